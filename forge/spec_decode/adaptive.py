"""The adaptive rule: each sequence drafts about as many tokens as it can expect to have accepted,
and stops proposing for a while when its drafts are rarely accepted.

A verify step of 1 + k tokens costs more than a decode step (on the 2-core CPU, for the default
model with int4 weights, each extra token ~0.26 of a batch-1 decode step: the matmuls are compute
bound there), so drafts that are rejected make a request slower. Each sequence keeps a decayed
estimate of the probability p that a draft is accepted given the ones before it were (accepted
drafts over accepted drafts plus rejections, a rejection being the first draft that differs). It
then drafts k = p / (1 - p) tokens (the expected run of accepted drafts, at least 1, at most
num_speculative_tokens), and when p drops below `min_rate` it proposes nothing for `backoff` steps,
a pause that doubles each time it is taken again (4, 8, ... 64 steps) and is reset by a verify
step that accepts everything. A request whose drafts never match pays for about one verify step
in 64.

Where a token of a step costs much (the CPU: its matmuls are compute bound), the drafts on offer
are then trimmed to what pays (fit_drafts): StepCost learns what a step of T tokens costs, and each
sequence keeps the number of drafts that makes the most expected tokens per second of the step.
"""

from __future__ import annotations

from dataclasses import dataclass

DECAY = 0.7  # weight of the past in the estimate, per verify step
FIRST_BACKOFF, MAX_BACKOFF = 4, 64


@dataclass
class AcceptanceGate:
    accepted: float = 1.0  # decayed counts (start hopeful: a sequence's first drafts are tried)
    rejected: float = 0.0
    paused: int = 0  # steps left without proposals
    backoff: int = FIRST_BACKOFF

    @property
    def rate(self) -> float:
        """Estimated probability that a draft is accepted, given that the drafts before it were."""
        return self.accepted / (self.accepted + self.rejected)

    def draft_length(self, most: int) -> int:
        """How many tokens to draft now (0 while paused; counts a paused step down): the expected run
        of accepted drafts, p / (1 - p), at least 1, at most `most`."""
        if self.paused:
            self.paused -= 1
            return 0
        p = self.rate
        return most if p >= most / (most + 1) else max(1, min(most, round(p / (1 - p))))

    def update(self, drafted: int, accepted: int, min_rate: float) -> None:
        self.accepted = DECAY * self.accepted + accepted
        self.rejected = DECAY * self.rejected + (accepted < drafted)
        if min_rate > 0 and self.rate < min_rate:
            self.paused = self.backoff
            self.backoff = min(2 * self.backoff, MAX_BACKOFF)
        elif accepted == drafted:
            self.backoff = FIRST_BACKOFF


class StepCost:
    """What a step of T tokens costs, learned from the engine's decode and verify steps: an
    exponentially weighted mean per T where T was seen, else a least-squares line through them all
    (c0 + c1 * T). A table, not just the line, because the CPU's quantized matmul works on tiles of
    rows: for the default model at batch 1, 1..10 tokens cost 5.2, 5.9, 7.2, 9.3, 14.2, 16.2, 17.9,
    21.3, 24.3, 25.3 ms (4 -> 5 tokens: +53%). Fed on the CPU only (a GPU step runs asynchronously
    to the host, and there drafts are nearly free: 4 cost 1.02x a decode step at the 8B shape)."""

    FORGET = 0.98  # per step, for the line
    TABLE_WEIGHT = 0.3  # of the newest step in its T's mean
    MIN_STEPS = 8

    def __init__(self):
        self.w = self.x = self.xx = self.y = self.xy = 0.0
        self.steps = 0
        self.table: dict[int, tuple[int, float]] = {}  # T -> (steps seen, mean seconds)

    def observe(self, tokens: int, seconds: float) -> None:
        f = self.FORGET
        self.w, self.x, self.xx = f * self.w + 1, f * self.x + tokens, f * self.xx + tokens * tokens
        self.y, self.xy = f * self.y + seconds, f * self.xy + tokens * seconds
        self.steps += 1
        seen, mean = self.table.get(tokens, (0, seconds))
        self.table[tokens] = (seen + 1, mean + (self.TABLE_WEIGHT if seen else 1.0) * (seconds - mean))

    def line(self) -> tuple[float, float] | None:
        """(c0, c1), once enough steps of different sizes were seen."""
        if self.steps < self.MIN_STEPS:
            return None
        var = self.xx / self.w - (self.x / self.w) ** 2
        if var < 0.5:  # (every step the same size: no slope to read)
            return None
        c1 = (self.xy / self.w - self.x * self.y / self.w**2) / var
        c0 = self.y / self.w - c1 * self.x / self.w
        return max(c0, 0.0), max(c1, 0.0)

    def cost(self, tokens: int) -> float | None:
        """Seconds for a step of `tokens` tokens; None until the line is known."""
        line = self.line()
        if line is None:
            return None
        seen, mean = self.table.get(tokens, (0, 0.0))
        return mean if seen >= 2 else line[0] + line[1] * tokens


def fit_drafts(rates: list[float], lengths: list[int], num_rows: int, cost: StepCost) -> list[int]:
    """How many of its drafts each sequence verifies, to make the most tokens per second of the step:
    sequence i's j-th draft is accepted with probability rates[i]^j (lengths[i] drafts on offer), the
    step already has num_rows tokens (one per decoding sequence), each draft adds one, and `cost`
    prices the step. Greedy in order; the lengths as given while the cost is unknown."""
    if cost.cost(num_rows) is None:
        return lengths
    tokens, expected, out = num_rows, float(num_rows), []
    for p, most in zip(rates, lengths):
        best_k, best, gain, best_gain = 0, expected / cost.cost(tokens), 0.0, 0.0
        for k in range(1, most + 1):
            gain += p**k
            value = (expected + gain) / cost.cost(tokens + k)
            if value > best:
                best_k, best, best_gain = k, value, gain
        out.append(best_k)
        tokens += best_k
        expected += best_gain
    return out
