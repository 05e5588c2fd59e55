"""vLLM / OpenAI parity found by using the server as a client would (issue 17), and the router-facing
metrics with vLLM's names in the forge: namespace, moving as requests run. Default model, CPU."""

import asyncio
import logging
import math

import httpx
import pytest

openai = pytest.importorskip("openai", reason="needs the openai client: pip install -e '.[test]'")
from prometheus_client.parser import text_string_to_metric_families

import forge
from forge.config import EngineConfig
from forge.engine.llm_engine import LLMEngine
from tests.test_server_harness import LiveServer

GREEDY = {"temperature": 0}
PROMPT = "The capital of France is"
BLOCK = 16


@pytest.fixture(scope="module")
def server():
    # A small KV cache (32 blocks of 16 tokens) so that a few long requests at once must preempt.
    engine = LLMEngine(EngineConfig(model=None, max_model_len=512, num_kv_blocks=32, block_size=BLOCK))
    with LiveServer(engine) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    with server.openai_client() as c:
        yield c


def post(server, path: str, body: dict) -> httpx.Response:
    return httpx.post(server.url + path, json={"model": "default", **body}, timeout=60)


# -- request parity ------------------------------------------------------------------------------------

def test_chat_choices_carry_stop_reason(client):
    kw = dict(model="default", messages=[{"role": "user", "content": "Tell me about Paris."}], **GREEDY)
    free = client.chat.completions.create(max_tokens=12, **kw).choices[0]
    assert free.finish_reason == "length" and free.model_extra["stop_reason"] is None
    stop = free.message.content.split()[2]  # a word the reply is known to contain
    whole = client.chat.completions.create(max_tokens=12, stop=[stop], **kw).choices[0]
    assert whole.finish_reason == "stop" and whole.model_extra["stop_reason"] == stop
    assert whole.message.content == free.message.content[:free.message.content.index(stop)]
    last = [c for chunk in client.chat.completions.create(max_tokens=12, stop=[stop], stream=True, **kw)
            for c in chunk.choices][-1]
    assert last.finish_reason == "stop" and last.model_extra["stop_reason"] == stop


