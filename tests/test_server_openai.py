"""The server through the official `openai` client, on the real default model (CPU, 127.0.0.1)."""

import asyncio
import json
import re

import httpx
import pytest

# The GPU machine has no openai wheel (its `pytest -m cuda` run collects this module too).
openai = pytest.importorskip("openai", reason="needs the openai client: pip install -e '.[test]'")
from prometheus_client.parser import text_string_to_metric_families

from forge.config import EngineConfig
from forge.engine.llm_engine import LLMEngine
from tests.test_server_harness import LiveServer

GREEDY = {"temperature": 0}


@pytest.fixture(scope="module", params=[False, True], ids=["sync", "async"])
def server(request):
    """Each test runs against a synchronous engine and one with async scheduling (the default on a
    GPU), so streaming, logprobs, echo and parallel clients are checked in both step modes."""
    # quantization="none": the exact path, whose greedy tokens must equal HF transformers' reference.
    engine = LLMEngine(EngineConfig(model=None, max_model_len=2048, num_kv_blocks=1024, quantization="none",
                                    async_scheduling=request.param))
    with LiveServer(engine) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    with server.openai_client() as c:
        yield c


def stream_completion(client, **kwargs) -> tuple[dict[int, str], dict[int, str], object]:
    """Assemble a streamed completion: ({index: text}, {index: finish_reason}, usage)."""
    texts, reasons, usage = {}, {}, None
    for chunk in client.completions.create(stream=True, **kwargs):
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            texts[c.index] = texts.get(c.index, "") + c.text
            if c.finish_reason:
                reasons[c.index] = c.finish_reason
    return texts, reasons, usage


def stream_chat(client, **kwargs) -> tuple[dict[int, str], dict[int, str], object]:
    texts, reasons, usage = {}, {}, None
    for chunk in client.chat.completions.create(stream=True, **kwargs):
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            texts[c.index] = texts.get(c.index, "") + (c.delta.content or "")
            if c.finish_reason:
                reasons[c.index] = c.finish_reason
    return texts, reasons, usage


# -- basics -------------------------------------------------------------------------------------------

def test_models_and_health(server, client):
    assert [m.id for m in client.models.list().data] == ["SmolLM2-135M-Instruct.Q4_1"]
    assert client.models.retrieve("default").id == server.model
    assert httpx.get(server.url + "/health", timeout=10).status_code == 200


def test_completion_matches_reference(server, client, reference_cases):
    """Greedy completions through HTTP are the same tokens HF transformers produced."""
    tok = server.engine.tokenizer
    for case in reference_cases[:3]:
        out = client.completions.create(model=server.model, prompt=case["prompt_ids"], max_tokens=16, **GREEDY)
        assert out.choices[0].text == tok.decode(case["greedy_ids"][:16])
        assert out.choices[0].finish_reason == "length"
        assert (out.usage.prompt_tokens, out.usage.completion_tokens) == (len(case["prompt_ids"]), 16)


def test_chat_matches_reference(server, client, reference_cases):
    case = next(c for c in reference_cases if c["name"] == "chat_sys")
    messages = [{"role": "system", "content": "You are a pirate. Answer like one."},
                {"role": "user", "content": "What is the sea?"}]
    out = client.chat.completions.create(model="default", messages=messages, max_tokens=12, **GREEDY)
    assert out.choices[0].message.role == "assistant"
    assert out.choices[0].message.content == server.engine.tokenizer.decode(case["greedy_ids"][:12])
    assert out.usage.prompt_tokens == len(case["prompt_ids"]) and out.usage.completion_tokens == 12
    # max_completion_tokens is the newer name and wins over max_tokens.
    out = client.chat.completions.create(model="default", messages=messages, max_tokens=12,
                                         max_completion_tokens=3, **GREEDY)
    assert out.usage.completion_tokens == 3 and out.choices[0].finish_reason == "length"


def test_chat_finishes_with_stop_at_end_of_turn(client):
    out = client.chat.completions.create(model="default", messages=[{"role": "user", "content": "Say hi."}],
                                         max_tokens=24, **GREEDY)
    c = out.choices[0]
    assert c.finish_reason == "stop" and "<|im_end|>" not in c.message.content


# -- streaming ----------------------------------------------------------------------------------------

