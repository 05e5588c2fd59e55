"""The Llama decoder, written once against the ops interface (forge.ops) for every device.

Weights are held fused: q/k/v as one matrix and gate/up as one, so each is a single GEMM; the
`qkv_rope_cache` op splits the result, applies RoPE and writes K/V into the paged cache.
"""

from dataclasses import dataclass

import torch

from forge.config import ModelConfig
from forge.distributed.parallel_state import SINGLE
from forge.distributed.sharding import gather_logits, plan_shard, shard_weights, vocab_parallel_embedding
from forge.models.rope import build_cos_sin_cache
from forge.ops.metadata import AttentionMetadata
from forge.quant import runtime_weight, weight_nbytes


@dataclass
class LayerWeights:
    """One decoder layer. Matrices are float tensors or, on the CPU, quantized layouts (forge.quant)
    that `ops.linear` dispatches on."""

    input_norm: torch.Tensor  # [hidden]
    qkv_proj: torch.Tensor  # [q_size + 2 kv_size, hidden]
    o_proj: torch.Tensor  # [hidden, q_size]
    post_attention_norm: torch.Tensor  # [hidden]
    gate_up_proj: torch.Tensor  # [2 intermediate, hidden]
    down_proj: torch.Tensor  # [hidden, intermediate]


def dummy_weights(config: ModelConfig, device: torch.device, dtype: torch.dtype, seed: int = 0) -> dict:
    """Random weights with a sane scale (norms 1, matrices N(0, 0.02)), for benchmarks and tests."""
    g = torch.Generator(device=device).manual_seed(seed)
    c = config

    def rnd(*shape):
        return torch.randn(*shape, generator=g, device=device, dtype=dtype) * 0.02

    ones = lambda: torch.ones(c.hidden_size, device=device, dtype=dtype)  # noqa: E731
    w = {"model.embed_tokens.weight": rnd(c.vocab_size, c.hidden_size), "model.norm.weight": ones()}
    if not c.tie_word_embeddings:
        w["lm_head.weight"] = rnd(c.vocab_size, c.hidden_size)
    for i in range(c.num_layers):
        p = f"model.layers.{i}."
        w.update({
            p + "input_layernorm.weight": ones(), p + "post_attention_layernorm.weight": ones(),
            p + "self_attn.q_proj.weight": rnd(c.q_size, c.hidden_size),
            p + "self_attn.k_proj.weight": rnd(c.kv_size, c.hidden_size),
            p + "self_attn.v_proj.weight": rnd(c.kv_size, c.hidden_size),
            p + "self_attn.o_proj.weight": rnd(c.hidden_size, c.q_size),
            p + "mlp.gate_proj.weight": rnd(c.intermediate_size, c.hidden_size),
            p + "mlp.up_proj.weight": rnd(c.intermediate_size, c.hidden_size),
            p + "mlp.down_proj.weight": rnd(c.hidden_size, c.intermediate_size),
        })
    return w


