"""Tool calls and reasoning for chat completions: reading them out of a model's text, and the grammar
that forces them.

* `tool_parsers`: the `tool_choice: "auto"` parsers (hermes, llama3_json, mistral), chosen by name
  or detected from a chat template; each streams OpenAI-shaped deltas or parses a whole output.
* `grammar`: checks `tools` / `tool_choice`, builds the JSON schema that enforces "required" and
  named functions, and reads the constrained output back into `tool_calls`.
* `reasoning`: splits `<think>...</think>` output into reasoning_content and content.
* `json_scan`: the incremental JSON checker the parsers stream arguments with.
* `chat`: a chat request's tools resolved once (`ToolUse`: template tools, grammar, parser), and
  one output read as an assistant message, reasoning first, then tool calls (`ChatOutputParser`);
  the server and `LLM.chat` both use it.

Nothing here touches the engine or the server: these are pure functions and per-output state
machines over text, so the server and the offline API share them.
"""

from forge.tools.grammar import (
    constrained_tool_parser,
    parse_constrained_tool_calls,
    resolve_tool_choice,
    tool_call_schema,
    validate_tools,
)
from forge.tools.reasoning import (
    REASONING_PARSERS,
    ReasoningDelta,
    ReasoningParser,
    detect_reasoning_parser,
    get_reasoning_parser,
    prompt_opens_reasoning,
)
from forge.tools.tool_parsers import (
    TOOL_PARSERS,
    ContentDelta,
    Delta,
    ToolCall,
    ToolCallDelta,
    ToolParser,
    assemble,
    call_id_factory,
    detect_tool_parser,
    get_tool_parser,
)

__all__ = [
    "TOOL_PARSERS", "REASONING_PARSERS", "ToolCall", "ContentDelta", "ToolCallDelta", "ReasoningDelta", "Delta",
    "ToolParser", "ReasoningParser", "assemble", "call_id_factory", "get_tool_parser", "detect_tool_parser",
    "get_reasoning_parser", "detect_reasoning_parser", "prompt_opens_reasoning", "validate_tools",
    "resolve_tool_choice", "tool_call_schema", "constrained_tool_parser", "parse_constrained_tool_calls",
]
