"""A Sequence owns one generation stream: its token ids, KV block table and output state. A Request
is one prompt and its `n` sequences."""

import enum
import itertools
import time
from dataclasses import dataclass, field

from forge.kernels.sampling import stream_key
from forge.outputs import Logprob
from forge.sampling_params import SamplingParams
from forge.text import partial_suffix_len


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


_seq_counter = itertools.count()

# With async scheduling a sampled token is known on the GPU a step before the host reads it: the
# sequence holds this id in its place meanwhile (counted by the scheduler, never detokenized).
PLACEHOLDER = -1


class Sequence:
    def __init__(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        index: int = 0,
        detokenizer=None,
    ):
        self.seq_id = next(_seq_counter)
        self.request_id = request_id
        self.index = index  # which of the request's n completions this is
        self.params = params
        self.token_ids: list[int] = list(prompt_token_ids)
        self.num_prompt_tokens = len(prompt_token_ids)
        self.status = SequenceStatus.WAITING
        # KV cache state, owned by the block manager.
        self.block_table: list[int] = []
        self.block_hashes: list[int] = []  # hash of each full block, in order (prefix caching)
        self.num_computed_tokens = 0  # tokens whose K/V are in the cache
        self.num_cached_tokens = 0  # of the prompt, how many came from the prefix cache
        self.num_preemptions = 0
        # Async scheduling: 1 while the last entry of token_ids is a PLACEHOLDER (sampled, not read
        # back); awaiting_final: that token is the last one allowed (max_tokens / context), so the
        # sequence is not scheduled again before it is read back and finishes.
        self.num_inflight = 0
        self.awaiting_final = False
        # The sampler's draws are a function of (sampling_key, output position): they depend
        # neither on the batch nor on the device. Each of the request's n completions (`index`)
        # gets its own stream from the request's seed.
        self.sampling_key = stream_key(params.seed, index)
        # Speculative decoding (forge.spec_decode): this step's draft tokens (verified, never part of
        # token_ids until accepted), the adaptive rule's state, and counts for RequestOutput.metrics.
        self.spec_token_ids: list[int] = []
        self.spec_gate = None  # forge.spec_decode.adaptive.AcceptanceGate
        self.spec_num_drafts = 0  # verify steps that carried drafts
        self.spec_num_draft_tokens = 0
        self.spec_num_accepted_tokens = 0
        self.structured = None  # a forge.structured matcher when the request is constrained
        self.reasoning_gate = None  # forge.structured.reasoning_gate: the matcher, until the reasoning ends
        # Output state.
        self.detokenizer = detokenizer
        self.output_logprobs: list[dict[int, Logprob]] = []
        # Prompt logprobs (first prompt token: None), filled as prefill chunks run; None if not asked.
        self.prompt_logprobs: list[dict[int, Logprob] | None] | None = [None] if params.prompt_logprobs is not None else None
        self.cumulative_logprob = 0.0
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None
        self.stop_text_cut: int | None = None  # length of the text kept after a stop string
        self.first_scheduled_time: float | None = None  # set by the scheduler (RequestOutput.metrics)
        self.first_token_time: float | None = None
        self.last_token_time: float | None = None

    # -- token bookkeeping -------------------------------------------------------------
    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        """Generated tokens read back so far (an in-flight placeholder is not one yet)."""
        return len(self.token_ids) - self.num_inflight - self.num_prompt_tokens

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.token_ids[: self.num_prompt_tokens]

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens : len(self.token_ids) - self.num_inflight]

    def drop_inflight(self) -> None:
        """Remove the in-flight PLACEHOLDER (async scheduling), if any: its token was read back (and
        is appended next) or is lost with a failed step."""
        if self.num_inflight:
            self.token_ids.pop()
            self.num_inflight, self.awaiting_final = 0, False

    @property
    def num_uncomputed_tokens(self) -> int:
        return self.num_tokens - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        return self.status == SequenceStatus.FINISHED

    # -- text ----------------------------------------------------------------------------
    def sync_text(self) -> str:
        """Detokenize lazily: only when text is read (streaming, stop strings, the final output)."""
        if self.detokenizer is None:
            return ""
        self.detokenizer.catch_up(self.output_token_ids)
        return self.detokenizer.text

    @property
    def output_text(self) -> str:
        """Text so far; while running, a tail that could still become a stop string is held back."""
        text = self.sync_text()
        if self.stop_text_cut is not None:
            return text[: self.stop_text_cut]
        if not self.is_finished and self.params.stop:
            return text[: len(text) - partial_suffix_len(text, self.params.stop)]
        return text

    def __repr__(self) -> str:
        return (
            f"Sequence(id={self.seq_id}, req={self.request_id}, tokens={self.num_tokens}, "
            f"computed={self.num_computed_tokens}, status={self.status.value})"
        )


@dataclass
class Request:
    """A user request: one prompt, `n` sequences sampled from it."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    seqs: list[Sequence] = field(default_factory=list)
    arrival_time: float = field(default_factory=time.monotonic)

    @property
    def finished(self) -> bool:
        return all(s.is_finished for s in self.seqs)
