"""Continuous-batching scheduler with chunked prefill, prefix caching and preemption.

Each step it decides how many new tokens every sequence computes, within a token budget:
running sequences first (decodes take 1 token, an unfinished prefill takes its next chunk), then
waiting ones in arrival order. When the KV pool runs dry, the most recently started running
sequence is preempted: its blocks are freed and it recomputes from the start when resumed (the
prefix cache usually gives most of them back).

`schedule()` returns the engine's view of the step (the scheduled `Sequence`s) and the step's
`StepPlan` (forge.engine.plan), the plain data the model runner consumes.

Async scheduling is a mode of this scheduler: step t+1 is planned before step t's tokens are read
back. Each sequence sampled in step t holds a PLACEHOLDER for its token meanwhile
(`add_placeholders`); step t+1's plan names it as "the token sampled for row r of the previous
step", which the model runner fills in on the device; the placeholder goes when the token is read
(`drop_placeholder`), one step late. A sequence whose in-flight token is its last one allowed
(max_tokens, context) is not scheduled again before that token is read.

Speculative decoding (forge.spec_decode): a decoding sequence with draft tokens
(`Sequence.spec_token_ids`) is scheduled for 1 + k tokens, its KV slots reserved for all of them
(fewer drafts, or none, when the budget or the pool is short: drafts never preempt anyone); its
plan row returns k + 1 logits. After the verify step `accept_drafts` counts the accepted drafts as
computed and gives back the blocks that only rejected drafts used.
"""

import time
from collections import deque
from dataclasses import dataclass, field

from forge.engine.block_manager import BlockManager
from forge.engine.plan import StepPlan
from forge.sequence import PLACEHOLDER, Sequence, SequenceStatus


@dataclass
class ScheduledSeq:
    seq: Sequence
    num_new_tokens: int  # including the drafts
    num_drafts: int = 0  # speculative decoding: draft tokens verified after the sequence's last token

    @property
    def samples(self) -> bool:
        """This step completes the sequence's known tokens, so it produces the next token."""
        return self.seq.num_computed_tokens + self.num_new_tokens - self.num_drafts == self.seq.num_tokens

    @property
    def drafts(self) -> list[int]:
        return self.seq.spec_token_ids[: self.num_drafts]

    @property
    def wants_prompt_logprobs(self) -> bool:
        """This chunk holds prompt positions whose next-token logprobs the request asked for."""
        seq = self.seq
        return seq.params.prompt_logprobs is not None and seq.prompt_logprobs is not None and \
            len(seq.prompt_logprobs) < seq.num_prompt_tokens


