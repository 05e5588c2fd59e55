"""The step plan (forge.engine.plan): what the scheduler puts in it, that it is plain data, and that the
model runner's inputs come from it alone."""

import pickle

import pytest
import torch

from forge import SamplingParams
from forge.config import EngineConfig
from forge.engine.block_manager import BlockManager
from forge.engine.model_runner import ModelRunner
from forge.engine.plan import StepPlan
from forge.engine.scheduler import Scheduler
from forge.sequence import PLACEHOLDER, Sequence
from tests.util import random_weights, tiny_config

BLOCK = 4


def scheduler(budget: int, num_blocks: int = 64, **kw) -> Scheduler:
    return Scheduler(BlockManager(num_blocks, BLOCK, enable_prefix_caching=False), max_num_seqs=8,
                     max_num_batched_tokens=budget, **kw)


def seq(n: int, first: int = 100, **params) -> Sequence:
    return Sequence(f"req{first}", list(range(first, first + n)), SamplingParams(temperature=0, **params))


def finish_step(s: Scheduler, out, tokens: dict[int, int]) -> None:
    """What the engine does after a step: advance the computed counts, append sampled tokens."""
    s.postprocess(out)
    for item in out.scheduled:
        if item.seq.seq_id in tokens:
            item.seq.token_ids.append(tokens[item.seq.seq_id])


def test_plan_rows_for_chunks_decodes_and_prompt_logprobs():
    s = scheduler(budget=12)
    a, b, c = seq(5, 100), seq(10, 200), seq(6, 300, prompt_logprobs=2)
    for x in (a, b, c):
        s.add(x)
    out = s.schedule()
    plan = out.plan
    # a's whole prompt (5), b's first chunk (7): c waits for the budget
    assert plan.seq_ids == [a.seq_id, b.seq_id] and plan.request_ids == ["req100", "req200"]
    assert plan.starts == [0, 0] and plan.query_lens == [5, 7]
    assert plan.token_ids == list(range(100, 105)) + list(range(200, 207))
    assert plan.num_logits == [1, 0] and plan.num_sampled == [1, 0]  # prompt end; mid-prefill
    assert plan.block_tables == [a.block_table, b.block_table] and plan.block_tables[0] is not a.block_table
    assert plan.logits_rows() == [4] and not plan.from_prev_step
    finish_step(s, out, {a.seq_id: 7})
    out = s.schedule()
    plan = out.plan
    # a decodes its token, b finishes its prompt (3), c's prompt (6) with every row's logits (prompt logprobs)
    assert plan.seq_ids == [a.seq_id, b.seq_id, c.seq_id]
    assert plan.starts == [5, 7, 0] and plan.query_lens == [1, 3, 6]
    assert plan.token_ids == [7, 207, 208, 209] + list(range(300, 306))
    assert plan.num_logits == [1, 1, 6] and plan.num_sampled == [1, 1, 1]
    assert plan.logits_rows() == [0, 3, 4, 5, 6, 7, 8, 9]
    finish_step(s, out, {a.seq_id: 8, b.seq_id: 9, c.seq_id: 10})
    plan = s.schedule().plan
    assert plan.query_lens == [1, 1, 1] and plan.token_ids == [8, 9, 10]
    assert plan.logits_rows() is None  # pure decode: every position's logits


