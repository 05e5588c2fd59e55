"""What generation returns, shaped like vLLM's RequestOutput / CompletionOutput."""

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass


@dataclass
class Logprob:
    logprob: float
    rank: int  # 1 = most likely token
    decoded_token: str | None = None


class VocabLogprobs(Mapping[int, Logprob]):
    """{token id: Logprob} over the whole vocabulary, for one position (SamplingParams(logprobs=-1)).

    A dict for every purpose of reading it (`[id]`, `in`, `len`, `items()`, `dict(...)`, iteration most
    likely first), but each Logprob is only made when read: building ~50k objects (and decoding ~50k
    tokens) for every generated token would cost more than the step that produced it.
    """

    def __init__(self, ranked: list[tuple[int, float]], decode: Callable[[int], str]):
        self._ranked = ranked  # (token id, logprob), most likely first: rank = position + 1
        self._decode = decode
        self._rank_of: dict[int, int] | None = None

    def __getitem__(self, token_id: int) -> Logprob:
        if self._rank_of is None:  # built on the first lookup by id only
            self._rank_of = {t: rank for rank, (t, _) in enumerate(self._ranked, start=1)}
        rank = self._rank_of[token_id]
        return Logprob(self._ranked[rank - 1][1], rank, self._decode(token_id))

    def __iter__(self) -> Iterator[int]:
        return (t for t, _ in self._ranked)

    def __len__(self) -> int:
        return len(self._ranked)

    def __repr__(self) -> str:
        return f"VocabLogprobs({len(self)} tokens, most likely: {self._ranked[:3]}...)"


@dataclass
class RequestMetrics:
    """When a request passed each stage, as vLLM's RequestMetrics: seconds since the epoch (time.time());
    None until it happened."""

    arrival_time: float
    first_scheduled_time: float | None = None  # first step that computed any of its tokens
    first_token_time: float | None = None
    last_token_time: float | None = None
    finished_time: float | None = None
    time_in_queue: float | None = None  # first_scheduled_time - arrival_time
    # Speculative decoding (forge.spec_decode), over the request's sequences:
    spec_num_drafts: int = 0  # verify steps that carried draft tokens
    spec_num_draft_tokens: int = 0  # draft tokens verified
    spec_num_accepted_tokens: int = 0  # of those, accepted
    spec_acceptance_rate: float | None = None  # accepted / drafted; None without drafts
    spec_mean_accepted_length: float | None = None  # tokens per verify step: accepted drafts + 1; None without drafts

    def __post_init__(self):
        if self.time_in_queue is None and self.first_scheduled_time is not None:
            self.time_in_queue = self.first_scheduled_time - self.arrival_time


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None = None
    logprobs: list[dict[int, Logprob]] | None = None
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"
    stop_reason: int | str | None = None  # the stop string or token id that ended it
    # LLM.chat(tools=...): the calls read from `text` (a list of forge.tools.ToolCall); None otherwise
    tool_calls: list | None = None

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool = False
    num_cached_tokens: int = 0
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None
    metrics: RequestMetrics | None = None
    # Why the engine failed this request (its completions' finish_reason is "error"): an
    # InvalidRequestError when its own input was at fault, else an internal error (forge.engine.failures).
    error: BaseException | None = None
