"""Requests' `tools` and `tool_choice`, and the grammar that enforces "required" and named functions.

`tool_choice: "required"` and `{"type": "function", "function": {"name": ...}}` are enforced with
the structured-outputs engine (xgrammar): `tool_call_schema` gives the JSON schema the output must
follow, to be passed as `StructuredOutputsParams(json=...)`, so the output always parses, on any
model. What the model is made to write:

* a named function: its arguments object alone (the function's `parameters` schema), as vLLM
  does; the name is already fixed, so the model spends no tokens on it.
* "required": a JSON array of calls, `[{"name": "f", "arguments": {...}}, ...]`, each item one of
  the functions (`anyOf` over `{"name": <const>, "arguments": <its parameters>}`), at least one
  item, and at most one when `parallel_tool_calls` is false.

`constrained_tool_parser` reads that output back into `tool_calls`, streamed or whole, with the
same deltas as the `auto` parsers.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable
from typing import Any

from forge.errors import InvalidRequestError
from forge.tools.tool_parsers import ArgumentsToolParser, CallArrayToolParser, ToolCall, ToolParser

__all__ = ["validate_tools", "resolve_tool_choice", "tool_call_schema", "constrained_tool_parser",
           "parse_constrained_tool_calls"]

_FUNCTION_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")  # OpenAI's rule, plus "." (MCP tool names)
_NO_PARAMETERS = {"type": "object", "properties": {}}


def validate_tools(tools: Any) -> list[dict]:
    """Check a request's `tools` (OpenAI shape); returns their `function` dicts. None or [] -> []."""
    if tools is None:
        return []
    if not isinstance(tools, list):
        raise InvalidRequestError(f"tools must be a list, got {type(tools).__name__}", param="tools")
    functions: list[dict] = []
    seen: set[str] = set()
    for i, tool in enumerate(tools):
        where = f"tools[{i}]"
        if not isinstance(tool, dict) or tool.get("type", "function") != "function":
            raise InvalidRequestError(f'{where} must be {{"type": "function", "function": {{...}}}}', param="tools")
        function = tool.get("function")
        if not isinstance(function, dict):
            raise InvalidRequestError(f"{where}.function must be an object", param="tools")
        name = function.get("name")
        if not isinstance(name, str) or not _FUNCTION_NAME.match(name):
            raise InvalidRequestError(
                f"{where}.function.name must be 1-64 letters, digits, '_', '-' or '.', got {name!r}", param="tools")
        if name in seen:
            raise InvalidRequestError(f"{where}: two tools are named {name!r}", param="tools")
        seen.add(name)
        parameters = function.get("parameters")
        if parameters is not None:
            if not isinstance(parameters, dict):
                raise InvalidRequestError(f"{where}.function.parameters must be a JSON schema object", param="tools")
            _check_schema(parameters, f"{where}.function.parameters")
        description = function.get("description")
        if description is not None and not isinstance(description, str):
            raise InvalidRequestError(f"{where}.function.description must be a string", param="tools")
        functions.append(function)
    return functions


def _check_schema(schema: dict, where: str) -> None:
    try:
        import jsonschema
    except ImportError:  # optional: xgrammar still rejects what it cannot compile
        return
    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.exceptions.SchemaError as e:
        at = "/".join(str(p) for p in e.absolute_path)
        raise InvalidRequestError(f"{where} is not a valid JSON schema{f' at {at}' if at else ''}: {e.message}",
                                  param="tools") from None


