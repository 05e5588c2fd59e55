"""Tools, reasoning and chat-template options through the `openai` client, on the default model (CPU).

SmolLM2's own template knows no tools, so the server runs with a Qwen3-style test template
(--chat-template): tools in the system prompt, calls as Hermes `<tool_call>` blocks (so the tool
parser is detected as hermes), results as `<tool_response>`, and a generation prompt that opens
`<think>` when enable_thinking is true (the output starts inside the reasoning) and writes an empty
`<think></think>` otherwise; the reasoning parser is qwen3. "required" and named functions are forced
by the grammar; the "auto" path is driven end to end by forcing a Hermes call with a regex."""

import json

import httpx
import pytest

openai = pytest.importorskip("openai", reason="needs the openai client: pip install -e '.[test]'")
jsonschema = pytest.importorskip("jsonschema")

from forge.config import EngineConfig
from forge.engine.llm_engine import LLMEngine
from forge.server.chat import ChatSettings, load_chat_template
from tests.test_server_harness import LiveServer

TEMPLATE = """
{%- if tools %}<|im_start|>system
{% if messages[0].role == 'system' %}{{ messages[0].content }}

{% endif %}# Tools

You may call one or more functions. Their signatures, within <tools></tools> tags:
<tools>
{% for tool in tools %}{{ tool | tojson }}
{% endfor %}</tools>

For each call, return a JSON object with the function name and arguments within <tool_call></tool_call> tags:
<tool_call>
{"name": <function-name>, "arguments": <args-json-object>}
</tool_call><|im_end|>
{% elif messages[0].role == 'system' %}<|im_start|>system
{{ messages[0].content }}<|im_end|>
{% endif %}
{%- for message in messages %}
{%- if message.role == 'system' %}
{%- elif message.role == 'assistant' %}<|im_start|>assistant
{% if message.content %}{{ message.content }}{% endif %}
{%- for call in message.tool_calls or [] %}
<tool_call>
{"name": {{ call.function.name | tojson }}, "arguments": {{ call.function.arguments | tojson }}}
</tool_call>
{%- endfor %}<|im_end|>
{% elif message.role == 'tool' %}<|im_start|>user
<tool_response>
{{ message.content }}
</tool_response><|im_end|>
{% else %}<|im_start|>{{ message.role }}
{{ message.content }}<|im_end|>
{% endif %}
{%- endfor %}
{%- if add_generation_prompt %}<|im_start|>assistant
{% if enable_thinking is defined and enable_thinking %}<think>
{% else %}<think>

</think>

{% endif %}{% endif %}"""

WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                             "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
           "required": ["city", "unit"]}
ADD = {"type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 99},
                                        "b": {"type": "integer", "minimum": 0, "maximum": 99}}, "required": ["a", "b"]}
PARAMETERS = {"get_weather": WEATHER, "add": ADD}
TOOLS = [{"type": "function", "function": {"name": name, "description": f"the {name} tool", "parameters": schema}}
         for name, schema in PARAMETERS.items()]
ASK = [{"role": "user", "content": "What is the weather in Paris, in celsius? And what is 2 plus 3?"}]
THINK = {"chat_template_kwargs": {"enable_thinking": True}}
GREEDY = {"temperature": 0}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    path = tmp_path_factory.mktemp("template") / "tools.jinja"
    path.write_text(TEMPLATE)
    # Without prefix caching: a repeated prompt then computes exactly as the first time, so greedy
    # streamed and whole requests agree even at near-ties (a cache hit shifts the Q4 CPU logits by ~0.02).
    engine = LLMEngine(EngineConfig(model=None, max_model_len=2048, num_kv_blocks=256, enable_prefix_caching=False))
    settings = ChatSettings(load_chat_template(str(path)), tool_call_parser="auto", reasoning_parser="qwen3")
    with LiveServer(engine, chat_settings=settings) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    with server.openai_client() as c:
        yield c


def test_tool_parser_is_detected_from_the_template(server):
    assert server.app.state.serving.tool_parser == "hermes"


def chat(client, **kwargs):
    return client.chat.completions.create(model="default", messages=kwargs.pop("messages", ASK), **kwargs).choices[0]


