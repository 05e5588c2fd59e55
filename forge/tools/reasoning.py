"""Reasoning parser: split a thinking model's output into reasoning_content and content.

Qwen3, QwQ and DeepSeek-R1 write their reasoning between `<think>` and `</think>` before the
answer. Newer templates (DeepSeek-R1-0528, Qwen3-Thinking-2507) already end the prompt with
`<think>`, so the output starts inside the reasoning and only `</think>` appears; build the parser
with `starts_in_reasoning=True` then (`prompt_opens_reasoning` tells from the prompt text).

Rules, the same streamed or whole: a `<think>` at the very start of the output (after whitespace)
opens the reasoning; without one the output is all content (unless it starts in reasoning). The
reasoning runs to the first `</think>`, or to the end of the output when that never comes (cut
off by max_tokens). Whitespace around the reasoning and at the start of the answer after
`</think>` is dropped. Partial tags at the end of a piece are held back until decided.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from forge.tools.tool_parsers import ContentDelta

__all__ = ["ReasoningDelta", "ReasoningParser", "REASONING_PARSERS", "get_reasoning_parser",
           "detect_reasoning_parser", "prompt_opens_reasoning"]

_WS = " \t\n\r"
START_TAG = "<think>"
END_TAG = "</think>"


@dataclass(frozen=True)
class ReasoningDelta:
    text: str

    def to_openai(self) -> dict:
        return {"reasoning_content": self.text}


def prompt_opens_reasoning(prompt: str) -> bool:
    """Whether a rendered prompt leaves the model inside an open `<think>` block."""
    return prompt.rstrip(_WS).endswith(START_TAG)


class ReasoningParser:
    """Reads one output; `feed` / `finish` stream it, `extract` splits a whole one."""

    def __init__(self, starts_in_reasoning: bool = False):
        self._starts_in_reasoning = starts_in_reasoning
        self._state = self._start
        self._buf = ""
        self._ws = ""  # whitespace at the end of the reasoning so far, held: dropped if it is the end
        self._reasoning_started = False  # leading whitespace of the reasoning is dropped
        self._out: list[ReasoningDelta | ContentDelta] = []
        self._finished = False

    def feed(self, text: str) -> list[ReasoningDelta | ContentDelta]:
        if self._finished:
            raise RuntimeError("feed() after finish(): a reasoning parser reads one output")
        self._buf += text
        while self._state(False):
            pass
        return self._take()

    def finish(self) -> list[ReasoningDelta | ContentDelta]:
        if not self._finished:
            while self._state(True):
                pass
            self._finished = True
        return self._take()

    def extract(self, text: str) -> tuple[str, str]:
        """(reasoning_content, content) of a whole output; either may be ""."""
        return assemble_reasoning(self.feed(text) + self.finish())

    # -- states ----------------------------------------------------------------------------------

    def _start(self, final: bool) -> bool:
        rest = self._buf.lstrip(_WS)
        if not rest and not final:
            return False  # only whitespace so far: the tag may still come
        if rest.startswith(START_TAG):
            self._buf = rest[len(START_TAG):]
            self._state = self._reasoning
            return True
        if rest and START_TAG.startswith(rest) and not final:
            return False
        self._state = self._reasoning if self._starts_in_reasoning else self._content
        return True

    def _reasoning(self, final: bool) -> bool:
        buf = self._buf
        end = buf.find(END_TAG)
        if end >= 0:
            self._emit_reasoning(buf[:end])
            self._ws = ""
            self._buf = buf[end + len(END_TAG):]
            self._state = self._after_reasoning
            return True
        hold = 0
        if not final:
            hold = next((n for n in range(min(len(END_TAG) - 1, len(buf)), 0, -1) if buf.endswith(END_TAG[:n])), 0)
        self._emit_reasoning(buf[: len(buf) - hold])
        self._buf = buf[len(buf) - hold:]
        return False

    def _after_reasoning(self, final: bool) -> bool:
        rest = self._buf.lstrip(_WS)
        self._buf = rest
        if rest:
            self._state = self._content
            return True
        return False

    def _content(self, final: bool) -> bool:
        if self._buf:
            self._out.append(ContentDelta(self._buf))
            self._buf = ""
        return False

    def _emit_reasoning(self, text: str) -> None:
        if not self._reasoning_started:
            text = text.lstrip(_WS)
            if not text:
                return
            self._reasoning_started = True
        text = self._ws + text
        body = text.rstrip(_WS)
        self._ws = text[len(body):]
        if body:
            self._out.append(ReasoningDelta(body))

    def _take(self) -> list[ReasoningDelta | ContentDelta]:
        merged: list[ReasoningDelta | ContentDelta] = []
        for d in self._out:
            if merged and type(merged[-1]) is type(d):
                merged[-1] = type(d)(merged[-1].text + d.text)
            else:
                merged.append(d)
        self._out = []
        return merged


def assemble_reasoning(deltas: Iterable[ReasoningDelta | ContentDelta]) -> tuple[str, str]:
    """(reasoning_content, content) that a stream of deltas adds up to."""
    deltas = list(deltas)
    reasoning = "".join(d.text for d in deltas if isinstance(d, ReasoningDelta))
    content = "".join(d.text for d in deltas if isinstance(d, ContentDelta))
    return reasoning, content


# Both names read `<think>...</think>`; vLLM users know them by these names.
REASONING_PARSERS = ("deepseek_r1", "qwen3")


def get_reasoning_parser(name: str, prompt: str | None = None) -> ReasoningParser:
    """A fresh parser for one output, by `--reasoning-parser` name; `prompt` (the rendered prompt
    text) tells whether the output starts inside the reasoning."""
    if name not in REASONING_PARSERS:
        raise ValueError(f"unknown reasoning parser {name!r}; choose one of {', '.join(REASONING_PARSERS)}")
    return ReasoningParser(starts_in_reasoning=prompt is not None and prompt_opens_reasoning(prompt))


def detect_reasoning_parser(chat_template: str | None) -> str | None:
    """"qwen3" when a chat template writes `<think>` blocks, else None."""
    return "qwen3" if chat_template and START_TAG in chat_template and END_TAG in chat_template else None