def resolve_tool_choice(tool_choice: Any, functions: list[dict]) -> str:
    """Check `tool_choice` against the validated tools; returns "none", "auto", "required", or the
    forced function's name. Absent: "auto" with tools, "none" without (OpenAI's defaults)."""
    if tool_choice is None:
        return "auto" if functions else "none"
    if tool_choice == "none":
        return "none"
    if tool_choice in ("auto", "required"):
        if not functions:
            raise InvalidRequestError(f'tool_choice "{tool_choice}" needs tools', param="tool_choice")
        return tool_choice
    if isinstance(tool_choice, dict):
        function = tool_choice.get("function")
        name = function.get("name") if isinstance(function, dict) else None
        if tool_choice.get("type") != "function" or not isinstance(name, str):
            raise InvalidRequestError('a named tool_choice must be {"type": "function", "function": {"name": ...}}',
                                      param="tool_choice")
        if name not in {f["name"] for f in functions}:
            raise InvalidRequestError(f"tool_choice names {name!r}, which is not one of the tools", param="tool_choice")
        if name in ("none", "auto", "required"):
            raise InvalidRequestError(f"a function may not be named {name!r} for tool_choice", param="tool_choice")
        return name
    raise InvalidRequestError(
        f'tool_choice must be "none", "auto", "required" or {{"type": "function", "function": {{"name": ...}}}}, '
        f"got {tool_choice!r}", param="tool_choice")


def _parameters(function: dict) -> dict:
    return function.get("parameters") or _NO_PARAMETERS


def _relocate(schema: dict, prefix: str, defs: dict) -> dict:
    """`schema` moved from the root to #/$defs/<prefix>: its own $defs / definitions become
    #/$defs/<prefix>_<name> entries of `defs` and every local $ref is rewritten to match."""
    schema = copy.deepcopy(schema)
    for key in ("$defs", "definitions"):
        for name, sub in (schema.pop(key, None) or {}).items():
            defs[f"{prefix}_{name}"] = sub

    def fix(node: Any) -> None:
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str) and ref.startswith("#"):
                pointer = ref[1:]
                m = re.match(r"^/(?:\$defs|definitions)/([^/]+)(.*)$", pointer)
                node["$ref"] = f"#/$defs/{prefix}_{m.group(1)}{m.group(2)}" if m else f"#/$defs/{prefix}{pointer}"
            for value in node.values():
                fix(value)
        elif isinstance(node, list):
            for value in node:
                fix(value)

    fix(schema)
    for name in [n for n in defs if n.startswith(prefix + "_")]:
        fix(defs[name])
    return schema


def tool_call_schema(functions: list[dict], tool_choice: str, parallel_tool_calls: bool = True) -> dict | None:
    """The JSON schema the output must follow for `tool_choice` (as resolve_tool_choice returns it);
    None for "none" and "auto", which are not constrained."""
    if tool_choice in ("none", "auto"):
        return None
    if tool_choice != "required":
        return copy.deepcopy(_parameters(next(f for f in functions if f["name"] == tool_choice)))
    defs: dict[str, Any] = {}
    items = []
    for i, function in enumerate(functions):
        prefix = f"fn{i}"
        defs[prefix] = _relocate(_parameters(function), prefix, defs)
        items.append({
            "type": "object",
            "properties": {"name": {"const": function["name"]}, "arguments": {"$ref": f"#/$defs/{prefix}"}},
            "required": ["name", "arguments"],
        })
    schema: dict[str, Any] = {"type": "array", "items": {"anyOf": items}, "minItems": 1}
    if not parallel_tool_calls:
        schema["maxItems"] = 1
    schema["$defs"] = defs
    return schema


def constrained_tool_parser(tool_choice: str, id_factory: Callable[[], str] | None = None) -> ToolParser:
    """The parser for output generated under `tool_call_schema(..., tool_choice)` ("required" or a
    function name): stream it with feed/finish or read it whole with extract."""
    if tool_choice in ("none", "auto"):
        raise ValueError(f'tool_choice "{tool_choice}" is not constrained; use a tool-call parser')
    if tool_choice == "required":
        return CallArrayToolParser(id_factory)
    return ArgumentsToolParser(tool_choice, id_factory)


def parse_constrained_tool_calls(text: str, tool_choice: str,
                                 id_factory: Callable[[], str] | None = None) -> list[ToolCall]:
    """The OpenAI `tool_calls` of a whole constrained output."""
    return constrained_tool_parser(tool_choice, id_factory).extract(text)[1]