def stream(client, **kwargs) -> tuple[dict, str, list]:
    """A streamed chat assembled as the openai client's users do: (message fields, finish_reason, chunks)."""
    content, reasoning, calls, reason, chunks = "", "", {}, None, []
    for chunk in client.chat.completions.create(model="default", messages=kwargs.pop("messages", ASK), stream=True,
                                                **kwargs):
        chunks.append(chunk)
        for c in chunk.choices:
            delta = c.delta
            content += delta.content or ""
            reasoning += getattr(delta, "reasoning_content", None) or ""
            for call in delta.tool_calls or []:
                if call.id is not None:  # id, type and name come once, first
                    assert call.index not in calls and call.type == "function" and call.function.name
                    calls[call.index] = {"id": call.id, "name": call.function.name, "arguments": ""}
                else:
                    assert call.function.name is None
                calls[call.index]["arguments"] += call.function.arguments or ""
            reason = c.finish_reason or reason
    return {"content": content, "reasoning": reasoning, "calls": [calls[i] for i in sorted(calls)]}, reason, chunks


def calls_of(choice) -> list[tuple[str, str]]:
    return [(c.function.name, c.function.arguments) for c in choice.message.tool_calls or []]


@pytest.mark.parametrize("tool_choice, parallel", [
    ("required", True),
    ("required", False),
    ({"type": "function", "function": {"name": "get_weather"}}, True),
    ({"type": "function", "function": {"name": "add"}}, True),
], ids=["required", "required-single", "named-weather", "named-add"])
def test_forced_calls_validate_and_stream_as_whole(client, tool_choice, parallel):
    kw = dict(tools=TOOLS, tool_choice=tool_choice, parallel_tool_calls=parallel, max_tokens=80, **GREEDY)
    whole = chat(client, **kw)
    assert whole.finish_reason == "tool_calls" and whole.message.content is None
    calls = calls_of(whole)
    assert calls and all(c.id.startswith("call_") and c.type == "function" for c in whole.message.tool_calls)
    if isinstance(tool_choice, dict):
        assert [name for name, _ in calls] == [tool_choice["function"]["name"]]
    if not parallel:
        assert len(calls) == 1
    for name, arguments in calls:
        jsonschema.validate(json.loads(arguments), PARAMETERS[name])
    streamed, reason, _ = stream(client, **kw)
    assert reason == "tool_calls" and streamed["content"] == ""
    assert [(c["name"], c["arguments"]) for c in streamed["calls"]] == calls


