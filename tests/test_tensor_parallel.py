"""Tensor parallelism (forge.distributed): sharding, TP=2 logits and generation equal TP=1, clean shutdown.

CPU tests run 2 processes over gloo in float32. The cuda-marked test needs >= 2 GPUs (NCCL) and
compares TP=2 (and TP=4 where 4 GPUs exist) with TP=1: float32 greedy tokens exactly, bfloat16
prefill and graph-replayed decode logits within bf16 tolerance.
"""

import gc
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from forge import LLM, SamplingParams
from forge.config import EngineConfig
from forge.distributed.parallel_state import destroy_tp_group, free_port, init_tp_group
from forge.distributed.sharding import plan_shard, shard_weights
from forge.engine.model_runner import ModelRunner
from forge.errors import InvalidRequestError
from forge.ops.metadata import AttentionMetadata
from tests.util import default_tokenizer, forward_logits, random_weights, tiny_config

REPO = Path(__file__).resolve().parents[1]

# Model shapes for the logits test: GQA split across ranks with an odd (padded) vocabulary; one KV
# head for 4 query heads (replicated on both ranks) with tied embeddings.
CONFIGS = {
    "gqa2-odd-vocab": dict(vocab_size=1001, num_heads=4, num_kv_heads=2),
    "kv1-tied": dict(vocab_size=999, num_heads=4, num_kv_heads=1, tie_word_embeddings=True),
    # families (forge.models.families): biases cut by heads, per-head norms replicated, fused checkpoint
    # matrices cut part by part, windows and soft-caps per rank
    "qwen2-bias": dict(vocab_size=1001, family="qwen2"),
    "gemma3-window": dict(vocab_size=1001, family="gemma3", sliding_window=8, rope_local_theta=10000.0,
                          layer_types=("sliding_attention", "full_attention"), query_pre_attn_scalar=24,
                          attn_logit_softcap=3.0, final_logit_softcap=5.0),
    "phi3-fused": dict(vocab_size=1001, family="phi3"),
}
PROMPT = [3, 17, 256, 998, 5, 42, 77, 1000 % 999, 600, 12, 9, 31, 400, 2, 88, 19, 250, 7]
NEXT_TOKEN = 123
MAX_LEN = 256


def decode_metadata(context_len: int, block_size: int) -> AttentionMetadata:
    """One decode token at position context_len - 1 of a sequence in blocks 0, 1, 2, ..."""
    blocks = -(-context_len // block_size)
    return AttentionMetadata(
        positions=torch.tensor([context_len - 1]), slot_mapping=torch.tensor([context_len - 1]),
        query_start_loc=torch.tensor([0, 1], dtype=torch.int32),
        context_lens=torch.tensor([context_len], dtype=torch.int32),
        block_tables=torch.arange(blocks, dtype=torch.int32)[None], max_query_len=1, max_context_len=context_len,
        query_lens_cpu=[1], context_lens_cpu=[context_len],
    )


@torch.inference_mode()
def prefill_and_decode_logits(config, tp=None) -> tuple[torch.Tensor, torch.Tensor]:
    runner = ModelRunner(config, random_weights(config, seed=3), EngineConfig(num_kv_blocks=8), MAX_LEN, tp=tp)
    prefill = forward_logits(runner, PROMPT)
    meta = decode_metadata(len(PROMPT) + 1, runner.block_size)
    hidden = runner.model.forward(torch.tensor([NEXT_TOKEN]), meta, runner.kv_caches)
    return prefill, runner.model.compute_logits(hidden)


def _logits_rank(rank: int, world_size: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    group = init_tp_group(rank, world_size, port, "cpu")
    try:
        for name, overrides in CONFIGS.items():
            prefill, decode = prefill_and_decode_logits(tiny_config(**overrides), tp=group)
            if rank == 0:
                torch.save({"prefill": prefill, "decode": decode}, Path(out_dir) / f"{name}.pt")
    finally:
        destroy_tp_group()


def run_ranks(fn, world_size: int, *args, timeout: float = 60.0) -> None:
    ctx = torch.multiprocessing.spawn(fn, args=(world_size, *args), nprocs=world_size, join=False)
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=0.5):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"tensor-parallel ranks did not finish in {timeout} s")