def test_streamed_completion_equals_non_streamed(client):
    kwargs = dict(model="default", prompt="Once upon a time, there", max_tokens=20, **GREEDY)
    full = client.completions.create(**kwargs)
    texts, reasons, usage = stream_completion(client, stream_options={"include_usage": True}, **kwargs)
    assert texts == {0: full.choices[0].text} and reasons == {0: full.choices[0].finish_reason}
    assert usage.completion_tokens == full.usage.completion_tokens == 20
    assert usage.prompt_tokens == full.usage.prompt_tokens


def test_streamed_chat_equals_non_streamed(client):
    kwargs = dict(model="default", messages=[{"role": "user", "content": "Name three colors."}], max_tokens=20,
                  **GREEDY)
    full = client.chat.completions.create(**kwargs)
    texts, reasons, usage = stream_chat(client, stream_options={"include_usage": True}, **kwargs)
    assert texts == {0: full.choices[0].message.content} and reasons == {0: full.choices[0].finish_reason}
    assert usage.model_dump() == full.usage.model_dump()


def test_stream_wire_format(server):
    """Raw SSE: `data: {chunk}` events, OpenAI's chunk objects, the usage chunk, then `data: [DONE]`."""
    body = {"model": "default", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    chunks = [json.loads(e[6:]) for e in events[:-1]]
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"} and len({c["id"] for c in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 4
    assert all(c["usage"] is None for c in chunks[:-1])
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"


# -- sampling features ----------------------------------------------------------------------------------

def test_stop_strings(client):
    base = client.completions.create(model="default", prompt="1, 2, 3, 4, 5,", max_tokens=16, **GREEDY).choices[0].text
    assert base.startswith(" 6, 7, 8")
    out = client.completions.create(model="default", prompt="1, 2, 3, 4, 5,", max_tokens=16, stop=[" 8", "zzz"],
                                    **GREEDY)
    assert out.choices[0].text == " 6, 7," and out.choices[0].finish_reason == "stop"
    texts, reasons, _ = stream_completion(client, model="default", prompt="1, 2, 3, 4, 5,", max_tokens=16, stop=" 8",
                                          **GREEDY)
    assert texts == {0: " 6, 7,"} and reasons == {0: "stop"}


def test_seeds_reproducible_and_n(client):
    kwargs = dict(model="default", prompt="My favourite animal is", max_tokens=8, temperature=1.0, top_p=0.95, n=3)
    a = client.completions.create(seed=1234, **kwargs)
    b = client.completions.create(seed=1234, **kwargs)
    assert [c.index for c in a.choices] == [0, 1, 2]
    assert [c.text for c in a.choices] == [c.text for c in b.choices]
    assert len({c.text for c in a.choices}) > 1  # each choice draws from its own seed (seed + index)
    assert 3 <= a.usage.completion_tokens <= 24
    texts, _, _ = stream_completion(client, seed=1234, **kwargs)
    assert [texts[i] for i in range(3)] == [c.text for c in a.choices]
    chat = dict(model="default", messages=[{"role": "user", "content": "Tell me a word."}], max_tokens=8, seed=5,
                temperature=1.2, extra_body={"top_k": 40, "min_p": 0.05})
    assert (client.chat.completions.create(**chat).choices[0].message.content
            == client.chat.completions.create(**chat).choices[0].message.content)


def test_penalties_are_applied(client):
    kwargs = dict(model="default", prompt="Repeat after me: yes yes yes yes", max_tokens=8, **GREEDY)
    plain = client.completions.create(**kwargs).choices[0].text
    assert plain == " yes" * 8
    for extra in ({"presence_penalty": 2.0}, {"frequency_penalty": 2.0}, {"extra_body": {"repetition_penalty": 1.8}}):
        assert client.completions.create(**kwargs, **extra).choices[0].text != plain, extra


def test_completion_logprobs(client):
    out = client.completions.create(model="default", prompt="The capital of France is", max_tokens=6, logprobs=3,
                                    **GREEDY)
    lp = out.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 6
    assert "".join(lp.tokens) == out.choices[0].text and lp.text_offset[0] == 0
    for token, value, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert value <= 0 and len(top) == 3
        assert max(top.values()) == pytest.approx(value)  # greedy picks the most likely token
        assert top[token] == pytest.approx(value)
    texts = stream_logprob_tokens(client)
    assert texts == lp.tokens


def stream_logprob_tokens(client) -> list[str]:
    tokens = []
    for chunk in client.completions.create(model="default", prompt="The capital of France is", max_tokens=6,
                                           logprobs=3, stream=True, **GREEDY):
        for c in chunk.choices:
            tokens += c.logprobs.tokens if c.logprobs else []
    return tokens


def test_chat_logprobs(client):
    out = client.chat.completions.create(model="default", messages=[{"role": "user", "content": "Hi"}], max_tokens=5,
                                         logprobs=True, top_logprobs=2, **GREEDY)
    content = out.choices[0].logprobs.content
    assert len(content) == out.usage.completion_tokens
    for item in content:
        assert len(item.top_logprobs) == 2 and item.top_logprobs[0].logprob >= item.top_logprobs[1].logprob
        assert item.top_logprobs[0].token == item.token and item.logprob == pytest.approx(item.top_logprobs[0].logprob)
        assert bytes(item.bytes).decode() == item.token
    plain = client.chat.completions.create(model="default", messages=[{"role": "user", "content": "Hi"}], max_tokens=5,
                                           logprobs=True, **GREEDY)
    assert [i.top_logprobs for i in plain.choices[0].logprobs.content] == [[]] * len(content)


def test_prompt_forms_and_echo(client):
    out = client.completions.create(model="default", prompt=["The sky is", "Water is"], n=2, max_tokens=4, **GREEDY)
    assert [c.index for c in out.choices] == [0, 1, 2, 3]
    assert out.choices[0].text == out.choices[1].text and out.choices[2].text == out.choices[3].text
    single = client.completions.create(model="default", prompt="Water is", max_tokens=4, **GREEDY)
    assert out.choices[2].text == single.choices[0].text
    echo = client.completions.create(model="default", prompt="Water is", max_tokens=4, echo=True, **GREEDY)
    assert echo.choices[0].text == "Water is" + single.choices[0].text
    texts, _, _ = stream_completion(client, model="default", prompt="Water is", max_tokens=4, echo=True, **GREEDY)
    assert texts == {0: echo.choices[0].text}


def test_echo_with_logprobs_scores_the_prompt(client):
    """echo + logprobs returns the prompt tokens' logprobs too (the lm-eval loglikelihood recipe)."""
    kwargs = dict(model="default", prompt="The capital of France is", max_tokens=3, logprobs=2, **GREEDY)
    plain = client.completions.create(**kwargs).choices[0]
    echo = client.completions.create(echo=True, **kwargs).choices[0]
    lp = echo.logprobs
    num_prompt = len(lp.tokens) - 3
    assert echo.text == "The capital of France is" + plain.text and num_prompt == 5
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None  # nothing predicts the first token
    assert all(v < 0 for v in lp.token_logprobs[1:num_prompt])
    assert all(top[t] == pytest.approx(v) for t, v, top in
               zip(lp.tokens[1:num_prompt], lp.token_logprobs[1:num_prompt], lp.top_logprobs[1:num_prompt]))
    assert lp.tokens[num_prompt:] == plain.logprobs.tokens
    assert lp.token_logprobs[num_prompt:] == pytest.approx(plain.logprobs.token_logprobs, abs=1e-4)
    assert lp.text_offset[num_prompt] == len("The capital of France is")
    streamed_tokens, streamed_text = [], ""
    for chunk in client.completions.create(echo=True, stream=True, **kwargs):
        for c in chunk.choices:
            streamed_text += c.text
            streamed_tokens += c.logprobs.tokens if c.logprobs else []
    assert (streamed_text, streamed_tokens) == (echo.text, lp.tokens)


def test_structured_outputs(client):
    """response_format and forge's structured_outputs / vLLM's guided_* constrain the text."""
    messages = [{"role": "user", "content": "Give me a JSON object with field a set to 5."}]
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"],
              "additionalProperties": False}
    out = client.chat.completions.create(model="default", messages=messages, max_tokens=24, **GREEDY,
                                         response_format={"type": "json_schema",
                                                          "json_schema": {"name": "a", "schema": schema}})
    assert out.choices[0].finish_reason == "stop" and isinstance(json.loads(out.choices[0].message.content)["a"], int)
    out = client.chat.completions.create(model="default", messages=messages, max_tokens=24, **GREEDY,
                                         response_format={"type": "json_object"})
    assert isinstance(json.loads(out.choices[0].message.content), dict)
    out = client.completions.create(model="default", prompt="My phone number is", max_tokens=24, **GREEDY,
                                    extra_body={"guided_regex": r"\d{3}-\d{4}"})
    assert re.fullmatch(r"\d{3}-\d{4}", out.choices[0].text)
    kwargs = dict(model="default", messages=[{"role": "user", "content": "Yes or no?"}], max_tokens=24, **GREEDY,
                  extra_body={"structured_outputs": {"choice": ["yes", "no"]}})
    text = client.chat.completions.create(**kwargs).choices[0].message.content
    assert text in ("yes", "no") and stream_chat(client, **kwargs)[0] == {0: text}
    with pytest.raises(openai.BadRequestError, match="regex"):
        client.completions.create(model="default", prompt="x", max_tokens=4, extra_body={"guided_regex": "(("})