def test_multi_turn_with_tool_results(server, client):
    first = chat(client, tools=TOOLS, tool_choice={"type": "function", "function": {"name": "get_weather"}},
                 max_tokens=60, **GREEDY)
    call = first.message.tool_calls[0]
    history = ASK + [first.message.model_dump(exclude_none=True),
                     {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temperature": 21})}]
    # the call and its result are rendered through the template
    tokens = httpx.post(server.url + "/tokenize", json={"messages": history, "tools": TOOLS}, timeout=30).json()
    prompt = httpx.post(server.url + "/detokenize", json={"tokens": tokens["tokens"]}, timeout=30).json()["prompt"]
    assert f'<tool_call>\n{{"name": "get_weather", "arguments": {call.function.arguments}}}\n</tool_call>' in prompt
    assert '<tool_response>\n{"temperature": 21}\n</tool_response>' in prompt
    answer = chat(client, messages=history, tools=TOOLS, tool_choice="none", max_tokens=12, **GREEDY)
    assert answer.finish_reason in ("stop", "length") and answer.message.content and not answer.message.tool_calls


HERMES_CALL = ('<tool_call>\n\\{"name": "get_weather", "arguments": \\{"city": "[A-Z][a-z]{2,8}", '
               '"unit": "celsius"\\}\\}\n</tool_call>')


def test_auto_reads_hermes_calls_the_model_writes(client):
    """tool_choice "auto" (the default with tools): the model's own text is parsed. A regex makes the
    model write a Hermes call; the hermes parser reads it back, streamed and whole alike."""
    kw = dict(tools=TOOLS, max_tokens=60, extra_body={"structured_outputs": {"regex": HERMES_CALL}}, **GREEDY)
    whole = chat(client, **kw)
    assert whole.finish_reason == "tool_calls" and whole.message.content is None
    [(name, arguments)] = calls_of(whole)
    assert name == "get_weather" and json.loads(arguments)["unit"] == "celsius"
    streamed, reason, _ = stream(client, **kw)
    assert reason == "tool_calls" and [(c["name"], c["arguments"]) for c in streamed["calls"]] == [(name, arguments)]
    plain = chat(client, tools=TOOLS, max_tokens=12, **GREEDY)  # no call written: plain content
    assert plain.message.tool_calls is None and plain.message.content and plain.finish_reason in ("stop", "length")
    none = chat(client, tools=TOOLS, tool_choice="none", max_tokens=60,  # "none": nothing is read as a call
                extra_body={"structured_outputs": {"regex": HERMES_CALL}}, **GREEDY)
    assert none.message.tool_calls is None and none.message.content.startswith("<tool_call>")
    assert none.finish_reason == "stop"


def test_reasoning_content(client):
    """enable_thinking opens <think> in the generation prompt: the output starts inside the reasoning
    (this model never closes it, so all of it is reasoning_content)."""
    whole = chat(client, max_tokens=16, extra_body=THINK, **GREEDY)
    assert whole.message.content is None and whole.message.tool_calls is None
    assert whole.message.reasoning_content and "think>" not in whole.message.reasoning_content
    streamed, reason, _ = stream(client, max_tokens=16, extra_body=THINK, **GREEDY)
    assert (streamed["reasoning"], streamed["content"], reason) == (whole.message.reasoning_content, "",
                                                                    whole.finish_reason)
    plain = chat(client, max_tokens=16, **GREEDY)  # thinking off: the template closed the reasoning
    assert plain.message.reasoning_content is None and plain.message.content


def test_reasoning_then_answer(client):
    """The whole <think>...</think> answer written by the model (forced by a regex, with thinking off
    so the grammar applies at once): reasoning_content and content split, streamed and whole."""
    regex = "<think>\nThe user greets me[.]\n</think>\n\nHello[!] How can I help[?]"
    kw = dict(max_tokens=40, extra_body={"structured_outputs": {"regex": regex}}, **GREEDY)
    whole = chat(client, **kw)
    assert whole.message.reasoning_content == "The user greets me."
    assert whole.message.content == "Hello! How can I help?" and whole.finish_reason == "stop"
    streamed, reason, _ = stream(client, **kw)
    assert (streamed["reasoning"], streamed["content"], reason) == ("The user greets me.", "Hello! How can I help?",
                                                                    "stop")


def test_tool_grammar_waits_for_the_reasoning(client):
    """With the reasoning open, "required" constrains only what follows </think>: the reasoning is
    what the model writes unconstrained (tool_choice "none", same prompt)."""
    forced = chat(client, tools=TOOLS, tool_choice="required", max_tokens=12, extra_body=THINK, **GREEDY)
    free = chat(client, tools=TOOLS, tool_choice="none", max_tokens=12, extra_body=THINK, **GREEDY)
    assert forced.message.reasoning_content == free.message.reasoning_content
    assert forced.finish_reason == "length" and not forced.message.tool_calls


def test_continue_final_message(server, client):
    messages = ASK + [{"role": "assistant", "content": "The weather in Paris is"}]
    tokens = httpx.post(server.url + "/tokenize", json={"messages": messages, "continue_final_message": True},
                        timeout=30).json()["tokens"]
    prompt = httpx.post(server.url + "/detokenize", json={"tokens": tokens}, timeout=30).json()["prompt"]
    assert prompt.endswith("<|im_start|>assistant\nThe weather in Paris is")  # the turn is left open
    continued = chat(client, messages=messages, max_tokens=5, extra_body={"continue_final_message": True}, **GREEDY)
    closed = chat(client, messages=messages, max_tokens=5, extra_body={"add_generation_prompt": False}, **GREEDY)
    assert continued.message.content and continued.message.content != closed.message.content


@pytest.mark.parametrize("body, param, words", [
    ({"tools": [{"type": "function", "function": {"name": "bad name"}}]}, "tools", ["tools[0].function.name"]),
    ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice", ["'sometimes'"]),
    ({"tool_choice": "required"}, "tool_choice", ["needs tools"]),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "sub"}}}, "tool_choice", ["'sub'"]),
    ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}}, "tool_choice",
     ["already constrains"]),
    ({"tools": TOOLS, "parallel_tool_calls": "no"}, "parallel_tool_calls", []),
    ({"chat_template_kwargs": {"add_generation_prompt": False}}, "chat_template_kwargs", ["add_generation_prompt"]),
    ({"chat_template_kwargs": {"self": 1}}, "chat_template_kwargs", ["'self'"]),
    ({"chat_template_kwargs": {"a-b": 1}}, "chat_template_kwargs", ["'a-b'"]),
    ({"continue_final_message": True, "add_generation_prompt": True}, "continue_final_message", ["cannot both"]),
    ({"messages": [{"role": "function", "content": "x"}]}, "messages[0].role", ["role tool"]),
    ({"messages": [{"role": "user", "content": "x", "tool_calls": [{"function": {"name": "f", "arguments": "{}"}}]}]},
     "messages[0].tool_calls", ["only assistant"]),
    # a schema jsonschema accepts but the grammar engine cannot compile: the error names the tools
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"x": {"type": "string", "pattern": "(?<=a)b"}}}}}], "tool_choice": "required"},
     "tools", ["Lookbehind"]),
])
def test_bad_requests_are_400s_naming_the_field(server, body, param, words):
    payload = {"model": "default", "messages": ASK, "max_tokens": 4, **body}
    r = httpx.post(server.url + "/v1/chat/completions", json=payload, timeout=60)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and "\n" not in error["message"]
    for word in words:
        assert word in error["message"]


