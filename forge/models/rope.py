"""Rotary position embedding tables (Llama-3, linear and LongRoPE frequency scaling), computed like HF
transformers."""

import math

import torch

from forge.config import ModelConfig, RopeScaling


def rope_inv_freq(head_dim: int, theta: float, scaling: RopeScaling | None, long_context: bool = False) -> torch.Tensor:
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
    if scaling is not None and scaling.rope_type == "longrope":  # (HF's order of operations, to the last bit)
        factors = scaling.long_factor if long_context else scaling.short_factor
        return 1.0 / (torch.tensor(factors, dtype=torch.float32) * theta ** exponents)
    inv_freq = 1.0 / (theta ** exponents)
    if scaling is None:
        return inv_freq
    if scaling.rope_type == "linear":
        return inv_freq / scaling.factor
    # Llama 3: leave high frequencies alone, divide low ones by `factor`, blend in between.
    old_len = scaling.original_max_position_embeddings
    low_wavelen = old_len / scaling.low_freq_factor
    high_wavelen = old_len / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
    smooth = (old_len / wavelen - scaling.low_freq_factor) / (scaling.high_freq_factor - scaling.low_freq_factor)
    smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    is_medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def build_cos_sin_cache(
    config: ModelConfig, max_positions: int, freq_factors: torch.Tensor | None = None, local: bool = False
) -> torch.Tensor:
    """[max_positions, head_dim] float32: cos of each (position, frequency) then sin.

    `freq_factors` is GGUF's `rope_freqs.weight` (llama.cpp stores Llama-3 scaling as divisors).
    local: the table of the sliding-window layers (Gemma 3: their own base, no scaling).
    LongRoPE picks its long factors when the engine's context (max_positions) is longer than the
    original one, for every position, as llama.cpp does from its context size (transformers
    switches per forward call, by the longest sequence).
    """
    theta = config.rope_local_theta if local else config.rope_theta
    scaling = None if local or freq_factors is not None else config.rope_scaling
    long_context = scaling is not None and max_positions > scaling.original_max_position_embeddings
    inv_freq = rope_inv_freq(config.head_dim, theta, scaling, long_context)
    if freq_factors is not None:
        inv_freq = inv_freq / freq_factors.float()
    freqs = torch.outer(torch.arange(max_positions, dtype=torch.float32), inv_freq)
    cos, sin = freqs.cos(), freqs.sin()
    if scaling is not None and scaling.attention_factor is not None:
        cos, sin = cos * scaling.attention_factor, sin * scaling.attention_factor
    return torch.cat((cos, sin), dim=-1)
