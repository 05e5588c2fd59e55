"""Block manager and scheduler: prefix caching, chunked prefill, preemption, abort, no leaks."""

import random

import pytest

from forge import LLM, SamplingParams
from forge.engine.block_manager import BlockManager
from forge.engine.scheduler import Scheduler
from forge.sequence import Sequence
from tests.util import random_prompts


def make_seq(tokens):
    return Sequence("r", list(tokens), SamplingParams(temperature=0))


def test_block_manager_prefix_hits_and_lru_eviction():
    bm = BlockManager(num_blocks=8, block_size=4)
    a = make_seq(range(10))  # 2 full blocks + 2 tokens
    assert bm.find_cached_prefix(a) == []
    bm.allocate(a, [])
    bm.append_slots(a, 10)
    a.num_computed_tokens = 10
    bm.register_full_blocks(a)
    assert len(a.block_table) == 3 and bm.num_free_blocks == 5
    b = make_seq(list(range(8)) + [99, 98, 97])
    cached = bm.find_cached_prefix(b)
    assert cached == a.block_table[:2]
    assert bm.can_allocate(b, 3, cached)
    bm.allocate(b, cached)
    assert b.num_computed_tokens == 8 and bm.blocks[cached[0]].ref_count == 2
    bm.free(a)
    bm.free(b)
    assert bm.num_free_blocks == 8 and bm.usage == 0.0
    # Freed blocks stay cached...
    c = make_seq(list(range(8)) + [1])
    assert len(bm.find_cached_prefix(c)) == 2
    # ...until the pool needs them: taking every block evicts the cached ones.
    d = make_seq([50 + i for i in range(32)])
    bm.allocate(d, [])
    bm.append_slots(d, 32)
    assert bm.num_free_blocks == 0 and bm.find_cached_prefix(c) == []
    assert bm.prefix_hit_rate == pytest.approx(8 / (10 + 11 + 32))


def test_full_prompt_hit_still_computes_last_token():
    bm = BlockManager(num_blocks=8, block_size=4)
    a = make_seq(range(8))
    bm.allocate(a, [])
    bm.append_slots(a, 8)
    a.num_computed_tokens = 8
    bm.register_full_blocks(a)
    b = make_seq(range(8))
    assert len(bm.find_cached_prefix(b)) == 1  # the second block is recomputed for its logits


prompts = random_prompts


def outputs(llm, ps, params):
    return [o.outputs[0].token_ids for o in llm.generate(ps, params, use_tqdm=False)]


GREEDY = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)


def seeded(n):
    return [SamplingParams(temperature=1.0, seed=i, max_tokens=24, ignore_eos=True) for i in range(n)]


@pytest.mark.parametrize("kind", ["greedy", "seeded"])
def test_chunked_prefill_equals_unchunked(tiny, kind):
    ps = prompts(6, seed=1, lo=40, hi=200)
    params = GREEDY if kind == "greedy" else seeded(len(ps))
    roomy = outputs(LLM(tiny, num_kv_blocks=256, max_num_batched_tokens=4096), ps, params)
    chunky = LLM(tiny, num_kv_blocks=256, max_num_batched_tokens=32)
    assert outputs(chunky, ps, params) == roomy
    assert chunky.llm_engine.block_manager.num_free_blocks == 256


def test_chunked_prefill_interleaves_with_decodes(tiny):
    llm = LLM(tiny, num_kv_blocks=256, max_num_batched_tokens=16)
    engine = llm.llm_engine
    short = engine.add_request({"prompt_token_ids": [7] * 5}, GREEDY)
    engine.step()  # short prompt prefilled
    long = engine.add_request({"prompt_token_ids": list(range(100, 300))}, GREEDY)
    decoded_while_prefilling = 0
    for _ in range(8):
        outs = {o.request_id: o for o in engine.step()}
        if short in outs and long not in outs:
            decoded_while_prefilling += 1
    assert decoded_while_prefilling >= 5  # the 200-token prompt takes >12 steps at 15 tokens/step
    llm.llm_engine.abort_request(short)
    llm.llm_engine.abort_request(long)


