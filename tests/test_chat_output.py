"""forge.tools.chat: a chat request's tools resolved (ToolUse), the grammar and decoding options they
imply (chat_params), and outputs read as reasoning + content + tool calls (ChatOutputParser), streamed
at every split point == read whole. No model: canned outputs."""

import json

import pytest

from forge import SamplingParams, StructuredOutputsParams
from forge.errors import InvalidRequestError
from forge.tools import call_id_factory
from forge.tools.chat import ChatOutputParser, ToolUse, chat_params, reasoning_end_for_grammar, template_tool_parser
from forge.tools.reasoning import ReasoningParser
from forge.tools.tool_parsers import HermesToolParser, assemble


def _tool(name, parameters=None):
    return {"type": "function", "function": {"name": name, "parameters": parameters or {"type": "object"}}}


TOOLS = [_tool("get_weather", {"type": "object", "properties": {"city": {"type": "string"}}}), _tool("now")]


def _parser(reasoning=True, starts_in_reasoning=False, max_calls=None):
    return ChatOutputParser(ReasoningParser(starts_in_reasoning) if reasoning else None,
                            HermesToolParser(call_id_factory(seed=1)), max_calls)


CANNED = [
    # (output, starts inside <think>, reasoning, content, [(name, arguments)])
    ("<think>Need the weather.</think>\n\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Oslo\"}}"
     "\n</tool_call>", False, "Need the weather.", "", [("get_weather", '{"city": "Oslo"}')]),
    ("Let me see.\n</think>\nIt is sunny.", True, "Let me see.", "It is sunny.", []),
    ("Plain answer, <tool_call> not closed", False, "", "Plain answer, <tool_call> not closed", []),
    ("<think>a</think>Two calls:<tool_call>{\"name\": \"now\", \"arguments\": {}}</tool_call>"
     "<tool_call>{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Rome\"}}</tool_call>", False, "a",
     "Two calls:", [("now", "{}"), ("get_weather", '{"city": "Rome"}')]),
    ("still thinking when cut off", True, "still thinking when cut off", "", []),
]


@pytest.mark.parametrize("text, starts_in, reasoning, content, calls", CANNED)
def test_whole_output(text, starts_in, reasoning, content, calls):
    parsed = _parser(starts_in_reasoning=starts_in).extract(text)
    assert (parsed.reasoning, parsed.content) == (reasoning, content)
    assert [(c.name, c.arguments) for c in parsed.tool_calls] == calls


@pytest.mark.parametrize("text, starts_in, reasoning, content, calls", CANNED)
def test_streams_split_at_every_boundary_give_the_whole_output(text, starts_in, reasoning, content, calls):
    whole = _parser(starts_in_reasoning=starts_in).extract(text)
    for cut in range(len(text) + 1):
        p = _parser(starts_in_reasoning=starts_in)
        deltas = [p.feed(text[:cut]), p.feed(text[cut:], final=True)]
        got_reasoning = "".join(d.reasoning for d in deltas)
        got_content = "".join(d.content for d in deltas)
        _, got_calls = assemble([t for d in deltas for t in d.tool_calls])
        assert (got_reasoning, got_content, got_calls) == (whole.reasoning, whole.content, whole.tool_calls), cut
        assert p.num_calls == len(calls)


def test_token_by_token_deltas_are_openai_shaped():
    text = CANNED[0][0]
    p = _parser()
    chunks = [p.feed(ch).to_openai() for ch in text] + [p.finish().to_openai()]
    assert all(set(c) <= {"reasoning_content", "content", "tool_calls"} for c in chunks)
    calls = [t for c in chunks for t in c.get("tool_calls", [])]
    first = calls[0]  # id, type and name come first, then argument fragments only
    assert first["index"] == 0 and first["type"] == "function" and first["function"]["name"] == "get_weather"
    assert first["id"].startswith("call_")
    assert all(set(t) == {"index", "function"} and set(t["function"]) == {"arguments"} for t in calls[1:])
    assert json.loads("".join(t["function"]["arguments"] for t in calls)) == {"city": "Oslo"}
    assert "".join(c.get("reasoning_content", "") for c in chunks) == "Need the weather."


def test_parallel_tool_calls_false_keeps_the_first_call():
    parsed = _parser(max_calls=1).extract(CANNED[3][0])
    assert [c.name for c in parsed.tool_calls] == ["now"] and parsed.content == "Two calls:"


