"""Sampling math, the same on every device: temperature, top-k / top-p / min-p, seeded draws, logprobs.

The random number behind row r's draw at token i is a pure function of (keys[r], positions[r], i):
u = U(splitmix64 stream of key(keys[r], positions[r]), element i) in (0, 1) (23 bits), so a request
samples the same token whatever else is in the batch, and on whatever device. The draw is
Gumbel-max: token = argmax_i x_i - logf(-logf(u_i)) over the kept tokens, an exact sample from
softmax(x) over them; ties go to the lower index. `sampling.cu` is the CUDA kernel and the ground
truth; `gumbel_argmax_torch` computes the same float32 values in torch (the integer hash exactly,
in int64 with wrap-around and masked right shifts; each log rounded to float32 as logf's result),
so equal logits give equal tokens on the CPU and the GPU. Which of the two runs is chosen once, by
`select_draw(device)` (the engine's Sampler calls it at construction).

Filters (one value threshold per row, on the temperature-scaled logits x): top-k keeps the k largest
values, then top-p keeps, in descending order, each token while the mass before it (softmax over the
top-k set, in float64) is below top_p, then min-p keeps x >= max(x) + log(min_p) (probability >=
min_p times the top one). A cut keeps every token tied with the last one kept; the top token
always stays. top_k 0 (or >= vocab), top_p 1 and min_p 0 turn a filter off.

Logprobs are those of the raw model distribution (log_softmax of the unscaled, unfiltered logits),
like vLLM.

No input makes a row draw from NaN: NaN logits count as masked (-inf), +inf as the largest float,
and each row is shifted by its maximum before it is divided by the temperature, so the top token
sits at 0 (finite for any temperature) and every filter keeps it. A row with every token masked
gives token 0. Temperatures that round to 0 in float32 (or NaN) are greedy; +inf is the largest float.
"""

from __future__ import annotations

import functools
import secrets

import torch

from forge.kernels import compiler

FLT_MAX = torch.finfo(torch.float32).max
_GOLDEN = 0x9E3779B97F4A7C15
_M1 = 0xBF58476D1CE4E5B9
_M2 = 0x94D049BB133111EB
_MASK64 = (1 << 64) - 1
# Gumbel scores are x - c with c = logf(-logf(u)) in [-16.6356, 2.8116] for the 2^23 values of u: a
# token with x < -19.5 scores below the top token (x = 0) whatever the draws, so it can be skipped.
_NEVER_WINS = -19.5


# -- the hash ---------------------------------------------------------------------------------------
def splitmix64_int(z: int) -> int:
    """splitmix64 on a Python int (taken modulo 2^64)."""
    z = (z + _GOLDEN) & _MASK64
    z = ((z ^ (z >> 30)) * _M1) & _MASK64
    z = ((z ^ (z >> 27)) * _M2) & _MASK64
    return z ^ (z >> 31)


def stream_key(seed: int | None, index: int = 0) -> int:
    """The key of one completion's random stream, as the int64 with its bits: splitmix64 of the
    request's seed, then mixed with the completion's index, so that completion i of seed s never
    shares a stream with completion j of seed t (with seed + i, completion 1 of seed s would be
    completion 0 of seed s + 1). Without a seed, a random key."""
    key = secrets.randbits(64) if seed is None else splitmix64_int(splitmix64_int(seed & _MASK64) ^ index)
    return key - (1 << 64) if key >> 63 else key


def _s64(c: int) -> int:
    """A uint64 constant as the int64 with the same bits."""
    return c - (1 << 64) if c >= 1 << 63 else c


def splitmix64(z: torch.Tensor) -> torch.Tensor:
    """splitmix64 on int64 tensors (wrapping arithmetic, same bits as the CUDA version)."""
    return _splitmix64_(z + _s64(_GOLDEN))


