"""Model families: what each decoder family changes, declared once, and how its config is read.

Every family runs the one decoder (forge.models.decoder). A family is its weight schema
(forge.models.schema: the tensors, and so which optional parts a layer has: q/k/v biases, per-head
q/k norms, norms after attention and the MLP, fused checkpoint matrices) plus the few switches
below. Per-checkpoint hyperparameters (windows, soft-caps, RoPE bases) are ModelConfig fields,
read here from an HF config.json and in forge.loader.gguf from GGUF metadata.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from forge.config import ModelConfig, RopeScaling
from forge.errors import UnsupportedModelError
from forge.models.schema import (
    GEMMA2_SCHEMA,
    GEMMA3_SCHEMA,
    LLAMA_SCHEMA,
    MIXTRAL_SCHEMA,
    PHI3_SCHEMA,
    QWEN2_SCHEMA,
    QWEN3_MOE_SCHEMA,
    QWEN3_SCHEMA,
    WeightSpec,
)


@dataclass(frozen=True)
class Family:
    name: str  # ModelConfig.family
    hf_types: tuple[str, ...]  # config.json model_type values it runs
    hf_architecture: str  # config.json architectures[0] when forge writes one
    gguf_arch: str  # GGUF general.architecture
    schema: tuple[WeightSpec, ...]
    norm_offset: float = 0.0  # RMSNorm scales by (norm_offset + w): Gemma's 1 + w, folded into w at load
    activation: str = "silu"  # the gated MLP's: "silu" (SwiGLU) | "gelu_tanh" (GeGLU)
    scale_embeddings: bool = False  # embeddings times sqrt(hidden), rounded to the model dtype (Gemma)
    window_pattern: int | None = None  # no layer_types given: layer i is windowed unless (i + 1) % pattern == 0
    gguf_permute_qk: bool = False  # llama.cpp stores Q/K rows interleaved for its "llama" RoPE ("llama" arch only)
    rope_theta: float = 10000.0  # when the config names none
    moe: bool = False  # every layer's MLP is a mixture of experts (the schema's router and experts)


FAMILIES: tuple[Family, ...] = (
    Family("llama", ("llama", "mistral"), "LlamaForCausalLM", "llama", LLAMA_SCHEMA, gguf_permute_qk=True),
    Family("qwen2", ("qwen2",), "Qwen2ForCausalLM", "qwen2", QWEN2_SCHEMA),
    Family("qwen3", ("qwen3",), "Qwen3ForCausalLM", "qwen3", QWEN3_SCHEMA),
    Family("gemma2", ("gemma2",), "Gemma2ForCausalLM", "gemma2", GEMMA2_SCHEMA, norm_offset=1.0,
           activation="gelu_tanh", scale_embeddings=True, window_pattern=2),
    Family("gemma3", ("gemma3_text",), "Gemma3ForCausalLM", "gemma3", GEMMA3_SCHEMA, norm_offset=1.0,
           activation="gelu_tanh", scale_embeddings=True, window_pattern=6, rope_theta=1_000_000.0),
    Family("phi3", ("phi3",), "Phi3ForCausalLM", "phi3", PHI3_SCHEMA),
    Family("qwen3_moe", ("qwen3_moe",), "Qwen3MoeForCausalLM", "qwen3moe", QWEN3_MOE_SCHEMA, moe=True),
    # (llama.cpp writes Mixtral as its "llama" architecture with experts)
    Family("mixtral", ("mixtral",), "MixtralForCausalLM", "llama", MIXTRAL_SCHEMA, gguf_permute_qk=True,
           rope_theta=1_000_000.0, moe=True),
)
_BY_NAME = {f.name: f for f in FAMILIES}


def family_of(config: ModelConfig) -> Family:
    return _BY_NAME[config.family]


def supported() -> str:
    """For error messages: every HF model_type and GGUF architecture forge runs."""
    types = sorted({t for f in FAMILIES for t in f.hf_types})
    archs = sorted({f.gguf_arch for f in FAMILIES})
    return f"supported: HF model_type {', '.join(types)}; GGUF architecture {', '.join(archs)}"


def family_for_hf(cfg: dict) -> Family:
    model_type = cfg.get("model_type")
    archs = cfg.get("architectures") or []
    for family in FAMILIES:
        if model_type in family.hf_types:
            return family
    if model_type is None:
        for family in FAMILIES:
            if family.hf_architecture in archs:
                return family
        if any("Llama" in a for a in archs) or not archs:
            return _BY_NAME["llama"]
    hint = " (multimodal Gemma 3 is not supported: use a text-only gemma3_text checkpoint)" if model_type == "gemma3" else ""
    raise UnsupportedModelError(f"unsupported architecture {model_type or archs!r}{hint}; {supported()}")


def family_for_gguf(arch, num_experts: int = 0) -> Family:
    """The family of a GGUF's general.architecture and {arch}.expert_count ("llama" with experts: Mixtral)."""
    for family in FAMILIES:
        if family.gguf_arch == arch and family.moe == (num_experts > 0):
            return family
    if any(f.gguf_arch == arch for f in FAMILIES):
        kind = f"with {num_experts} experts" if num_experts else "without experts"
        raise UnsupportedModelError(f"unsupported GGUF architecture {arch!r} {kind}; {supported()}")
    raise UnsupportedModelError(f"unsupported GGUF architecture {arch!r}; {supported()}")


