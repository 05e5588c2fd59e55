"""The server's chat options (--chat-template, --tool-call-parser, --reasoning-parser) and what a chat
request carries through serving besides its sampling parameters: its tools and how its outputs are read
(forge.tools.chat does the reading, and builds the grammar of "required" / named tool calls)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from forge.server.limits import ServerConfigError
from forge.tools import REASONING_PARSERS, TOOL_PARSERS
from forge.tools.chat import ChatOutputParser, ToolUse, template_tool_parser

TOOL_PARSER_CHOICES = ("auto", "none", *sorted(TOOL_PARSERS))


@dataclass(frozen=True)
class ChatSettings:
    """How the server renders chats and reads their outputs.

    chat_template: template text replacing the model's (or the name of one the model carries); None:
        the model's own ("tool_use" when a request has tools and the model has that one).
    tool_call_parser: the format tool calls are read from with tool_choice "auto": a name from
        forge.tools.TOOL_PARSERS, "auto" (detected from the chat template) or "none" (tool_choice
        "auto" is refused; "required" and named functions still work, through the grammar).
    reasoning_parser: "deepseek_r1" / "qwen3" split `<think>` reasoning into reasoning_content; None: off.
    """

    chat_template: str | None = None
    tool_call_parser: str = "auto"
    reasoning_parser: str | None = None

    def __post_init__(self):
        if self.tool_call_parser not in TOOL_PARSER_CHOICES:
            raise ServerConfigError(f"unknown tool-call parser {self.tool_call_parser!r}; choose one of "
                                    f"{', '.join(TOOL_PARSER_CHOICES)}")
        if self.reasoning_parser is not None and self.reasoning_parser not in REASONING_PARSERS:
            raise ServerConfigError(f"unknown reasoning parser {self.reasoning_parser!r}; choose one of "
                                    f"{', '.join(REASONING_PARSERS)}")

    def resolved_tool_parser(self, tokenizer) -> str | None:
        """The parser name the server uses ("auto" looked up in the template tool calls are rendered with)."""
        if self.tool_call_parser == "none":
            return None
        if self.tool_call_parser != "auto":
            return self.tool_call_parser
        return template_tool_parser(tokenizer, self.chat_template)


def load_chat_template(value: str | None) -> str | None:
    """--chat-template: a file's path or the template itself (as vLLM takes it); None stays None. A
    value that is neither a file nor looks like a template (no "{{" or "{%") is an error."""
    if value is None:
        return None
    path = Path(value).expanduser()
    try:
        if path.is_file():
            return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ServerConfigError(f"--chat-template {value}: cannot read it: {e}") from None
    except ValueError:  # a template too long or odd to be a path
        pass
    if "{{" in value or "{%" in value:
        return value
    raise ServerConfigError(f"--chat-template {value}: no such file, and it is not template text (no '{{{{' or "
                            f"'{{%')")


@dataclass
class ChatJob:
    """A chat request's tools and how its outputs are read."""

    tool_use: ToolUse
    reasoning_parser: str | None
    prompt: str  # the rendered prompt text

    def output_parser(self) -> ChatOutputParser:
        """A fresh parser for one of the request's outputs (choices)."""
        return ChatOutputParser.for_request(self.tool_use, self.reasoning_parser, self.prompt)

    @property
    def strip_stop_text(self) -> bool:
        """Special tokens are kept for the tool parser: the stop token's text is cut from the end."""
        return self.tool_use.keeps_special_tokens

    @property
    def grammar_from_tools(self) -> bool:
        """The request's grammar is the tool-call schema: its errors name "tools"."""
        return self.tool_use.constrained
