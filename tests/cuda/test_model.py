"""The whole model on the CUDA path against the CPU reference, CUDA graphs against eager, batch vs alone."""


import pytest
import torch

from forge import LLM, SamplingParams
from forge.loader.safetensors import save_hf_dir
from tests.util import default_tokenizer, forward_logits, random_weights, tiny_config

pytestmark = pytest.mark.cuda


@pytest.fixture(scope="module")
def tokenizer():
    return default_tokenizer()


SHAPES = {
    # the default model's shape (SmolLM2-135M): 30 layers, GQA 3, head_dim 64
    "smollm2": dict(hidden_size=576, intermediate_size=1536, num_layers=30, num_heads=9, num_kv_heads=3, head_dim=64,
                    tie_word_embeddings=True, rope_theta=100000.0),
    # Llama-3-8B's layer shape cut to 2 layers: GQA 4, head_dim 128
    "llama8b-2l": dict(hidden_size=4096, intermediate_size=14336, num_layers=2, num_heads=32, num_kv_heads=8,
                       head_dim=128, rope_theta=500000.0),
}


@pytest.fixture(scope="module", params=list(SHAPES))
def model_dir(request, tmp_path_factory, tokenizer):
    config = tiny_config(vocab_size=tokenizer.vocab_size, **SHAPES[request.param])
    path = tmp_path_factory.mktemp(request.param)
    save_hf_dir(path, config, random_weights(config, seed=1, scale=0.02), tokenizer)
    return path


def rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def test_logits_cuda_bf16_vs_cpu(model_dir, tokenizer):
    ids = tokenizer.encode("The quick brown fox jumps over the lazy dog. " * 6)
    cpu = LLM(str(model_dir), num_kv_blocks=64)
    ref = forward_logits(cpu.llm_engine.runner, ids)
    for dtype, tol in (("bfloat16", 3e-2), ("float16", 1e-2), ("float32", 1e-4)):
        gpu = LLM(str(model_dir), device="cuda", dtype=dtype, num_kv_blocks=64, enforce_eager=True)
        got = forward_logits(gpu.llm_engine.runner, ids).cpu()
        assert rel_err(got, ref) < tol, (dtype, rel_err(got, ref))
        del gpu
        torch.cuda.empty_cache()


def prompts(tokenizer):
    texts = ["Once upon a time", "The capital of France is", "def fib(n):", "1, 2, 3, 4,", "Hello"]
    return [{"prompt_token_ids": tokenizer.encode(t * (i + 1))} for i, t in enumerate(texts)]


def test_greedy_fp32_cuda_equals_cpu(model_dir, tokenizer):
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    cpu = [o.outputs[0].token_ids for o in LLM(str(model_dir), num_kv_blocks=64).generate(prompts(tokenizer), params)]
    gpu_llm = LLM(str(model_dir), device="cuda", dtype="float32", num_kv_blocks=64, max_num_seqs=8)
    gpu = [o.outputs[0].token_ids for o in gpu_llm.generate(prompts(tokenizer), params)]
    assert gpu == cpu


def test_batch_equals_sequential_and_graphs_equal_eager(model_dir, tokenizer):
    ps = prompts(tokenizer)
    params = [SamplingParams(temperature=0.8, top_p=0.9, seed=i, max_tokens=12 + i, ignore_eos=True) for i in range(len(ps))]
    graphs = LLM(str(model_dir), device="cuda", dtype="float32", num_kv_blocks=128, max_num_seqs=8)
    assert graphs.llm_engine.runner.graphs is not None
    together = [o.outputs[0].token_ids for o in graphs.generate(ps, params)]
    alone = [graphs.generate(p, sp)[0].outputs[0].token_ids for p, sp in zip(ps, params)]
    assert together == alone
    eager = LLM(str(model_dir), device="cuda", dtype="float32", num_kv_blocks=128, max_num_seqs=8, enforce_eager=True)
    assert [o.outputs[0].token_ids for o in eager.generate(ps, params)] == together


def test_graph_replay_logits_match_eager_bf16(model_dir, tokenizer):
    """Decode logits through a replayed CUDA graph equal the eager forward within bf16 noise."""
    # Synchronous steps: the runner is driven by hand below, with every token on the host.
    llm = LLM(str(model_dir), device="cuda", dtype="bfloat16", num_kv_blocks=128, max_num_seqs=8,
              async_scheduling=False)
    engine = llm.llm_engine
    for p in prompts(tokenizer)[:3]:
        engine.add_request(p, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    engine.step()  # prefill
    engine.step()  # one decode through the graph
    sched = engine.scheduler.schedule()  # the next decode step (allocates its slots)
    assert all(item.num_new_tokens == 1 for item in sched.scheduled)
    runner = engine.runner
    graph_logits = runner.execute(sched.plan).clone()
    graphs, runner.graphs = runner.graphs, None
    eager_logits = runner.execute(sched.plan)
    runner.graphs = graphs
    assert rel_err(graph_logits, eager_logits) < 1e-2
    assert torch.equal(graph_logits.argmax(-1), eager_logits.argmax(-1))
