"""Bounded grammar work (issue 11): a size limit on specs, grammars that match nothing refused up front,
a compile time limit that really stops the compile (a killed helper process), a compiled-grammar
cache bounded in bytes, and compiles off the engine thread so other streams keep flowing."""

import asyncio
import gc
import re
import threading
import time

import httpx
import pytest

from forge import LLM, SamplingParams, StructuredOutputsParams
from forge.config import EngineConfig
from forge.engine.llm_engine import LLMEngine
from forge.errors import InvalidRequestError
from forge.structured import MAX_SPEC_BYTES, StructuredBackend
from forge.structured import backend as backend_module
from tests.test_server_harness import LiveServer
from tests.util import default_tokenizer

MATCH_NOTHING = [
    dict(grammar='root ::= root "a"'),
    dict(grammar="root ::= a\na ::= b\nb ::= a"),
    dict(regex="[^\\s\\S]"),
]
DEAD_END = 'root ::= "a" b\nb ::= b "c"'  # "a" is allowed, then nothing ever is
SLOW = "a?" * 300  # 600 bytes that xgrammar 0.2.9 needs a minute or more to compile


@pytest.fixture(scope="module")
def tokenizer():
    return default_tokenizer()


def new_backend(tokenizer, **limits) -> StructuredBackend:
    return StructuredBackend(tokenizer, tokenizer.vocab_size, tokenizer.stop_token_ids, **limits)


def spec(**kw) -> StructuredOutputsParams:
    return StructuredOutputsParams(**kw)


@pytest.fixture(scope="module")
def llm(tiny):
    return LLM(tiny, max_model_len=256, num_kv_blocks=256)


def constrained(max_tokens=8, **kw) -> SamplingParams:
    return SamplingParams(temperature=0.8, seed=1, max_tokens=max_tokens, structured_outputs=spec(**kw))


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20


# -- admission ------------------------------------------------------------------------------------------

def test_specs_over_the_size_limit_are_refused(llm):
    engine = llm.llm_engine
    with pytest.raises(InvalidRequestError, match="the regex is 1,000,000 bytes; the limit is 65,536 bytes") as err:
        engine.add_request("Hi", constrained(regex="a" * 1_000_000))
    assert err.value.param == "response_format"
    big_schema = {"type": "object", "properties": {f"p{i}": {"type": "integer"} for i in range(5000)}}
    with pytest.raises(InvalidRequestError, match="JSON schema is .* bytes; the limit is 65,536"):
        engine.add_request("Hi", constrained(json=big_schema))
    exactly = "a" * MAX_SPEC_BYTES  # the limit itself is allowed
    assert engine.structured_backend.key(spec(regex=exactly)) == ("regex", exactly)
    assert not engine.has_unfinished_requests()


@pytest.mark.parametrize("kw", MATCH_NOTHING, ids=["left_recursion", "rule_cycle", "empty_class"])
def test_grammars_that_match_nothing_are_refused(llm, kw):
    engine = llm.llm_engine
    with pytest.raises(InvalidRequestError, match="matches no text") as err:
        engine.add_request("Hi", constrained(**kw))
    assert err.value.param == "response_format" and "\n" not in str(err.value)
    assert not engine.has_unfinished_requests()


def test_a_grammar_dead_end_fails_only_its_request(llm):
    """A grammar that lets generation start but then allows nothing: that request fails with a
    client error; the others in the batch are untouched."""
    plain = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    alone = llm.generate([[5, 6, 7], [8, 9, 10]], plain, use_tqdm=False)
    outs = llm.generate([[5, 6, 7], [11, 12, 13], [8, 9, 10]], [plain, constrained(grammar=DEAD_END), plain],
                        use_tqdm=False)
    bad = outs[1]
    assert isinstance(bad.error, InvalidRequestError) and "allows no next token after 1" in str(bad.error)
    assert bad.outputs[0].finish_reason == "error" and bad.outputs[0].text == "a"
    assert [o.outputs[0].token_ids for o in (outs[0], outs[2])] == [o.outputs[0].token_ids for o in alone]
    assert outs[0].error is None and outs[2].error is None


# -- the compile time limit, the cache ----------------------------------------------------------------------

def test_compile_time_limit_kills_the_compile(tokenizer):
    backend = new_backend(tokenizer, compile_timeout_s=0.5)
    try:
        backend.compile_in_background(spec(regex="[0-9]+")).result()  # starts the helper process
        helper = backend._checker._slots.queue[-1]
        start = time.monotonic()
        with pytest.raises(InvalidRequestError, match=r"compiling the regex took longer than 0.5 s \(the limit\)"):
            backend.compile_in_background(spec(regex=SLOW)).result()
        assert time.monotonic() - start < 3
        assert helper.process.poll() is not None  # killed: no core keeps compiling it
        assert backend.stats["compiled"] == 1  # the slow spec never compiled in the server's process
        compiled = backend.compile_in_background(spec(regex="[a-z]+")).result()  # a new helper takes over
        assert compiled is not None and backend.stats["compiled"] == 2
    finally:
        backend.shutdown()


def test_the_same_new_spec_compiles_once(tokenizer):
    backend = new_backend(tokenizer)
    try:
        futures = [backend.compile_in_background(spec(json={"type": "object", "properties": {"k": {"type": "integer"}}}))
                   for _ in range(8)]
        grammars = {id(f.result()) for f in futures}
        assert len(grammars) == 1 and backend.stats["compiled"] == 1 and backend.stats["checked"] == 1
        with pytest.raises(InvalidRequestError, match="matches no text"):
            backend.compile_in_background(spec(grammar='root ::= root "a"')).result()
    finally:
        backend.shutdown()


