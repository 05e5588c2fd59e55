"""Failure isolation (forge/engine/failures.py): requests that make a step fail get an error, alone;
every other request completes with exactly the output it gives on its own. On the engine (synchronous
and async scheduling) with failures injected deterministically, and through a live server with
injected failures and with the poison requests of issue 11 (sampling edge values, grammars that
match nothing)."""

import asyncio
import json
import time

import httpx
import pytest

from forge import SamplingParams
from forge.config import EngineConfig
from forge.engine.llm_engine import LLMEngine
from forge.errors import InvalidRequestError, RequestFailure
from tests.test_server_harness import LiveServer
from tests.util import random_prompts

CMPL = "/v1/completions"
NUM_GOOD, NUM_BAD = 10, 3


def make_engine(model_dir, async_scheduling: bool) -> LLMEngine:
    return LLMEngine(EngineConfig(model=str(model_dir), max_model_len=256, num_kv_blocks=512,
                                  async_scheduling=async_scheduling))


def good_params(i: int) -> SamplingParams:
    """Greedy and seeded sampling (on the CPU a seeded request draws from its own generator, which a
    failed step must rewind), with logprobs and stop strings on some."""
    if i % 2:
        return SamplingParams(temperature=0.8, top_p=0.95, seed=100 + i, max_tokens=20, ignore_eos=True,
                              logprobs=1 if i % 3 else None)
    return SamplingParams(temperature=0, max_tokens=16 + i, ignore_eos=True, stop=["zzz"] if i % 4 == 0 else None)


GOOD = random_prompts(NUM_GOOD, seed=11, lo=5, hi=40)
BAD = [{"prompt_token_ids": [9, 8, 7, 6, 5, 4, 3, 2 + k]} for k in range(NUM_BAD)]
BAD_IDS = {tuple(p["prompt_token_ids"]) for p in BAD}


def is_bad(seq) -> bool:
    return tuple(seq.prompt_token_ids) in BAD_IDS


def run_all(engine, prompts, params) -> dict[str, object]:
    """request id -> final RequestOutput, all added at once, stepped to the end."""
    ids = [engine.add_request(p, sp) for p, sp in zip(prompts, params)]
    finals = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                finals[out.request_id] = out
    assert set(finals) == set(ids)
    return {rid: finals[rid] for rid in ids}


def texts(outs) -> list[tuple]:
    return [(tuple(c.token_ids), c.text, c.finish_reason) for o in outs for c in o.outputs]


@pytest.fixture(scope="module", params=[False, True], ids=["sync", "async"])
def engine(tiny_model_dir, request):
    return make_engine(tiny_model_dir, request.param)


@pytest.fixture(scope="module")
def alone(tiny_model_dir):
    """Each good request's output when it runs on its own."""
    engine = make_engine(tiny_model_dir, False)
    return [texts(run_all(engine, [p], [good_params(i)]).values()) for i, p in enumerate(GOOD)]


def check_isolated(engine, alone, finals: dict, expect_error=None) -> None:
    outs = list(finals.values())
    good, bad = outs[:NUM_GOOD], outs[NUM_GOOD:]
    assert [o.error for o in good] == [None] * NUM_GOOD
    assert [texts([o]) for o in good] == alone
    for o in bad:
        assert o.finished and o.error is not None and all(c.finish_reason == "error" for c in o.outputs)
        if expect_error is not None:
            assert isinstance(o.error, expect_error), o.error
    assert not engine.has_unfinished_requests() and not engine.isolation.isolating
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def mixed():
    """3 bad requests spread among 10 good ones, all in one batch."""
    prompts = GOOD[:3] + [BAD[0]] + GOOD[3:6] + [BAD[1]] + GOOD[6:] + [BAD[2]]
    params = [good_params(i) for i in range(3)] + [good_params(0)] + [good_params(i) for i in range(3, 6)] + \
             [good_params(1)] + [good_params(i) for i in range(6, NUM_GOOD)] + [good_params(2)]
    order = list(range(3)) + [10] + list(range(3, 6)) + [11] + list(range(6, 10)) + [12]
    return prompts, params, order


def run_mixed(engine):
    prompts, params, order = mixed()
    finals = list(run_all(engine, prompts, params).values())
    by_index = dict(zip(order, finals))
    return {i: by_index[i] for i in range(NUM_GOOD + NUM_BAD)}


