"""Serving-core invariants on the GPU: chunked == unchunked, prefix hit == miss, preemption == roomy."""

import random

import pytest

from forge import LLM, SamplingParams
from tests.util import default_tokenizer, make_random_model_dir

pytestmark = pytest.mark.cuda


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return str(make_random_model_dir(tmp_path_factory.mktemp("serving"), default_tokenizer(), seed=2, hidden_size=256,
                                     intermediate_size=512, num_layers=4, num_heads=8, num_kv_heads=2, head_dim=32))


def prompts(n, seed, lo, hi, prefix=()):
    rng = random.Random(seed)
    return [{"prompt_token_ids": list(prefix) + [rng.randrange(49152) for _ in range(rng.randint(lo, hi))]}
            for _ in range(n)]


def run(llm, ps, params):
    return [o.outputs[0].token_ids for o in llm.generate(ps, params, use_tqdm=False)]


PARAMS = [SamplingParams(temperature=0.7, seed=i, max_tokens=20, ignore_eos=True) for i in range(8)]


def gpu(model_dir, **kw):
    return LLM(model_dir, device="cuda", dtype="float32", max_num_seqs=8, **kw)


def test_chunked_prefix_and_preemption_equal_plain_runs(model_dir):
    ps = prompts(8, seed=1, lo=30, hi=150)
    roomy = run(gpu(model_dir, num_kv_blocks=512, enable_prefix_caching=False), ps, PARAMS)
    assert run(gpu(model_dir, num_kv_blocks=512, max_num_batched_tokens=48), ps, PARAMS) == roomy
    tight = gpu(model_dir, num_kv_blocks=24, max_model_len=300)
    assert run(tight, ps, PARAMS) == roomy
    assert tight.llm_engine.scheduler.num_preemptions > 0
    assert tight.llm_engine.block_manager.num_free_blocks == 24
    shared = prompts(8, seed=3, lo=5, hi=40, prefix=[7, 8, 9, 10] * 24)
    miss = run(gpu(model_dir, num_kv_blocks=512, enable_prefix_caching=False), shared, PARAMS)
    cached = gpu(model_dir, num_kv_blocks=512)
    run(cached, shared[:1], PARAMS[:1])
    assert run(cached, shared, PARAMS) == miss
    assert cached.llm_engine.prefix_cache_hit_rate > 0.5


def test_async_scheduling_equals_sync_on_the_gpu(model_dir):
    """Async scheduling (the CUDA default) gives the synchronous engine's outputs: greedy, seeded,
    logprobs, penalties, stop strings, n > 1, chunked prefill and preemption in one batch."""
    ps = prompts(10, seed=5, lo=20, hi=120)
    mixed = [
        SamplingParams(temperature=0, max_tokens=17, ignore_eos=True),
        SamplingParams(temperature=0.8, top_p=0.9, seed=5, max_tokens=23, logprobs=2),
        SamplingParams(temperature=0, max_tokens=30, presence_penalty=0.5, repetition_penalty=1.2),
        SamplingParams(n=2, temperature=1.0, seed=9, max_tokens=12),
        SamplingParams(temperature=0, max_tokens=40, min_tokens=3, stop=["a", "e"]),
    ]
    params = [mixed[i % len(mixed)] for i in range(len(ps))]

    def outs(llm):
        return [[(c.token_ids, c.finish_reason, c.text) for c in o.outputs] for o in llm.generate(ps, params, use_tqdm=False)]

    for kw in (dict(num_kv_blocks=512), dict(num_kv_blocks=24, max_model_len=300, max_num_batched_tokens=48)):
        sync = gpu(model_dir, async_scheduling=False, **kw)
        overlapped = gpu(model_dir, **kw)
        assert overlapped.llm_engine.async_scheduling
        assert outs(overlapped) == outs(sync)
        assert overlapped.llm_engine.block_manager.num_free_blocks == kw["num_kv_blocks"]
