"""The decoder of every supported family, written once against the ops interface (forge.ops) for every device.

Llama is the plain case; a family (forge.models.families) adds parts that its schema holds: q/k/v
biases (Qwen2), per-head q/k RMSNorm (Qwen3, Gemma 3), norms after attention and after the MLP
(Gemma 2/3), a mixture of experts in place of the MLP (Qwen3-MoE, Mixtral); and switches: GeGLU,
scaled embeddings, (1 + w) norms. Per-layer sliding windows, the attention scale and soft-caps come
from the ModelConfig.

Weights are held fused: q/k/v as one matrix and gate/up as one, so each is a single GEMM; the
`qkv_rope_cache` op splits the result, applies RoPE and writes K/V into the paged cache (with the input norm
and the GEMM: `rms_norm_qkv_rope_cache`, where no bias or q/k norm comes between). Which HF
tensors make up each attribute is the schema's (forge.models.schema), not this file's.
"""

from dataclasses import dataclass, fields

import torch

from forge.config import ModelConfig
from forge.distributed.parallel_state import SINGLE
from forge.distributed.sharding import gather_logits, plan_shard, vocab_parallel_embedding
from forge.models.families import family_of
from forge.models.rope import build_cos_sin_cache
from forge.models.schema import field_specs
from forge.ops.metadata import AttentionMetadata
from forge.quant import GroupQuantized, runtime_weight, weight_nbytes

KV_SCALE_NAMES = ("k_scale", "v_scale")  # model.layers.{i}.self_attn.<name>: FP8 checkpoints (llm-compressor)


def kv_cache_scales(weights: dict, layer: int) -> dict[str, float]:
    """Layer `layer`'s float8 KV-cache scales, the ops' k_scale / v_scale keywords (the cache holds
    k / k_scale): the checkpoint's, taken out of `weights`, else 1.0 (vLLM's default without
    calibration). Python floats, so a captured CUDA graph holds them; a float cache ignores them."""
    scales = {}
    for name in KV_SCALE_NAMES:
        key = f"model.layers.{layer}.self_attn.{name}"
        t = weights.pop(key, None)
        if t is None:
            scales[name] = 1.0
            continue
        t = t.detach().float().flatten().cpu()
        if t.numel() == 0 or not torch.all(t == t[0]):
            raise ValueError(f"{key}: per-head KV cache scales are not supported (one scale per layer), got shape "
                             f"{tuple(t.shape)}")
        value = float(t[0])
        if not (value > 0 and value < float("inf")):
            raise ValueError(f"{key} must be a positive finite scale, got {value}")
        scales[name] = value
    return scales


@dataclass
class LayerWeights:
    """One decoder layer. Matrices are float tensors or, on the CPU, quantized layouts (forge.quant)
    that `ops.linear` dispatches on. The optional parts are None where the family has none."""

    input_norm: torch.Tensor  # [hidden]
    qkv_proj: torch.Tensor  # [q_size + 2 kv_size, hidden]
    o_proj: torch.Tensor  # [hidden, q_size]
    mlp_norm: torch.Tensor  # [hidden]
    gate_up_proj: torch.Tensor | None = None  # [2 intermediate, hidden] (a dense MLP)
    down_proj: torch.Tensor | None = None  # [hidden, intermediate]
    router: torch.Tensor | None = None  # [experts, hidden] (a mixture of experts instead)
    experts_gate_up: torch.Tensor | None = None  # [experts, 2 expert width, hidden]
    experts_down: torch.Tensor | None = None  # [experts, hidden, expert width]
    qkv_bias: torch.Tensor | None = None  # [q_size + 2 kv_size]
    q_norm: torch.Tensor | None = None  # [head_dim]
    k_norm: torch.Tensor | None = None  # [head_dim]
    attn_out_norm: torch.Tensor | None = None  # [hidden], on the attention's output
    mlp_out_norm: torch.Tensor | None = None  # [hidden], on the MLP's output


