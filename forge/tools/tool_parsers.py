"""Tool-call parsers: find the calls in a model's text output, whole or as it streams.

One parser object reads one output (one choice of one request). Stream it with `feed(delta_text)`
for each new piece of text and `finish()` at the end, or parse a finished output with
`extract(text)`. Both run the same state machine, so the calls and content that a stream adds up
to are exactly what `extract` returns, however the text was split.

`feed` returns OpenAI-shaped deltas: `ContentDelta` for text outside tool calls and, for each
call, one `ToolCallDelta` with its index, id and function name, then `ToolCallDelta`s of argument
text whose concatenation is the call's final `arguments` string. Text that might still turn into
a tool-call marker is held back until it is decided (as stop strings are).

How a call is read (shared by every format): a JSON object `{"name": ..., "arguments": {...}}`
("parameters" is accepted for "arguments", as Llama writes it). The call is committed, and its id
and name sent, as soon as its name is known and its arguments object has begun; the arguments are
then streamed as the model writes them, checked character by character by a JSON scanner. Before
that point anything unexpected (not JSON, a key other than name/arguments/parameters/type/id, a
non-string name, arguments that are not an object) turns the whole would-be call back into plain
content. After it, the call stands: if the output ends (max_tokens) or its JSON breaks inside the
arguments, the call keeps the arguments sent so far (then not valid JSON, like OpenAI's own
truncated calls) and any text after the break is content.

Whitespace between calls, and between content and a call, is dropped.
"""

from __future__ import annotations

import json
import random
import string
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import ClassVar

from forge.text import partial_suffix_len
from forge.tools.json_scan import JsonScanner

__all__ = [
    "ToolCall", "ContentDelta", "ToolCallDelta", "Delta", "ToolParser", "HermesToolParser",
    "Llama3JsonToolParser", "MistralToolParser", "ArgumentsToolParser", "CallArrayToolParser",
    "TOOL_PARSERS", "get_tool_parser", "detect_tool_parser", "call_id_factory", "assemble",
]

_WS = " \t\n\r"
_ARGUMENT_KEYS = ("arguments", "parameters")
# Keys a call object may have before it is committed; any other key means it is not a tool call.
_CALL_KEYS = frozenset({"name", "type", "id", *_ARGUMENT_KEYS})
_ID_ALPHABET = string.ascii_letters + string.digits


# -- results and deltas -------------------------------------------------------------------------


@dataclass(frozen=True)
class ToolCall:
    id: str
    name: str
    arguments: str  # the arguments object's JSON text, as the model wrote it

    def to_openai(self) -> dict:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


@dataclass(frozen=True)
class ContentDelta:
    text: str

    def to_openai(self) -> dict:
        return {"content": self.text}


@dataclass(frozen=True)
class ToolCallDelta:
    index: int
    id: str | None = None  # id and name are set on a call's first delta only
    name: str | None = None
    arguments: str = ""  # a fragment of the arguments text

    def to_openai(self) -> dict:
        """The `delta` of a chat.completion.chunk carrying this piece of a call."""
        call: dict = {"index": self.index}
        if self.id is not None:
            call.update(id=self.id, type="function", function={"name": self.name, "arguments": self.arguments})
        else:
            call["function"] = {"arguments": self.arguments}
        return {"tool_calls": [call]}


Delta = ContentDelta | ToolCallDelta


def assemble(deltas: Iterable[Delta]) -> tuple[str, list[ToolCall]]:
    """(content, calls) that a stream of deltas adds up to."""
    content: list[str] = []
    calls: dict[int, list] = {}
    for d in deltas:
        if isinstance(d, ContentDelta):
            content.append(d.text)
        elif d.id is not None:
            calls[d.index] = [d.id, d.name, [d.arguments]]
        else:
            calls[d.index][2].append(d.arguments)
    return "".join(content), [ToolCall(i, n, "".join(a)) for i, n, a in (calls[k] for k in sorted(calls))]


def call_id_factory(seed: int | None = None, style: str = "openai") -> Callable[[], str]:
    """Makes tool-call ids: "call_" + 24 letters/digits (OpenAI's shape), or 9 letters/digits for
    style="mistral" (Mistral's chat templates reject any other id). A seed makes them repeatable."""
    rng = random.Random(seed) if seed is not None else random.SystemRandom()
    if style == "mistral":
        return lambda: "".join(rng.choices(_ID_ALPHABET, k=9))
    if style != "openai":
        raise ValueError(f"unknown tool-call id style {style!r}; expected 'openai' or 'mistral'")
    return lambda: "call_" + "".join(rng.choices(_ID_ALPHABET, k=24))


