"""OpenAI request bodies and their translation into SamplingParams.

Bodies are parsed by hand (UTF-8, JSON, then pydantic in strict mode) rather than by FastAPI, so every
mistake a client can make becomes one OpenAI-style error, `{"error": {message, type, param, code}}`,
with a 4xx status. Unknown fields are ignored, as OpenAI and vLLM do, and logged once per name (a typo
such as `max_token` is otherwise silent); known fields must have the right JSON type ("5" is not an
integer, true is not a number; 5.0 is the integer 5, as in vLLM).
"""

from __future__ import annotations

import json
import logging
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError

from forge.errors import InvalidRequestError
from forge.sampling_params import SamplingParams, StructuredOutputsParams

MAX_BODY_BYTES = 4 * 1024 * 1024  # a full 8k-token context is ~50 KB of text; 4 MiB leaves room for token-id lists
MAX_CHOICES = 128  # n x number of prompts in one request
# Stop strings are matched against the newest text after every token: bound that work. (OpenAI allows 4.)
MAX_STOP_STRINGS = 16
MAX_STOP_STRING_BYTES = 1024  # one string, UTF-8
MAX_STOP_TOTAL_BYTES = 4096  # all of them together
MAX_STOP_TOKEN_IDS = 1024
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1  # seeds are 64-bit signed integers
# Request fields that, when omitted (None), take SamplingParams' default.
_DEFAULTED_SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "min_p", "presence_penalty", "frequency_penalty",
                              "repetition_penalty", "min_tokens", "ignore_eos", "skip_special_tokens",
                              "include_stop_str_in_output")
MAX_WARNED_FIELDS = 256  # unknown field names remembered (and warned about once each)
# chat_template_kwargs may not set what the request's own fields set.
RESERVED_TEMPLATE_KWARGS = ("messages", "tools", "add_generation_prompt", "continue_final_message", "chat_template")

logger = logging.getLogger("forge.server")


class APIError(Exception):
    """An error the API returns as `{"error": {...}}` with an HTTP status."""

    def __init__(self, message: str, status: int = 400, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.message, self.status, self.type, self.param, self.code = message, status, type, param, code
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    @classmethod
    def from_invalid_request(cls, e: InvalidRequestError) -> "APIError":
        from forge.errors import PromptTooLongError

        code = "context_length_exceeded" if isinstance(e, PromptTooLongError) else None
        return cls(str(e), param=e.param, code=code)


# -- parsing ------------------------------------------------------------------------------------------

def parse_json_object(raw: bytes) -> dict:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise APIError(f"request body is not valid UTF-8 (bad byte at offset {e.start})") from None
    if not text.strip():
        raise APIError("request body is empty; expected a JSON object")
    try:
        data = json.loads(text, parse_constant=_reject_constant)
    except json.JSONDecodeError as e:
        raise APIError(f"request body is not valid JSON: {e.msg} (line {e.lineno}, column {e.colno})") from None
    except RecursionError:
        raise APIError("request body is nested too deeply") from None
    if not isinstance(data, dict):
        raise APIError(f"request body must be a JSON object, got a JSON {type(data).__name__}")
    _check_strings(data)
    return data


def _reject_constant(name: str):
    raise APIError(f"request body contains {name}, which is not valid JSON")


def _check_strings(data: Any) -> None:
    """JSON escapes can smuggle in lone UTF-16 surrogates ("\\ud800"), which no tokenizer can encode."""
    stack = [data]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                raise APIError("a string in the request contains an unpaired UTF-16 surrogate") from None
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)


def validate(model_cls: type[BaseModel], data: dict):
    _warn_unknown_fields(model_cls, data)
    try:
        return model_cls.model_validate(data)
    except ValidationError as e:
        raise _validation_error(e) from None


_warned_fields: set[str] = set()


def _warn_unknown_fields(model_cls: type[BaseModel], data: dict) -> None:
    """Log each top-level field the model ignores, once per name for the life of the process."""
    known = {name for name, f in model_cls.model_fields.items()} | \
            {f.alias for f in model_cls.model_fields.values() if f.alias}
    for name in data:
        if name in known or name in _warned_fields or len(_warned_fields) >= MAX_WARNED_FIELDS:
            continue
        _warned_fields.add(name)
        shown = name if len(name) <= 64 else name[:61] + "..."
        logger.warning("request field %r is not supported and was ignored (said once per field name)", shown)