def window_layer_types(family: Family, num_layers: int, pattern: int | None = None) -> tuple[str, ...] | None:
    """A family's default interleaving of sliding and global layers (None: every layer alike)."""
    pattern = pattern or family.window_pattern
    if not pattern:
        return None
    return tuple("full_attention" if (i + 1) % pattern == 0 else "sliding_attention" for i in range(num_layers))


# ---- HF config.json ---------------------------------------------------------------------------

def _rope(cfg: dict, family: Family) -> tuple[float, RopeScaling | None, float | None]:
    """(theta, scaling, local theta) from either config layout: rope_theta + rope_scaling (+ Gemma 3's
    rope_local_base_freq), or transformers 5's rope_parameters (per layer type for Gemma 3)."""
    params = cfg.get("rope_parameters") or {}
    local = {}
    if "full_attention" in params:
        params, local = params["full_attention"] or {}, params.get("sliding_attention") or {}
    scaling_dict = cfg.get("rope_scaling") or params
    theta = cfg.get("rope_theta") or params.get("rope_theta") or family.rope_theta
    local_theta = cfg.get("rope_local_base_freq") or local.get("rope_theta")
    if local.get("rope_type", "default") != "default":
        raise UnsupportedModelError(f"unsupported rope scaling {local['rope_type']!r} on sliding layers")
    if float(scaling_dict.get("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0))) != 1.0:
        raise UnsupportedModelError("partial rotary embeddings (partial_rotary_factor < 1) are not supported")
    return float(theta), _rope_scaling(scaling_dict, cfg), float(local_theta) if local_theta else None


def _rope_scaling(rs: dict, cfg: dict) -> RopeScaling | None:
    kind = rs.get("rope_type", rs.get("type"))
    if kind in (None, "default"):
        return None
    if kind == "llama3":
        return RopeScaling(factor=rs["factor"], low_freq_factor=rs["low_freq_factor"],
                           high_freq_factor=rs["high_freq_factor"],
                           original_max_position_embeddings=rs["original_max_position_embeddings"])
    if kind == "linear":
        return RopeScaling(factor=float(rs["factor"]), rope_type="linear")
    if kind in ("longrope", "su"):  # ("su": Phi-3's first name for it)
        original = rs.get("original_max_position_embeddings") or cfg["original_max_position_embeddings"]
        factor = rs.get("factor") or cfg["max_position_embeddings"] / original
        attention_factor = rs.get("attention_factor")
        if attention_factor is None:  # the LongRoPE paper's, as transformers computes it
            attention_factor = 1.0 if factor <= 1 else math.sqrt(1 + math.log(factor) / math.log(original))
        return RopeScaling(factor=float(factor), original_max_position_embeddings=int(original), rope_type="longrope",
                           short_factor=tuple(map(float, rs["short_factor"])),
                           long_factor=tuple(map(float, rs["long_factor"])), attention_factor=float(attention_factor))
    raise UnsupportedModelError(f"unsupported rope scaling {kind!r} (forge runs default, llama3, linear, longrope)")


def _layer_types(cfg: dict, family: Family, num_layers: int, window: int | None) -> tuple[str, ...] | None:
    if window is None:
        return None
    if cfg.get("layer_types"):
        return tuple(cfg["layer_types"])
    if cfg.get("use_sliding_window") and "max_window_layers" in cfg:  # Qwen2: the layers from max_window_layers on
        return tuple("sliding_attention" if i >= cfg["max_window_layers"] else "full_attention"
                     for i in range(num_layers))
    return window_layer_types(family, num_layers, cfg.get("sliding_window_pattern"))


def _moe(cfg: dict, family: Family) -> dict:
    """The mixture-of-experts fields (Qwen3-MoE: num_experts, moe_intermediate_size, norm_topk_prob;
    Mixtral: num_local_experts, intermediate_size, always renormalized)."""
    if not family.moe:
        return {}
    if cfg.get("mlp_only_layers") or cfg.get("decoder_sparse_step", 1) != 1:
        raise UnsupportedModelError("MoE models with dense layers among the expert layers (mlp_only_layers, "
                                    "decoder_sparse_step != 1) are not supported")
    return dict(num_experts=cfg.get("num_experts") or cfg["num_local_experts"],
                num_experts_per_tok=cfg["num_experts_per_tok"],
                moe_intermediate_size=cfg.get("moe_intermediate_size") or cfg["intermediate_size"],
                norm_topk_prob=bool(cfg.get("norm_topk_prob", family.name == "mixtral")))


def config_from_hf(cfg: dict) -> ModelConfig:
    family = family_for_hf(cfg)
    num_heads = cfg["num_attention_heads"]
    hidden = cfg["hidden_size"]
    num_layers = cfg["num_hidden_layers"]
    theta, scaling, local_theta = _rope(cfg, family)
    window = cfg.get("sliding_window")
    if cfg.get("use_sliding_window") is False:  # Qwen2/3 carry a window they do not use
        window = None
    eos = cfg.get("eos_token_id")
    return ModelConfig(
        vocab_size=cfg["vocab_size"],
        hidden_size=hidden,
        intermediate_size=cfg["intermediate_size"],
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=cfg.get("num_key_value_heads") or num_heads,
        head_dim=cfg.get("head_dim") or hidden // num_heads,
        max_position_embeddings=cfg.get("max_position_embeddings", 4096),
        rms_norm_eps=cfg.get("rms_norm_eps", 1e-5),
        rope_theta=theta,
        rope_scaling=scaling,
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", family.norm_offset != 0)),  # (Gemma ties by default)
        bos_token_id=cfg.get("bos_token_id"),
        eos_token_id=eos[0] if isinstance(eos, list) else eos,
        family=family.name,
        sliding_window=window,
        layer_types=_layer_types(cfg, family, num_layers, window),
        rope_local_theta=local_theta,
        query_pre_attn_scalar=cfg.get("query_pre_attn_scalar"),
        attn_logit_softcap=cfg.get("attn_logit_softcapping"),
        final_logit_softcap=cfg.get("final_logit_softcapping"),
        **_moe(cfg, family),
    )


def config_to_hf(config: ModelConfig) -> dict:
    """An HF config.json for the config (save_hf_dir)."""
    family = family_of(config)
    windowed_llama = family.name == "llama" and config.sliding_window is not None
    d = {
        "architectures": ["MistralForCausalLM" if windowed_llama else family.hf_architecture],
        "model_type": "mistral" if windowed_llama else family.hf_types[0],
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.num_kv_heads,
        "head_dim": config.head_dim,
        "max_position_embeddings": config.max_position_embeddings,
        "rms_norm_eps": config.rms_norm_eps,
        "rope_theta": config.rope_theta,
        "tie_word_embeddings": config.tie_word_embeddings,
        "hidden_act": "gelu_pytorch_tanh" if family.activation == "gelu_tanh" else "silu",
        "bos_token_id": config.bos_token_id,
        "eos_token_id": config.eos_token_id,
        "torch_dtype": "float32",
        "sliding_window": config.sliding_window,
    }
    optional = {"layer_types": list(config.layer_types) if config.layer_types else None,
                "rope_local_base_freq": config.rope_local_theta, "query_pre_attn_scalar": config.query_pre_attn_scalar,
                "attn_logit_softcapping": config.attn_logit_softcap,
                "final_logit_softcapping": config.final_logit_softcap}
    d.update({k: v for k, v in optional.items() if v is not None})
    if family.name == "qwen3_moe":
        d.update(num_experts=config.num_experts, num_experts_per_tok=config.num_experts_per_tok,
                 moe_intermediate_size=config.moe_intermediate_size, norm_topk_prob=config.norm_topk_prob,
                 decoder_sparse_step=1, mlp_only_layers=[])
    elif family.name == "mixtral":
        d.update(num_local_experts=config.num_experts, num_experts_per_tok=config.num_experts_per_tok,
                 intermediate_size=config.moe_intermediate_size)
    rs = config.rope_scaling
    if rs and rs.rope_type == "llama3":
        d["rope_scaling"] = {"rope_type": "llama3", "factor": rs.factor, "low_freq_factor": rs.low_freq_factor,
                             "high_freq_factor": rs.high_freq_factor,
                             "original_max_position_embeddings": rs.original_max_position_embeddings}
    elif rs and rs.rope_type == "linear":
        d["rope_scaling"] = {"rope_type": "linear", "factor": rs.factor}
    elif rs:
        d["rope_scaling"] = {"rope_type": "longrope", "short_factor": list(rs.short_factor),
                             "long_factor": list(rs.long_factor), "factor": rs.factor,
                             "attention_factor": rs.attention_factor}
        d["original_max_position_embeddings"] = rs.original_max_position_embeddings
    return d
