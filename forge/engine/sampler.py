"""Turns a batch of logits into next tokens: penalties, temperature, top-k/top-p/min-p, seeded draws.

This is the reference sampler used on the CPU. Each sampled row draws from its sequence's own
generator, so a request's output does not depend on what else is in the batch.

No accepted SamplingParams can make it draw from NaN/inf probabilities: NaN logits count as masked
(-inf) and +inf as the largest float; penalties keep logits finite (masked ones stay masked); a row is
shifted by its maximum and scaled in float64, so the top token has logit 0 and survives every filter.
A row with no finite logit at all (every token masked) falls back to argmax. Logprobs are floored at
LOGPROB_FLOOR, as OpenAI does, so they are always finite.
"""

from dataclasses import dataclass

import torch

from forge.sequence import Sequence


@dataclass
class SampleResult:
    token_id: int
    logprob: float | None = None  # of the chosen token, from the raw model distribution
    top_logprobs: list[tuple[int, float]] | None = None  # (token id, logprob), most likely first


LOGPROB_FLOOR = -9999.0  # OpenAI's value for "practically impossible": masked tokens' logprobs stay finite (JSON)


def finite_logprobs(logprobs: torch.Tensor) -> torch.Tensor:
    """Floor at LOGPROB_FLOOR; NaN (a row with every token masked) counts as impossible too."""
    return torch.nan_to_num(logprobs, nan=LOGPROB_FLOOR).clamp_(min=LOGPROB_FLOOR)


def sanitize_logits(logits: torch.Tensor) -> torch.Tensor:
    """NaN -> -inf (never drawn), +inf -> the largest float32, -inf (masked) stays: float32."""
    return torch.nan_to_num(logits.float(), nan=float("-inf"), posinf=torch.finfo(torch.float32).max,
                            neginf=float("-inf"))


def apply_penalties(logits: torch.Tensor, seq: Sequence) -> torch.Tensor:
    """OpenAI presence/frequency penalties over output tokens; HF repetition penalty over all tokens.
    Penalized logits are clamped to the finite float range, and masked (-inf) ones stay masked, so a
    penalty can neither unmask a token nor push every allowed token to -inf."""
    p = seq.params
    finite = torch.finfo(logits.dtype).max
    if p.repetition_penalty != 1.0:
        seen = torch.tensor(sorted(set(seq.token_ids)), dtype=torch.long, device=logits.device)
        vals = logits[seen]
        penalized = torch.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
        logits[seen] = torch.where(vals == float("-inf"), vals, penalized.clamp(-finite, finite))
    if (p.presence_penalty or p.frequency_penalty) and seq.num_output_tokens:
        ids, counts = torch.tensor(seq.output_token_ids, device=logits.device).unique(return_counts=True)
        vals = logits[ids]
        penalized = vals - (p.frequency_penalty * counts.to(logits.dtype) + p.presence_penalty)
        logits[ids] = torch.where(vals == float("-inf"), vals, penalized.clamp(-finite, finite))
    return logits


def filter_logits(logits: torch.Tensor, top_k: int, top_p: float, min_p: float) -> torch.Tensor:
    """Mask (to -inf) every token outside top-k, outside the top-p nucleus, or under min_p * max prob.
    The most likely token always stays."""
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = sorted_logits.softmax(-1)
        # Drop a token when the mass before it already reaches top_p.
        drop = (probs.cumsum(-1) - probs) >= top_p
        drop[0] = False
        logits = logits.clone()
        logits[order[drop]] = float("-inf")
    if min_p > 0.0:
        probs = logits.softmax(-1)
        logits = logits.masked_fill(probs < min_p * probs.max(), float("-inf"))
    return logits