def _integral(value: Any) -> Any:
    """5.0 -> 5, as a lax JSON reader takes it; 5.5, "5" and true stay what they are (and are refused)."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


Int = Annotated[int, BeforeValidator(_integral)]  # an integer field that takes an integer-valued number


_UNION_TAGS = {"str", "int", "float", "bool", "dict", "list", "none"}


def _validation_error(e: ValidationError) -> APIError:
    errors = e.errors(include_url=False)
    first = errors[0]

    def param_of(err) -> str:
        # pydantic adds union-member tags such as 'str' or 'list[int]' to the location; drop them.
        parts = [p for p in err["loc"] if not (isinstance(p, str) and (p in _UNION_TAGS or "[" in p))]
        out = ""
        for p in parts:
            out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
        return out

    param = param_of(first)
    if first["type"] == "missing":
        return APIError(f"'{param}' is a required field", param=param)
    # A union reports one error per member it tried: say them all, for the same field.
    msgs = list(dict.fromkeys(err["msg"] for err in errors if param_of(err) == param))
    got = first.get("input")
    shown = json.dumps(got) if isinstance(got, (int, float, str, bool)) or got is None else f"a JSON {_json_type(got)}"
    if len(shown) > 80:
        shown = shown[:77] + "..."
    return APIError(f"invalid value for '{param}': {' or '.join(msgs)} (got {shown})", param=param)


def _json_type(value: Any) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", int: "number", float: "number"}.get(
        type(value), type(value).__name__)


# -- request models -----------------------------------------------------------------------------------

class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True, allow_inf_nan=False, populate_by_name=True)


class StreamOptions(_Body):
    include_usage: bool | None = False


class JsonSchemaSpec(_Body):
    name: str | None = None
    description: str | None = None
    schema_: dict | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Body):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaSpec | None = None


class StructuredOutputsBody(_Body):
    """forge's extension (vLLM's name): exactly one of these."""

    json_: dict | str | None = Field(default=None, alias="json")
    json_object: bool | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None


class _SamplingRequest(_Body):
    """Fields shared by /v1/completions and /v1/chat/completions. None means "not given"."""

    model: str | None = None
    n: Int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: Int | None = None
    min_p: float | None = None
    seed: Int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    min_tokens: Int | None = None
    ignore_eos: bool | None = None
    skip_special_tokens: bool | None = None
    include_stop_str_in_output: bool | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    user: str | None = None
    logit_bias: dict[str, float] | None = None
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputsBody | None = None
    guided_json: dict | str | None = None  # vLLM's older spellings of structured_outputs
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def sampling_params(self, max_tokens: int | None, logprobs: int | None, num_prompts: int = 1,
                        max_model_len: int | None = None) -> SamplingParams:
        n = SamplingParams.n if self.n is None else self.n
        if n * num_prompts > MAX_CHOICES:
            raise APIError(f"n x prompts = {n * num_prompts} choices; at most {MAX_CHOICES} per request", param="n")
        if self.seed is not None and not INT64_MIN <= self.seed <= INT64_MAX:
            raise APIError(f"seed must be a 64-bit signed integer, got {self.seed}", param="seed")
        if self.stream_options is not None and not self.stream:
            raise APIError("stream_options is only allowed when stream is true", param="stream_options")
        self._check_stop()
        if max_model_len is not None and self.min_tokens is not None and self.min_tokens > max_model_len:
            raise APIError(f"min_tokens ({self.min_tokens}) exceeds the model's context of {max_model_len} tokens",
                           param="min_tokens", code="context_length_exceeded")

        # An omitted field takes SamplingParams' default (defined there, once).
        given = {name: value for name in _DEFAULTED_SAMPLING_FIELDS if (value := getattr(self, name)) is not None}
        return SamplingParams(
            n=n, max_tokens=max_tokens, logprobs=logprobs, seed=self.seed, stop=self.stop,
            stop_token_ids=self.stop_token_ids, structured_outputs=self.structured_outputs_params(),
            logit_bias=self.logit_bias or None, **given,
        )

    def _check_stop(self) -> None:
        stops = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        if len(stops) > MAX_STOP_STRINGS:
            raise APIError(f"at most {MAX_STOP_STRINGS} stop strings, got {len(stops)}", param="stop")
        sizes = [len(s.encode("utf-8")) for s in stops]
        if sizes and max(sizes) > MAX_STOP_STRING_BYTES:
            raise APIError(f"a stop string may be at most {MAX_STOP_STRING_BYTES} bytes (UTF-8), got {max(sizes)}",
                           param="stop")
        if sum(sizes) > MAX_STOP_TOTAL_BYTES:
            raise APIError(f"stop strings may total at most {MAX_STOP_TOTAL_BYTES} bytes (UTF-8), got {sum(sizes)}",
                           param="stop")
        if self.stop_token_ids is not None and len(self.stop_token_ids) > MAX_STOP_TOKEN_IDS:
            raise APIError(f"at most {MAX_STOP_TOKEN_IDS} stop_token_ids, got {len(self.stop_token_ids)}",
                           param="stop_token_ids")

    def structured_outputs_params(self) -> StructuredOutputsParams | None:
        """response_format, structured_outputs and guided_* all say the same thing: accept one of them."""
        specs: dict[str, dict] = {}
        rf = self.response_format
        if rf is not None and rf.type == "json_object":
            specs["response_format"] = {"json_object": True}
        elif rf is not None and rf.type == "json_schema":
            if rf.json_schema is None or rf.json_schema.schema_ is None:
                raise APIError("response_format of type json_schema needs json_schema.schema",
                               param="response_format.json_schema")
            specs["response_format"] = {"json": rf.json_schema.schema_}
        so = self.structured_outputs
        if so is not None:
            fields = {"json": so.json_, "json_object": so.json_object, "regex": so.regex, "choice": so.choice,
                      "grammar": so.grammar}
            specs["structured_outputs"] = {k: v for k, v in fields.items() if v is not None and v is not False}
        guided = {"json": self.guided_json, "regex": self.guided_regex, "choice": self.guided_choice,
                  "grammar": self.guided_grammar}
        guided = {k: v for k, v in guided.items() if v is not None}
        if guided:
            specs["guided_*"] = guided
        if not specs:
            return None
        if len(specs) > 1:
            raise APIError(f"give at most one of response_format, structured_outputs and guided_*; got {sorted(specs)}",
                           param="response_format")
        (where, spec), = specs.items()
        try:
            return StructuredOutputsParams(**spec)
        except InvalidRequestError as e:
            raise APIError(str(e), param=where if e.param == "structured_outputs" else e.param) from None


class CompletionRequest(_SamplingRequest):
    prompt: Any = None  # str | list[str] | list[int] | list[list[int]]: checked by prompts()
    max_tokens: Int | None = 16  # OpenAI's default for completions
    echo: bool | None = None
    logprobs: Int | None = None
    suffix: str | None = None
    best_of: Int | None = None

    @property
    def prompt_only(self) -> bool:
        """echo with max_tokens 0: the prompt (and its logprobs) back, nothing generated, as evaluation
        harnesses score text (lm-eval-harness's loglikelihood requests)."""
        return bool(self.echo) and self.max_tokens == 0

    def completion_params(self, num_prompts: int, max_model_len: int | None = None) -> SamplingParams:
        max_tokens = self.max_tokens
        if max_tokens == 0:
            if not self.echo:
                raise APIError("max_tokens 0 generates nothing: it is only allowed with echo true (to score the "
                               "prompt)", param="max_tokens")
            max_tokens = 1  # the prompt's logprobs come with the first token, which is then dropped (as vLLM)
        params = self.sampling_params(max_tokens, self.logprobs, num_prompts=num_prompts,
                                      max_model_len=max_model_len)
        if self.echo and self.logprobs is not None:  # echoed prompt tokens come with their logprobs too
            params.prompt_logprobs = self.logprobs
            params.validate()
        return params

    def prompts(self) -> list[str | list[int]]:
        p = self.prompt
        if p is None:
            raise APIError("'prompt' is a required field", param="prompt")
        if isinstance(p, str):
            return [p]
        if isinstance(p, list) and p:
            if all(isinstance(x, str) for x in p):
                return list(p)
            if all(_is_token_id(x) for x in p):
                return [list(p)]
            if all(isinstance(x, list) and all(_is_token_id(t) for t in x) for x in p):
                return [list(x) for x in p]
        if isinstance(p, list) and not p:
            raise APIError("prompt is empty", param="prompt")
        raise APIError("prompt must be a string, a list of strings, a list of token ids or a list of lists of "
                       "token ids", param="prompt")

    def check_supported(self) -> None:
        if self.suffix:
            raise APIError("suffix is not supported", param="suffix")
        if self.best_of is not None and self.best_of != (self.n or 1):
            raise APIError("best_of other than n is not supported", param="best_of")


def _is_token_id(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


class ContentPart(_Body):
    type: str
    text: str | None = None


class FunctionCall(_Body):
    name: str
    arguments: str | dict  # OpenAI sends JSON text; an object is taken too


class ToolCallMessage(_Body):
    """A call in an assistant message (the history of a tool-using conversation)."""

    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Body):
    role: str
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCallMessage] | None = None  # assistant
    tool_call_id: str | None = None  # tool: which call this is the result of
    reasoning_content: str | None = None  # assistant: its reasoning, for templates that show it in history


