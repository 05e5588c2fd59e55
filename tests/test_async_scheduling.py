"""Async scheduling (step t+1 launched before step t's tokens are read back) gives exactly the
outputs of the synchronous engine, under every scheduler feature. On the CPU the mechanism is the
same (placeholders, device-side input fill, one-step-late stop checks), so it is tested here.
Random arrivals and aborts under async scheduling: tests/test_scheduler.py."""

import json

import pytest

from forge import LLM, SamplingParams, StructuredOutputsParams
from tests.util import random_prompts


def prompts(n, seed=0, lo=5, hi=100):
    return random_prompts(n, seed, lo, hi)


def run(llm, ps, params):
    """Per request, per completion: (token ids, finish reason, text, {position: {token: logprob}})."""
    outs = llm.generate(ps, params, use_tqdm=False)
    return [[(c.token_ids, c.finish_reason, c.text,
              [{t: lp.logprob for t, lp in entry.items()} for entry in c.logprobs or []]) for c in o.outputs]
            for o in outs]


def assert_same(a, b):
    """Tokens, reasons and text exactly; logprobs to 1e-4 (the batches differ, so float sums may)."""
    assert [[c[:3] for c in r] for r in a] == [[c[:3] for c in r] for r in b]
    for ra, rb in zip(a, b):
        for ca, cb in zip(ra, rb):
            for ea, eb in zip(ca[3], cb[3]):
                assert ea.keys() == eb.keys() and all(abs(ea[t] - eb[t]) < 1e-4 for t in ea)


def both(tiny, **kw):
    sync = LLM(tiny, async_scheduling=False, **kw)
    overlapped = LLM(tiny, async_scheduling=True, **kw)
    assert overlapped.llm_engine.async_scheduling and not sync.llm_engine.async_scheduling
    return sync, overlapped


MIXED = [
    SamplingParams(temperature=0, max_tokens=17, ignore_eos=True),
    SamplingParams(temperature=1.0, seed=3, max_tokens=1, ignore_eos=True),
    SamplingParams(temperature=0.8, top_p=0.9, seed=5, max_tokens=23, logprobs=2),
    SamplingParams(temperature=0, max_tokens=30, presence_penalty=0.5, frequency_penalty=0.3, repetition_penalty=1.2),
    SamplingParams(n=3, temperature=1.0, seed=9, max_tokens=12),
    SamplingParams(temperature=0, max_tokens=40, min_tokens=5, stop=["a", "e"]),
]


@pytest.mark.parametrize("kw", [
    dict(num_kv_blocks=256),  # plain
    dict(num_kv_blocks=256, max_num_batched_tokens=24),  # chunked prefill interleaved with decodes
    dict(num_kv_blocks=14, max_model_len=200),  # preemption
], ids=["plain", "chunked", "preemption"])
def test_async_equals_sync(tiny, kw):
    ps = prompts(12, seed=1)
    params = [MIXED[i % len(MIXED)] for i in range(len(ps))]
    sync, overlapped = both(tiny, **kw)
    assert_same(run(overlapped, ps, params), run(sync, ps, params))
    engine = overlapped.llm_engine
    assert engine.in_flight is None and not engine.has_unfinished_requests()
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
    if "max_model_len" in kw:
        assert engine.scheduler.num_preemptions > 0
    # A prefix-cache hit on the second run (blocks hashed from the real tokens, not placeholders).
    assert_same(run(overlapped, ps, params), run(sync, ps, params))


def test_async_context_limit_and_structured_outputs(tiny):
    schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 99}},
              "required": ["n"]}
    ps = prompts(6, seed=4, lo=30, hi=50)
    params = [SamplingParams(temperature=0.7, seed=i, max_tokens=30,
                             structured_outputs=StructuredOutputsParams(json=schema)) if i % 2 else
              SamplingParams(temperature=0, ignore_eos=True, max_tokens=None) for i in range(len(ps))]  # to the context limit
    sync, overlapped = both(tiny, num_kv_blocks=64, max_model_len=96)
    a, b = run(overlapped, ps, params), run(sync, ps, params)
    assert_same(a, b)
    for i, out in enumerate(a):
        if i % 2:
            json.loads(out[0][2])
        else:
            assert out[0][1] == "length" and len(out[0][0]) == 96 - len(ps[i]["prompt_token_ids"])