def draw(row: torch.Tensor, params, generator: torch.Generator | None) -> int:
    """One seeded draw from softmax(row / temperature) after the filters. The row is shifted by its
    maximum and scaled in float64 (any finite float32 logit / any temperature >= GREEDY_TEMPERATURE
    stays finite there), so the top token has logit 0 and probability >= 1 / vocab."""
    x = row.double()
    top = x.max()
    if top == float("-inf"):  # nothing left to draw from: every token is masked
        return int(torch.argmax(row))
    x = filter_logits((x - top) / params.temperature, params.top_k, params.top_p, params.min_p)
    return int(torch.multinomial(torch.softmax(x, dim=-1), 1, generator=generator))


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
    def sample_async(self, logits: torch.Tensor, seqs: list[Sequence]) -> PendingSample:
        """The CPU sampler has nothing to overlap: it samples now."""
        results = self(logits, seqs)
        return PendingSample(torch.tensor([r.token_id for r in results], dtype=torch.long), lambda: results)

    def __call__(self, logits: torch.Tensor, seqs: list[Sequence]) -> list[SampleResult]:
        """logits: [len(seqs), vocab] float32 (already masked by any structured-output constraint)."""
        logits = sanitize_logits(logits)
        need_logprobs = any(s.params.logprobs is not None for s in seqs)
        raw_logprobs = finite_logprobs(torch.log_softmax(logits, dim=-1)) if need_logprobs else None
        results = []
        for i, seq in enumerate(seqs):
            p = seq.params
            row = logits[i]
            if p.has_penalties:
                row = apply_penalties(row.clone(), seq)
            token = int(torch.argmax(row)) if p.greedy else draw(row, p, seq.generator)
            result = SampleResult(token)
            if p.logprobs is not None:
                lp = raw_logprobs[i]
                result.logprob = float(lp[token])
                if p.logprobs > 0:
                    top = torch.topk(lp, p.logprobs)
                    result.top_logprobs = list(zip(top.indices.tolist(), top.values.tolist()))
            results.append(result)
        return results


class DeviceSampler:
    """Batched sampling on the GPU (forge.kernels.sampling): one launch for the whole batch.

    The random draw of a row is a pure function of (request seed, output position), so a request's
    tokens do not depend on the batch it ran in. Only token ids and requested logprobs cross to
    the host.
    """

    def __call__(self, logits: torch.Tensor, seqs: list[Sequence]) -> list[SampleResult]:
        return self.sample_async(logits, seqs).results()

    def sample_async(self, logits: torch.Tensor, seqs: list[Sequence]) -> PendingSample:
        from forge.kernels.sampling import sample

        device = logits.device
        params = [s.params for s in seqs]
        if all(p.greedy and p.logprobs is None and not p.has_penalties for p in params):
            token_ids = logits.argmax(dim=-1)  # the common greedy case: one op
            host, event = _to_host(token_ids)
            return PendingSample(token_ids, lambda: [SampleResult(t) for t in host[0].tolist()], event)
        penalized = [i for i, s in enumerate(seqs) if s.params.has_penalties]
        if penalized:
            logits = logits.clone()
            for i in penalized:
                apply_penalties(logits[i], seqs[i])
        host = torch.tensor(
            [[0.0 if p.greedy else p.temperature, p.top_p, p.min_p] for p in params], dtype=torch.float32
        )
        vocab = logits.shape[-1]  # (a top_k beyond the vocabulary keeps every token, and must fit int64)
        ints = torch.tensor([[min(p.top_k, vocab), s.sampling_seed, s.num_output_tokens] for p, s in zip(params, seqs)],
                            dtype=torch.int64)
        host, ints = host.pin_memory().to(device, non_blocking=True), ints.pin_memory().to(device, non_blocking=True)
        num_logprobs = max((p.logprobs or 0) for p in params)
        token_ids, chosen, top_ids, top_lps = sample(
            logits, host[:, 0], ints[:, 0], host[:, 1], host[:, 2], ints[:, 1], ints[:, 2], num_logprobs,
            use_top_k_p=any(not p.greedy and (p.top_k > 0 or p.top_p < 1.0) for p in params),
            use_min_p=any(not p.greedy and p.min_p > 0 for p in params),
        )
        want = any(p.logprobs is not None for p in params)
        if want:
            chosen, top_lps = finite_logprobs(chosen), finite_logprobs(top_lps)
        host, event = _to_host(token_ids, *((chosen, top_ids, top_lps) if want else ()))

        def build() -> list[SampleResult]:
            ids = host[0].tolist()
            if want:
                chosen_h, top_ids_h, top_lps_h = (t.tolist() for t in host[1:])
            results = []
            for i, p in enumerate(params):
                r = SampleResult(ids[i])
                if p.logprobs is not None:
                    r.logprob = chosen_h[i]
                    if p.logprobs > 0:
                        r.top_logprobs = list(zip(top_ids_h[i][: p.logprobs], top_lps_h[i][: p.logprobs]))
                results.append(r)
            return results

        return PendingSample(token_ids, build, event)


def _to_host(*tensors: torch.Tensor) -> tuple[list[torch.Tensor], object]:
    """Queue copies of device tensors into pinned host memory; returns ([copies], event), or the
    tensors themselves and None when they already live on the host."""
    if tensors[0].device.type != "cuda":
        return list(tensors), None
    copies = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(t, non_blocking=True) for t in tensors]
    event = torch.cuda.Event()
    event.record()
    return copies, event