# -- concurrency ----------------------------------------------------------------------------------------

CONFIGS = [  # 8 distinct requests, each sent by 4 of the 32 clients
    {"prompt": "The capital of France is", **GREEDY},
    {"prompt": "def fibonacci(n):\n", **GREEDY},
    {"prompt": "1, 2, 3, 4, 5,", **GREEDY, "stop": [" 9"]},
    {"prompt": "My favourite animal is", "temperature": 0.8, "seed": 11},
    {"prompt": "Once upon a time", "temperature": 1.0, "seed": 3, "extra_body": {"top_k": 20}},
    {"prompt": "The best way to learn is", "temperature": 0.7, "top_p": 0.9, "seed": 99},
    {"prompt": "Water boils at", **GREEDY, "frequency_penalty": 1.0},
    {"prompt": "In 1492,", "temperature": 0.9, "seed": 7, "extra_body": {"min_p": 0.1}},
]


def test_32_parallel_streams_match_solo_runs(server):
    async def one(client, cfg) -> str:
        text = ""
        stream = await client.completions.create(model="default", max_tokens=12, stream=True, **cfg)
        async for chunk in stream:
            text += "".join(c.text for c in chunk.choices)
        return text

    async def main():
        async with openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="x", timeout=120, max_retries=0) as client:
            solo = [await one(client, cfg) for cfg in CONFIGS]
            together = await asyncio.wait_for(
                asyncio.gather(*(one(client, CONFIGS[i % len(CONFIGS)]) for i in range(32))), timeout=120)
        return solo, together

    solo, together = asyncio.run(main())
    assert all(solo) and len(set(solo)) == len(CONFIGS)
    assert together == [solo[i % len(CONFIGS)] for i in range(32)]