class DecoderModel:
    def __init__(self, config: ModelConfig, weights: dict[str, torch.Tensor], ops, device: str, dtype: torch.dtype,
                 max_positions: int, tp=None, quantization: str = "none"):
        """weights: this rank's HF-named tensors (see forge.distributed.sharding.rank_weights)."""
        self.config = config
        self.family = family_of(config)
        self.ops = ops
        self.device = torch.device(device)
        self.dtype = dtype
        self.scale = config.attention_scale
        # Tensor parallelism (forge.distributed): this rank's shard; collectives are no-ops at size 1.
        self.tp = tp or SINGLE
        self.shard = plan_shard(config, self.tp.rank, self.tp.world_size)
        self.num_heads, self.num_kv_heads = self.shard.num_heads, self.shard.num_kv_heads
        self.q_size = self.num_heads * config.head_dim
        self.kv_size = self.num_kv_heads * config.head_dim
        schema = self.family.schema

        # Each weight is taken out of `weights` (the caller's dict ends up empty) as it is converted, so
        # the loader's copy (float32, or a quantized layout's unpacked codes) is freed as the model is built.
        def take(model_field: str, layer: int | None = None):
            """The schema's tensors for one model attribute: a norm or bias vector, or a matrix stacked
            from its parts (q/k/v, gate/up) and stored float or quantized (forge.quant); None when the
            family has no such part."""
            specs = field_specs(model_field, schema)
            if not specs:
                return None
            if specs[0].kind == "norm":  # Gemma's (1 + w), folded in float32
                return (weights.pop(specs[0].hf(layer)).float() + self.family.norm_offset).to(self.device, dtype)
            if specs[0].kind == "bias":
                return torch.cat([weights.pop(s.hf(layer)) for s in specs]).to(self.device, dtype)
            if specs[0].kind in ("router", "experts"):  # float (routing is sensitive; experts are 3-D);
                # an expert's gate rows, then its up rows: [E, 2 width, hidden]
                parts = [weights.pop(s.hf(layer)) for s in specs]
                parts = [p.dequantize() if isinstance(p, GroupQuantized) else p for p in parts]  # (a GGUF router)
                return torch.cat(parts, dim=1).to(self.device, dtype)
            return runtime_weight([weights.pop(s.hf(layer)) for s in specs], quantization, self.device, dtype,
                                  embedding=specs[0].kind == "embedding")

        def present(model_field: str) -> bool:
            specs = field_specs(model_field, schema)
            return bool(specs) and all(s.hf() in weights for s in specs)

        self.embed_tokens = take("embed_tokens")
        self.layers = [LayerWeights(**{f.name: take(f.name, i) for f in fields(LayerWeights)})
                       for i in range(config.num_layers)]
        self.norm = take("norm")
        self.kv_scales = [kv_cache_scales(weights, i) for i in range(config.num_layers)]
        self.lm_head = take("lm_head") if present("lm_head") and not config.tie_word_embeddings else self.embed_tokens
        # sqrt(hidden) in the model dtype, as HF rounds it (Gemma)
        self.embed_scale = torch.tensor(config.hidden_size ** 0.5, dtype=dtype, device=self.device) \
            if self.family.scale_embeddings else None
        rope_freqs = field_specs("rope_freqs", schema)  # (GGUF Llama 3: float32 divisors of the frequencies)
        freq_factors = weights.pop(rope_freqs[0].hf(), None) if rope_freqs else None
        self.windows = [config.layer_window(i) for i in range(config.num_layers)]
        global_rope = build_cos_sin_cache(config, max_positions, freq_factors).to(self.device)
        local_rope = global_rope if config.rope_local_theta is None else \
            build_cos_sin_cache(config, max_positions, local=True).to(self.device)
        self.layer_rope = [local_rope if w is not None else global_rope for w in self.windows]
        self.cos_sin_cache = global_rope

    def weight_bytes(self) -> int:
        tensors = [self.embed_tokens, self.norm] + [t for layer in self.layers for t in vars(layer).values()
                                                    if t is not None]
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
        ops, eps = self.ops, self.config.rms_norm_eps
        if self.tp.world_size > 1:
            hidden = vocab_parallel_embedding(ops, input_ids, self.embed_tokens, self.shard, self.tp)
        else:
            hidden = ops.embedding(input_ids, self.embed_tokens)
        if self.embed_scale is not None:
            hidden = hidden * self.embed_scale
        residual = None  # (the first layer's input norm has no residual to add)
        for i, (layer, kv_cache) in enumerate(zip(self.layers, kv_caches)):
            hidden, residual = self.attention(i, layer, hidden, residual, meta, kv_cache)
            if layer.attn_out_norm is not None:
                hidden = ops.rms_norm(hidden, layer.attn_out_norm, eps)
            hidden, residual = self.mlp(i, layer, hidden, residual)
            if layer.mlp_out_norm is not None:
                hidden = ops.rms_norm(hidden, layer.mlp_out_norm, eps)
        hidden, _ = ops.add_rms_norm(hidden, residual, self.norm, eps)
        return hidden

    def attention(self, i: int, layer: LayerWeights, hidden: torch.Tensor, residual: torch.Tensor | None,
                  meta: AttentionMetadata, kv_cache) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer i's residual add + input norm, qkv projection (+ bias, q/k norms), RoPE and KV-cache write, then
        its self-attention -> ([T, hidden] all-reduced, the new residual)."""
        ops, cfg, eps = self.ops, self.config, self.config.rms_norm_eps
        k_cache, v_cache = kv_cache
        rope_cache = (meta.positions, self.layer_rope[i], k_cache, v_cache, meta.slot_mapping, self.num_heads,
                      self.num_kv_heads, cfg.head_dim)
        if layer.qkv_bias is None and layer.q_norm is None:  # the qkv GEMM's output goes straight to RoPE
            q, residual = ops.rms_norm_qkv_rope_cache(hidden, residual, layer.input_norm, eps, layer.qkv_proj,
                                                      *rope_cache, **self.kv_scales[i])
        else:
            qkv, residual = ops.rms_norm_linear(hidden, residual, layer.input_norm, eps, layer.qkv_proj)
            if layer.qkv_bias is not None:
                qkv = qkv + layer.qkv_bias
            if layer.q_norm is not None:
                qkv = self.qk_norm(qkv, layer)
            q = ops.qkv_rope_cache(qkv, *rope_cache, **self.kv_scales[i])
        attn = ops.attention(q, k_cache, v_cache, meta, self.scale, window=self.windows[i],
                             soft_cap=cfg.attn_logit_softcap, **self.kv_scales[i])
        return self.tp.all_reduce(ops.linear(attn.reshape(q.shape[0], self.q_size), layer.o_proj)), residual

    def qk_norm(self, qkv: torch.Tensor, layer: LayerWeights) -> torch.Tensor:
        """RMSNorm over each head's q and k (before RoPE); v passes through."""
        d, eps = self.config.head_dim, self.config.rms_norm_eps
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = self.ops.rms_norm(q.reshape(-1, d), layer.q_norm, eps).view(q.shape)
        k = self.ops.rms_norm(k.reshape(-1, d), layer.k_norm, eps).view(k.shape)
        return torch.cat([q, k, v.to(q.dtype)], dim=-1)

    def mlp(self, i: int, layer: LayerWeights, hidden: torch.Tensor,
            residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer i's residual add + norm, then its gated MLP (SwiGLU or GeGLU) or mixture of experts ->
        ([T, hidden] all-reduced, the new residual)."""
        ops, eps = self.ops, self.config.rms_norm_eps
        if layer.router is not None:
            x, residual = ops.add_rms_norm(hidden, residual, layer.mlp_norm, eps)
            return self.moe(layer, x), residual
        act, residual = ops.rms_norm_linear(hidden, residual, layer.mlp_norm, eps, layer.gate_up_proj,
                                            act=self.family.activation)
        return self.tp.all_reduce(ops.linear(act, layer.down_proj)), residual

    def moe(self, layer: LayerWeights, x: torch.Tensor) -> torch.Tensor:
        """Each token through the num_experts_per_tok experts its router picks, summed with the router's
        weights (forge.ops.moe). Under tensor parallelism every rank routes alike (the router is
        replicated) and holds a slice of every expert's width, so one all-reduce sums the slices."""
        cfg = self.config
        weights, expert_ids = self.ops.moe_route(self.ops.linear(x, layer.router), cfg.num_experts_per_tok,
                                                 cfg.norm_topk_prob)
        return self.tp.all_reduce(self.ops.moe_experts(x, weights, expert_ids, layer.experts_gate_up, layer.experts_down))

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[n, hidden] -> float32 logits [n, vocab]."""
        logits = self.ops.logits(hidden, self.lm_head)
        if self.tp.world_size > 1:  # vocab-parallel lm_head: gather every rank's slice of the vocabulary
            logits = gather_logits(logits, self.shard, self.tp)
        logits = logits.float()
        cap = self.config.final_logit_softcap
        return logits if cap is None else torch.tanh(logits / cap) * cap