# "developer" is OpenAI's newer name for the system role.
_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant", "tool": "tool"}


class ChatCompletionRequest(_SamplingRequest):
    messages: list[ChatMessage]
    max_tokens: Int | None = None  # None: up to the end of the context (docs/RELIABILITY.md)
    max_completion_tokens: Int | None = None  # OpenAI's newer name for max_tokens; wins when both are given
    logprobs: bool | None = None
    top_logprobs: Int | None = None
    add_generation_prompt: bool | None = None
    continue_final_message: bool | None = None
    chat_template_kwargs: dict | None = None
    tools: list | None = None
    tool_choice: str | dict | None = None
    parallel_tool_calls: bool | None = None

    @property
    def max_new_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    @property
    def num_logprobs(self) -> int | None:
        if self.top_logprobs is not None and not self.logprobs:
            raise APIError("top_logprobs needs logprobs to be true", param="top_logprobs")
        if self.top_logprobs is not None and not 0 <= self.top_logprobs <= 20:
            raise APIError(f"top_logprobs must be in [0, 20], got {self.top_logprobs}", param="top_logprobs")
        return (self.top_logprobs or 0) if self.logprobs else None

    def template_options(self) -> dict:
        """add_generation_prompt, continue_final_message and the chat_template_kwargs, for
        Tokenizer.apply_chat_template. Continuing the final message turns the generation prompt off
        unless it was asked for (then both is an error, as in vLLM)."""
        return chat_template_options(self.add_generation_prompt, self.continue_final_message,
                                     self.chat_template_kwargs)

    def conversation(self) -> list[dict]:
        """The messages as the chat template wants them: role, text content and, where given, the
        assistant's tool_calls and reasoning_content, a tool result's tool_call_id, a name."""
        return conversation(self.messages)