@dataclass
class SchedulerOutput:
    """What runs this step: the engine's view (`scheduled`, the live sequences) and `plan`, the
    plain data the model runner computes it from (built last, by `Scheduler.schedule`)."""

    scheduled: list[ScheduledSeq] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)
    plan: StepPlan = field(default_factory=StepPlan)

    @property
    def num_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)

    def __bool__(self) -> bool:
        return bool(self.scheduled)


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int,
                 max_model_len: int | None = None, async_scheduling: bool = False):
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = max_model_len  # (async scheduling: a token at this length is the last one)
        self.async_scheduling = async_scheduling
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        # seq_id -> index of its token among the last plan's sampled tokens (async scheduling: the
        # next plan reads a token still on the device from there)
        self.sampled_index: dict[int, int] = {}

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens
        bm = self.block_manager

        # 1. Running sequences, oldest first; preempt the newest when blocks run out.
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            if seq.awaiting_final:  # async scheduling: its last token is in flight, nothing is left to run
                i += 1
                continue
            n = min(seq.num_uncomputed_tokens, budget)
            while not bm.can_append(seq, n):
                victim = self.running[-1]
                self.preempt(victim)
                out.preempted.append(victim)
                if victim is seq:
                    break
            if seq.status != SequenceStatus.RUNNING:
                break  # seq itself was preempted: nothing after it is left either
            bm.append_slots(seq, n)
            out.scheduled.append(ScheduledSeq(seq, n))
            budget -= n
            i += 1

        # Speculative decoding: drafts only from what every running sequence's own tokens left of
        # the budget and the free blocks, so a draft never preempts or crowds out anyone.
        for j, item in enumerate(out.scheduled):
            k = self._num_drafts(item.seq, item.num_new_tokens, budget)
            if k:
                bm.append_slots(item.seq, item.num_new_tokens + k)
                out.scheduled[j] = ScheduledSeq(item.seq, item.num_new_tokens + k, k)
                budget -= k

        # 2. Waiting sequences, in order, unless this step already had to preempt.
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs and not out.preempted:
            seq = self.waiting[0]
            cached = bm.find_cached_prefix(seq)
            n = seq.num_tokens - len(cached) * bm.block_size
            n = min(n, budget)  # a prompt beyond the budget is prefilled in chunks
            if not bm.can_allocate(seq, n, cached):
                break
            self.waiting.popleft()
            bm.allocate(seq, cached)
            bm.append_slots(seq, n)
            seq.status = SequenceStatus.RUNNING
            if seq.first_scheduled_time is None:
                seq.first_scheduled_time = time.monotonic()
            self.running.append(seq)
            out.scheduled.append(ScheduledSeq(seq, n))
            budget -= n
        out.plan = self.make_plan(out.scheduled)
        return out

    def _num_drafts(self, seq: Sequence, n: int, budget: int) -> int:
        """How many of seq's drafts this step verifies after its n own tokens (slots already
        reserved): those the budget left over and the free blocks take (the rest are dropped,
        never a reason to preempt)."""
        drafts = seq.spec_token_ids
        if not drafts:
            return 0
        k = min(len(drafts), budget) if n == seq.num_uncomputed_tokens else 0
        while k > 0 and not self.block_manager.can_append(seq, n + k):
            k -= 1
        return k

    def make_plan(self, scheduled: list[ScheduledSeq]) -> StepPlan:
        """The step as plain data for the model runner (forge.engine.plan)."""
        plan = StepPlan()
        token_ids, num_sampled, sampled_index = plan.token_ids, plan.num_sampled, {}
        for item in scheduled:
            seq, k = item.seq, item.num_drafts
            n = item.num_new_tokens - k  # the sequence's own tokens
            start, tokens = seq.num_computed_tokens, seq.token_ids
            if n == 1:
                token_ids.append(tokens[start])
            else:
                token_ids.extend(tokens[start : start + n])
            if start + n == len(tokens):  # it completes its known tokens: it samples the next one
                if seq.num_inflight:  # its last token is still on the device
                    plan.from_prev_step.append((len(token_ids) - 1, self.sampled_index[seq.seq_id]))
                sampled_index[seq.seq_id] = len(sampled_index)
                if k:  # verify: a token is drawn after its last token and after each draft
                    token_ids.extend(item.drafts)
                num_sampled.append(1 + k)
            else:
                num_sampled.append(0)
            wants_prompt_logprobs = seq.prompt_logprobs is not None and item.wants_prompt_logprobs
            plan.num_logits.append(n if wants_prompt_logprobs else num_sampled[-1])
            plan.seq_ids.append(seq.seq_id)
            plan.request_ids.append(seq.request_id)
            plan.starts.append(start)
            plan.query_lens.append(n + k)
            plan.block_tables.append(list(seq.block_table))
        self.sampled_index = sampled_index
        return plan

    def preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.block_manager.free(seq)
        seq.status = SequenceStatus.WAITING
        seq.spec_token_ids = []
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def postprocess(self, out: SchedulerOutput) -> None:
        """Advance computed-token counts after the forward pass and register full blocks (their
        tokens must be real: in async mode, after the previous step's tokens were read back)."""
        for item in out.scheduled:
            item.seq.num_computed_tokens += item.num_new_tokens - item.num_drafts  # drafts: accept_drafts
            self.block_manager.register_full_blocks(item.seq)

    def accept_drafts(self, seq: Sequence, num_accepted: int) -> None:
        """After a verify step whose tokens joined `seq`: its first `num_accepted` drafts (now its
        tokens) have their KV in the cache; the slots of the rejected ones are given back (whole
        blocks beyond what the sequence's tokens need)."""
        seq.spec_token_ids = []
        if seq.is_finished:
            return
        seq.num_computed_tokens += num_accepted
        self.block_manager.register_full_blocks(seq)
        self.block_manager.trim(seq, seq.num_tokens)

    def add_placeholders(self, seqs: list[Sequence]) -> bool:
        """Async mode: the step that samples `seqs` was launched and is not read back; each one still
        running holds a PLACEHOLDER for its token. Returns whether any does."""
        held = False
        for seq in seqs:
            if seq.is_finished:  # (it finished when the step before was read back)
                continue
            seq.token_ids.append(PLACEHOLDER)
            seq.num_inflight = 1
            p = seq.params
            seq.awaiting_final = (p.max_tokens is not None and seq.num_output_tokens + 1 >= p.max_tokens) or \
                (self.max_model_len is not None and seq.num_tokens >= self.max_model_len)
            held = True
        return held

    def drop_placeholder(self, seq: Sequence) -> bool:
        """A sampled token of `seq` was read back: remove its placeholder, if any. Returns whether the
        token joins the sequence (not when it finished or was aborted meanwhile)."""
        seq.drop_inflight()
        return not seq.is_finished

    def finish(self, seq: Sequence) -> None:
        """Remove a finished or aborted sequence and free its blocks at once."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.block_manager.free(seq)
        seq.status = SequenceStatus.FINISHED
