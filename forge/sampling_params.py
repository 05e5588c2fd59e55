"""Per-request sampling parameters, with vLLM's names and defaults so users can switch."""

from dataclasses import dataclass

from forge.errors import InvalidRequestError
from forge.validation import INT64_MAX, INT64_MIN, check_bool, check_float, check_int

# Below this temperature a request is sampled greedily: logits / temperature would overflow, and the
# distribution is already the argmax (vLLM's _SAMPLING_EPS).
GREEDY_TEMPERATURE = 1e-5
# A factor below 1/100 or above 100 only drives seen tokens' logits to +-overflow; HF and vLLM use ~1-2.
REPETITION_PENALTY_RANGE = (0.01, 100.0)
MAX_LOGPROBS = 20  # the engine's default max_logprobs (vLLM's and OpenAI's top_logprobs limit)


@dataclass
class StructuredOutputsParams:
    """Constrain generation to a JSON schema, any JSON object, a regex, one of several strings, or an
    EBNF grammar (exactly one of them), like vLLM's `StructuredOutputsParams`."""

    json: dict | str | None = None  # a JSON schema (dict or its JSON text)
    json_object: bool = False  # any valid JSON object
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None  # EBNF (GBNF-style, as xgrammar reads it)
    # Reasoning models: the constraint starts once this text (the reasoning's end, "</think>") has been
    # generated; the reasoning before it is free. None: from the first token.
    reasoning_end: str | None = None

    def __post_init__(self):
        given = [k for k in ("json", "regex", "choice", "grammar") if getattr(self, k) is not None]
        given += ["json_object"] if self.json_object else []
        if len(given) != 1:
            raise InvalidRequestError(
                f"structured outputs need exactly one of json, json_object, regex, choice, grammar; got {given or 'none'}",
                param="structured_outputs",
            )
        if self.choice is not None and (not isinstance(self.choice, (list, tuple)) or not self.choice
                                        or not all(isinstance(c, str) and c for c in self.choice)):
            raise InvalidRequestError("choice must be a non-empty list of non-empty strings", param="choice")
        for name in ("regex", "grammar"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), str):
                raise InvalidRequestError(f"{name} must be a string, got {type(getattr(self, name)).__name__}", param=name)
        if self.json is not None and not isinstance(self.json, (dict, str)):
            raise InvalidRequestError(f"json must be a JSON schema (dict or string), got {type(self.json).__name__}",
                                      param="json")
        check_bool(self.json_object, "json_object")
        if self.reasoning_end is not None and (not isinstance(self.reasoning_end, str) or not self.reasoning_end):
            raise InvalidRequestError(f"reasoning_end must be a non-empty string or None, got {self.reasoning_end!r}",
                                      param="reasoning_end")


@dataclass
class SamplingParams:
    n: int = 1
    temperature: float = 1.0  # 0 (anything below GREEDY_TEMPERATURE) = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 (or -1) = off
    min_p: float = 0.0
    seed: int | None = None
    max_tokens: int | None = 16  # None = up to the context length
    min_tokens: int = 0
    stop: list[str] | str | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    # Top logprobs per generated token: 0 = just the chosen one, -1 = the whole vocabulary (vLLM's meaning).
    # More than the engine's max_logprobs (default MAX_LOGPROBS) is refused when the request is added.
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    structured_outputs: StructuredOutputsParams | None = None
    # {token id: bias}, OpenAI's logit_bias: added to the token's logit before sampling (and before a
    # grammar's mask); -100 all but bans a token, +100 all but forces it. Ids are checked against the
    # vocabulary when the request is added.
    logit_bias: dict[int, float] | None = None

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if self.stop is not None:
            bad = [self.stop] if not isinstance(self.stop, (list, tuple)) else [s for s in self.stop if not isinstance(s, str)]
            if bad:
                raise InvalidRequestError(f"stop must be a string or a list of strings, got {bad[0]!r}", param="stop")
        self.stop = [s for s in (self.stop or []) if s]
        if self.stop_token_ids is not None and not isinstance(self.stop_token_ids, (list, tuple)):
            raise InvalidRequestError(f"stop_token_ids must be a list of token ids, got {self.stop_token_ids!r}",
                                      param="stop_token_ids")
        self.stop_token_ids = [check_int(t, "stop_token_ids entry", 0, param="stop_token_ids")
                               for t in self.stop_token_ids or []]
        self.validate()
        if self.top_k == -1:
            self.top_k = 0

    def validate(self) -> None:
        """Check every field; numbers come back as plain int/float. Each rule is stated in its message."""
        self.n = check_int(self.n, "n", 1)
        self.temperature = check_float(self.temperature, "temperature", 0)
        self.top_p = check_float(self.top_p, "top_p", 0, 1, lo_open=True)
        self.top_k = check_int(self.top_k, "top_k (0 or -1 disables it)", -1, param="top_k")
        self.min_p = check_float(self.min_p, "min_p", 0, 1)
        if self.seed is not None:  # (each of the n completions draws from a stream key hashed from it)
            self.seed = check_int(self.seed, "seed", INT64_MIN, INT64_MAX)
        if self.max_tokens is not None:
            self.max_tokens = check_int(self.max_tokens, "max_tokens", 1, INT64_MAX)
        # (the engine also checks both against the model's context at add_request)
        self.min_tokens = check_int(self.min_tokens, "min_tokens", 0, self.max_tokens or INT64_MAX)
        for name in ("logprobs", "prompt_logprobs"):
            if getattr(self, name) is not None:
                setattr(self, name, check_int(getattr(self, name), f"{name} (-1 = the whole vocabulary)", -1,
                                              param=name))
        self.presence_penalty = check_float(self.presence_penalty, "presence_penalty", -2, 2)
        self.frequency_penalty = check_float(self.frequency_penalty, "frequency_penalty", -2, 2)
        self.repetition_penalty = check_float(self.repetition_penalty, "repetition_penalty", *REPETITION_PENALTY_RANGE)
        for name in ("ignore_eos", "skip_special_tokens", "include_stop_str_in_output"):
            check_bool(getattr(self, name), name)
        if self.structured_outputs is not None and not isinstance(self.structured_outputs, StructuredOutputsParams):
            raise InvalidRequestError(f"structured_outputs must be a StructuredOutputsParams, got "
                                      f"{type(self.structured_outputs).__name__}", param="structured_outputs")
        if self.logit_bias is not None:
            self.logit_bias = _check_logit_bias(self.logit_bias)

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE or self.top_k == 1

    @property
    def has_penalties(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0)


def _check_logit_bias(bias) -> dict[int, float]:
    """{token id: bias in [-100, 100]}; ids may be given as decimal strings, as JSON object keys are."""
    if not isinstance(bias, dict):
        raise InvalidRequestError(f"logit_bias must be a dict of token id -> bias, got {type(bias).__name__}",
                                  param="logit_bias")
    checked = {}
    for key, value in bias.items():
        token = int(key) if isinstance(key, str) and key.isascii() and key.isdigit() else key
        token = check_int(token, "a logit_bias key (a token id)", 0, param="logit_bias")
        checked[token] = check_float(value, f"logit_bias[{token}]", -100, 100, param="logit_bias")
    return checked