def chat_template_options(add_generation_prompt: bool | None, continue_final_message: bool | None,
                          chat_template_kwargs: dict | None) -> dict:
    kwargs = chat_template_kwargs or {}
    reserved = [k for k in kwargs if k in RESERVED_TEMPLATE_KWARGS]
    if reserved:
        raise APIError(f"chat_template_kwargs may not set {reserved[0]!r}: it is a request field of its own",
                       param="chat_template_kwargs")
    bad = [k for k in kwargs if not k.isidentifier() or k == "self"]
    if bad:
        raise APIError(f"chat_template_kwargs keys are template variable names; {bad[0][:64]!r} is not one",
                       param="chat_template_kwargs")
    continuing = bool(continue_final_message)
    return {**kwargs, "continue_final_message": continuing,
            "add_generation_prompt": add_generation_prompt if add_generation_prompt is not None else not continuing}


def conversation(messages: list[ChatMessage]) -> list[dict]:
    if not messages:
        raise APIError("messages must not be empty", param="messages")
    out = []
    for i, m in enumerate(messages):
        role = _ROLES.get(m.role)
        if role is None:
            hint = "; a tool result is role tool" if m.role == "function" else ""
            raise APIError(f"unsupported role {m.role!r}; use system, user, assistant or tool{hint}",
                           param=f"messages[{i}].role")
        content = m.content
        if isinstance(content, list):
            bad = [part.type for part in content if part.type != "text" or part.text is None]
            if bad:
                raise APIError(f"only text content parts are supported, got {bad[0]!r}",
                               param=f"messages[{i}].content")
            content = "\n".join(part.text for part in content)
        if content is None:
            if role != "assistant":
                raise APIError(f"a {m.role} message needs content", param=f"messages[{i}].content")
            content = ""
        if m.tool_calls and role != "assistant":
            raise APIError(f"only assistant messages have tool_calls, not {m.role}", param=f"messages[{i}].tool_calls")
        message: dict = {"role": role, "content": content}
        if m.name is not None:
            message["name"] = m.name
        if m.tool_calls:
            message["tool_calls"] = [
                {"id": c.id, "type": "function", "function": {"name": c.function.name, "arguments": c.function.arguments
                                                              if isinstance(c.function.arguments, str)
                                                              else json.dumps(c.function.arguments)}}
                for c in m.tool_calls]
        if m.tool_call_id is not None:
            message["tool_call_id"] = m.tool_call_id
        if m.reasoning_content is not None:
            message["reasoning_content"] = m.reasoning_content
        out.append(message)
    return out


# -- /tokenize and /detokenize (vLLM's shapes) ---------------------------------------------------------

class TokenizeRequest(_Body):
    """vLLM's TokenizeCompletionRequest (`prompt`) or TokenizeChatRequest (`messages`)."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool | None = None  # default: true for a prompt, false for messages (as vLLM)
    add_generation_prompt: bool | None = None
    continue_final_message: bool | None = None
    chat_template_kwargs: dict | None = None
    tools: list | None = None
    return_token_strs: bool | None = None

    def check(self) -> None:
        if (self.prompt is None) == (self.messages is None):
            raise APIError("give either prompt (text) or messages (a chat), not both or neither",
                           param="prompt" if self.prompt is None else "messages")


class DetokenizeRequest(_Body):
    model: str | None = None
    tokens: list[int]
