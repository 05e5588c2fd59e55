"""Every dense model family against HF transformers' own implementation: a tiny random-weight model made
with transformers' class and saved with save_pretrained; forge's fp32 CPU logits equal transformers'
over a prompt longer than the sliding window, 32 greedy tokens are identical, the same weights
written as a GGUF (llama.cpp's names and metadata) give the same logits, batch == sequential and
chunked prefill == whole prefill."""

import dataclasses

import pytest
import torch

from tests.util import TinyHFModel, default_tokenizer, forward_logits, write_tiny_gguf

transformers = pytest.importorskip("transformers")

WINDOW = 12
BASE = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
            max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=0, initializer_range=0.2)
# name: (transformers config class, its arguments, prompt length, forge max_model_len)
CASES = {
    "llama": ("LlamaConfig", dict(num_hidden_layers=2), 40, 128),
    "mistral": ("MistralConfig", dict(num_hidden_layers=2, sliding_window=None), 40, 128),
    "mistral-window": ("MistralConfig", dict(num_hidden_layers=2, sliding_window=WINDOW), 40, 128),
    # (a window on the layers from max_window_layers on: Qwen2's own interleaving)
    "qwen2": ("Qwen2Config", dict(num_hidden_layers=3, use_sliding_window=True, sliding_window=WINDOW,
                                  max_window_layers=1), 40, 128),
    "qwen3": ("Qwen3Config", dict(num_hidden_layers=2), 40, 128),
    "gemma2": ("Gemma2Config", dict(num_hidden_layers=4, sliding_window=WINDOW, query_pre_attn_scalar=24,
                                    attn_logit_softcapping=3.0, final_logit_softcapping=5.0), 40, 128),
    "gemma3": ("Gemma3TextConfig", dict(
        num_hidden_layers=4, sliding_window=WINDOW, sliding_window_pattern=2, query_pre_attn_scalar=24,
        final_logit_softcapping=5.0,
        rope_parameters={"full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}), 40, 128),
    # LongRoPE: the short factors while the engine's context fits the original 64 positions, the long ones past it
    "phi3": ("Phi3Config", dict(num_hidden_layers=2, original_max_position_embeddings=64, rope_scaling={
        "type": "longrope", "short_factor": [1.0 + i / 8 for i in range(8)],
        "long_factor": [1.0 + i for i in range(8)]}), 24, 64),
    "phi3-long": ("Phi3Config", dict(num_hidden_layers=2, original_max_position_embeddings=64, rope_scaling={
        "type": "longrope", "short_factor": [1.0 + i / 8 for i in range(8)],
        "long_factor": [1.0 + i for i in range(8)]}), 80, 256),
}
NEW_TOKENS = 32


class Case(TinyHFModel):
    """One family's tiny HF model and its forge engine."""

    def __init__(self, name: str, root, tokenizer):
        cls_name, kwargs, prompt_len, max_model_len = CASES[name]
        config = getattr(transformers, cls_name)(vocab_size=tokenizer.vocab_size, **(BASE | kwargs))
        super().__init__(name, config, root, tokenizer, prompt_len, max_model_len)


@pytest.fixture(scope="module")
def case(request, tmp_path_factory) -> Case:
    return Case(request.param, tmp_path_factory.mktemp("families"), default_tokenizer())


def families(*names):
    return pytest.mark.parametrize("case", names or list(CASES), indirect=True)


@families()
@torch.inference_mode()
def test_logits_match_transformers(case):
    ref = case.hf(torch.tensor([case.prompt])).logits[0]
    got = forward_logits(case.llm.llm_engine.runner, case.prompt)
    diff = (got - ref).abs().max().item()
    assert diff <= 1e-4, diff
    assert ref.std() > 0.5  # (logits spread enough that greedy picks are not near-ties)


@families()
@torch.inference_mode()
def test_greedy_matches_transformers(case):
    ref = case.hf.generate(torch.tensor([case.prompt]), max_new_tokens=NEW_TOKENS, do_sample=False)[0]
    assert case.greedy(case.llm, [case.prompt]) == [ref[case.prompt_len:].tolist()]


@families()
def test_gguf_loads_to_the_same_logits(case, tmp_path, default_model_path):
    from forge.loader import load_model

    loaded = load_model(case.path)
    gguf = write_tiny_gguf(tmp_path / "tiny.gguf", loaded.config, loaded.weights, default_model_path)
    from_gguf = case.engine(gguf)
    a, b = from_gguf.llm_engine.runner.model_config, case.llm.llm_engine.runner.model_config
    for key in ("family", "num_layers", "head_dim", "sliding_window", "layer_types", "rope_theta", "rope_local_theta",
                "attn_logit_softcap", "final_logit_softcap", "tie_word_embeddings"):
        assert getattr(a, key) == getattr(b, key), key
    # (float32 in the file: Gemma's attention scale 1 / sqrt(query_pre_attn_scalar), LongRoPE's attention factor)
    assert a.attention_scale == pytest.approx(b.attention_scale, rel=1e-7)
    if b.rope_scaling is not None and b.rope_scaling.attention_factor is not None:
        assert a.rope_scaling.attention_factor == pytest.approx(b.rope_scaling.attention_factor, rel=1e-7)
        assert dataclasses.replace(a.rope_scaling, attention_factor=b.rope_scaling.attention_factor) == b.rope_scaling
    else:
        assert a.rope_scaling == b.rope_scaling
    got = forward_logits(from_gguf.llm_engine.runner, case.prompt)
    ref = forward_logits(case.llm.llm_engine.runner, case.prompt)
    assert (got - ref).abs().max().item() <= 1e-6


@families("mistral-window", "qwen2", "gemma2", "gemma3", "phi3-long")
def test_batch_and_chunked_prefill_equal_sequential(case):
    """Three prompts, longer and shorter than the window: batched, one at a time, and with the prefill
    cut into 16-token chunks (a chunk's queries see a cached prefix through the window)."""
    prompts = [case.prompt, case.prompt[:17], case.prompt[5:34]]
    alone = [case.greedy(case.llm, [p], 12)[0] for p in prompts]
    assert case.greedy(case.llm, prompts, 12) == alone
    chunked = case.engine(max_num_batched_tokens=16, enable_prefix_caching=False)
    assert case.greedy(chunked, prompts, 12) == alone


def test_unsupported_architectures_name_the_supported_ones():
    from forge.config import ModelConfig
    from forge.errors import UnsupportedModelError
    from forge.loader.gguf import config_from_metadata

    shape = dict(vocab_size=10, hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2)
    with pytest.raises(UnsupportedModelError, match=r"'gpt_neox'.*model_type .*gemma3_text.*qwen3.*GGUF .*phi3"):
        ModelConfig.from_hf_dict({"model_type": "gpt_neox", **shape})
    with pytest.raises(UnsupportedModelError, match="multimodal Gemma 3"):
        ModelConfig.from_hf_dict({"model_type": "gemma3", **shape})
    with pytest.raises(UnsupportedModelError, match=r"'falcon'.*GGUF architecture .*gemma2.*qwen2"):
        config_from_metadata({"general.architecture": "falcon"})
    with pytest.raises(UnsupportedModelError, match="partial rotary"):
        ModelConfig.from_hf_dict({"model_type": "phi3", "partial_rotary_factor": 0.75, **shape})


def test_gguf_names_are_llama_cpps():
    """Every GGUF tensor name in a dense family's schema is one llama.cpp's converter writes for that architecture."""
    from gguf.constants import MODEL_ARCH_NAMES, MODEL_TENSORS, TENSOR_NAMES

    from forge.models.families import FAMILIES

    archs = {name: arch for arch, name in MODEL_ARCH_NAMES.items()}
    for family in FAMILIES:
        known = {TENSOR_NAMES[t].format(bid="{layer}") + ".weight" for t in MODEL_TENSORS[archs[family.gguf_arch]]}
        known |= {n.removesuffix(".weight") + ".bias" for n in known}
        for spec in family.schema:
            assert spec.gguf_name in known, (family.name, spec.gguf_name)