def test_unnamed_step_failures_are_bisected_to_their_requests(engine, alone, monkeypatch):
    """The model runner raises (naming nobody) whenever a bad request, past its second token, is in
    the step: bisection finds exactly the three."""
    real_execute = engine.runner.execute
    failures = []

    def execute(*args, **kwargs):
        if any(is_bad(s) and s.num_output_tokens >= 2 for s in engine.scheduler.running):
            failures.append(len(engine.scheduler.running))
            raise RuntimeError("injected device error")
        return real_execute(*args, **kwargs)

    monkeypatch.setattr(engine.runner, "execute", execute)
    finals = run_mixed(engine)
    check_isolated(engine, alone, finals, RuntimeError)
    assert 3 <= len(failures) <= 30  # ~2k·log2(n) trial failures for k=3 of n=13
    for o in list(finals.values())[NUM_GOOD:]:  # they failed where they broke: after 2 tokens
        assert len(o.outputs[0].token_ids) == 2


def test_named_failures_fail_only_their_requests(engine, alone, monkeypatch):
    """A failure in per-request work names the request: in the token checks (a stop-string check that
    raises) and in the sampler (a row that cannot be sampled). No bisection is needed."""
    real_add = engine.output_processor.add_token

    def add_token(seq, result, now):
        if is_bad(seq) and seq.num_output_tokens == 3:
            raise ValueError("injected check failure")
        return real_add(seq, result, now)

    monkeypatch.setattr(engine.output_processor, "add_token", add_token)
    finals = run_mixed(engine)
    check_isolated(engine, alone, finals, ValueError)
    assert all(len(o.outputs[0].token_ids) == 3 for o in list(finals.values())[NUM_GOOD:])
    monkeypatch.undo()

    inner = engine.sampler.sampler
    real_sample = inner.sample_async

    def sample_async(logits, seqs):
        if any(is_bad(s) for s in seqs):
            raise RuntimeError("probability tensor contains either inf, nan or element < 0")
        return real_sample(logits, seqs)

    monkeypatch.setattr(inner, "sample_async", sample_async)
    finals = run_mixed(engine)
    check_isolated(engine, alone, finals, InvalidRequestError)  # sound logits: the request's parameters
    assert "sampling failed with this request's parameters" in str(finals[NUM_GOOD].error)
    assert not engine.isolation.trials


def test_request_failure_names_requests():
    err = RequestFailure({"a": ValueError("x"), "b": KeyError("y")})
    assert err.request_ids == ["a", "b"] and "ValueError" in str(err)


