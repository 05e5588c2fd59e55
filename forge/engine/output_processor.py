"""Output processing: what happens to a sampled token once it is on the host, and what a request
returns.

`add_token` is the one place a token joins its sequence: timing, its logprob entry, its grammar,
then `check_stop`. Logprob entries (sampled and prompt tokens alike) are built by `logprob_entry`.
`make_output` turns a request into its `RequestOutput`; text is detokenized only when it is read
(streaming, stop strings, the final output).
"""

from __future__ import annotations

import time
from collections.abc import Collection
from typing import NamedTuple

import torch

from forge.engine.sampler import SampleResult
from forge.outputs import CompletionOutput, Logprob, RequestMetrics, RequestOutput, VocabLogprobs
from forge.sequence import Request, Sequence


class Stop(NamedTuple):
    reason: str  # "stop" | "length" (CompletionOutput.finish_reason)
    stop_reason: int | str | None = None  # the stop token id or stop string
    text_cut: int | None = None  # a stop string: how much of the output text is kept


def check_stop(seq: Sequence, max_model_len: int, eos_token_ids: Collection[int], text: str | None = None,
               searched: int = 0) -> Stop | None:
    """Whether `seq` ends with its newest token, and why; None if it goes on. Reads, never changes.

    In order: a stop token id or EOS (once min_tokens are out), the grammar's end, a stop string
    (`text`: the output text, given when the request has stop strings; `searched`: its length before
    this token, so only the new tail is searched), max_tokens, then the context length."""
    p = seq.params
    token = seq.token_ids[-1]
    enough = seq.num_output_tokens >= p.min_tokens
    if enough and (token in p.stop_token_ids or (not p.ignore_eos and token in eos_token_ids)):
        return Stop("stop", token)
    if seq.structured is not None and seq.structured.is_terminated():
        return Stop("stop")
    if enough and text is not None and p.stop:
        start = max(0, searched - max(map(len, p.stop)) + 1)  # a stop string may straddle the old tail
        for stop in p.stop:
            idx = text.find(stop, start)
            if idx != -1:
                return Stop("stop", stop, idx + len(stop) if p.include_stop_str_in_output else idx)
    if (p.max_tokens is not None and seq.num_output_tokens >= p.max_tokens) or seq.num_tokens >= max_model_len:
        return Stop("length")
    return None


