"""Turns a batch of logits into next tokens, with the same algorithm on every device.

Steps, in order (the batched math is forge.kernels.sampling):
  1. sanitize: NaN logits count as masked (-inf, never drawn), +inf as the largest float;
  2. logprobs, where asked: of the raw distribution (before penalties, temperature and filters),
     floored at LOGPROB_FLOOR as OpenAI does, so they are always finite;
  3. penalties: presence/frequency over the output tokens, repetition over all tokens (penalized
     logits stay finite and masked ones stay masked);
  4. temperature: each row is shifted by its maximum and divided by T, so the top token has logit 0
     for any accepted T; greedy rows (T < GREEDY_TEMPERATURE or top_k 1) take the argmax;
  5. filters: top-k, then top-p, then min-p, as one threshold per row (the top token always stays);
  6. the draw: Gumbel-max with noise keyed by (the sequence's stream key, its output position), so a
     request's tokens depend neither on the batch it ran in nor on the device. A verify step
     (forge.spec_decode) gives a sequence several rows, at output positions num_output_tokens + offset:
     each draws what plain decoding would draw there, given the same preceding tokens.
A row with no finite logit at all (every token masked) gives token 0. The device's draw (the CUDA
kernel, or torch on the CPU) is chosen once, when the sampler is built.
"""

from dataclasses import dataclass

import torch

from forge.kernels.sampling import draw_tokens, sanitize_logits, select_draw
from forge.sequence import Sequence


@dataclass
class SampleResult:
    token_id: int
    logprob: float | None = None  # of the chosen token, from the raw model distribution
    top_logprobs: list[tuple[int, float]] | None = None  # (token id, logprob), most likely first
    rank: int | None = None  # of the chosen token in the raw distribution (1 = most likely), as vLLM reports it


LOGPROB_FLOOR = -9999.0  # OpenAI's value for "practically impossible": masked tokens' logprobs stay finite (JSON)


def finite_logprobs(logprobs: torch.Tensor) -> torch.Tensor:
    """Floor at LOGPROB_FLOOR; NaN (a row with every token masked) counts as impossible too."""
    return torch.nan_to_num(logprobs, nan=LOGPROB_FLOOR).clamp_(min=LOGPROB_FLOOR)


def apply_penalties(logits: torch.Tensor, seq: Sequence) -> torch.Tensor:
    """OpenAI presence/frequency penalties over output tokens; HF repetition penalty over all tokens.
    Penalized logits are clamped to the finite float range, and masked (-inf) ones stay masked, so a
    penalty can neither unmask a token nor push every allowed token to -inf."""
    p = seq.params
    finite = torch.finfo(logits.dtype).max
    if p.repetition_penalty != 1.0:
        seen = torch.tensor(sorted(set(seq.token_ids)), dtype=torch.long, device=logits.device)
        vals = logits[seen]
        # (times the reciprocal: what CUDA computes for a division by a scalar, so every device agrees)
        penalized = torch.where(vals > 0, vals * (1.0 / p.repetition_penalty), vals * p.repetition_penalty)
        logits[seen] = torch.where(vals == float("-inf"), vals, penalized.clamp(-finite, finite))
    if (p.presence_penalty or p.frequency_penalty) and seq.num_output_tokens:
        ids, counts = torch.tensor(seq.output_token_ids, device=logits.device).unique(return_counts=True)
        vals = logits[ids]
        penalized = vals - (p.frequency_penalty * counts.to(logits.dtype) + p.presence_penalty)
        logits[ids] = torch.where(vals == float("-inf"), vals, penalized.clamp(-finite, finite))
    return logits


class PendingSample:
    """A batch's sampled tokens: `token_ids` on the logits' device (the next step's inputs can read
    them there) and, once `results()` is called, the per-row results on the host. On a GPU the
    host copies were queued behind the sampling (pinned, non-blocking): `results()` waits for
    this batch's copies only, not for work queued after them."""

    def __init__(self, token_ids: torch.Tensor, build, event=None):
        self.token_ids = token_ids
        self._build = build  # () -> list[SampleResult], reads the host copies
        self._event = event

    def results(self) -> list[SampleResult]:
        if self._event is not None:
            self._event.synchronize()
        return self._build()


