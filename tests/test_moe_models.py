"""Qwen3-MoE and Mixtral against HF transformers' own implementation: a tiny random-weight model (hidden
64, 4 experts, top 2, 2 layers) made with transformers' class and saved with save_pretrained (its
per-expert tensors); forge's fp32 CPU logits equal transformers', 32 greedy tokens are identical, the
same weights written as a GGUF (llama.cpp's names: stacked ffn_*_exps, ffn_gate_inp) give the same
logits, batch == sequential, and tensor parallelism (2 ranks over gloo) gives the same logits."""

import dataclasses

import pytest
import torch

from tests.util import TinyHFModel, default_tokenizer, forward_logits, write_tiny_gguf

transformers = pytest.importorskip("transformers")

WINDOW = 12
BASE = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
            max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=0, initializer_range=0.2,
            num_experts_per_tok=2)
# name: (transformers config class, its arguments)
CASES = {
    "qwen3_moe": ("Qwen3MoeConfig", dict(intermediate_size=128, moe_intermediate_size=32, num_experts=4,
                                         norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[])),
    "qwen3_moe-unnormalized": ("Qwen3MoeConfig", dict(intermediate_size=128, moe_intermediate_size=32, num_experts=4,
                                                      norm_topk_prob=False, decoder_sparse_step=1, mlp_only_layers=[])),
    "mixtral": ("MixtralConfig", dict(intermediate_size=32, num_local_experts=4, sliding_window=None)),
    "mixtral-window": ("MixtralConfig", dict(intermediate_size=32, num_local_experts=4, sliding_window=WINDOW)),
}
PROMPT_LEN, MAX_MODEL_LEN, NEW_TOKENS = 40, 128, 32


class Case(TinyHFModel):
    """One family's tiny HF model (its per-expert tensors) and its forge engine."""

    def __init__(self, name: str, root, tokenizer):
        cls_name, kwargs = CASES[name]
        config = getattr(transformers, cls_name)(vocab_size=tokenizer.vocab_size, **(BASE | kwargs))
        super().__init__(name, config, root, tokenizer, PROMPT_LEN, MAX_MODEL_LEN)


@pytest.fixture(scope="module")
def case(request, tmp_path_factory) -> Case:
    return Case(request.param, tmp_path_factory.mktemp("moe"), default_tokenizer())


def families(*names):
    return pytest.mark.parametrize("case", names or list(CASES), indirect=True)


@families()
@torch.inference_mode()
def test_logits_match_transformers(case):
    config, model = case.llm.llm_engine.runner.model_config, case.llm.llm_engine.runner.model
    assert config.num_experts == 4 and config.num_experts_per_tok == 2
    assert not config.tie_word_embeddings and model.lm_head is not model.embed_tokens  # (the checkpoint's lm_head)
    ref = case.hf(torch.tensor([case.prompt])).logits[0]
    got = forward_logits(case.llm.llm_engine.runner, case.prompt)
    diff = (got - ref).abs().max().item()
    assert diff <= 1e-4, diff
    assert ref.std() > 0.5  # (logits spread enough that greedy picks are not near-ties)


@families()
@torch.inference_mode()
def test_greedy_matches_transformers(case):
    ref = case.hf.generate(torch.tensor([case.prompt]), max_new_tokens=NEW_TOKENS, do_sample=False)[0]
    assert case.greedy(case.llm, [case.prompt]) == [ref[PROMPT_LEN:].tolist()]


@families("qwen3_moe", "mixtral")
def test_gguf_loads_to_the_same_logits(case, tmp_path, default_model_path):
    from forge.loader import load_model

    loaded = load_model(case.path)
    gguf = write_tiny_gguf(tmp_path / "tiny.gguf", loaded.config, loaded.weights, default_model_path)
    from_gguf = case.engine(gguf)
    gguf_config, hf_config = from_gguf.llm_engine.runner.model_config, case.llm.llm_engine.runner.model_config
    assert abs(gguf_config.rms_norm_eps - hf_config.rms_norm_eps) < 1e-12  # (GGUF stores it as float32)
    assert dataclasses.replace(gguf_config, name=hf_config.name, rms_norm_eps=hf_config.rms_norm_eps) == hf_config
    got = forward_logits(from_gguf.llm_engine.runner, case.prompt)
    ref = forward_logits(case.llm.llm_engine.runner, case.prompt)
    assert (got - ref).abs().max().item() <= 1e-6


@families("qwen3_moe")
def test_quantized_gguf_keeps_experts_float(case, tmp_path, default_model_path):
    """A Q8_0 GGUF with quantization=auto: attention matrices stay in blocks, the router (2-D blocks) and
    the stacked experts are dequantized to float; the logits stay close to the float model's."""
    from forge.loader import load_model
    from forge.quant import GroupQuantized

    loaded = load_model(case.path)
    gguf = write_tiny_gguf(tmp_path / "q8.gguf", loaded.config, loaded.weights, default_model_path, q8_0=True)
    llm = case.engine(gguf, quantization="auto")
    layer = llm.llm_engine.runner.model.layers[0]
    assert not isinstance(layer.qkv_proj, torch.Tensor)  # (a quantized layout)
    assert isinstance(layer.router, torch.Tensor) and layer.experts_gate_up.dtype == torch.float32
    assert not any(isinstance(t, GroupQuantized) for t in vars(layer).values())
    got = forward_logits(llm.llm_engine.runner, case.prompt)
    ref = forward_logits(case.llm.llm_engine.runner, case.prompt)
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.9