def test_cache_is_bounded_in_bytes(tokenizer):
    limit = 16 * 2**20
    backend = new_backend(tokenizer, cache_bytes=limit)
    backend.compile(spec(regex="warm up"))
    gc.collect()
    before = rss_mib()
    specs = [spec(regex=f"v{i}" + "ab" * 8000) for i in range(16)]  # ~4 MiB each compiled: 66 MiB in all
    total = 0
    for s in specs:
        total += backend.compile(s).memory_size_bytes
        assert backend.cached_bytes <= limit
        assert backend.cached_bytes == sum(g.memory_size_bytes for g in backend._cache.values())
    gc.collect()
    assert total > 3 * limit
    assert rss_mib() - before < limit / 2**20 + 24  # what is dropped is freed
    # Least recently used first: the newest are kept, a hit refreshes, a miss recompiles.
    kept = [s for s in specs if backend.key(s) in backend._cache]
    assert kept == specs[-len(kept):] and 1 <= len(kept) < len(specs)
    compiled = backend.stats["compiled"]
    backend.compile(specs[-1])
    assert backend.stats["compiled"] == compiled
    backend.compile(specs[0])
    assert backend.stats["compiled"] == compiled + 1
    # A grammar larger than the whole budget is used, never kept.
    small = new_backend(tokenizer, cache_bytes=2**20)
    assert small.compile(spec(regex="ab" * 8000)) is not None and small.cached_bytes == 0 and not small._cache


# -- a live server: big grammars never stall the other streams -------------------------------------------------

@pytest.fixture(scope="module")
def server(tiny_model_dir):
    engine = LLMEngine(EngineConfig(model=str(tiny_model_dir), max_model_len=512, num_kv_blocks=512))
    real_step = engine.step

    def step(*args, **kwargs):  # >= 5 ms a step: the streams run for seconds
        time.sleep(0.005)
        return real_step(*args, **kwargs)

    engine.step = step
    with LiveServer(engine) as srv:
        yield srv
    engine.shutdown()  # its grammar compile helper process too


CMPL = "/v1/completions"


async def stream_gaps(client, i, gaps, done):
    body = {"model": "default", "prompt": f"Stream {i}:", "max_tokens": 400, "ignore_eos": True,
            "temperature": 0, "stream": True}
    async with client.stream("POST", CMPL, json=body) as r:
        assert r.status_code == 200
        last = None
        async for line in r.aiter_lines():
            if line.startswith("data: {"):
                now = time.monotonic()
                if last is not None:
                    gaps.append(now - last)
                last = now
    done.append(i)


def test_big_grammars_never_stall_other_streams(server, monkeypatch):
    """8 streams run while a 1,000,000-char regex (refused at once: size limit) and a large allowed one
    (compiled off the engine thread, in seconds) arrive: no stream waits more than 1 s for a chunk."""
    threads = []
    real_compile_spec = backend_module.compile_spec

    def compile_spec(*args):
        threads.append(threading.current_thread().name)
        return real_compile_spec(*args)

    monkeypatch.setattr(backend_module, "compile_spec", compile_spec)
    big = "[a-z0-9]" * 1500  # 12 KB, seconds to compile
    result = {}

    async def grammar_requests(client):
        await asyncio.sleep(0.5)  # the streams are flowing
        start = time.monotonic()
        r = await client.post(CMPL, json={"model": "default", "prompt": "x", "max_tokens": 8,
                                          "guided_regex": "a" * 1_000_000})
        result["huge"] = (r.status_code, r.json()["error"], time.monotonic() - start)
        start = time.monotonic()
        r = await client.post(CMPL, json={"model": "default", "prompt": "x", "max_tokens": 8, "temperature": 0.8,
                                          "seed": 3, "guided_regex": big})
        result["big"] = (r.status_code, r.json(), time.monotonic() - start)

    async def main():
        gaps, done = [], []
        async with httpx.AsyncClient(base_url=server.url, timeout=120, limits=httpx.Limits(max_connections=20)) as c:
            await asyncio.gather(*(stream_gaps(c, i, gaps, done) for i in range(8)), grammar_requests(c))
        return gaps, done

    gaps, done = asyncio.run(main())
    status, error, seconds = result["huge"]
    assert status == 400 and error["type"] == "invalid_request_error" and "limit is 65,536 bytes" in error["message"]
    assert seconds < 1
    status, body, seconds = result["big"]
    assert status == 200 and re.fullmatch("[a-z0-9]+", body["choices"][0]["text"]), body
    assert threads and all(name.startswith("forge-grammar") for name in threads), threads
    assert len(done) == 8 and len(gaps) > 8 * 200
    assert max(gaps) <= 1.0, f"max gap {max(gaps):.2f} s while compiling for {seconds:.1f} s"


def test_compile_time_limit_on_the_server(server):
    """A spec that would compile for minutes: a 400 at the limit, and the server goes on."""
    backend = server.engine.structured_backend
    backend.compile_in_background(spec(regex="[0-9]+")).result()  # the helper (and the checker) exist
    backend._checker.timeout_s = 1.0
    try:
        with httpx.Client(base_url=server.url, timeout=60) as client:
            start = time.monotonic()
            r = client.post(CMPL, json={"model": "default", "prompt": "x", "max_tokens": 4, "guided_regex": SLOW})
            assert r.status_code == 400 and "took longer than 1 s (the limit)" in r.json()["error"]["message"]
            assert time.monotonic() - start < 5
            r = client.post(CMPL, json={"model": "default", "prompt": "x", "max_tokens": 4,
                                        "response_format": {"type": "json_object"}})
            assert r.status_code == 200 and r.json()["choices"][0]["text"].startswith("{")
    finally:
        backend._checker.timeout_s = backend.compile_timeout_s