# -- one call object being read -------------------------------------------------------------------


class _CallObject:
    """A call object `{"name": ..., "arguments": {...}}`, or, when the name is already known (Mistral's
    `name[ARGS]{...}`, a grammar-forced named function), the arguments object alone."""

    def __init__(self, name: str | None = None):
        self.scanner = JsonScanner()
        self.text = ""  # the object's text consumed so far
        self.arguments_only = name is not None
        self.name = name
        self.args_start: int | None = None
        self.args_end: int | None = None
        self.ready = False  # name known and arguments object begun: the call can be committed
        self.index: int | None = None  # set when committed
        self.sent = 0  # argument characters sent so far
        self._seen = 0
        self._key: str | None = None
        self._value_start = 0

    def read_events(self) -> bool:
        """Apply the scanner's new events; False when this cannot be a tool call (checked until ready)."""
        events = self.scanner.events
        while self._seen < len(events):
            kind, depth, *where = events[self._seen]
            self._seen += 1
            if self.arguments_only:
                if depth == 0 and kind == "start":
                    if self.text[where[0]] != "{":
                        return False
                    self.args_start = where[0]
                elif depth == 0 and kind == "end":
                    self.args_end = where[0]
            elif depth == 1 and kind == "key":
                self._key = json.loads(self.text[where[0]:where[1]])
                if not self.ready and self._key not in _CALL_KEYS:
                    return False
            elif depth == 1 and kind == "start":
                self._value_start = where[0]
                if self._key in _ARGUMENT_KEYS and self.args_start is None:
                    self.args_start = where[0]
            elif depth == 1 and kind == "end":
                if self._key == "name" and self.name is None:
                    name = json.loads(self.text[self._value_start:where[0]])
                    if not isinstance(name, str) or not name.strip():
                        return False
                    self.name = name
                elif self._value_start == self.args_start:
                    self.args_end = where[0]
            if not self.ready:
                self.ready = (self.name is not None and self.args_start is not None
                              and self.text[self.args_start] == "{")
        return True

    def held_arguments(self) -> str | None:
        """For a complete object that never became ready: its arguments text, or None if it is not a
        call. Absent or null arguments are "{}"; a string holding a JSON object (some models quote
        the arguments) is unquoted."""
        if self.name is None:
            return None
        if self.args_start is None:
            return "{}"
        value = json.loads(self.text[self.args_start:self.args_end])
        if value is None:
            return "{}"
        if isinstance(value, str):
            try:
                inner = json.loads(value)
            except ValueError:
                return None
            return value.strip() if isinstance(inner, dict) else None
        return None


# -- the shared state machine ---------------------------------------------------------------------


