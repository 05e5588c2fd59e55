"""GPU sampling: temperature, top-k / top-p / min-p, seeded draws and raw logprobs for a batch.

`sample` is batch-invariant per row: the random number behind row r's draw is a pure function
of (seeds[r], steps[r], token index) (a splitmix64 stream), so a request samples the same token
whatever else is in the batch. The draw is Gumbel-max (argmax of x + Gumbel noise), which is an
exact sample from softmax(x) over the kept tokens. Filters follow forge.engine.sampler: top-k,
then top-p over the top-k set (a token is dropped when the mass before it already reaches
top_p; the top token always stays), then min-p relative to the most likely token. They are
turned into one value threshold per row, so the kernel (sampling.cu) masks, scales, adds noise
and takes the argmax in one pass over the logits.

On CPU tensors (or without cuda.core) the same hash and draw run in plain torch.
Logprobs are those of the raw model distribution (log_softmax of the unscaled, unmasked
logits), like vLLM.

No input makes a row draw from NaN: NaN logits count as masked (-inf), +inf as the largest float,
and each row is shifted by its maximum before it is divided by the temperature, so the top token
sits at 0 (finite for any temperature) and every filter keeps it. A row with every token masked
gives token 0. Temperatures that round to 0 in float32 (or NaN) are greedy; +inf is the largest float.
"""

from __future__ import annotations

import torch

from forge.kernels import compiler

FLT_MAX = torch.finfo(torch.float32).max
_GOLDEN = 0x9E3779B97F4A7C15
_M1 = 0xBF58476D1CE4E5B9
_M2 = 0x94D049BB133111EB


def _s64(c: int) -> int:
    """A uint64 constant as the int64 with the same bits."""
    return c - (1 << 64) if c >= 1 << 63 else c


def _srl(z: torch.Tensor, k: int) -> torch.Tensor:
    """Logical right shift of int64 bits."""
    return (z >> k) & ((1 << (64 - k)) - 1)


def _splitmix64(z: torch.Tensor) -> torch.Tensor:
    """splitmix64 on int64 tensors (wrapping arithmetic, same bits as the CUDA version)."""
    z = z + _s64(_GOLDEN)
    z = (z ^ _srl(z, 30)) * _s64(_M1)
    z = (z ^ _srl(z, 27)) * _s64(_M2)
    return z ^ _srl(z, 31)


def uniform_noise(seeds: torch.Tensor, steps: torch.Tensor, vocab: int) -> torch.Tensor:
    """[B, vocab] float64 uniforms in (0, 1): u[r, i] depends only on (seeds[r], steps[r], i)."""
    seeds = seeds.to(torch.int64)
    steps = steps.to(torch.int64)
    key = _splitmix64(seeds ^ _splitmix64(steps))
    idx = torch.arange(vocab, device=seeds.device, dtype=torch.int64) * _s64(_GOLDEN)
    h = _splitmix64(key[:, None] + idx[None, :])
    return (_srl(h, 41).to(torch.float64) + 0.5) * (1.0 / 8388608.0)


def filter_thresholds(
    x: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    min_p: torch.Tensor,
    use_top_k_p: bool = True,
    use_min_p: bool = True,
) -> torch.Tensor:
    """Per-row value threshold on the temperature-scaled logits x [B, V]: keep x >= threshold."""
    b, v = x.shape
    thr = torch.full((b,), float("-inf"), dtype=x.dtype, device=x.device)
    if use_top_k_p:
        sorted_x = torch.sort(x, dim=-1, descending=True).values
        k = torch.where(top_k > 0, top_k.to(torch.int64).clamp(max=v), torch.full_like(top_k, v, dtype=torch.int64))
        ar = torch.arange(v, device=x.device)
        in_k = ar[None, :] < k[:, None]
        probs = torch.softmax(sorted_x.masked_fill(~in_k, float("-inf")), dim=-1)
        before = probs.cumsum(-1) - probs
        keep = in_k & (before < top_p.to(x.dtype)[:, None])
        keep[:, 0] = True
        count = keep.sum(-1)
        thr = sorted_x.gather(1, (count - 1)[:, None]).squeeze(1)
    if use_min_p:
        mp = min_p.to(x.dtype)
        xmax = x.max(dim=-1).values
        cut = torch.where(mp > 0, xmax + torch.log(mp.clamp_min(1e-30)), torch.full_like(xmax, float("-inf")))
        thr = torch.maximum(thr, cut)
    return thr