def test_async_placeholders_name_the_previous_steps_sampled_row():
    """A token sampled last step and not read back yet (a PLACEHOLDER) is named in the plan by its
    place among the previous step's sampled tokens."""
    s = scheduler(budget=9, async_scheduling=True)
    x, a, b = seq(2, 100), seq(3, 200), seq(9, 300)
    for q in (x, a, b):
        s.add(q)
    out = s.schedule()  # x (sampled: 0), a (sampled: 1), b's first 4 tokens
    assert out.plan.num_sampled == [1, 1, 0]
    s.postprocess(out)
    s.finish(x)  # (its token was a stop token, read back before the step was launched)
    assert s.add_placeholders([x, a]) and a.token_ids[-1] == PLACEHOLDER and x.token_ids[-1] != PLACEHOLDER
    out = s.schedule()  # a's token, still on the device, and b's last 5 (sampled: 1)
    assert out.plan.token_ids == [PLACEHOLDER] + list(range(304, 309))
    assert out.plan.from_prev_step == [(0, 1)]
    s.postprocess(out)
    assert s.drop_placeholder(a) and PLACEHOLDER not in a.token_ids
    a.token_ids.append(11)  # read back
    s.add_placeholders([a, b])
    plan = s.schedule().plan
    assert plan.token_ids == [PLACEHOLDER, PLACEHOLDER] and plan.starts == [4, 9]
    assert plan.from_prev_step == [(0, 0), (1, 1)]


@pytest.mark.parametrize("limit", ["max_tokens", "context"])
def test_async_last_token_in_flight_is_not_scheduled_again(limit):
    """A sequence whose in-flight token is its last allowed one waits for it to be read back; a
    sequence that finished meanwhile takes no token."""
    s = scheduler(budget=16, async_scheduling=True, max_model_len=6 if limit == "context" else 64)
    a, b = seq(4, 100, max_tokens=2 if limit == "max_tokens" else None), seq(3, 200)
    for q in (a, b):
        s.add(q)
    out = s.schedule()
    s.postprocess(out)
    s.add_placeholders([a, b])  # a's first token in flight
    assert not a.awaiting_final
    s.drop_placeholder(a)
    a.token_ids.append(7)  # read back while the next step runs
    out = s.schedule()
    s.postprocess(out)
    s.add_placeholders([a, b])  # a's second token: its last (2 of max_tokens 2, or 6 of the context)
    assert a.awaiting_final and not b.awaiting_final
    assert s.schedule().plan.seq_ids == [b.seq_id]  # a waits for its last token
    s.finish(a)  # (it finished when that token was read)
    assert not s.drop_placeholder(a) and a.token_ids[-1] == 7  # a finished sequence takes no token


def test_plan_is_plain_picklable_data():
    s = scheduler(budget=64)
    for i in range(3):
        s.add(seq(5 + 3 * i, 100 * (i + 1)))
    plan = s.schedule().plan

    def plain(v) -> bool:
        if isinstance(v, (list, tuple)):
            return all(plain(x) for x in v)
        return type(v) in (int, str)

    assert all(plain(v) for v in vars(plan).values())
    assert pickle.loads(pickle.dumps(plan)) == plan


# -- the runner ------------------------------------------------------------------------------------------
def runner() -> ModelRunner:
    config = tiny_config(vocab_size=512)
    return ModelRunner(config, random_weights(config, seed=2), EngineConfig(num_kv_blocks=64, block_size=BLOCK), 256)


def mixed_plan() -> StepPlan:
    """A prefill chunk, a decode whose token is on the device, a chunk with prompt logprobs, a decode."""
    plan = StepPlan()
    plan.add_row(1, "a", 0, [5, 6, 7, 8, 9, 10], [3, 9], num_logits=0, num_sampled=0)
    plan.add_row(2, "b", 6, [PLACEHOLDER], [4, 7], num_logits=1, num_sampled=1)
    plan.add_row(3, "c", 4, [20, 21, 22], [11, 12], num_logits=3, num_sampled=1)
    plan.add_row(4, "d", 13, [30], [1, 2, 5, 6], num_logits=1, num_sampled=1)
    plan.from_prev_step.append((6, 2))
    return plan