class ToolParser:
    """Base class: content outside calls, markers, whitespace and the call objects. A subclass names
    its markers and supplies the states that follow a marker (see the formats below)."""

    name: ClassVar[str]
    markers: ClassVar[tuple[str, ...]] = ()
    id_style: ClassVar[str] = "openai"

    def __init__(self, id_factory: Callable[[], str] | None = None):
        self._new_id = id_factory or call_id_factory(style=self.id_style)
        self._buf = ""  # text received and not yet consumed
        self._out: list[Delta] = []
        self._state: Callable[[bool], bool] = self._initial_state()
        self._ws = ""  # whitespace after content, held until it is known not to precede a call
        self._after_call = False  # a call was the last thing out: leading whitespace is dropped
        self._at_start = True  # nothing but whitespace has come out yet
        self._raw = ""  # text of a would-be call not yet committed: content again if it fails
        self._call: _CallObject | None = None
        self._then: Callable[[bool], bool] = self._outside  # the state after the current call
        self._num_calls = 0
        self._finished = False

    # -- public ----------------------------------------------------------------------------------

    def feed(self, text: str) -> list[Delta]:
        """Add the next piece of output text; returns the deltas it decides."""
        if self._finished:
            raise RuntimeError("feed() after finish(): a tool parser reads one output")
        self._buf += text
        self._run(final=False)
        return self._take()

    def finish(self) -> list[Delta]:
        """The output has ended: decide everything still held back."""
        if self._finished:
            return []
        self._run(final=True)
        self._finished = True
        if self._ws and not self._after_call:
            self._out.append(ContentDelta(self._ws))
        self._ws = ""
        return self._take()

    def extract(self, text: str) -> tuple[str, list[ToolCall]]:
        """(content, calls) of a whole output."""
        return assemble(self.feed(text) + self.finish())

    # -- machinery -------------------------------------------------------------------------------

    def _initial_state(self) -> Callable[[bool], bool]:
        return self._outside

    def _run(self, final: bool) -> None:
        # Each state consumes text and/or moves to another state and returns True, or returns False
        # when it needs more text (at the end: when nothing is left to do).
        while self._state(final):
            pass

    def _take(self) -> list[Delta]:
        """The deltas produced since the last call, adjacent pieces of one kind merged."""
        merged: list[Delta] = []
        for d in self._out:
            last = merged[-1] if merged else None
            if isinstance(d, ContentDelta) and isinstance(last, ContentDelta):
                merged[-1] = ContentDelta(last.text + d.text)
            elif isinstance(d, ToolCallDelta) and isinstance(last, ToolCallDelta) and d.index == last.index:
                merged[-1] = ToolCallDelta(last.index, last.id, last.name, last.arguments + d.arguments)
            else:
                merged.append(d)
        self._out = []
        return merged

    def _content(self, text: str) -> None:
        if not text:
            return
        text = self._ws + text
        self._ws = ""
        if self._after_call:
            text = text.lstrip(_WS)
            if not text:
                return
            self._after_call = False
        body = text.rstrip(_WS)
        self._ws = text[len(body):]
        if body:
            self._at_start = False
            self._out.append(ContentDelta(body))

    def _skip_ws(self) -> bool:
        """Move leading whitespace of the buffer into the would-be call's text; True if more follows."""
        rest = self._buf.lstrip(_WS)
        self._raw += self._buf[: len(self._buf) - len(rest)]
        self._buf = rest
        return bool(rest)

    def _consume(self, n: int) -> None:
        self._raw += self._buf[:n]
        self._buf = self._buf[n:]

    def _fail(self) -> bool:
        """The would-be call is not one: its text is content, and scanning resumes after it."""
        raw, self._raw = self._raw, ""
        self._call = None
        self._content(raw)
        self._state = self._outside
        return True

    def _outside(self, final: bool) -> bool:
        buf = self._buf
        if not buf:
            return False
        found = min(((i, m) for m in self.markers if (i := buf.find(m)) >= 0), default=None)
        if found is not None:
            i, marker = found
            self._content(buf[:i])
            self._buf = buf[i + len(marker):]
            self._raw = marker
            self._state = self._after_marker(marker)
            return True
        hold = 0 if final else partial_suffix_len(buf, self.markers)
        self._content(buf[: len(buf) - hold])
        self._buf = buf[len(buf) - hold:]
        return False

    def _after_marker(self, marker: str) -> Callable[[bool], bool]:
        raise NotImplementedError

    def _expect(self, final: bool, options: dict[str, Callable[[bool], bool]]) -> bool:
        """After optional whitespace, one of `options` (literal -> next state) must follow, else the
        would-be call fails."""
        if not self._skip_ws():
            return self._fail() if final else False
        for literal, next_state in options.items():
            if self._buf.startswith(literal):
                self._consume(len(literal))
                self._state = next_state
                return True
        if not final and any(lit.startswith(self._buf) for lit in options):
            return False
        return self._fail()

    def _start_call(self, then: Callable[[bool], bool], name: str | None = None) -> bool:
        """A call object starts at the buffer (a "{" there); `then` reads what follows it."""
        self._call = _CallObject(name)
        self._then = then
        self._state = self._in_call
        return True

    def _call_or_fail(self, final: bool, then: Callable[[bool], bool], name: str | None = None) -> bool:
        """After optional whitespace a call object must start, else the would-be call fails."""
        if not self._skip_ws():
            return self._fail() if final else False
        return self._start_call(then, name) if self._buf[0] == "{" else self._fail()

    def _in_call(self, final: bool) -> bool:
        call = self._call
        consumed = call.scanner.feed(self._buf)
        chunk, self._buf = self._buf[:consumed], self._buf[consumed:]
        call.text += chunk
        if call.index is None:
            self._raw += chunk
        if not call.read_events():
            return self._fail()
        if call.ready and call.index is None:
            self._commit(call, "")
        if call.index is not None:
            self._send_arguments(call)
        if call.scanner.done:
            if call.index is None:  # complete, but its arguments were not an object being written
                held = call.held_arguments()
                if held is None:
                    return self._fail()
                self._commit(call, held)
            return self._end_call()
        if call.scanner.failed or (final and not self._buf):
            return self._end_call() if call.index is not None else self._fail()
        return consumed > 0

    def _commit(self, call: _CallObject, arguments: str) -> None:
        call.index = self._num_calls
        self._num_calls += 1
        self._ws = ""
        self._raw = ""
        self._after_call = True
        self._at_start = False
        self._out.append(ToolCallDelta(call.index, self._new_id(), call.name, arguments))

    def _send_arguments(self, call: _CallObject) -> None:
        if call.args_start is None or call.text[call.args_start] != "{":
            return
        end = call.args_end if call.args_end is not None else len(call.text)
        start = call.args_start + call.sent
        if end > start:
            self._out.append(ToolCallDelta(call.index, arguments=call.text[start:end]))
            call.sent = end - call.args_start

    def _end_call(self) -> bool:
        self._call = None
        self._raw = ""
        self._state = self._then
        return True


