"""A chat request's tools resolved once, and its output read back as OpenAI's assistant message.

`ToolUse.resolve` checks a request's `tools` / `tool_choice` / `parallel_tool_calls` against the
tool-call parser the server (or `LLM.chat`) reads outputs with, and says what generation needs:
the JSON schema that constrains "required" and named functions, and whether special tokens must be
kept in the output text (Mistral's `[TOOL_CALLS]`, Llama's `<|python_tag|>` are control tokens).

`ChatOutputParser` reads one output (one choice) streamed or whole: the reasoning parser first,
then its content through the tool parser, as vLLM does. Each `feed` returns a `ChatDelta`, the
`delta` of one chat.completion.chunk (reasoning_content, content, tool_calls).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from forge.errors import InvalidRequestError
from forge.sampling_params import SamplingParams, StructuredOutputsParams
from forge.tools.grammar import constrained_tool_parser, resolve_tool_choice, tool_call_schema, validate_tools
from forge.tools.reasoning import END_TAG, START_TAG, ReasoningDelta, ReasoningParser, get_reasoning_parser
from forge.tools.tool_parsers import (
    ContentDelta,
    ToolCall,
    ToolCallDelta,
    ToolParser,
    assemble,
    call_id_factory,
    detect_tool_parser,
    get_tool_parser,
)

__all__ = ["ToolUse", "ChatDelta", "ParsedChat", "ChatOutputParser", "chat_params", "reasoning_end_for_grammar",
           "template_tool_parser"]

# Parsers whose markers are special tokens: the output must be decoded with special tokens kept.
_SPECIAL_TOKEN_PARSERS = ("mistral", "llama3_json")


@dataclass(frozen=True)
class ToolUse:
    """A chat request's tools, checked: what the template gets (`tools`), what constrains the output
    (`schema`) and how the output is read (`tool_choice`, `parser`)."""

    tools: list[dict] | None  # as the request gave them: the chat template's `tools`
    functions: list[dict]
    tool_choice: str  # "none" | "auto" | "required" | a function's name
    parallel_tool_calls: bool = True
    parser: str | None = None  # the tool-call parser for "auto" (and the id style of every call)

    @classmethod
    def resolve(cls, tools: Any, tool_choice: Any = None, parallel_tool_calls: Any = None,
                parser: str | None = None, require_parser: bool = True) -> ToolUse:
        """Check the request's fields (InvalidRequestError naming the field). `parser` is the
        server's --tool-call-parser (None: none); with require_parser, tool_choice "auto" without
        one is an error, since the calls could not be read."""
        functions = validate_tools(tools)
        choice = resolve_tool_choice(tool_choice, functions)
        if parallel_tool_calls is not None and not isinstance(parallel_tool_calls, bool):
            raise InvalidRequestError(f"parallel_tool_calls must be true or false, got {parallel_tool_calls!r}",
                                      param="parallel_tool_calls")
        if choice == "auto" and parser is None and require_parser:
            raise InvalidRequestError(
                'tool_choice "auto" (the default with tools) needs a tool-call parser, and this server has none: '
                "the model's chat template shows no known tool-call format. Start the server with "
                '--tool-call-parser hermes|llama3_json|mistral, or send tool_choice "required" or a named function',
                param="tool_choice")
        return cls(tools if functions else None, functions, choice, parallel_tool_calls is not False, parser)

    @property
    def schema(self) -> dict | None:
        """The JSON schema the output must follow ("required" / a named function), else None."""
        return tool_call_schema(self.functions, self.tool_choice, self.parallel_tool_calls)

    @property
    def constrained(self) -> bool:
        return self.tool_choice not in ("none", "auto")

    @property
    def keeps_special_tokens(self) -> bool:
        """Whether outputs must be decoded with special tokens kept, for the parser to see its markers."""
        return self.tool_choice == "auto" and self.parser in _SPECIAL_TOKEN_PARSERS

    def tool_parser(self, seed: int | None = None) -> ToolParser | None:
        """A fresh parser for one output, or None when the output is not read for calls."""
        ids = call_id_factory(seed, style="mistral" if self.parser == "mistral" else "openai")
        if self.constrained:
            return constrained_tool_parser(self.tool_choice, ids)
        if self.tool_choice == "auto" and self.parser is not None:
            return get_tool_parser(self.parser, ids)
        return None


@dataclass
class ChatDelta:
    """What one piece of output adds to the assistant message."""

    reasoning: str = ""
    content: str = ""
    tool_calls: list[ToolCallDelta] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.reasoning or self.content or self.tool_calls)

    def to_openai(self) -> dict:
        """The `delta` of a chat.completion.chunk (only the fields this piece has)."""
        delta: dict = {}
        if self.reasoning:
            delta["reasoning_content"] = self.reasoning
        if self.content:
            delta["content"] = self.content
        if self.tool_calls:
            delta["tool_calls"] = [d.to_openai()["tool_calls"][0] for d in self.tool_calls]
        return delta


@dataclass
class ParsedChat:
    """A whole output read as an assistant message."""

    reasoning: str | None  # None without a reasoning parser
    content: str
    tool_calls: list[ToolCall]


class ChatOutputParser:
    """Reads one output: reasoning (if a reasoning parser is given) first, then the content through
    the tool parser (if any). `max_calls` drops calls beyond it (parallel_tool_calls false)."""

    def __init__(self, reasoning: ReasoningParser | None = None, tools: ToolParser | None = None,
                 max_calls: int | None = None):
        self.reasoning, self.tools, self.max_calls = reasoning, tools, max_calls
        self.num_calls = 0

    @classmethod
    def for_request(cls, tool_use: ToolUse | None, reasoning_parser: str | None, prompt: str | None,
                    seed: int | None = None) -> ChatOutputParser:
        """The parser for one output of a chat request. `prompt`: the rendered prompt text (does the
        output start inside the reasoning?)."""
        reasoning = get_reasoning_parser(reasoning_parser, prompt) if reasoning_parser else None
        tools = tool_use.tool_parser(seed) if tool_use is not None else None
        limit = 1 if tool_use is not None and not tool_use.parallel_tool_calls else None
        return cls(reasoning, tools, limit)

    def feed(self, text: str, final: bool = False) -> ChatDelta:
        """The next piece of output text; final: the output ends with it (everything held is decided)."""
        if self.reasoning is None:
            pieces = [ContentDelta(text)] if text else []
        else:
            pieces = self.reasoning.feed(text) + (self.reasoning.finish() if final else [])
        return self._route(pieces, final)

    def finish(self) -> ChatDelta:
        return self.feed("", final=True)

    def extract(self, text: str) -> ParsedChat:
        whole = self.feed(text, final=True)
        _, calls = assemble(whole.tool_calls)
        return ParsedChat(whole.reasoning if self.reasoning is not None else None, whole.content, calls)

    def _route(self, pieces: list, final: bool) -> ChatDelta:
        out = ChatDelta()
        for piece in pieces:
            if isinstance(piece, ReasoningDelta):
                out.reasoning += piece.text
            elif self.tools is None:
                out.content += piece.text
            else:
                self._add(out, self.tools.feed(piece.text))
        if final and self.tools is not None:
            self._add(out, self.tools.finish())
        return out

    def _add(self, out: ChatDelta, deltas: list) -> None:
        for d in deltas:
            if isinstance(d, ContentDelta):
                out.content += d.text
                continue
            if self.max_calls is not None and d.index >= self.max_calls:
                continue
            self.num_calls = max(self.num_calls, d.index + 1)
            last = out.tool_calls[-1] if out.tool_calls else None
            if last is not None and last.index == d.index and d.id is None:  # one entry per call per chunk
                out.tool_calls[-1] = ToolCallDelta(last.index, last.id, last.name, last.arguments + d.arguments)
            else:
                out.tool_calls.append(d)


def reasoning_end_for_grammar(generation_prompt: str) -> str | None:
    """Where a grammar (structured outputs, forced tool calls) starts when a reasoning parser is on:
    END_TAG ("</think>": after the model's reasoning) unless the generation prompt already closed the
    reasoning (a template with thinking turned off writes an empty `<think></think>`), then None (at
    once). As vLLM decides it: the last tag of the prompt's new turn; no tag means the model reasons first."""
    return None if generation_prompt.rfind(END_TAG) > generation_prompt.rfind(START_TAG) else END_TAG


def chat_params(params: SamplingParams, tool_use: ToolUse, reasoning_parser: str | None,
                generation_prompt: str) -> SamplingParams:
    """The request's sampling parameters with the tool-call grammar ("required" / named), with any
    grammar starting after the reasoning when a reasoning parser is on, and with special tokens kept
    when the tool parser needs them."""
    changes: dict = {}
    spec = params.structured_outputs
    if tool_use.constrained:
        if spec is not None:
            raise InvalidRequestError(f'tool_choice {tool_use.tool_choice!r} already constrains the output; '
                                      f'leave out response_format / structured_outputs', param="tool_choice")
        spec = StructuredOutputsParams(json=tool_use.schema)
    if spec is not None and reasoning_parser is not None:
        spec = dataclasses.replace(spec, reasoning_end=reasoning_end_for_grammar(generation_prompt))
    if spec is not params.structured_outputs:
        changes["structured_outputs"] = spec
    if tool_use.keeps_special_tokens:
        changes["skip_special_tokens"] = False
    return dataclasses.replace(params, **changes) if changes else params


def template_tool_parser(tokenizer, chat_template: str | None = None) -> str | None:
    """The tool-call parser for the template tool calls are rendered with: `chat_template` (text, or
    the name of one of the model's templates) or else the model's "tool_use" template or default one."""
    named = tokenizer.named_chat_templates
    if chat_template is None:
        template = named.get("tool_use") or tokenizer.chat_template
    else:
        template = named.get(chat_template, chat_template)
    return detect_tool_parser(template)