def expected_inputs(plan: StepPlan, prev: list[int]) -> dict[str, list]:
    """The inputs a plan stands for, one position at a time."""
    ids, positions, slots = list(plan.token_ids), [], []
    for dst, src in plan.from_prev_step:
        ids[dst] = prev[src]
    for start, n, table in zip(plan.starts, plan.query_lens, plan.block_tables):
        positions += range(start, start + n)
        slots += [table[p // BLOCK] * BLOCK + p % BLOCK for p in range(start, start + n)]
    width = max(map(len, plan.block_tables))
    return dict(ids=ids, positions=positions, slots=slots,
                query_start=[sum(plan.query_lens[:i]) for i in range(plan.num_rows + 1)],
                context_lens=[s + n for s, n in zip(plan.starts, plan.query_lens)],
                tables=[t + [0] * (width - len(t)) for t in plan.block_tables])


def test_runner_inputs_come_from_the_plan():
    r = runner()
    plan = mixed_plan()
    prev = torch.tensor([40, 41, 42])
    with torch.inference_mode():
        inputs = r.prepare_inputs(plan, prev_sampled=prev)
    want = expected_inputs(plan, prev.tolist())
    meta = inputs.meta
    assert inputs.input_ids.tolist() == want["ids"] and want["ids"][6] == 42
    assert meta.positions.tolist() == want["positions"] and meta.slot_mapping.tolist() == want["slots"]
    assert meta.query_start_loc.tolist() == want["query_start"] and meta.context_lens.tolist() == want["context_lens"]
    assert meta.block_tables.tolist() == want["tables"]
    assert meta.query_lens_cpu == [6, 1, 3, 1] and meta.context_lens_cpu == want["context_lens"]
    assert (meta.max_query_len, meta.max_context_len) == (6, 14)
    assert inputs.logits_rows.tolist() == [6, 7, 8, 9, 10]
    # The next steps reuse the staging buffers (two in turn); a decode step needs no ranges.
    buffers = [t.data_ptr() for t in r.long_stager.buffers + r.int_stager.buffers]
    decode = StepPlan()
    decode.add_row(2, "b", 7, [3], [4, 7], num_logits=1, num_sampled=1)
    decode.add_row(4, "d", 14, [8], [1, 2, 5, 6], num_logits=1, num_sampled=1)
    with torch.inference_mode():
        inputs = r.prepare_inputs(decode)
    assert inputs.meta.positions.tolist() == [7, 14] and inputs.meta.slot_mapping.tolist() == [7 * BLOCK + 3, 6 * BLOCK + 2]
    assert inputs.logits_rows is None and inputs.meta.is_decode_only
    assert [t.data_ptr() for t in r.long_stager.buffers + r.int_stager.buffers] == buffers


def test_a_plan_too_big_for_the_staging_buffers_grows_them():
    r = runner()
    plan = StepPlan()
    plan.add_row(1, "a", 0, list(range(200)) * 8, list(range(64)) * 7, num_logits=1, num_sampled=1)
    with torch.inference_mode():
        inputs = r.prepare_inputs(plan)
    assert inputs.meta.positions.tolist() == list(range(1600)) and r.long_stager.buffers[0].numel() >= 3 * 1600 + 1


def test_execute_from_the_plan_alone_as_a_worker_would():
    """The runner consumes only the plan: a pickled copy (what a tensor-parallel worker receives)
    gives the same logits; a plan that reads the previous step's tokens needs them."""
    r = runner()
    for k, v in r.kv_caches:  # the plan's rows read context this test never wrote: zeros, not whatever
        k.zero_()  # memory the CPU cache was allocated on held (NaN bits made the two runs unequal)
        v.zero_()
    plan = mixed_plan()
    prev = torch.tensor([40, 41, 42])
    direct = r.execute(plan, prev_sampled=prev)
    assert direct.shape == (5, 512)
    assert torch.equal(r.execute(pickle.loads(pickle.dumps(plan)), prev_sampled=prev), direct)
    try:
        r.execute(plan)
    except RuntimeError as e:
        assert "previous step" in str(e)
    else:
        raise AssertionError("a plan with placeholders ran without the previous step's tokens")