@pytest.mark.parametrize("family, arch", [("qwen3_moe", "QWEN3MOE"), ("mixtral", "LLAMA")])
def test_gguf_names_are_llama_cpps(family, arch):
    """The schema's GGUF names are the ones the gguf package lists for the architecture (not just
    whatever forge's own writer and reader agree on)."""
    from gguf.constants import MODEL_ARCH, MODEL_TENSORS, TENSOR_NAMES

    from forge.models.families import FAMILIES

    schema = next(f for f in FAMILIES if f.name == family).schema
    known = {TENSOR_NAMES[t].format(bid="{layer}") for t in MODEL_TENSORS[getattr(MODEL_ARCH, arch)]}
    for spec in schema:
        if spec.required:  # (rope_freqs: only the "llama" arch's Llama-3 files)
            assert spec.gguf_name.removesuffix(".weight") in known, spec.gguf_name
    assert {"blk.{layer}.ffn_gate_exps.weight", "blk.{layer}.ffn_up_exps.weight", "blk.{layer}.ffn_down_exps.weight",
            "blk.{layer}.ffn_gate_inp.weight"} <= {s.gguf_name for s in schema}


@families("qwen3_moe", "mixtral-window")
def test_batch_and_chunked_prefill_equal_sequential(case):
    """Three prompts batched, one at a time, and with the prefill cut into 16-token chunks."""
    prompts = [case.prompt, case.prompt[:17], case.prompt[5:34]]
    alone = [case.greedy(case.llm, [p], 12)[0] for p in prompts]
    assert case.greedy(case.llm, prompts, 12) == alone
    chunked = case.engine(max_num_batched_tokens=16, enable_prefix_caching=False)
    assert case.greedy(chunked, prompts, 12) == alone


# -- tensor parallelism: 2 ranks over gloo, the experts' width split, the router replicated ---------------
TP_CONFIGS = {
    "qwen3_moe": dict(family="qwen3_moe", num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                      norm_topk_prob=True),
    "mixtral": dict(family="mixtral", num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                    intermediate_size=32, norm_topk_prob=True),
}


def _tp_rank(rank: int, world_size: int, port: int, out_dir: str) -> None:
    from pathlib import Path

    from forge.distributed.parallel_state import destroy_tp_group, init_tp_group
    from tests.test_tensor_parallel import prefill_and_decode_logits
    from tests.util import tiny_config

    torch.set_num_threads(1)
    group = init_tp_group(rank, world_size, port, "cpu")
    try:
        for name, overrides in TP_CONFIGS.items():
            prefill, decode = prefill_and_decode_logits(tiny_config(vocab_size=1001, **overrides), tp=group)
            if rank == 0:
                torch.save({"prefill": prefill, "decode": decode}, Path(out_dir) / f"{name}.pt")
    finally:
        destroy_tp_group()


def test_tp2_logits_equal_tp1(tmp_path):
    from forge.distributed.parallel_state import free_port
    from tests.test_tensor_parallel import prefill_and_decode_logits, run_ranks
    from tests.util import tiny_config

    run_ranks(_tp_rank, 2, free_port(), str(tmp_path))
    for name, overrides in TP_CONFIGS.items():
        ref_prefill, ref_decode = prefill_and_decode_logits(tiny_config(vocab_size=1001, **overrides))
        got = torch.load(tmp_path / f"{name}.pt")
        assert (got["prefill"] - ref_prefill).abs().max() <= 1e-4, name
        assert (got["decode"] - ref_decode).abs().max() <= 1e-4, name


def test_tp_shards_experts_by_width():
    """Each rank holds every expert, cut along the expert width: gate and up rows, down columns."""
    from forge.distributed.sharding import plan_shard, shard_weights
    from tests.util import random_weights, tiny_config

    config = tiny_config(vocab_size=1001, **TP_CONFIGS["qwen3_moe"])
    w = random_weights(config)
    shards = [shard_weights(w, config, plan_shard(config, r, 2)) for r in range(2)]
    p = "model.layers.1.mlp."
    gate, up = w[p + "experts.gate_proj.weight"], w[p + "experts.up_proj.weight"]
    assert gate.shape == (4, 32, 64)
    assert torch.equal(torch.cat([s[p + "experts.gate_proj.weight"] for s in shards], 1), gate)
    assert torch.equal(torch.cat([s[p + "experts.up_proj.weight"] for s in shards], 1), up)
    assert torch.equal(torch.cat([s[p + "experts.down_proj.weight"] for s in shards], 2), w[p + "experts.down_proj.weight"])
    assert all(s[p + "gate.weight"] is w[p + "gate.weight"] for s in shards)


def test_unsupported_moe_layouts_are_refused(tmp_path):
    from forge.config import ModelConfig
    from forge.errors import UnsupportedModelError

    cfg = transformers.Qwen3MoeConfig(vocab_size=100, **(BASE | CASES["qwen3_moe"][1] | {"mlp_only_layers": [1]}))
    with pytest.raises(UnsupportedModelError, match="mlp_only_layers"):
        ModelConfig.from_hf_dict(cfg.to_dict())
    with pytest.raises(UnsupportedModelError, match="qwen2_moe"):
        ModelConfig.from_hf_dict({"model_type": "qwen2_moe", "architectures": ["Qwen2MoeForCausalLM"]})
