"""qkv_rope_cache launcher (kernel: rope_cache.cu)."""

import numpy as np
import torch

from forge.kernels import compiler


def qkv_rope_cache(
    qkv: torch.Tensor,
    positions: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> torch.Tensor:
    """Rotate q/k (neox), write k/v to their cache slots (slot < 0: skipped); returns q [T, H, D].

    A float8 (e4m3) cache stores k / k_scale and v / v_scale (saturated to +-448); other caches
    ignore the scales."""
    t = qkv.shape[0]
    if qkv.stride(-1) != 1:
        qkv = qkv.contiguous()
    q = torch.empty(t, num_heads, head_dim, dtype=qkv.dtype, device=qkv.device)
    if t == 0:
        return q
    assert head_dim % 2 == 0, "RoPE needs an even head_dim"
    assert k_cache.is_contiguous() and v_cache.is_contiguous(), "KV cache must be contiguous"
    assert k_cache.dtype == v_cache.dtype
    positions = positions.to(torch.int64)
    slot_mapping = slot_mapping.to(torch.int64)
    if cos_sin_cache.dtype != torch.float32 or not cos_sin_cache.is_contiguous():
        cos_sin_cache = cos_sin_cache.float().contiguous()
    half = head_dim // 2
    row_stride = qkv.stride(0)
    vec = 16 // max(qkv.element_size(), 1)
    while vec > 1 and (
        half % vec
        or row_stride % vec
        or any(p.data_ptr() % (vec * p.element_size()) for p in (qkv, q, k_cache, v_cache))
        or cos_sin_cache.data_ptr() % 16
    ):
        vec //= 2
    n_items = (num_heads + 2 * num_kv_heads) * (half // vec)
    threads = min(1024, max(32, (n_items + 31) // 32 * 32))
    kernel = compiler.get_kernel(
        "rope_cache.cu", "qkv_rope_cache_kernel", qkv.dtype, VEC=vec,
        FORGE_CACHE_DTYPE=compiler.dtype_code(k_cache.dtype),
    )
    compiler.run(
        kernel, t, threads,
        compiler.ptr(q), compiler.ptr(k_cache), compiler.ptr(v_cache), compiler.ptr(qkv),
        compiler.ptr(positions), compiler.ptr(cos_sin_cache), compiler.ptr(slot_mapping),
        np.int64(row_stride), np.int32(num_heads), np.int32(num_kv_heads), np.int32(head_dim),
        np.float32(k_scale), np.float32(v_scale),
    )
    return q