def scaled_logits(logits: torch.Tensor, temperature: torch.Tensor, sampled: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(clean, x): clean = logits with NaN -> -inf and +inf -> FLT_MAX; x = (clean - row max) / T
    for sampled rows and clean - row max for greedy ones (same argmax). x <= 0 with the top token at 0,
    so no temperature overflows it, and softmax over x never sees inf - inf."""
    clean = torch.nan_to_num(logits, nan=float("-inf"), posinf=FLT_MAX, neginf=float("-inf"))
    top = clean.amax(dim=-1, keepdim=True)
    top = torch.where(top == float("-inf"), torch.zeros_like(top), top)  # every token masked: nothing to shift
    t = torch.where(sampled, temperature, torch.ones_like(temperature))
    return clean, (clean - top) / t[:, None]


def _draw_torch(logits, temperature, threshold, seeds, steps) -> torch.Tensor:
    greedy = ~(temperature > 0)
    t = torch.where(greedy, torch.ones_like(temperature), temperature)
    x = logits / t[:, None]
    u = uniform_noise(seeds, steps, logits.shape[1])
    scores = x.double() - torch.log(-torch.log(u))
    scores = scores.masked_fill(~(x >= threshold[:, None]), float("-inf"))
    return torch.where(greedy, logits.argmax(-1), scores.argmax(-1))


def _draw_cuda(logits, temperature, threshold, seeds, steps) -> torch.Tensor:
    import numpy as np

    b, v = logits.shape
    threads = 256
    # enough blocks to fill the GPU (about 4 per SM), each scanning at least 8 elements a thread
    chunks = max(1, min(-(-v // (threads * 8)), -(-4 * compiler.num_sms() // max(b, 1))))
    chunk_len = -(-v // chunks)
    best = torch.zeros(b, dtype=torch.int64, device=logits.device)
    kernel = compiler.get_kernel("sampling.cu", "gumbel_sample_kernel", None)
    compiler.run(
        kernel, (b, chunks), threads,
        compiler.ptr(best), compiler.ptr(logits), np.int64(logits.stride(0)), np.int32(v), np.int32(chunk_len),
        compiler.ptr(temperature), compiler.ptr(threshold), compiler.ptr(seeds), compiler.ptr(steps),
    )
    # low 32 bits hold 0xFFFFFFFF - index (see sampling.cu)
    return (0xFFFFFFFF - (best & 0xFFFFFFFF)).clamp_(0, v - 1)


def sample(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    min_p: torch.Tensor,
    seeds: torch.Tensor,
    steps: torch.Tensor,
    num_logprobs: int = 0,
    *,
    use_top_k_p: bool | None = None,
    use_min_p: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sample one token per row.

    logits [B, V] float32; temperature/top_p/min_p [B] float; top_k [B] int (0 = off);
    seeds/steps [B] int64. Returns (token_ids [B] int64, chosen_logprob [B],
    top_ids [B, n] int64, top_logprobs [B, n]) with n = num_logprobs.
    `use_top_k_p` / `use_min_p`: host-side hints that some row uses the filter (None: checked on
    the device, which synchronizes); passing them keeps the call sync-free.
    """
    logits = logits.float()
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    b, v = logits.shape
    dev = logits.device
    temperature = temperature.to(device=dev, dtype=torch.float32).nan_to_num(nan=0.0, posinf=FLT_MAX).contiguous()
    top_k = top_k.to(device=dev, dtype=torch.int64)
    top_p = top_p.to(device=dev, dtype=torch.float32)
    min_p = min_p.to(device=dev, dtype=torch.float32)
    seeds = seeds.to(device=dev, dtype=torch.int64).contiguous()
    steps = steps.to(device=dev, dtype=torch.int64).contiguous()
    sampled = temperature > 0
    if use_top_k_p is None:
        use_top_k_p = bool((sampled & (((top_k > 0) & (top_k < v)) | (top_p < 1.0))).any())
    if use_min_p is None:
        use_min_p = bool((sampled & (min_p > 0)).any())
    logits, x = scaled_logits(logits, temperature, sampled)
    if use_top_k_p or use_min_p:
        threshold = filter_thresholds(x, top_k, top_p, min_p, use_top_k_p, use_min_p)
    else:
        threshold = torch.full((b,), float("-inf"), dtype=torch.float32, device=dev)
    threshold = threshold.float().contiguous()
    # x is already scaled: the draw divides by 1 (sampled rows) or takes the argmax (0 = greedy rows)
    mode = sampled.float().contiguous()
    if logits.is_cuda and compiler.available():
        token_ids = _draw_cuda(x, mode, threshold, seeds, steps)
    else:
        token_ids = _draw_torch(x, mode, threshold, seeds, steps)
    logprobs = torch.log_softmax(logits, dim=-1)
    chosen = logprobs.gather(1, token_ids[:, None]).squeeze(1)
    if num_logprobs > 0:
        top = torch.topk(logprobs, min(num_logprobs, v), dim=-1)
        top_ids, top_lps = top.indices, top.values
    else:
        top_ids = torch.empty(b, 0, dtype=torch.int64, device=dev)
        top_lps = torch.empty(b, 0, dtype=logprobs.dtype, device=dev)
    return token_ids, chosen, top_ids, top_lps


def top_k_candidates(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k most likely tokens of each row and their probabilities: ([B, k] int64, [B, k] float32)."""
    probs = torch.softmax(logits.float(), dim=-1)
    vals, ids = torch.topk(probs, min(k, probs.shape[-1]), dim=-1)
    return ids, vals
