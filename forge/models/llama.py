"""The Llama decoder, written once against the ops interface (forge.ops) for every device.

Weights are held fused: q/k/v as one matrix and gate/up as one, so each is a single GEMM; the
`qkv_rope_cache` op splits the result, applies RoPE and writes K/V into the paged cache. Which HF
tensors make up each attribute is the schema's (forge.models.schema), not this file's.
"""

from dataclasses import dataclass, fields

import torch

from forge.config import ModelConfig
from forge.distributed.parallel_state import SINGLE
from forge.distributed.sharding import gather_logits, plan_shard, vocab_parallel_embedding
from forge.models.rope import build_cos_sin_cache
from forge.models.schema import field_specs
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


class LlamaModel:
    def __init__(self, config: ModelConfig, weights: dict[str, torch.Tensor], ops, device: str, dtype: torch.dtype,
                 max_positions: int, tp=None, quantization: str = "none"):
        """weights: this rank's HF-named tensors (see forge.distributed.sharding.rank_weights)."""
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

        # Each weight is taken out of `weights` (the caller's dict ends up empty) as it is converted, so
        # the loader's copy (float32, or a quantized layout's unpacked codes) is freed as the model is built.
        def take(model_field: str, layer: int | None = None):
            """The schema's tensors for one model attribute: a norm vector, or a matrix stacked from its
            parts (q/k/v, gate/up) and stored float or quantized (forge.quant)."""
            specs = field_specs(model_field)
            if specs[0].kind == "norm":
                return weights.pop(specs[0].hf(layer)).to(device=self.device, dtype=dtype)
            return runtime_weight([weights.pop(s.hf(layer)) for s in specs], quantization, self.device, dtype,
                                  embedding=specs[0].kind == "embedding")

        def present(model_field: str) -> bool:
            return all(s.hf() in weights for s in field_specs(model_field))

        self.embed_tokens = take("embed_tokens")
        self.layers = [LayerWeights(**{f.name: take(f.name, i) for f in fields(LayerWeights)})
                       for i in range(config.num_layers)]
        self.norm = take("norm")
        self.lm_head = take("lm_head") if present("lm_head") and not config.tie_word_embeddings else self.embed_tokens
        freq_factors = weights.pop(field_specs("rope_freqs")[0].hf(), None)  # (float32: they divide the frequencies)
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