def test_prefix_cache_hit_equals_miss(tiny):
    system = [11, 22, 33, 44] * 20  # an 80-token shared "system prompt"
    rng = random.Random(5)
    ps = [{"prompt_token_ids": system + [rng.randrange(49152) for _ in range(rng.randint(3, 30))]} for _ in range(5)]
    miss = outputs(LLM(tiny, num_kv_blocks=128, enable_prefix_caching=False), ps, GREEDY)
    cached = LLM(tiny, num_kv_blocks=128)
    outputs(cached, ps[:1], GREEDY)  # warm the cache with the shared prefix
    hit = outputs(cached, ps, GREEDY)
    assert hit == miss
    bm = cached.llm_engine.block_manager
    assert bm.prefix_hit_rate > 0.5
    seeded_miss = outputs(LLM(tiny, num_kv_blocks=128, enable_prefix_caching=False), ps, seeded(5))
    assert outputs(cached, ps, seeded(5)) == seeded_miss


@pytest.mark.parametrize("kind", ["greedy", "seeded"])
def test_preemption_gives_same_outputs(tiny, kind):
    ps = prompts(8, seed=2, lo=20, hi=60)
    params = GREEDY if kind == "greedy" else seeded(len(ps))
    roomy = outputs(LLM(tiny, num_kv_blocks=512), ps, params)
    tight = LLM(tiny, num_kv_blocks=14, max_model_len=200)  # 224 tokens of KV for 8 sequences of ~64
    assert outputs(tight, ps, params) == roomy
    assert tight.llm_engine.scheduler.num_preemptions > 0
    assert tight.llm_engine.block_manager.num_free_blocks == 14


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
def test_random_arrivals_and_aborts_leave_every_block_free(tiny, async_scheduling):
    llm = LLM(tiny, num_kv_blocks=40, max_num_batched_tokens=64, max_num_seqs=16, async_scheduling=async_scheduling)
    engine = llm.llm_engine
    rng = random.Random(0)
    live: list[str] = []
    finished = 0
    for step in range(1000):
        r = rng.random()
        if r < 0.35:
            n = rng.randint(1, 80)
            params = SamplingParams(temperature=rng.choice([0, 1.0]), seed=step, max_tokens=rng.randint(1, 20))
            live.append(engine.add_request({"prompt_token_ids": [rng.randrange(49152) for _ in range(n)]}, params))
        elif r < 0.5 and live:
            engine.abort_request(live.pop(rng.randrange(len(live))))
        for out in engine.step():
            assert all(t >= 0 for c in out.outputs for t in c.token_ids)  # no async placeholder leaks out
            if out.finished:
                live.remove(out.request_id)
                finished += 1
        # Invariants: a block is free exactly when nobody references it.
        bm = engine.block_manager
        referenced = {b for s in engine.scheduler.running for b in s.block_table}
        assert all((bm.blocks[b].ref_count == 0) == (b in bm.free_blocks) for b in range(bm.num_blocks))
        assert referenced.isdisjoint(bm.free_blocks)
    for rid in list(live):
        engine.abort_request(rid)
    assert finished > 50
    assert not engine.has_unfinished_requests()
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_no_block_leak_after_many_requests(tiny):
    llm = LLM(tiny, num_kv_blocks=64, max_num_seqs=8)
    for round_ in range(3):
        outs = llm.generate(prompts(20, seed=round_), SamplingParams(temperature=0.5, seed=1, max_tokens=8), use_tqdm=False)
        assert all(o.finished for o in outs)
        assert llm.llm_engine.block_manager.num_free_blocks == 64


def _two_decoding(drafts_for_a: list[int]):
    bm = BlockManager(num_blocks=5, block_size=4, enable_prefix_caching=False)
    s = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=64)
    a = Sequence("a", list(range(8)), SamplingParams(max_tokens=50))
    b = Sequence("b", list(range(100, 104)), SamplingParams(max_tokens=50))
    s.add(a)
    s.add(b)
    s.postprocess(s.schedule())  # both prefilled: 3 blocks used, 2 free
    a.token_ids.append(1)
    b.token_ids.append(2)  # each needs one new block for its own token: exactly the 2 free
    a.spec_token_ids = drafts_for_a
    return s.schedule()


def test_drafts_never_preempt_another_sequence():
    """Drafts come only from what every running sequence's own tokens leave of the blocks and the
    budget: a's drafts neither preempt b nor push it out of the step (they did)."""
    plain = _two_decoding([])
    assert not plain.preempted and len(plain.scheduled) == 2
    spec = _two_decoding([7, 7, 7, 7])
    assert not spec.preempted, [v.request_id for v in spec.preempted]
    assert {x.seq.request_id for x in spec.scheduled} == {"a", "b"}
