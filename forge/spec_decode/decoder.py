"""SpeculativeDecoder: the engine's side of speculation. Before each step it asks the proposer for
each running sequence's drafts (within what the sequence may still generate, its grammar and the
adaptive rule); after the verify step it counts what was accepted."""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field

from forge.sequence import Sequence
from forge.spec_decode.adaptive import AcceptanceGate, StepCost, fit_drafts
from forge.spec_decode.config import SpeculativeConfig


@dataclass
class SpecStats:
    """Engine-wide counts (vLLM's spec_decode metrics): verify rows that carried drafts, draft tokens,
    accepted draft tokens, and accepted tokens by draft position."""

    num_drafts: int = 0
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    accepted_per_pos: list[int] = field(default_factory=list)

    @property
    def acceptance_rate(self) -> float:
        return self.num_accepted_tokens / self.num_draft_tokens if self.num_draft_tokens else 0.0

    @property
    def mean_accepted_length(self) -> float:
        """Tokens a verify step produced, on average: the accepted drafts plus the one drawn after them."""
        return 1 + self.num_accepted_tokens / self.num_drafts if self.num_drafts else 0.0


class SpeculativeDecoder:
    def __init__(self, config: SpeculativeConfig, proposer, max_model_len: int, eos_token_ids: Collection[int],
                 measure_steps: bool = False):
        self.config = config
        self.cost = StepCost() if measure_steps else None  # the CPU: what a draft token costs (adaptive)
        self.proposer = proposer
        self.max_model_len = max_model_len
        self.eos_token_ids = eos_token_ids
        self.stats = SpecStats(accepted_per_pos=[0] * config.num_speculative_tokens)

    def propose(self, running: list[Sequence]) -> None:
        """Set each running sequence's `spec_token_ids` for this step (often none)."""
        seqs, limits = [], []
        for seq in running:
            seq.spec_token_ids = []
            limit = self._limit(seq)
            if limit > 0:
                seqs.append(seq)
                limits.append(limit)
        if not seqs:
            return
        for seq, limit, drafts in zip(seqs, limits, self.proposer.propose(seqs, limits)):
            seq.spec_token_ids = self._cut(seq, list(drafts[:limit]))
        if self.cost is not None:  # keep the drafts that pay for what they cost (forge.spec_decode.adaptive)
            decoding = sum(1 for seq in running if seq.num_uncomputed_tokens == 1)
            kept = fit_drafts([s.spec_gate.rate for s in seqs], [len(s.spec_token_ids) for s in seqs], decoding,
                              self.cost)
            for seq, k in zip(seqs, kept):
                del seq.spec_token_ids[k:]

    def observe_step(self, num_tokens: int, seconds: float) -> None:
        """A decode or verify step of `num_tokens` tokens took `seconds` (forward and sampling, CPU)."""
        if self.cost is not None:
            self.cost.observe(num_tokens, seconds)

    def _limit(self, seq: Sequence) -> int:
        """How many drafts `seq` may verify this step: 0 mid-prefill, with penalties (they depend on
        each preceding token), before a reasoning gate opens its grammar; else what the adaptive rule
        gives (forge.spec_decode.adaptive), never past max_tokens or the context (the step yields up
        to limit + 1 tokens)."""
        p = seq.params
        if seq.num_uncomputed_tokens != 1 or seq.num_inflight or p.has_penalties or seq.reasoning_gate is not None:
            return 0
        if seq.structured is not None and seq.structured.is_terminated():
            return 0
        room = self.max_model_len - seq.num_tokens - 1
        if p.max_tokens is not None:
            room = min(room, p.max_tokens - seq.num_output_tokens - 1)
        if room <= 0:
            return 0
        if seq.spec_gate is None:
            seq.spec_gate = AcceptanceGate()
        return min(room, seq.spec_gate.draft_length(self.config.num_speculative_tokens))

    def _cut(self, seq: Sequence, drafts: list[int]) -> list[int]:
        """Drafts end after a stop token (nothing after it is used), and before the first one the
        request's grammar forbids."""
        p = seq.params
        for i, token in enumerate(drafts):
            if token in p.stop_token_ids or (not p.ignore_eos and token in self.eos_token_ids):
                drafts = drafts[: i + 1]
                break
        if seq.structured is not None and drafts:
            drafts = drafts[: seq.structured.valid_prefix_len(drafts)]
        return drafts

    def record(self, seq: Sequence, drafted: int, accepted: int) -> None:
        """A verify step of `seq` accepted `accepted` of its `drafted` drafts."""
        s = self.stats
        s.num_drafts += 1
        s.num_draft_tokens += drafted
        s.num_accepted_tokens += accepted
        for i in range(accepted):
            s.accepted_per_pos[i] += 1
        seq.spec_num_drafts += 1
        seq.spec_num_draft_tokens += drafted
        seq.spec_num_accepted_tokens += accepted
        seq.spec_gate.update(drafted, accepted, self.config.min_acceptance_rate)