# -- formats ---------------------------------------------------------------------------------------


class HermesToolParser(ToolParser):
    """Hermes 2/3, Qwen2.5, Qwen3 (and most models trained on their format):
    `<tool_call>\\n{"name": "f", "arguments": {...}}\\n</tool_call>`, one block per call (several
    objects inside one block are read too). A missing `</tool_call>` at the end is tolerated."""

    name = "hermes"
    markers = ("<tool_call>",)
    _CLOSE = "</tool_call>"

    def _after_marker(self, marker: str) -> Callable[[bool], bool]:
        return self._open

    def _open(self, final: bool) -> bool:
        return self._call_or_fail(final, then=self._close)

    def _close(self, final: bool) -> bool:
        if not self._skip_ws():
            return False
        if self._buf.startswith(self._CLOSE):
            self._buf = self._buf[len(self._CLOSE):]
            self._raw = ""
            self._state = self._outside
            return True
        if self._buf[0] == "{":
            return self._start_call(then=self._close)
        if not final and self._CLOSE.startswith(self._buf):
            return False
        self._raw = ""  # anything else after a call is content again
        self._state = self._outside
        return True


class Llama3JsonToolParser(ToolParser):
    """Llama 3.1 / 3.2 / 3.3 JSON tool calls: `{"name": "f", "parameters": {...}}` at the start of
    the output, or after `<|python_tag|>` (a special token: it only reaches the parser when the
    output is decoded with special tokens kept); several calls separated by ";". Llama's built-in
    tools (`<|python_tag|>brave_search.call(...)`) and the pythonic `[f(x=1)]` form are content."""

    name = "llama3_json"
    markers = ("<|python_tag|>",)

    def _outside(self, final: bool) -> bool:
        if self._at_start and self._buf:
            rest = self._buf.lstrip(_WS)
            if rest.startswith("{"):
                self._content(self._buf[: len(self._buf) - len(rest)])  # held: it precedes a call
                self._buf = rest
                return self._start_call(then=self._separator)
            if not rest and not final:
                self._content(self._buf)  # whitespace only: held, the output may still start with "{"
                self._buf = ""
                return False
        return super()._outside(final)

    def _after_marker(self, marker: str) -> Callable[[bool], bool]:
        return self._open

    def _open(self, final: bool) -> bool:
        return self._call_or_fail(final, then=self._separator)

    def _separator(self, final: bool) -> bool:
        if not self._skip_ws():
            return False
        self._raw = ""
        if self._buf[0] == ";":
            self._consume(1)
            self._state = self._open
        else:
            self._state = self._outside
        return True