def test_readme_example_runs(server, capsys):
    """The openai client example of the README's "Tools and reasoning" section, as written."""
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("## Tools and reasoning", 1)[1]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    assert "tool_choice=\"required\"" in code
    exec(compile(code.replace("http://127.0.0.1:8000/v1", server.url + "/v1"), "README.md", "exec"), {})
    assert capsys.readouterr().out.strip()  # the model's answer after the tool result


def test_chat_template_option_is_checked_at_start(server, tmp_path):
    from forge.server.api_server import build_app
    from forge.server.async_engine import AsyncEngine
    from forge.server.limits import ServerConfigError

    path = tmp_path / "t.jinja"
    path.write_text("{{ messages[0].content }}")
    assert load_chat_template(str(path)) == "{{ messages[0].content }}"
    assert load_chat_template("{% for m in messages %}{{ m.content }}{% endfor %}").startswith("{% for")
    with pytest.raises(ServerConfigError, match="no such file"):
        load_chat_template(str(tmp_path / "missing.jinja"))
    with pytest.raises(ServerConfigError, match="does not compile"):
        build_app(AsyncEngine(server.engine), "m", chat_settings=ChatSettings("{% if %}"))
    with pytest.raises(ServerConfigError, match="unknown tool-call parser"):
        ChatSettings(tool_call_parser="xml")


def test_special_token_parsers_lose_the_stop_tokens_text(server):
    """llama3_json / mistral read special tokens, so outputs keep them; the stop token's own text is
    then cut from the end (it is not part of the reply)."""
    from forge.outputs import CompletionOutput
    from forge.server.chat import ChatJob
    from forge.server.serving import _Job
    from forge.tools.chat import ToolUse

    serving = server.app.state.serving
    eos = server.engine.tokenizer.eos_token_id
    eos_text = server.engine.tokenizer.decode([eos], skip_special_tokens=False)
    tool_use = ToolUse.resolve(TOOLS, None, None, "llama3_json")
    job = _Job("chat", "x", "m", [], None, chat=ChatJob(tool_use, None, ""))
    out = CompletionOutput(0, '{"name": "add", "parameters": {"a": 1, "b": 2}}' + eos_text, [1, eos],
                           finish_reason="stop", stop_reason=eos)
    seen = serving._view(job, out)
    assert seen.text == '{"name": "add", "parameters": {"a": 1, "b": 2}}'
    parsed = job.chat.output_parser().extract(seen.text)
    assert parsed.content == "" and [(c.name, c.arguments) for c in parsed.tool_calls] == [("add", '{"a": 1, "b": 2}')]
    hermes = _Job("chat", "x", "m", [], None, chat=ChatJob(ToolUse.resolve(TOOLS, None, None, "hermes"), None, ""))
    assert serving._view(hermes, out) is out  # special tokens were skipped as usual: nothing to cut