class Sampler:
    def __init__(self, device: str | torch.device = "cpu"):
        self.device = torch.device(device)
        self.draw = select_draw(self.device)

    def __call__(self, logits: torch.Tensor, seqs: list[Sequence], offsets: list[int] | None = None) -> list[SampleResult]:
        return self.sample_async(logits, seqs, offsets).results()

    def sample_async(self, logits: torch.Tensor, seqs: list[Sequence], offsets: list[int] | None = None) -> PendingSample:
        """logits: [len(seqs), vocab] (already masked by any structured-output constraint). Only
        token ids and requested logprobs cross to the host, after the returned object is asked.
        offsets: per row, how many tokens past the sequence's last one it draws (a verify step's rows;
        None: 0 for every row). Rows with an offset never carry penalties (forge.spec_decode)."""
        params = [s.params for s in seqs]
        clean = sanitize_logits(logits)
        if all(p.greedy and p.logprobs is None and not p.has_penalties for p in params):
            token_ids = clean.argmax(dim=-1)  # the common greedy case: one op
            host, event = _to_host(token_ids)
            return PendingSample(token_ids, lambda: [SampleResult(t) for t in host[0].tolist()], event)
        want = any(p.logprobs is not None for p in params)
        logprobs = torch.log_softmax(clean, dim=-1) if want else None
        for i, seq in enumerate(seqs):
            if seq.params.has_penalties:
                apply_penalties(clean[i], seq)
        vocab = clean.shape[-1]  # (a top_k beyond the vocabulary keeps every token, and must fit int64)
        floats = self._to_device(torch.tensor([[0.0 if p.greedy else p.temperature, p.top_p, p.min_p] for p in params],
                                              dtype=torch.float64))
        offsets = offsets or [0] * len(seqs)
        ints = self._to_device(torch.tensor([[min(p.top_k, vocab), s.sampling_key, s.num_output_tokens + o]
                                             for p, s, o in zip(params, seqs, offsets)], dtype=torch.int64))
        # (how many tokens top-k / top-p can keep in any row: topk, not a full sort, finds them)
        widths = [p.top_k if 0 < p.top_k < vocab else vocab for p in params
                  if not p.greedy and (0 < p.top_k < vocab or p.top_p < 1.0)]
        token_ids = draw_tokens(
            clean, floats[:, 0], ints[:, 0], floats[:, 1], floats[:, 2], ints[:, 1], ints[:, 2], self.draw,
            use_top_k_p=bool(widths), use_min_p=any(not p.greedy and p.min_p > 0 for p in params),
            sort_width=max(widths, default=vocab),
        )
        if not want:
            host, event = _to_host(token_ids)
            return PendingSample(token_ids, lambda: [SampleResult(t) for t in host[0].tolist()], event)
        chosen_raw = logprobs.gather(1, token_ids[:, None])
        ranks = (logprobs > chosen_raw).sum(-1) + 1  # exact, also when the token is outside the top-n
        chosen = finite_logprobs(chosen_raw.squeeze(1))
        top = torch.topk(logprobs, min(max(p.logprobs or 0 for p in params), vocab), dim=-1)
        host, event = _to_host(token_ids, chosen, top.indices, finite_logprobs(top.values), ranks)

        def build() -> list[SampleResult]:
            ids, chosen_h, top_ids_h, top_lps_h, ranks_h = (t.tolist() for t in host)
            results = []
            for i, p in enumerate(params):
                r = SampleResult(ids[i])
                if p.logprobs is not None:
                    r.logprob, r.rank = chosen_h[i], ranks_h[i]
                    if p.logprobs > 0:
                        r.top_logprobs = list(zip(top_ids_h[i][: p.logprobs], top_lps_h[i][: p.logprobs]))
                results.append(r)
            return results

        return PendingSample(token_ids, build, event)

    def _to_device(self, host: torch.Tensor) -> torch.Tensor:
        if self.device.type != "cuda":
            return host
        return host.pin_memory().to(self.device, non_blocking=True)


def _to_host(*tensors: torch.Tensor) -> tuple[list[torch.Tensor], object]:
    """Queue copies of device tensors into pinned host memory; returns ([copies], event), or the
    tensors themselves and None when they already live on the host."""
    if tensors[0].device.type != "cuda":
        return list(tensors), None
    copies = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(t, non_blocking=True) for t in tensors]
    event = torch.cuda.Event()
    event.record()
    return copies, event