class MistralToolParser(ToolParser):
    """Mistral: `[TOOL_CALLS][{"name": "f", "arguments": {...}}, ...]` (Mistral 7B v0.3, Mixtral,
    Nemo) and the newer `[TOOL_CALLS]f[ARGS]{...}` (one marker per call; Mistral Small 3.2,
    Magistral, Devstral). [TOOL_CALLS] is a control token: the output must be decoded with special
    tokens kept. Ids are 9 letters/digits, the only ids Mistral's templates accept back."""

    name = "mistral"
    markers = ("[TOOL_CALLS]",)
    id_style = "mistral"
    _NAME_CHARS = frozenset(string.ascii_letters + string.digits + "_-.")
    _MAX_NAME = 64

    def __init__(self, id_factory: Callable[[], str] | None = None):
        super().__init__(id_factory)
        self._pending_name = ""

    def _after_marker(self, marker: str) -> Callable[[bool], bool]:
        return self._open

    def _open(self, final: bool) -> bool:
        if not self._skip_ws():
            return self._fail() if final else False
        if self._buf[0] == "[":
            self._consume(1)
            self._state = self._first
            return True
        if self._buf[0] in self._NAME_CHARS:
            self._state = self._function_name
            return True
        return self._fail()

    def _first(self, final: bool) -> bool:
        return self._call_or_fail(final, then=self._separator)

    def _separator(self, final: bool) -> bool:
        if not self._skip_ws():
            return False
        self._raw = ""
        if self._buf[0] == ",":
            self._consume(1)
            self._state = self._first
        else:
            if self._buf[0] == "]":
                self._buf = self._buf[1:]
            self._state = self._outside
        return True

    def _function_name(self, final: bool) -> bool:
        buf = self._buf
        end = next((i for i, ch in enumerate(buf) if ch not in self._NAME_CHARS), None)
        if end is None:
            if final or len(buf) > self._MAX_NAME:
                return self._fail()
            return False
        if buf[end] != "[" or end > self._MAX_NAME:
            return self._fail()
        self._pending_name = buf[:end]
        self._consume(end)
        self._state = self._args_tag
        return True

    def _args_tag(self, final: bool) -> bool:
        return self._expect(final, {"[ARGS]": self._named_arguments})

    def _named_arguments(self, final: bool) -> bool:
        return self._call_or_fail(final, then=self._outside, name=self._pending_name)


class ArgumentsToolParser(ToolParser):
    """The output of a grammar-forced named function (tool_choice {"type": "function", ...}): the
    arguments object alone."""

    name = "named_function"

    def __init__(self, function_name: str, id_factory: Callable[[], str] | None = None):
        self._function_name = function_name
        super().__init__(id_factory)

    def _initial_state(self) -> Callable[[bool], bool]:
        return self._arguments

    def _arguments(self, final: bool) -> bool:
        return self._call_or_fail(final, then=self._outside, name=self._function_name)


class CallArrayToolParser(MistralToolParser):
    """The output of the grammar for tool_choice "required": `[{"name": ..., "arguments": {...}}, ...]`
    (Mistral's array without its marker)."""

    name = "required"
    markers = ()
    id_style = "openai"

    def _initial_state(self) -> Callable[[bool], bool]:
        return self._array

    def _array(self, final: bool) -> bool:
        return self._expect(final, {"[": self._first})


TOOL_PARSERS: dict[str, type[ToolParser]] = {
    cls.name: cls for cls in (HermesToolParser, Llama3JsonToolParser, MistralToolParser)
}


def get_tool_parser(name: str, id_factory: Callable[[], str] | None = None) -> ToolParser:
    """A fresh parser for one output, by `--tool-call-parser` name."""
    cls = TOOL_PARSERS.get(name)
    if cls is None:
        raise ValueError(f"unknown tool-call parser {name!r}; choose one of {', '.join(sorted(TOOL_PARSERS))}")
    return cls(id_factory)


def detect_tool_parser(chat_template: str | None) -> str | None:
    """The parser for the tool-call format a chat template teaches, or None if it is not one of ours."""
    if not chat_template:
        return None
    if "<function=" in chat_template or "<|python_start|>" in chat_template:
        return None  # Qwen3-Coder's XML calls, Llama 4's pythonic calls: other formats
    if "[TOOL_CALLS]" in chat_template:
        return "mistral"
    if "<tool_call>" in chat_template:
        return "hermes"
    if "<|python_tag|>" in chat_template or "ipython" in chat_template:
        return "llama3_json"
    return None