def test_without_parsers_the_text_is_content():
    p = ChatOutputParser()
    assert p.extract("<think>x</think><tool_call>{}</tool_call>").content == "<think>x</think><tool_call>{}</tool_call>"
    assert ChatOutputParser().extract("abc").reasoning is None


def test_tool_use_resolution():
    auto = ToolUse.resolve(TOOLS, None, None, "hermes")
    assert (auto.tool_choice, auto.schema, auto.constrained, auto.tools) == ("auto", None, False, TOOLS)
    assert isinstance(auto.tool_parser(), HermesToolParser)
    none = ToolUse.resolve(None, None, None, None)
    assert (none.tool_choice, none.tools, none.tool_parser()) == ("none", None, None)
    named = ToolUse.resolve(TOOLS, {"type": "function", "function": {"name": "now"}}, False, None)
    assert named.constrained and named.schema == {"type": "object"}
    required = ToolUse.resolve(TOOLS, "required", False, None)
    assert required.schema["maxItems"] == 1 and not required.parallel_tool_calls
    with pytest.raises(InvalidRequestError, match="needs a tool-call parser") as err:
        ToolUse.resolve(TOOLS, "auto", None, None)
    assert err.value.param == "tool_choice"
    assert ToolUse.resolve(TOOLS, None, None, None, require_parser=False).tool_parser() is None
    with pytest.raises(InvalidRequestError) as err:
        ToolUse.resolve(TOOLS, "required", "yes", None)
    assert err.value.param == "parallel_tool_calls"
    # Mistral's templates take back only 9-character ids, also for grammar-forced calls
    mistral = ToolUse.resolve(TOOLS, "required", None, "mistral")
    assert len(mistral.tool_parser().extract('[{"name": "now", "arguments": {}}]')[1][0].id) == 9
    assert ToolUse.resolve(TOOLS, None, None, "llama3_json").keeps_special_tokens
    assert not ToolUse.resolve(TOOLS, None, None, "hermes").keeps_special_tokens
    assert not ToolUse.resolve(TOOLS, "required", None, "mistral").keeps_special_tokens


def test_chat_params():
    base = SamplingParams(max_tokens=8)
    required = ToolUse.resolve(TOOLS, "required", None, None)
    params = chat_params(base, required, None, "")
    assert params.structured_outputs == StructuredOutputsParams(json=required.schema)
    assert base.structured_outputs is None  # not changed in place
    # with a reasoning parser the grammar waits for </think> unless the new turn closed the reasoning
    assert chat_params(base, required, "qwen3", "<|im_start|>assistant\n").structured_outputs.reasoning_end == "</think>"
    assert chat_params(base, required, "qwen3", "assistant\n<think>\n").structured_outputs.reasoning_end == "</think>"
    assert chat_params(base, required, "qwen3", "<think>\n\n</think>\n\n").structured_outputs.reasoning_end is None
    schema = SamplingParams(structured_outputs=StructuredOutputsParams(json_object=True))
    auto = ToolUse.resolve(TOOLS, None, None, "llama3_json")
    gated = chat_params(schema, auto, "deepseek_r1", "")
    assert gated.structured_outputs.json_object and gated.structured_outputs.reasoning_end == "</think>"
    assert not gated.skip_special_tokens  # <|python_tag|> must reach the parser
    assert chat_params(base, ToolUse.resolve(None, None, None, None), None, "") is base
    with pytest.raises(InvalidRequestError, match="already constrains") as err:
        chat_params(schema, required, None, "")
    assert err.value.param == "tool_choice"


def test_reasoning_end_for_grammar():
    assert reasoning_end_for_grammar("") == "</think>"
    assert reasoning_end_for_grammar("<think>\n") == "</think>"
    assert reasoning_end_for_grammar("<think>\n\n</think>\n\n") is None


def test_template_tool_parser():
    class Tok:
        chat_template = "{{ '[TOOL_CALLS]' }}"
        named_chat_templates = {"tool_use": "<tool_call>", "other": "<|python_tag|>"}

    assert template_tool_parser(Tok()) == "hermes"  # the tool_use template is the one tools render with
    assert template_tool_parser(Tok(), "other") == "llama3_json"
    assert template_tool_parser(Tok(), "{{ messages }}") is None
