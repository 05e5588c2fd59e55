"""Rotary position embedding tables (with Llama-3 frequency scaling), computed like HF transformers."""

import math

import torch

from forge.config import ModelConfig, RopeScaling


def rope_inv_freq(head_dim: int, theta: float, scaling: RopeScaling | None) -> torch.Tensor:
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if scaling is None:
        return inv_freq
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
    config: ModelConfig, max_positions: int, freq_factors: torch.Tensor | None = None
) -> torch.Tensor:
    """[max_positions, head_dim] float32: cos of each (position, frequency) then sin.

    `freq_factors` is GGUF's `rope_freqs.weight` (llama.cpp stores Llama-3 scaling as divisors).
    """
    inv_freq = rope_inv_freq(config.head_dim, config.rope_theta, None if freq_factors is not None else config.rope_scaling)
    if freq_factors is not None:
        inv_freq = inv_freq / freq_factors.float()
    freqs = torch.outer(torch.arange(max_positions, dtype=torch.float32), inv_freq)
    return torch.cat((freqs.cos(), freqs.sin()), dim=-1)