class OutputProcessor:
    def __init__(self, tokenizer, vocab_size: int, max_model_len: int, eos_token_ids: Collection[int]):
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.max_model_len = max_model_len
        self.eos_token_ids = eos_token_ids

    # -- per token ---------------------------------------------------------------------------------
    def add_token(self, seq: Sequence, result: SampleResult, now: float) -> Stop | None:
        """Append a sampled token to `seq` with its logprobs, hand it to the grammar, and say
        whether the sequence stops here."""
        token = result.token_id
        seq.token_ids.append(token)
        if seq.first_token_time is None:
            seq.first_token_time = now
        seq.last_token_time = now
        if result.logprob is not None:
            seq.cumulative_logprob += result.logprob
            top = result.top_logprobs or []
            rank = result.rank if result.rank is not None else \
                next((r for r, (t, _) in enumerate(top, start=1) if t == token), -1)  # -1: unknown
            seq.output_logprobs.append(self.logprob_entry(token, result.logprob, rank, top, seq.params.logprobs))
        searched = len(seq.detokenizer.text) if seq.params.stop else 0  # (text of the tokens before this one)
        if seq.structured is not None:
            seq.structured.push(token)  # the grammar advances during the next step's forward pass
        elif seq.reasoning_gate is not None and seq.reasoning_gate.opens(seq.sync_text()):
            seq.structured, seq.reasoning_gate = seq.reasoning_gate.matcher, None  # constrains the next token
        # Stop strings need the text now; otherwise it is decoded when read.
        text = seq.sync_text() if seq.params.stop else None
        return check_stop(seq, self.max_model_len, self.eos_token_ids, text, searched)

    # -- logprobs ----------------------------------------------------------------------------------
    def logprob_entry(self, token: int, logprob: float, rank: int, top: list[tuple[int, float]],
                      top_n: int) -> dict[int, Logprob]:
        """{token id: Logprob} for one position: `token` (with `rank`, -1 if unknown) and the `top`
        (token id, logprob) pairs, most likely first. When the whole vocabulary was asked for, each
        Logprob is made when it is read (VocabLogprobs)."""
        if top_n >= self.vocab_size:
            return VocabLogprobs(top, self.decode_token)
        entry = {token: Logprob(logprob, rank, self.decode_token(token))}
        for r, (t, lp) in enumerate(top, start=1):
            if t not in entry:
                entry[t] = Logprob(lp, r, self.decode_token(t))
        return entry

    def take_prompt_logprobs(self, scheduled, logits: torch.Tensor) -> torch.Tensor:
        """Record prompt logprobs from the chunk rows that carry them (forge.engine.plan:
        num_logits); return only the sampling rows."""
        keep, row = [], 0
        for item in scheduled:
            seq = item.seq
            if not item.wants_prompt_logprobs:
                if item.samples:  # (a verify step's row: 1 + num_drafts logits)
                    keep.extend(range(row, row + 1 + item.num_drafts))
                    row += 1 + item.num_drafts
                continue
            start, n = seq.num_computed_tokens, item.num_new_tokens
            # The row of position p predicts token p + 1. Record prompt tokens not recorded yet
            # (a sequence preempted mid-prefill recomputes positions it already recorded).
            first = len(seq.prompt_logprobs)  # index of the next prompt token to record
            end = min(start + n, seq.num_prompt_tokens - 1)  # positions [first - 1, end) predict [first, end + 1)
            if end >= first:
                rows = torch.log_softmax(logits[row + first - 1 - start : row + end - start], -1)
                seq.prompt_logprobs.extend(self._prompt_entries(rows, seq.token_ids[first : end + 1],
                                                                seq.params.prompt_logprobs))
            if item.samples:
                keep.append(row + n - 1)
            row += n
        return logits[keep]

    def _prompt_entries(self, logprobs: torch.Tensor, targets: list[int], top_n: int) -> list[dict[int, Logprob]]:
        """One entry per row of `logprobs`: its target token, with its exact rank, and the top_n."""
        if top_n >= self.vocab_size:  # the whole vocabulary, ranked
            ranked = torch.sort(logprobs, dim=-1, descending=True)
            return [self.logprob_entry(t, 0.0, 0, list(zip(ids, lps)), top_n)  # (the target is among them)
                    for t, ids, lps in zip(targets, ranked.indices.tolist(), ranked.values.tolist())]
        target_lp = logprobs.gather(1, torch.tensor(targets, device=logprobs.device)[:, None]).squeeze(1)
        ranks = ((logprobs > target_lp[:, None]).sum(-1) + 1).tolist()
        top = torch.topk(logprobs, top_n, dim=-1) if top_n else None
        tops = [list(zip(i, v)) for i, v in zip(top.indices.tolist(), top.values.tolist())] if top_n else \
            [[] for _ in targets]
        return [self.logprob_entry(t, lp, rank, top_i, top_n)
                for t, lp, rank, top_i in zip(targets, target_lp.tolist(), ranks, tops)]

    def decode_token(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id], skip_special_tokens=False)

    # -- outputs -----------------------------------------------------------------------------------
    def make_output(self, req: Request) -> RequestOutput:
        outs = [CompletionOutput(
            index=seq.index,
            text=seq.output_text,
            token_ids=list(seq.output_token_ids),
            cumulative_logprob=seq.cumulative_logprob if seq.params.logprobs is not None else None,
            logprobs=list(seq.output_logprobs) if seq.params.logprobs is not None else None,
            finish_reason=seq.finish_reason,
            stop_reason=seq.stop_reason,
        ) for seq in req.seqs]
        return RequestOutput(
            request_id=req.request_id,
            prompt=req.prompt,
            prompt_token_ids=req.prompt_token_ids,
            outputs=outs,
            finished=req.finished,
            num_cached_tokens=req.seqs[0].num_cached_tokens,
            prompt_logprobs=req.seqs[0].prompt_logprobs,
            metrics=request_metrics(req),
        )


# The engine times with time.monotonic(); metrics report seconds since the epoch, as vLLM's do.
_EPOCH_OFFSET = time.time() - time.monotonic()


def request_metrics(req: Request) -> RequestMetrics:
    def epoch(times: list[float | None], pick) -> float | None:
        known = [t for t in times if t is not None]
        return pick(known) + _EPOCH_OFFSET if known else None

    last_token = epoch([s.last_token_time for s in req.seqs], max)
    drafts = sum(s.spec_num_drafts for s in req.seqs)
    draft_tokens = sum(s.spec_num_draft_tokens for s in req.seqs)
    accepted = sum(s.spec_num_accepted_tokens for s in req.seqs)
    return RequestMetrics(
        arrival_time=req.arrival_time + _EPOCH_OFFSET,
        first_scheduled_time=epoch([s.first_scheduled_time for s in req.seqs], min),
        first_token_time=epoch([s.first_token_time for s in req.seqs], min),
        last_token_time=last_token,
        finished_time=last_token if req.finished else None,
        spec_num_drafts=drafts,
        spec_num_draft_tokens=draft_tokens,
        spec_num_accepted_tokens=accepted,
        spec_acceptance_rate=accepted / draft_tokens if draft_tokens else None,
        spec_mean_accepted_length=1 + accepted / drafts if drafts else None,
    )