# -- sharding (no processes) ---------------------------------------------------------------------
@pytest.mark.parametrize("tp", [2, 4])
def test_shards_reassemble(tp):
    """Concatenated shards give back every weight; with fewer KV heads than ranks, each rank holds
    the KV head its query heads use."""
    config = tiny_config(vocab_size=1001, num_heads=8, num_kv_heads=2, intermediate_size=128)
    w = random_weights(config, seed=1)
    shards = [shard_weights(w, config, plan_shard(config, r, tp)) for r in range(tp)]
    plan = plan_shard(config, 0, tp)
    assert plan.vocab_per_rank == -(-1001 // tp) and plan.num_heads == 8 // tp
    assert plan.kv_replicated == (tp > 2)
    p = "model.layers.1."
    for name, dim in [("self_attn.q_proj.weight", 0), ("self_attn.o_proj.weight", 1), ("mlp.gate_proj.weight", 0),
                      ("mlp.up_proj.weight", 0), ("mlp.down_proj.weight", 1)]:
        assert torch.equal(torch.cat([s[p + name] for s in shards], dim), w[p + name]), name
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        full = torch.cat([s[name] for s in shards])
        assert full.shape[0] == plan.vocab_per_rank * tp
        assert torch.equal(full[:1001], w[name]) and not full[1001:].any()
    d = config.head_dim
    group = config.num_heads // config.num_kv_heads
    for r, s in enumerate(shards):
        rp = plan_shard(config, r, tp)
        kv_head = rp.head_start // group  # the KV head of this rank's first query head
        assert torch.equal(s[p + "self_attn.k_proj.weight"][:d], w[p + "self_attn.k_proj.weight"][kv_head * d:(kv_head + 1) * d])
        assert s[p + "input_layernorm.weight"] is w[p + "input_layernorm.weight"]


def test_unsplittable_model_is_rejected(tiny_model_dir):
    with pytest.raises(InvalidRequestError, match="tensor_parallel_size 3"):
        LLM(str(tiny_model_dir), num_kv_blocks=16, tensor_parallel_size=3)
    assert not dist.is_initialized()


def test_cli_flag():
    from forge.cli import build_parser, engine_config

    for cmd in (["generate", "hi"], ["serve"], ["bench"]):
        assert engine_config(build_parser().parse_args(cmd + ["-tp", "2"])).tensor_parallel_size == 2
        assert engine_config(build_parser().parse_args(cmd + ["--tensor-parallel-size", "4"])).tensor_parallel_size == 4
        assert engine_config(build_parser().parse_args(cmd)).tensor_parallel_size == 1


# -- two processes over gloo ---------------------------------------------------------------------
def test_tp2_logits_equal_tp1(tmp_path):
    run_ranks(_logits_rank, 2, free_port(), str(tmp_path))
    for name, overrides in CONFIGS.items():
        ref_prefill, ref_decode = prefill_and_decode_logits(tiny_config(**overrides))
        got = torch.load(tmp_path / f"{name}.pt")
        assert got["prefill"].shape == ref_prefill.shape == (len(PROMPT), overrides["vocab_size"])
        assert torch.allclose(got["prefill"], ref_prefill, atol=1e-4, rtol=1e-4), name
        assert torch.allclose(got["decode"], ref_decode, atol=1e-4, rtol=1e-4), name


def _prompts():
    base = list(range(40, 90))
    return [{"prompt_token_ids": base[: 6 + 9 * i]} for i in range(5)] + [{"prompt_token_ids": [5, 6, 7] * 11}]


def _generate(llm):
    params = [SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)] * 5 + [
        SamplingParams(temperature=0.8, top_p=0.9, seed=7, n=2, max_tokens=10, ignore_eos=True)
    ]
    return [[c.token_ids for c in o.outputs] for o in llm.generate(_prompts(), params, use_tqdm=False)]


def _gone(pid: int, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
            with open(f"/proc/{pid}/stat") as f:  # a zombie (exited, not yet reaped) counts as gone
                if f.read().split(") ", 1)[1].startswith("Z"):
                    return True
        except (ProcessLookupError, FileNotFoundError):
            return True
        time.sleep(0.1)
    return False


def test_generate_tp2_equals_tp1_and_shutdown(tiny_model_dir):
    """Greedy and seeded sampling through LLM(tensor_parallel_size=2), with chunked prefill (a small
    token budget) and prefix caching, equal TP=1; shutdown() stops the worker and frees the group."""
    kw = dict(num_kv_blocks=64, max_num_batched_tokens=32, max_num_seqs=4)
    expected = _generate(LLM(str(tiny_model_dir), **kw))
    llm = LLM(str(tiny_model_dir), tensor_parallel_size=2, **kw)
    assert llm.llm_engine.runner.model.num_kv_heads == 1  # tiny model: 2 KV heads over 2 ranks
    assert _generate(llm) == expected
    procs = llm.llm_engine.tp.procs
    start = time.monotonic()
    llm.llm_engine.shutdown()
    assert time.monotonic() - start < 5
    assert [p.exitcode for p in procs] == [0]  # left on the shutdown command, not terminated
    assert not dist.is_initialized()
    llm.llm_engine.shutdown()  # idempotent


def test_workers_exit_when_engine_is_collected(tiny_model_dir):
    llm = LLM(str(tiny_model_dir), num_kv_blocks=16, tensor_parallel_size=2)
    llm.generate([1, 2, 3], SamplingParams(max_tokens=2), use_tqdm=False)
    procs = llm.llm_engine.tp.procs
    del llm
    gc.collect()
    assert all(_gone(p.pid) for p in procs)
    assert [p.exitcode for p in procs] == [0]
    assert not dist.is_initialized()


def test_workers_exit_when_rank0_is_killed(tiny_model_dir):
    """No orphans even when the engine's process dies without a shutdown (SIGKILL)."""
    script = textwrap.dedent(f"""
        import sys, time
        from forge import LLM
        llm = LLM({str(tiny_model_dir)!r}, num_kv_blocks=16, tensor_parallel_size=2)
        print(*llm.llm_engine.tp.worker_pids, flush=True)
        time.sleep(60)
    """)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, env=env)
    try:
        pids = [int(p) for p in proc.stdout.readline().split()]
        assert pids
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert all(_gone(pid) for pid in pids)


