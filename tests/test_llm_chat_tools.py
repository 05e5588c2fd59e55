"""LLM.chat with tools: they reach the template, "required" / named functions are forced by the grammar
and read into CompletionOutput.tool_calls, "auto" is read with the template's parser; text stays raw."""

import json

import pytest

from forge import SamplingParams, StructuredOutputsParams
from forge.errors import InvalidRequestError

jsonschema = pytest.importorskip("jsonschema")

WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}}, "required": ["city"]}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": WEATHER}},
         {"type": "function", "function": {"name": "now"}}]
ASK = [{"role": "user", "content": "What's the weather in Oslo?"}]
# A template that shows the tools and teaches Hermes calls (so "auto" is read with the hermes parser).
HERMES = ("{% if tools %}<|im_start|>system\nTools: {{ tools | tojson }}. Call one as <tool_call>{...}</tool_call>"
          "<|im_end|>\n{% endif %}{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def test_forced_calls(default_llm):
    params = SamplingParams(temperature=0, max_tokens=48)
    required, named, plain = (default_llm.chat(ASK, params, tools=TOOLS, tool_choice=choice, use_tqdm=False)[0]
                              for choice in ("required", {"type": "function", "function": {"name": "get_weather"}},
                                             None))
    calls = required.outputs[0].tool_calls
    assert calls and required.outputs[0].text.startswith("[")  # text: the raw output
    for call in calls + named.outputs[0].tool_calls:
        if call.name == "get_weather":
            jsonschema.validate(json.loads(call.arguments), WEATHER)
    assert [c.name for c in named.outputs[0].tool_calls] == ["get_weather"]
    assert named.outputs[0].tool_calls[0].to_openai()["type"] == "function"
    # the default model's template knows no tool format: "auto" reads nothing
    assert plain.outputs[0].tool_calls is None
    assert default_llm.chat(ASK, params, use_tqdm=False)[0].outputs[0].tool_calls is None
    single = default_llm.chat(ASK, [params], tools=TOOLS, tool_choice="required", parallel_tool_calls=False,
                              use_tqdm=False)[0]
    assert len(single.outputs[0].tool_calls) == 1


def test_auto_reads_the_templates_format(default_llm):
    regex = '<tool_call>\\{"name": "now", "arguments": \\{\\}\\}</tool_call>'
    params = SamplingParams(temperature=0, max_tokens=32, structured_outputs=StructuredOutputsParams(regex=regex))
    out = default_llm.chat(ASK, params, tools=TOOLS, chat_template=HERMES, use_tqdm=False)[0]
    assert "Tools: [" in out.prompt
    [call] = out.outputs[0].tool_calls
    assert (call.name, call.arguments) == ("now", "{}")
    with pytest.raises(InvalidRequestError, match="already constrains"):
        default_llm.chat(ASK, params, tools=TOOLS, tool_choice="required", use_tqdm=False)