def _splitmix64_(z: torch.Tensor) -> torch.Tensor:
    """splitmix64 of (z - golden), in place: z is a fresh int64 tensor that already had the
    golden ratio added (in place, so a [B, V] hash allocates one temporary)."""
    t = torch.empty_like(z)
    for shift, mul in ((30, _M1), (27, _M2), (31, None)):
        torch.bitwise_right_shift(z, shift, out=t)
        z.bitwise_xor_(t.bitwise_and_((1 << (64 - shift)) - 1))  # z ^= z >>> shift
        if mul is not None:
            z.mul_(_s64(mul))
    return z


def draw_bits(keys: torch.Tensor, positions: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """The 23 random bits of element (rows[j], cols[j]): splitmix64(key + col * golden) >> 41, with
    key = splitmix64(keys[row] ^ splitmix64(positions[row])), as in sampling.cu."""
    row_key = splitmix64(keys.to(torch.int64) ^ splitmix64(positions.to(torch.int64)))
    h = _splitmix64_((cols + 1) * _s64(_GOLDEN) + row_key[rows])  # (key + col * golden) + golden
    return torch.bitwise_right_shift(h, 41, out=h).bitwise_and_((1 << 23) - 1)


def _uniform(bits: torch.Tensor) -> torch.Tensor:
    """u in (0, 1) of 23 random bits: the kernel's float32 value, exactly (in float64)."""
    return bits.to(torch.float64).add_(0.5).mul_(1.0 / 8388608.0)


def gumbel_offsets(bits: torch.Tensor) -> torch.Tensor:
    """c = logf(-logf(u)) in float32 (the draw scores x - c): each log is taken in float64 and
    rounded to float32, i.e. the correctly rounded value logf gives (up to its last bit)."""
    inner = _uniform(bits).log_().float()
    return inner.neg_().double().log_().float()


# -- filters ----------------------------------------------------------------------------------------
def filter_thresholds(
    x: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    min_p: torch.Tensor,
    use_top_k_p: bool = True,
    use_min_p: bool = True,
    sort_width: int | None = None,
) -> torch.Tensor:
    """Per-row float32 threshold on the temperature-scaled logits x [B, V]: keep x >= threshold.

    sort_width: a host-side bound on the tokens top-k / top-p can keep in any row (the largest
    top_k, when every row that filters has one): the top values are then found by topk instead
    of sorting whole rows (the same thresholds). None: sort whole rows."""
    b, v = x.shape
    thr = torch.full((b,), float("-inf"), dtype=torch.float32, device=x.device)
    if use_top_k_p:
        width = v if sort_width is None else max(1, min(sort_width, v))
        if width < v:
            sorted_x = torch.topk(x, width, dim=-1).values
        else:
            sorted_x = torch.sort(x, dim=-1, descending=True).values
        k = torch.where(top_k > 0, top_k.to(torch.int64).clamp(max=width), torch.full_like(top_k, width, dtype=torch.int64))
        in_k = torch.arange(width, device=x.device)[None, :] < k[:, None]
        # float64 mass: the cut only moves where a sum is within ~1e-16 of top_p (float32: ~1e-7)
        probs = torch.softmax(sorted_x.double().masked_fill(~in_k, float("-inf")), dim=-1)
        before = probs.cumsum(-1) - probs
        top_p = top_p.to(torch.float64)
        keep = in_k & ((before < top_p[:, None]) | (top_p[:, None] >= 1.0))
        keep[:, 0] = True
        thr = sorted_x.gather(1, (keep.sum(-1) - 1)[:, None]).squeeze(1)
        filtering = ((top_k > 0) & (top_k < v)) | (top_p < 1.0)
        thr = torch.where(filtering, thr, float("-inf"))  # (a row that does not filter keeps every token)
    if use_min_p:
        mp = min_p.to(torch.float64)
        xmax = x.amax(dim=-1).double()
        cut = torch.where(mp > 0, xmax + torch.log(mp.clamp_min(5e-324)), torch.full_like(xmax, float("-inf")))
        thr = torch.maximum(thr, cut.float())
    return thr


def sanitize_logits(logits: torch.Tensor) -> torch.Tensor:
    """NaN -> -inf (never drawn), +inf -> the largest float32, -inf (masked) stays: float32."""
    return torch.nan_to_num(logits.float(), nan=float("-inf"), posinf=FLT_MAX, neginf=float("-inf"))


def scale_logits(clean: torch.Tensor, temperature: torch.Tensor, sampled: torch.Tensor) -> torch.Tensor:
    """x = (clean - row max) / T for sampled rows and clean - row max for greedy ones (same argmax),
    from sanitized logits. x <= 0 with the top token at 0, so no temperature overflows it, and
    softmax over x never sees inf - inf."""
    top = clean.amax(dim=-1, keepdim=True)
    top = torch.where(top == float("-inf"), torch.zeros_like(top), top)  # every token masked: nothing to shift
    t = torch.where(sampled, temperature, torch.ones_like(temperature))
    return (clean - top) / t[:, None]


# -- the draw ---------------------------------------------------------------------------------------
def gumbel_argmax_torch(x, mode, threshold, keys, positions, with_scores: bool = False, prune: bool = True):
    """Token per row, as sampling.cu computes it: greedy rows (mode 0) take argmax x; sampled rows
    (mode 1) argmax of x - c over x >= threshold. with_scores: also the winning scores (float32).

    prune: count on the host the tokens that can win (kept, x >= -19.5) and hash only those when
    they are few, else only the sampled rows (exact either way; without it, no host sync)."""
    b, v = x.shape
    sampled = mode > 0
    keep = sampled[:, None] & (x >= threshold[:, None])
    ids = x.argmax(dim=-1)  # greedy rows; also sampled rows with every token masked (token 0, as in the kernel)
    scores = x.gather(1, ids[:, None]).squeeze(1)
    if prune:
        can_win = keep & (x >= _NEVER_WINS)
        if int(can_win.sum()) * 8 < can_win.numel():  # peaked or filtered rows: few hashes
            rows, cols = can_win.nonzero(as_tuple=True)
            s = x[rows, cols] - gumbel_offsets(draw_bits(keys, positions, rows, cols))
            best = torch.full((b,), float("-inf"), device=x.device).scatter_reduce(0, rows, s, "amax")
            first = torch.full((b,), v, device=x.device).scatter_reduce(0, rows, torch.where(s == best[rows], cols, v), "amin")
            won = first < v
            ids, scores = torch.where(won, first, ids), torch.where(won, best, scores)
            return (ids, scores) if with_scores else ids
        rows = sampled.nonzero().squeeze(1)
    else:
        rows = torch.arange(b, device=x.device)
    cols = torch.arange(v, device=x.device)
    s = x[rows] - gumbel_offsets(draw_bits(keys, positions, rows[:, None], cols[None, :]))
    s.masked_fill_(~keep[rows], float("-inf"))
    won = sampled[rows]
    ids[rows] = torch.where(won, s.argmax(dim=-1), ids[rows])
    scores[rows] = torch.where(won, s.amax(dim=-1), scores[rows])
    return (ids, scores) if with_scores else ids


def gumbel_argmax_cuda(x, mode, threshold, keys, positions, with_scores: bool = False):
    """The same draw with sampling.cu: one launch for the batch, no host sync."""
    import numpy as np

    b, v = x.shape
    threads = 256
    # enough blocks to fill the GPU (about 4 per SM), each scanning at least 8 elements a thread
    chunks = max(1, min(-(-v // (threads * 8)), -(-4 * compiler.num_sms() // max(b, 1))))
    chunk_len = -(-v // chunks)
    best = torch.zeros(b, dtype=torch.int64, device=x.device)
    kernel = compiler.get_kernel("sampling.cu", "gumbel_sample_kernel", None)
    compiler.run(
        kernel, (b, chunks), threads,
        compiler.ptr(best), compiler.ptr(x), np.int64(x.stride(0)), np.int32(v), np.int32(chunk_len),
        compiler.ptr(mode), compiler.ptr(threshold), compiler.ptr(keys), compiler.ptr(positions),
    )
    # low 32 bits: 0xFFFFFFFF - index; high 32: the score's order-preserving bits (see sampling.cu)
    ids = (0xFFFFFFFF - (best & 0xFFFFFFFF)).clamp_(0, v - 1)
    if not with_scores:
        return ids
    key = (best >> 32) & 0xFFFFFFFF
    bits = torch.where(key >= 0x80000000, key & 0x7FFFFFFF, ~key & 0xFFFFFFFF)
    bits = torch.where(bits >= 1 << 31, bits - (1 << 32), bits)
    return ids, bits.to(torch.int32).view(torch.float32)


def select_draw(device: torch.device | str):
    """The draw for tensors on `device`: the CUDA kernel, or torch (pruned on the CPU; without a
    sync where the kernels are unavailable on a GPU, so that it stays graph-capturable)."""
    device = torch.device(device)
    if device.type == "cuda":
        return gumbel_argmax_cuda if compiler.available() else functools.partial(gumbel_argmax_torch, prune=False)
    return gumbel_argmax_torch


def draw_tokens(clean, temperature, top_k, top_p, min_p, keys, positions, draw, *, use_top_k_p, use_min_p,
                sort_width=None):
    """Token per row from sanitized logits (sanitize_logits, then any penalties): scale, filter,
    draw. temperature [B] (<= 0: greedy), taken in float32; top_k int64; top_p/min_p float64;
    sort_width: see filter_thresholds."""
    temperature = temperature.to(torch.float32).nan_to_num(nan=0.0, posinf=FLT_MAX)
    sampled = temperature > 0
    x = scale_logits(clean, temperature, sampled)
    if use_top_k_p or use_min_p:
        threshold = filter_thresholds(x, top_k, top_p, min_p, use_top_k_p, use_min_p, sort_width)
    else:
        threshold = torch.full((x.shape[0],), float("-inf"), dtype=torch.float32, device=x.device)
    # x is already scaled: the draw divides by 1 (sampled rows) or takes the argmax (0 = greedy rows)
    return draw(x, sampled.float().contiguous(), threshold.contiguous(), keys.contiguous(), positions.contiguous())


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
    draw=None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sample one token per row.

    logits [B, V] float32; temperature/top_p/min_p [B] float; top_k [B] int (0 = off);
    seeds [B] int64: each row's stream key (Sequence.sampling_key); steps [B] int64: the position
    being sampled (the row's output token index). Returns (token_ids [B] int64, chosen_logprob [B],
    top_ids [B, n] int64, top_logprobs [B, n]) with n = num_logprobs.
    `use_top_k_p` / `use_min_p`: host-side hints that some row uses the filter (None: checked on
    the device, which synchronizes); passing them keeps the call sync-free on a GPU.
    draw: select_draw(device)'s function (None: chosen here for the logits' device).
    """
    logits = logits.float()
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    b, v = logits.shape
    dev = logits.device
    temperature = temperature.to(device=dev, dtype=torch.float32).nan_to_num(nan=0.0, posinf=FLT_MAX)  # (hints)
    top_k = top_k.to(device=dev, dtype=torch.int64)
    top_p = top_p.to(device=dev, dtype=torch.float64)
    min_p = min_p.to(device=dev, dtype=torch.float64)
    sampled = temperature > 0
    if use_top_k_p is None:
        use_top_k_p = bool((sampled & (((top_k > 0) & (top_k < v)) | (top_p < 1.0))).any())
    if use_min_p is None:
        use_min_p = bool((sampled & (min_p > 0)).any())
    clean = sanitize_logits(logits)
    token_ids = draw_tokens(clean, temperature, top_k, top_p, min_p, seeds.to(device=dev, dtype=torch.int64),
                            steps.to(device=dev, dtype=torch.int64), draw or select_draw(dev),
                            use_top_k_p=use_top_k_p, use_min_p=use_min_p)
    logprobs = torch.log_softmax(clean, dim=-1)
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
