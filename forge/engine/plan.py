"""The step plan: what the scheduler asks the model runner to compute in one step.

Plain data (ints, strings and lists of them), so rank 0's runner and every tensor-parallel worker
build their inputs from the same message, pickled as it is. The runner reads nothing else: no
`Sequence`, no scheduler state.

Rows are the scheduled sequences, in order. Row i computes `query_lens[i]` new tokens at positions
`starts[i] ..` (everything before is in its KV cache) and returns the logits of its last
`num_logits[i]` positions, of which the engine samples the last `num_sampled[i]`:

    mid-prefill chunk             num_logits 0,           num_sampled 0
    decode / end of the prompt    num_logits 1,           num_sampled 1
    chunk with prompt logprobs    num_logits query_len,   num_sampled 0 or 1 (the prompt's end)
    verifying k draft tokens      num_logits k + 1,       num_sampled k + 1

Block tables are sent whole every step rather than as changes: the runner then keeps no
per-sequence state that preemption, aborts or a failed step would have to reset on every rank (so
the plan needs no preempted or finished ids either), and the host cost is the same as before (each
table was copied into the step's inputs anyway).
"""

from dataclasses import dataclass, field


@dataclass
class StepPlan:
    seq_ids: list[int] = field(default_factory=list)
    request_ids: list[str] = field(default_factory=list)
    starts: list[int] = field(default_factory=list)  # position of the row's first new token
    query_lens: list[int] = field(default_factory=list)  # new tokens of the row
    block_tables: list[list[int]] = field(default_factory=list)  # the row's whole block table
    num_logits: list[int] = field(default_factory=list)
    num_sampled: list[int] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)  # every row's new tokens, concatenated
    # Async scheduling: (index in token_ids, index in the previous step's sampled tokens) of each
    # token that was sampled last step and is not on the host yet (a PLACEHOLDER in token_ids).
    # The previous step's sampled tokens are its sampled rows' tokens, in row order.
    from_prev_step: list[tuple[int, int]] = field(default_factory=list)

    def add_row(self, seq_id: int, request_id: str, start: int, token_ids: list[int], block_table: list[int],
                num_logits: int, num_sampled: int) -> None:
        self.seq_ids.append(seq_id)
        self.request_ids.append(request_id)
        self.starts.append(start)
        self.query_lens.append(len(token_ids))
        self.block_tables.append(block_table)
        self.num_logits.append(num_logits)
        self.num_sampled.append(num_sampled)
        self.token_ids.extend(token_ids)

    @property
    def num_rows(self) -> int:
        return len(self.seq_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    def __bool__(self) -> bool:
        return bool(self.seq_ids)

    def logits_rows(self) -> list[int] | None:
        """Indices (into the step's tokens) of the positions that produce logits, in row order;
        None when every position does (a pure decode step)."""
        if sum(self.num_logits) == len(self.token_ids):
            return None
        rows, end = [], 0
        for n, k in zip(self.query_lens, self.num_logits):
            end += n
            rows.extend(range(end - k, end))
        return rows
