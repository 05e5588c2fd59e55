"""The weight schema (forge.models.schema) is what the loaders, the dummy format and TP sharding use:
names from HF directories and GGUF files, dummy shapes, and each tensor's shard rule."""

import pytest
import torch

from forge.distributed.sharding import plan_shard, shard_tensor
from forge.loader import load_model
from forge.loader.safetensors import save_hf_dir
from forge.models.schema import LLAMA_SCHEMA, SHARD_RULES, dummy_weights, expand, hf_name_of_gguf, spec_of
from tests.util import random_weights, tiny_config, write_tiny_gguf


def schema_names(config) -> set[str]:
    return {w.hf_name for w in expand(config)}


@pytest.mark.parametrize("tied", [False, True])
def test_hf_dir_loads_exactly_the_schema_names(tmp_path, default_loaded, tied):
    tok = default_loaded.tokenizer
    config = tiny_config(vocab_size=tok.vocab_size, tie_word_embeddings=tied)
    weights = random_weights(config, seed=1)
    weights["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)  # (old checkpoints carry it: dropped)
    save_hf_dir(tmp_path, config, weights, tok)
    loaded = load_model(tmp_path)
    assert loaded.config.tie_word_embeddings == tied
    assert set(loaded.weights) == schema_names(config)
    assert ("lm_head.weight" in loaded.weights) != tied


def test_gguf_loads_exactly_the_schema_names(tmp_path, default_loaded):
    config = tiny_config(vocab_size=default_loaded.tokenizer.vocab_size)
    weights = random_weights(config, seed=2)
    loaded = load_model(write_tiny_gguf(tmp_path / "tiny.gguf", config, weights, default_loaded.path))
    assert set(loaded.weights) == schema_names(config)
    assert torch.equal(loaded.weights["model.layers.1.mlp.down_proj.weight"], weights["model.layers.1.mlp.down_proj.weight"])
    assert torch.equal(loaded.weights["model.layers.1.self_attn.k_proj.weight"],  # (Q/K un-permuted on load)
                       weights["model.layers.1.self_attn.k_proj.weight"])


def test_the_default_gguf_holds_the_schema_names(default_loaded):
    assert set(default_loaded.weights) == schema_names(default_loaded.config)


def test_gguf_and_hf_names_map_one_to_one():
    config = tiny_config(num_layers=3)
    every = list(expand(config, everything=True))
    assert len({w.hf_name for w in every}) == len({w.gguf_name for w in every}) == len(every)
    for w in every:
        assert hf_name_of_gguf(w.gguf_name) == w.hf_name
        assert spec_of(w.hf_name) is w.spec
    assert hf_name_of_gguf("blk.0.attn_q.bias") is None and spec_of("model.layers.0.self_attn.rotary_emb.inv_freq") is None


def test_dummy_weights_have_the_schema_names_and_shapes():
    config = tiny_config(vocab_size=100)
    weights = dummy_weights(config, "cpu", torch.float32)
    assert list(weights) == [w.hf_name for w in expand(config)]
    for w in expand(config):
        assert weights[w.hf_name].shape == w.spec.shape(config), w.hf_name
    assert torch.equal(weights["model.norm.weight"], torch.ones(config.hidden_size))


@pytest.mark.parametrize("tp,kv_heads", [(2, 2), (4, 2)])  # (4 ranks, 2 KV heads: each KV head on two ranks)
def test_every_tensor_is_cut_by_its_shard_rule(tp, kv_heads):
    """Each rank's slice has the dummy shape of its local config; column/row slices of all ranks put
    back together give the full tensor (KV heads: each rank holds the one its query heads use); vocab
    slices are padded rows; replicated tensors are untouched."""
    config = tiny_config(vocab_size=101, num_kv_heads=kv_heads)  # (101: the last rank's vocab slice is padded)
    full = random_weights(config, seed=4)
    assert {s.shard for s in LLAMA_SCHEMA} == set(SHARD_RULES)
    plans = [plan_shard(config, r, tp) for r in range(tp)]
    shards = [{n: shard_tensor(n, t, config, p) for n, t in full.items()} for p in plans]
    for w in expand(config):
        rule, name = w.spec.shard, w.hf_name
        for plan, shard in zip(plans, shards):
            local = dummy_weights(plan.local_config(config), "cpu", torch.float32)
            assert shard[name].shape == local[name].shape, (name, plan.rank)
        parts = [s[name] for s in shards]
        if rule == "replicated":
            assert all(p is full[name] for p in parts), name
        elif rule == "vocab":
            assert torch.equal(torch.cat(parts)[: config.vocab_size], full[name])
            assert not torch.cat(parts)[config.vocab_size:].any()
        elif w.spec.split == "kv_heads" and tp > kv_heads:
            d = config.head_dim
            for plan, part in zip(plans, parts):
                assert torch.equal(part, full[name][plan.kv_head_start * d: (plan.kv_head_start + 1) * d]), name
        else:
            assert rule in ("column", "row") and w.spec.split is not None, name
            assert torch.equal(torch.cat(parts, dim=0 if rule == "column" else 1), full[name]), name