def test_integer_valued_numbers_are_integers(server):
    r = post(server, "/v1/completions", {"prompt": PROMPT, "max_tokens": 3.0, "n": 1.0, **GREEDY})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
    r = post(server, "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                                               "max_completion_tokens": 2.0, **GREEDY})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] <= 2
    for body in ({"max_tokens": 5.5}, {"max_tokens": "5"}, {"max_tokens": True}, {"n": 1.5}):
        r = post(server, "/v1/completions", {"prompt": PROMPT, **body})
        assert r.status_code == 400 and r.json()["error"]["param"] == next(iter(body)), r.text


def test_echo_with_max_tokens_0_scores_the_prompt(server, client):
    """lm-eval-harness's loglikelihood request: the prompt echoed with its logprobs, nothing generated."""
    scored = client.completions.create(model="default", prompt=PROMPT, max_tokens=0, echo=True, logprobs=1, **GREEDY)
    choice = scored.choices[0]
    ids = server.engine.tokenizer.encode(PROMPT, add_special_tokens=True)
    assert choice.text == PROMPT and choice.finish_reason == "length"
    assert (scored.usage.prompt_tokens, scored.usage.completion_tokens) == (len(ids), 0)
    lp = choice.logprobs
    assert len(lp.tokens) == len(ids) and lp.token_logprobs[0] is None
    assert all(isinstance(v, float) and v <= 0 for v in lp.token_logprobs[1:])
    # the same values as the prompt part of an ordinary echo request
    one = client.completions.create(model="default", prompt=PROMPT, max_tokens=1, echo=True, logprobs=1, **GREEDY)
    assert one.choices[0].logprobs.token_logprobs[:len(ids)] == lp.token_logprobs
    chunks = [c for chunk in client.completions.create(model="default", prompt=PROMPT, max_tokens=0, echo=True,
                                                       logprobs=1, stream=True, **GREEDY) for c in chunk.choices]
    assert "".join(c.text for c in chunks) == PROMPT and chunks[-1].finish_reason == "length"
    assert [v for c in chunks for v in c.logprobs.token_logprobs] == lp.token_logprobs
    r = post(server, "/v1/completions", {"prompt": PROMPT, "max_tokens": 0})
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens" and "echo" in r.json()["error"]["message"]


def test_unknown_fields_are_warned_about_once_per_name(server, caplog):
    with caplog.at_level(logging.WARNING, logger="forge.server"):
        for _ in range(3):
            r = post(server, "/v1/completions", {"prompt": PROMPT, "max_token": 2, "temprature": 0, "max_tokens": 1})
            assert r.status_code == 200
    warned = [rec.getMessage() for rec in caplog.records if "not supported and was ignored" in rec.getMessage()]
    assert len(warned) == 2 and any("'max_token'" in w for w in warned) and any("'temprature'" in w for w in warned)


def test_tokenize_detokenize_version(server):
    tok = server.engine.tokenizer
    r = post(server, "/tokenize", {"prompt": PROMPT, "return_token_strs": True}).json()
    ids = tok.encode(PROMPT, add_special_tokens=True)
    assert r == {"count": len(ids), "max_model_len": 512, "tokens": ids, "token_strs": [tok.id_to_token(t) for t in ids]}
    bare = post(server, "/tokenize", {"prompt": PROMPT, "add_special_tokens": False}).json()
    assert bare["tokens"] == tok.encode(PROMPT) and bare["token_strs"] is None
    messages = [{"role": "user", "content": "hi"}]
    chat = post(server, "/tokenize", {"messages": messages}).json()
    assert chat["tokens"] == tok.encode(tok.apply_chat_template(messages))
    assert post(server, "/detokenize", {"tokens": ids}).json() == {"prompt": tok.decode(ids, skip_special_tokens=False)}
    assert httpx.get(server.url + "/version", timeout=10).json() == {"version": forge.__version__}
    for path, body, param in [("/detokenize", {"tokens": [10**7]}, "tokens"),
                              ("/tokenize", {"prompt": "a", "messages": messages}, "messages"),
                              ("/tokenize", {}, "prompt"),
                              ("/tokenize", {"prompt": "a", "model": "other"}, "model")]:
        r = post(server, path, body)
        assert r.status_code in (400, 404) and r.json()["error"]["param"] == param, (path, body, r.text)


def test_logit_bias(server, client):
    def first_token(**kw) -> str:
        out = client.completions.create(model="default", prompt=PROMPT, max_tokens=1, logprobs=0, **GREEDY, **kw)
        return out.choices[0].logprobs.tokens[0]

    tok = server.engine.tokenizer
    free = first_token()
    free_id = tok.encode(free)[0]
    assert first_token(logit_bias={str(free_id): -100}) != free
    forced = tok.encode(" banana")[0]
    assert first_token(logit_bias={str(forced): 100}) == tok.decode([forced])
    for bias, words in [({"abc": 1}, "'abc'"), ({"5": 101}, "[-100, 100]"), ({str(10**6): 1}, "vocabulary")]:
        r = post(server, "/v1/completions", {"prompt": PROMPT, "logit_bias": bias})
        assert r.status_code == 400 and r.json()["error"]["param"] == "logit_bias" and words in r.text, r.text


# -- metrics -------------------------------------------------------------------------------------------

def samples(server) -> dict[tuple[str, tuple], float]:
    text = httpx.get(server.url + "/metrics", timeout=10).text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(snapshot: dict, name: str, **labels) -> float:
    return snapshot.get((name, tuple(sorted(labels.items()))), 0.0)


VLLM_NAMES = ["num_requests_running", "num_requests_waiting", "kv_cache_usage_perc", "prefix_cache_queries_total",
              "prefix_cache_hits_total", "prompt_tokens_total", "generation_tokens_total", "num_preemptions_total",
              "time_to_first_token_seconds_count", "inter_token_latency_seconds_count",
              "e2e_request_latency_seconds_count", "request_queue_time_seconds_count"]


def test_metrics_have_vllm_names_and_move(server, client):
    before = samples(server)
    for name in VLLM_NAMES:
        assert ("forge:" + name, ()) in before, name
    prompt = "one two three four five six seven eight nine ten " * 4  # several full blocks
    n_prompt = len(server.engine.tokenizer.encode(prompt, add_special_tokens=True))
    for _ in range(2):  # the second time its full blocks come from the prefix cache
        out = client.completions.create(model="default", prompt=prompt, max_tokens=5, extra_body={"ignore_eos": True}, **GREEDY)
        assert out.usage.completion_tokens == 5
    server.wait_for_metric("forge:num_requests_running", 0.0)
    after = samples(server)

    def moved(name: str, **labels) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert moved("forge:prompt_tokens_total") == 2 * n_prompt
    assert moved("forge:generation_tokens_total") == 10
    assert moved("forge:prefix_cache_queries_total") == 2 * n_prompt
    assert moved("forge:prefix_cache_hits_total") == (n_prompt - 1) // BLOCK * BLOCK  # full blocks, not the last token
    assert moved("forge:request_success_total", finished_reason="length") == 2
    assert moved("forge:time_to_first_token_seconds_count") == 2
    assert moved("forge:inter_token_latency_seconds_count") == 8  # 4 gaps per request
    assert moved("forge:e2e_request_latency_seconds_count") == 2
    assert moved("forge:request_queue_time_seconds_count") == 2
    assert 0 < moved("forge:e2e_request_latency_seconds_sum") < 120
    assert value(after, "forge:kv_cache_usage_perc") == 0.0  # nothing holds blocks once they finish
    assert value(after, "forge:http_requests_total", endpoint="/v1/completions", status="200") >= 2


def test_gauges_preemptions_and_aborts(server):
    """Six long streams at once on a 32-block cache: the gauges see them running and waiting, the cache
    fills, some are preempted; one stream is dropped by its client (request_success abort)."""
    before = samples(server)
    seen = {"running": 0.0, "waiting": 0.0, "kv": 0.0}
    stop = asyncio.Event()

    async def watch(http):
        while not stop.is_set():
            text = (await http.get("/metrics")).text
            for family in text_string_to_metric_families(text):
                for s in family.samples:
                    key = {"forge:num_requests_running": "running", "forge:num_requests_waiting": "waiting",
                           "forge:kv_cache_usage_perc": "kv"}.get(s.name)
                    if key:
                        seen[key] = max(seen[key], s.value)
            await asyncio.sleep(0.05)

    async def one(c, i):
        s = await c.completions.create(model="default", prompt=f"Story {i}: once upon a time", max_tokens=120,
                                       extra_body={"ignore_eos": True}, stream=True, **GREEDY)
        got = 0
        async for _ in s:
            got += 1
            if i == 0 and got == 3:
                await s.close()  # the client leaves
                return

    async def main():
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as http, \
                openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="x", timeout=120, max_retries=0) as c:
            watcher = asyncio.ensure_future(watch(http))
            await asyncio.wait_for(asyncio.gather(*(one(c, i) for i in range(6))), timeout=300)
            stop.set()
            await watcher

    asyncio.run(main())
    server.wait_for_metric("forge:num_requests_running", 0.0)
    after = samples(server)
    assert seen["running"] >= 2 and seen["waiting"] >= 1 and seen["kv"] > 0.5, seen
    assert value(after, "forge:num_preemptions_total") > value(before, "forge:num_preemptions_total")
    assert value(after, "forge:request_success_total", finished_reason="abort") == \
        value(before, "forge:request_success_total", finished_reason="abort") + 1
    assert value(after, "forge:request_success_total", finished_reason="length") == \
        value(before, "forge:request_success_total", finished_reason="length") + 5
    assert math.isclose(value(after, "forge:kv_cache_usage_perc"), 0.0)


def test_readme_pairs_every_metric_with_vllms():
    from pathlib import Path

    from forge.server.metrics import ServerMetrics

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    table = readme.split("## Tools and reasoning", 1)[1].split("\n## ", 1)[0]
    for metric in ServerMetrics().registry.collect():
        name = metric.name + ("_total" if metric.type == "counter" else "")
        row = next((line for line in table.splitlines() if line.startswith(f"| `{name}")), None)
        assert row is not None, f"{name} is not in the README's metric table"
        assert "vllm:" in row or "vLLM:" in row