# -- metrics ------------------------------------------------------------------------------------------

def test_metrics_parse_with_prometheus_client(server, client):
    for _ in range(2):  # the second time, the prompt's full blocks come from the prefix cache
        client.completions.create(model="default", prompt="Hello there, " * 12, max_tokens=3, **GREEDY)
    text = httpx.get(server.url + "/metrics", timeout=10).text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    for name in ("forge:http_requests", "forge:num_requests_running", "forge:num_requests_waiting",
                 "forge:kv_cache_usage_perc", "forge:prefix_cache_queries", "forge:prefix_cache_hits",
                 "forge:time_to_first_token_seconds", "forge:inter_token_latency_seconds", "forge:prompt_tokens",
                 "forge:generation_tokens"):
        assert name in families, name
    ok = [s for s in families["forge:http_requests"].samples
          if s.name == "forge:http_requests_total" and s.labels == {"endpoint": "/v1/completions", "status": "200"}]
    assert ok and ok[0].value >= 1
    assert server.metric("forge:generation_tokens_total") > 0 and server.metric("forge:prompt_tokens_total") > 0
    assert server.metric("forge:time_to_first_token_seconds_count") >= 1
    assert server.metric("forge:inter_token_latency_seconds_count") >= 1
    hits, queries = server.metric("forge:prefix_cache_hits_total"), server.metric("forge:prefix_cache_queries_total")
    assert 0 < hits <= queries  # the same prompts came back many times
    assert server.wait_for_metric("forge:kv_cache_usage_perc", 0.0) == 0.0