class LlamaModel:
    def __init__(self, config: ModelConfig, weights: dict[str, torch.Tensor], ops, device: str, dtype: torch.dtype,
                 max_positions: int, tp=None, weights_sharded: bool = False, quantization: str = "none"):
        self.config = config
        self.ops = ops
        self.device = torch.device(device)
        self.dtype = dtype
        self.scale = config.head_dim ** -0.5
        # Tensor parallelism (forge.distributed): this rank's shard; collectives are no-ops at size 1.
        self.tp = tp or SINGLE
        self.shard = plan_shard(config, self.tp.rank, self.tp.world_size)
        self.num_heads, self.num_kv_heads = self.shard.num_heads, self.shard.num_kv_heads
        self.q_size = self.num_heads * config.head_dim

        if not weights:  # load_format="dummy": random weights of the right shape, made on the device
            weights = dummy_weights(self.shard.local_config(config), self.device, dtype, seed=self.tp.rank)
        elif self.tp.world_size > 1 and not weights_sharded:  # (the loaders can cut them as they read)
            weights = shard_weights(weights, config, self.shard)

        # Each weight is taken out of `weights` (the caller's dict ends up empty) as it is converted, so
        # the loader's copy (float32, or a quantized layout's unpacked codes) is freed as the model is built.
        def w(name: str) -> torch.Tensor:
            return weights.pop(name).to(device=self.device, dtype=dtype)

        def matrix(*names: str, embedding: bool = False):
            """The named matrices stacked along the output dim: float, or a quantized layout (forge.quant)."""
            return runtime_weight([weights.pop(n) for n in names], quantization, self.device, dtype, embedding=embedding)

        self.embed_tokens = matrix("model.embed_tokens.weight", embedding=True)
        self.layers: list[LayerWeights] = []
        for i in range(config.num_layers):
            p = f"model.layers.{i}."
            self.layers.append(
                LayerWeights(
                    input_norm=w(p + "input_layernorm.weight"),
                    qkv_proj=matrix(p + "self_attn.q_proj.weight", p + "self_attn.k_proj.weight",
                                    p + "self_attn.v_proj.weight"),
                    o_proj=matrix(p + "self_attn.o_proj.weight"),
                    post_attention_norm=w(p + "post_attention_layernorm.weight"),
                    gate_up_proj=matrix(p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight"),
                    down_proj=matrix(p + "mlp.down_proj.weight"),
                )
            )
        self.norm = w("model.norm.weight")
        if "lm_head.weight" in weights and not config.tie_word_embeddings:
            self.lm_head = matrix("lm_head.weight", embedding=True)
        else:
            self.lm_head = self.embed_tokens
        freq_factors = weights.get("rope_freqs.weight")
        self.cos_sin_cache = build_cos_sin_cache(config, max_positions, freq_factors).to(self.device)

    def weight_bytes(self) -> int:
        tensors = [self.embed_tokens, self.norm] + [t for layer in self.layers for t in vars(layer).values()]
        if self.lm_head is not self.embed_tokens:
            tensors.append(self.lm_head)
        return sum(weight_nbytes(t) for t in tensors)

    def forward(
        self,
        input_ids: torch.Tensor,
        meta: AttentionMetadata,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
    ) -> torch.Tensor:
        """input_ids: [T] -> final normed hidden states [T, hidden]."""
        ops, cfg = self.ops, self.config
        num_tokens = input_ids.shape[0]
        if self.tp.world_size > 1:
            hidden = vocab_parallel_embedding(ops, input_ids, self.embed_tokens, self.shard, self.tp)
        else:
            hidden = ops.embedding(input_ids, self.embed_tokens)
        residual = None
        for layer, (k_cache, v_cache) in zip(self.layers, kv_caches):
            if residual is None:
                residual = hidden
                x = ops.rms_norm(hidden, layer.input_norm, cfg.rms_norm_eps)
            else:
                x, residual = ops.add_rms_norm(hidden, residual, layer.input_norm, cfg.rms_norm_eps)
            qkv = ops.linear(x, layer.qkv_proj)
            q = ops.qkv_rope_cache(
                qkv, meta.positions, self.cos_sin_cache, k_cache, v_cache, meta.slot_mapping,
                self.num_heads, self.num_kv_heads, cfg.head_dim,
            )
            attn = ops.attention(q, k_cache, v_cache, meta, self.scale)
            hidden = self.tp.all_reduce(ops.linear(attn.reshape(num_tokens, self.q_size), layer.o_proj))
            x, residual = ops.add_rms_norm(hidden, residual, layer.post_attention_norm, cfg.rms_norm_eps)
            hidden = self.tp.all_reduce(ops.linear(ops.silu_mul(ops.linear(x, layer.gate_up_proj)), layer.down_proj))
        hidden, _ = ops.add_rms_norm(hidden, residual, self.norm, cfg.rms_norm_eps)
        return hidden

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[n, hidden] -> float32 logits [n, vocab]."""
        logits = self.ops.logits(hidden, self.lm_head)
        if self.tp.world_size > 1:  # vocab-parallel lm_head: gather every rank's slice of the vocabulary
            logits = gather_logits(logits, self.shard, self.tp)
        return logits.float()
