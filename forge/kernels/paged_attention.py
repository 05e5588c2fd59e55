"""Paged decode attention launcher (kernels: paged_attention.cu).

`paged_decode_attention` is graph-capturable: the launch shape and the split-K scratch depend
only on tensor shapes and the `max_context_len` hint, never on the values in `context_lens`,
and nothing synchronizes with the host. Any hint is *correct* (each block derives its chunk of
the context on the device); the hint only steers how many splits are launched.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from forge.kernels import compiler

LOG2E = 1.4426950408889634
MIN_CHUNK = 128  # tokens: fewer per split and the split overhead outweighs the parallelism
SPLIT_OVERHEAD = 128  # fixed cost of one block, in tokens of context (fitted on an H100)


KERNEL_FILE = "paged_attention.cu"
SMEM_BUDGET = 40 << 10  # bytes of K/V stage buffers per block (static shared memory: < 48 KB)


def kernel_config(head_dim: int, group: int, cache_dtype: torch.dtype, num_warps: int | None = None,
                  tile: int | None = None, tpt: int | None = None, min_blocks: int | None = None,
                  stages: int | None = None) -> dict:
    """Compile-time shape constants of the decode kernel (cp.async double-buffered K/V tiles in
    shared memory, paged_attention.cu) for this model shape. A float8 cache keeps bf16's thread
    layout (vectors of 8 elements) and, with half the bytes per token, gets twice the tile."""
    elt = torch.empty((), dtype=cache_dtype).element_size()
    vec = 8 if elt == 1 else 16 // elt  # elements per vector of the math (the kernel's VEC)
    if head_dim % (16 // elt):  # whole 16-byte copies per row
        raise ValueError(f"head_dim {head_dim} must be a multiple of {16 // elt} for {cache_dtype}")
    nvec = head_dim // vec
    num_warps = num_warps or 4
    threads = num_warps * 32
    if nvec > threads:
        raise ValueError(f"head_dim {head_dim} too large")
    stages = stages or 2
    if tile is None:
        tile = 64
        while tile > 8 and stages * 2 * tile * head_dim * elt > SMEM_BUDGET:
            tile //= 2
    if tpt is None:
        # Threads per token in QK^T: enough that the GROUP query slices fit in ~64 registers,
        # and few enough tokens per pass that a tile holds at least one pass.
        want = max(1, math.ceil(group * head_dim / 64), -(-threads // tile))
        if elt == 1:  # float8's pair conversions take registers that 2 threads a token lack (head_dim 32, group 4 spilled)
            want = max(want, 4)
        tpt = 1
        while tpt < want and tpt < 32 and nvec % (tpt * 2) == 0:
            tpt *= 2
    if threads // tpt > tile or tile % (threads // tpt):
        raise ValueError(f"no TILE/TPT combination for head_dim {head_dim}, group {group}")
    if min_blocks is None:
        # 16 warps per SM (<= 128 registers a thread) while the query slices and accumulators
        # fit; fewer blocks when they would spill.
        live = group * head_dim // tpt + group * vec
        min_blocks = max(1, (4 if live <= 96 else 2) * 4 // num_warps)
    return dict(HEAD_DIM=head_dim, GROUP=group, NUM_WARPS=num_warps, TPT=tpt, TILE=tile, MIN_BLOCKS=min_blocks,
                STAGES=stages)


_occupancy: dict[tuple, int] = {}
_defaults: dict[tuple, dict] = {}


def _default_config(head_dim: int, group: int, cache_dtype: torch.dtype) -> dict:
    key = (head_dim, group, cache_dtype)
    if key not in _defaults:
        _defaults[key] = kernel_config(head_dim, group, cache_dtype)
    return _defaults[key]


def choose_num_splits(batch: int, num_kv_heads: int, max_context_len: int, ctas_per_sm: int = 4) -> int:
    """Split the context when B * Hkv blocks would leave SMs idle (flash-decoding).

    Cost model: a launch runs ceil(B * Hkv * S / slots) waves (slots = SMs x resident blocks
    per SM), each as long as one block's chunk, max_context_len / S tokens, plus a fixed cost
    per block (prologue, epilogue, the combine) worth about SPLIT_OVERHEAD tokens. Pick the S
    of least cost (ties: fewer splits), with at least MIN_CHUNK tokens per split. On an H100
    this picks the measured best S at batch 1/8/32/64/128 x 4096 tokens (32/8/2/1/1); e.g.
    S = 3 at batch 32 would leave a half-empty second wave and run 25% slower than S = 2.
    """
    slots = compiler.num_sms() * max(1, ctas_per_sm)
    base = max(1, batch * num_kv_heads)
    max_splits = max(1, min(256, -(-max_context_len // MIN_CHUNK)))
    best, best_cost = 1, float("inf")
    for s in range(1, max_splits + 1):
        cost = math.ceil(base * s / slots) * (max_context_len / s + SPLIT_OVERHEAD)
        if cost < best_cost * (1 - 1e-9):
            best, best_cost = s, cost
    # the kernel rounds each chunk up to a whole tile (64 tokens): drop splits that would be empty
    chunk = math.ceil(math.ceil(max_context_len / best) / 64) * 64
    return max(1, -(-max_context_len // chunk))


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    max_context_len: int | None = None,
    num_splits: int | None = None,
    out: torch.Tensor | None = None,
    config: dict | None = None,
    window: int | None = None,
    soft_cap: float | None = None,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> torch.Tensor:
    """q [B, H, D] (one new token per sequence) over its paged context -> [B, H, D].

    k_cache/v_cache: [num_blocks, block_size, Hkv, D]; block_tables: int32 [B, max_blocks];
    context_lens: int32 [B] (0 = padding row: zeros out). `max_context_len` is an upper bound
    on context_lens (default: what the block table can address); it picks the split count.
    window: the query sees only the last `window` keys (sliding-window layers); soft_cap: scores
    become soft_cap * tanh(scores / soft_cap) (Gemma 2). A float8 (e4m3) cache holds k / k_scale and
    v / v_scale: k_scale is folded into q's scale, v_scale into the output; other caches ignore them.
    """
    b, h, d = q.shape
    num_blocks, block_size, hkv, d2 = k_cache.shape
    assert d == d2 and h % hkv == 0, (q.shape, k_cache.shape)
    assert k_cache.is_contiguous() and v_cache.is_contiguous() and v_cache.shape == k_cache.shape
    assert block_size & (block_size - 1) == 0, "block_size must be a power of two"
    group = h // hkv
    q = q.contiguous()
    if out is None:
        out = torch.empty_like(q)
    if b == 0:
        return out
    if block_tables.dtype != torch.int32:
        block_tables = block_tables.to(torch.int32)
    if block_tables.stride(-1) != 1:
        block_tables = block_tables.contiguous()
    if context_lens.dtype != torch.int32:
        context_lens = context_lens.to(torch.int32)
    if max_context_len is None:
        max_context_len = block_tables.shape[1] * block_size
    if window is not None:  # a block reads at most the window
        max_context_len = min(max_context_len, window)
    if k_cache.dtype != torch.float8_e4m3fn:
        k_scale = v_scale = 1.0
    cfg = dict(config) if config else _default_config(d, group, k_cache.dtype)
    file = KERNEL_FILE
    cfg["BLOCK_SIZE"] = block_size
    cfg["FORGE_CACHE_DTYPE"] = compiler.dtype_code(k_cache.dtype)
    kernel = compiler.get_kernel(file, "paged_decode_kernel", q.dtype, **cfg)
    if num_splits is None:
        key = (file, q.dtype) + tuple(sorted(cfg.items()))
        per_sm = _occupancy.get(key)
        if per_sm is None:
            try:
                per_sm = kernel.occupancy.max_active_blocks_per_multiprocessor(cfg["NUM_WARPS"] * 32, 0)
            except Exception:  # noqa: BLE001 - older cuda.core
                per_sm = 2
            _occupancy[key] = per_sm = max(1, int(per_sm))
        num_splits = choose_num_splits(b, hkv, max_context_len, per_sm)
    num_splits = max(1, min(int(num_splits), 256))  # combine kernel holds <= 256 weights
    if num_splits > 1:
        part_o = torch.empty(b, h, num_splits, d, dtype=torch.float32, device=q.device)
        part_ml = torch.empty(b, h, num_splits, 2, dtype=torch.float32, device=q.device)
    else:
        part_o = part_ml = out  # unused by the kernel
    compiler.run(
        kernel, (num_splits, hkv, b), cfg["NUM_WARPS"] * 32,
        compiler.ptr(out), compiler.ptr(part_o), compiler.ptr(part_ml), compiler.ptr(q),
        compiler.ptr(k_cache), compiler.ptr(v_cache), compiler.ptr(block_tables),
        np.int32(block_tables.stride(0)), compiler.ptr(context_lens),
        np.int32(hkv), np.int32(num_splits), np.float32((scale if soft_cap else scale * LOG2E) * k_scale),
        np.int32(window or 0), np.float32(soft_cap or 0.0), np.float32(v_scale),
    )
    if num_splits > 1:
        combine = compiler.get_kernel(file, "paged_decode_combine_kernel", q.dtype, **cfg)
        compiler.run(
            combine, (h, b), d, compiler.ptr(out), compiler.ptr(part_o), compiler.ptr(part_ml),
            np.int32(h), np.int32(num_splits),
        )
    return out