def test_a_failure_with_one_request_fails_it_and_the_engine_goes_on(engine, monkeypatch):
    real_execute = engine.runner.execute
    calls = []

    def execute(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("injected transient error")
        return real_execute(*args, **kwargs)

    monkeypatch.setattr(engine.runner, "execute", execute)
    out = list(run_all(engine, GOOD[:1], [good_params(0)]).values())[0]
    assert isinstance(out.error, RuntimeError)
    out = list(run_all(engine, GOOD[:1], [good_params(0)]).values())[0]
    assert out.error is None and len(out.outputs[0].token_ids) == 16


# -- through a live server ------------------------------------------------------------------------------

@pytest.fixture(scope="module", params=[False, True], ids=["sync", "async"])
def server(tiny_model_dir, request):
    engine = make_engine(tiny_model_dir, request.param)
    with LiveServer(engine) as srv:
        yield srv
    engine.shutdown()  # its grammar compile helper process too


def body(prompt, params: SamplingParams, **kw) -> dict:
    b = {"model": "default", "prompt": prompt["prompt_token_ids"], "max_tokens": params.max_tokens,
         "temperature": params.temperature, "top_p": params.top_p, "ignore_eos": params.ignore_eos, **kw}
    if params.seed is not None:
        b["seed"] = params.seed
    return b


async def stream_text(client, b) -> tuple[int, str, dict | None]:
    """(status, streamed text, the error event or None)."""
    async with client.stream("POST", CMPL, json=b | {"stream": True}) as r:
        if r.status_code != 200:
            await r.aread()
            return r.status_code, "", r.json()["error"]
        text, error = "", None
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if "error" in event:
                error = event["error"]
            else:
                text += event["choices"][0]["text"]
        return 200, text, error


def burst(server, bodies) -> list[tuple[int, str, dict | None]]:
    async def main():
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as client:
            return await asyncio.gather(*(stream_text(client, b) for b in bodies))

    return asyncio.run(main())


def assert_idle_and_clean(engine, timeout: float = 20.0) -> None:
    """Every request done (the engine thread gets there shortly after the last response) and every
    KV block free again."""
    deadline = time.monotonic() + timeout
    while engine.num_unfinished_requests and time.monotonic() < deadline:
        time.sleep(0.02)
    assert engine.num_unfinished_requests == 0 and not engine.isolation.isolating
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def good_bodies():
    return [body(p, good_params(i)) for i, p in enumerate(GOOD)]


@pytest.fixture(scope="module")
def alone_texts(server):
    with httpx.Client(base_url=server.url, timeout=120) as client:
        return [client.post(CMPL, json=b).json()["choices"][0]["text"] for b in good_bodies()]


def test_poison_requests_fail_alone_on_the_server(server, alone_texts):
    """10 streams + 3 poison requests at once (issue 11): sampling values at the edge of what is
    accepted and grammars that match no text. The 10 complete with their own output; each poison
    request gets a 400 (or, where its input is safe, a normal answer)."""
    poison = [
        body(GOOD[0], SamplingParams(temperature=1e-38, max_tokens=8)),
        body(GOOD[1], SamplingParams(temperature=0.7, top_p=1e-320, max_tokens=8, seed=1)),
        body(GOOD[2], SamplingParams(temperature=0.7, max_tokens=8, seed=1), repetition_penalty=1e-38),
        body(GOOD[3], SamplingParams(temperature=0.7, max_tokens=8, seed=1), guided_grammar='root ::= root "a"'),
        body(GOOD[4], SamplingParams(temperature=0.7, max_tokens=8, seed=1),
             guided_grammar="root ::= a\na ::= b\nb ::= a"),
        body(GOOD[5], SamplingParams(temperature=0.7, max_tokens=8, seed=1), guided_regex="[^\\s\\S]"),
    ]
    for rnd in range(2):
        picked = poison[3 * rnd: 3 * rnd + 3]
        results = burst(server, good_bodies() + picked)
        assert [r[:2] for r in results[:NUM_GOOD]] == [(200, t) for t in alone_texts]
        assert all(r[2] is None for r in results[:NUM_GOOD])
        for (status, text, error), b in zip(results[NUM_GOOD:], picked):
            if "guided_grammar" in b or "guided_regex" in b:  # matches no text: refused before it runs
                assert status == 400 and error["type"] == "invalid_request_error", (b, error)
                assert "matches no text" in error["message"]
            else:
                assert (status == 400 and error["type"] == "invalid_request_error") or \
                       (status == 200 and error is None and text), (b, status, error)
    assert_idle_and_clean(server.engine)


def test_injected_failures_fail_exactly_those_streams(server, alone_texts, monkeypatch):
    """3 requests that each make the step raise (naming nobody) among 10 streams: those 3 get a 500
    error event without internal text, the 10 complete with their own output."""
    engine = server.engine
    real_execute = engine.runner.execute

    def execute(*args, **kwargs):
        if any(is_bad(s) and s.num_output_tokens >= 2 for s in engine.scheduler.running):
            raise RuntimeError("injected device error /secret/path.py:12")
        return real_execute(*args, **kwargs)

    monkeypatch.setattr(engine.runner, "execute", execute)
    bad = [body(p, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)) for p in BAD]
    results = burst(server, good_bodies() + bad)
    assert [r[:2] for r in results[:NUM_GOOD]] == [(200, t) for t in alone_texts]
    assert all(r[2] is None for r in results[:NUM_GOOD])
    for status, _text, error in results[NUM_GOOD:]:
        assert status == 200 and error["type"] == "server_error"  # the stream had started
        assert "RuntimeError" in error["message"] and "secret" not in error["message"]
    monkeypatch.undo()
    with httpx.Client(base_url=server.url, timeout=60) as client:  # the server is fine afterwards
        assert client.post(CMPL, json=good_bodies()[0]).json()["choices"][0]["text"] == alone_texts[0]
    assert_idle_and_clean(server.engine)