def test_worker_that_cannot_load_fails_the_start(tmp_path, tiny_model_dir):
    """A worker that dies while loading makes the engine's start raise at once (no hang, no orphans)."""
    script = tmp_path / "broken_worker.py"
    script.write_text(textwrap.dedent("""
        import sys
        import forge.loader

        if __name__ == "__mp_main__":  # the spawned worker re-imports this file under this name
            def broken(*args, **kwargs):
                raise OSError("cannot read the weights")
            forge.loader.load_model = broken

        if __name__ == "__main__":
            from forge import LLM
            try:
                LLM(sys.argv[1], num_kv_blocks=16, tensor_parallel_size=2)
            except RuntimeError as e:
                print("start failed:", e, flush=True)
    """))
    env = dict(os.environ, PYTHONPATH=str(REPO))
    out = subprocess.run([sys.executable, str(script), str(tiny_model_dir)], capture_output=True, text=True,
                         env=env, timeout=60)
    assert "start failed: tensor-parallel worker 1" in out.stdout, out.stdout + out.stderr
    assert "cannot read the weights" in out.stderr


# -- GPUs (NCCL) ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cuda_model_dir(tmp_path_factory):
    from forge.loader.safetensors import save_hf_dir

    tokenizer = default_tokenizer()
    # GQA 8 (16 query heads, 2 KV heads): TP=2 splits the KV heads, TP=4 replicates them.
    config = tiny_config(vocab_size=tokenizer.vocab_size, hidden_size=1024, intermediate_size=2816, num_layers=4,
                         num_heads=16, num_kv_heads=2, head_dim=64, tie_word_embeddings=True, rope_theta=500000.0)
    path = tmp_path_factory.mktemp("tp-cuda")
    save_hf_dir(path, config, random_weights(config, seed=1, scale=0.02), tokenizer)
    return path


def _step_logits(llm, prompts):
    """Logits of the prefill step, then of one decode step (a replayed CUDA graph) whose input tokens
    are fixed, so that every TP size decodes the same tokens."""
    engine = llm.llm_engine
    for p in prompts:
        engine.add_request(p, SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    sched = engine.scheduler.schedule()
    assert len(sched.scheduled) == len(prompts)
    prefill = engine.runner.execute(sched.plan).clone()
    engine.scheduler.postprocess(sched)
    for i, item in enumerate(sched.scheduled):
        item.seq.token_ids.append(1000 + i)
    sched = engine.scheduler.schedule()
    assert [item.num_new_tokens for item in sched.scheduled] == [1] * len(prompts)
    decode = engine.runner.execute(sched.plan).clone()
    for rid in list(engine.requests):
        engine.abort_request(rid)
    return prefill, decode


def _rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.cuda
@pytest.mark.parametrize("tp", [2, 4])
def test_cuda_tp_matches_tp1(tp, cuda_model_dir):
    if torch.cuda.device_count() < tp:
        pytest.skip(f"needs {tp} GPUs, found {torch.cuda.device_count()}")
    ids = [list(range(100 + 37 * i, 100 + 37 * i + 8 * (i + 1))) for i in range(5)]
    prompts = [{"prompt_token_ids": x} for x in ids]
    kw = dict(device="cuda", num_kv_blocks=128, max_num_seqs=8)
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)

    def greedy(llm):
        return [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]

    # float32: TP changes only the order of sums, so greedy tokens match exactly (graphs on).
    ref = LLM(str(cuda_model_dir), dtype="float32", **kw)
    expected = greedy(ref)
    del ref
    gc.collect()
    torch.cuda.empty_cache()
    llm = LLM(str(cuda_model_dir), dtype="float32", tensor_parallel_size=tp, **kw)
    assert llm.llm_engine.runner.graphs is not None
    assert greedy(llm) == expected
    llm.llm_engine.shutdown()
    del llm
    gc.collect()
    torch.cuda.empty_cache()

    # bfloat16: prefill and graph-replayed decode logits within bf16 noise of TP=1.
    ref = LLM(str(cuda_model_dir), dtype="bfloat16", **kw)
    ref_prefill, ref_decode = _step_logits(ref, prompts)
    del ref
    gc.collect()
    torch.cuda.empty_cache()
    llm = LLM(str(cuda_model_dir), dtype="bfloat16", tensor_parallel_size=tp, **kw)
    prefill, decode = _step_logits(llm, prompts)
    llm.llm_engine.shutdown()
    assert _rel_err(prefill, ref_prefill) < 3e-2, _rel_err(prefill, ref_prefill)
    assert _rel_err(decode, ref_decode) < 3e-2, _rel_err(decode, ref_decode)
    assert (prefill.argmax(-1) == ref_prefill.argmax(-1)).float().mean() >= 0.8
