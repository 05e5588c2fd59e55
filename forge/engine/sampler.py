"""Turns a batch of logits into next tokens: penalties, temperature, top-k/top-p/min-p, seeded draws.

This is the reference sampler used on the CPU. Each sampled row draws from its sequence's own
generator, so a request's output does not depend on what else is in the batch.
"""

from dataclasses import dataclass

import torch

from forge.sequence import Sequence


@dataclass
class SampleResult:
    token_id: int
    logprob: float | None = None  # of the chosen token, from the raw model distribution
    top_logprobs: list[tuple[int, float]] | None = None  # (token id, logprob), most likely first


def apply_penalties(logits: torch.Tensor, seq: Sequence) -> torch.Tensor:
    """OpenAI presence/frequency penalties over output tokens; HF repetition penalty over all tokens."""
    p = seq.params
    if p.repetition_penalty != 1.0:
        seen = torch.tensor(sorted(set(seq.token_ids)), dtype=torch.long, device=logits.device)
        vals = logits[seen]
        logits[seen] = torch.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
    if (p.presence_penalty or p.frequency_penalty) and seq.num_output_tokens:
        ids, counts = torch.tensor(seq.output_token_ids, device=logits.device).unique(return_counts=True)
        logits[ids] -= p.frequency_penalty * counts.to(logits.dtype) + p.presence_penalty
    return logits


def filter_logits(logits: torch.Tensor, top_k: int, top_p: float, min_p: float) -> torch.Tensor:
    """Mask (to -inf) every token outside top-k, outside the top-p nucleus, or under min_p * max prob."""
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = sorted_logits.softmax(-1)
        # Drop a token when the mass before it already reaches top_p (the top token always stays).
        drop = (probs.cumsum(-1) - probs) >= top_p
        logits = logits.clone()
        logits[order[drop]] = float("-inf")
    if min_p > 0.0:
        probs = logits.softmax(-1)
        logits = logits.masked_fill(probs < min_p * probs.max(), float("-inf"))
    return logits


class Sampler:
    def __call__(self, logits: torch.Tensor, seqs: list[Sequence]) -> list[SampleResult]:
        """logits: [len(seqs), vocab] float32 (already masked by any structured-output constraint)."""
        need_logprobs = any(s.params.logprobs is not None for s in seqs)
        raw_logprobs = torch.log_softmax(logits, dim=-1) if need_logprobs else None
        results = []
        for i, seq in enumerate(seqs):
            p = seq.params
            row = logits[i]
            if p.has_penalties:
                row = apply_penalties(row.clone(), seq)
            if p.greedy:
                token = int(torch.argmax(row))
            else:
                row = filter_logits(row / p.temperature, p.top_k, p.top_p, p.min_p)
                probs = torch.softmax(row, dim=-1)
                token = int(torch.multinomial(probs, 1, generator=seq.generator))
            result = SampleResult(token)
            if p.logprobs is not None:
                lp = raw_logprobs[i]
                result.logprob = float(lp[token])
                if p.logprobs > 0:
                    top = torch.topk(lp, p.logprobs)
                    result.top_logprobs = list(zip(top.indices.tolist(), top.values.tolist()))
            results.append(result)
        return results
