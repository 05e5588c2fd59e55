"""Launchers of quant_gemm.cu: x @ W.T for int4 / fp8 weight layouts (forge.quant.cuda) and for float
weights, the residual add + RMSNorm folded into such a GEMM (rms_norm_linear; for qkv also RoPE and the KV-cache
write: rms_norm_qkv_rope_cache), and the int4 layout's dequantization for prefill-sized steps."""

from __future__ import annotations

import numpy as np
import torch

from forge.kernels import compiler, norm

ROW_ALIGN = 32  # layouts pad their rows to this (2 row tiles of 16)
FLOAT_CODE = 2  # WCODE of a float (bf16 / fp16) weight
FLOAT_CHUNK = 32  # inputs per 64-byte chunk of a float row: K must be a multiple
ACTS = {None: 0, "silu": 1, "gelu_tanh": 2}  # ACT of the gated epilogue
PROLOGUE_ROW_SMEM = 32 * 4 + 4  # norm_prologue's static shared memory per token: 32 partial sums, 1 / rms
# head_dims of the RoPE epilogue (ROPE_HEAD_DIM): compiled without local memory in the main loop and tested (at 96,
# the division by D / 32 takes registers: 64 of them and a spill reload per batch); other head_dims compose
ROPE_HEAD_DIMS = (64, 128)


def kernel_config(m: int, rows: int, code: int, nt: int | None = None, rt: int | None = None,
                  warps: int | None = None, unroll: int | None = None) -> dict:
    """Tile shape for an M x rows product: NT token tiles of 8 (M <= 8: one), RT row tiles of 16, the K
    split over WARPS warps, UNROLL chunks of weights in flight per load batch. The defaults are the
    fastest of benchmarks/quant_gemm.py --configs on an H200 (Llama-3.1-8B's matrices, forge/kernels/NOTES.md)."""
    if nt is None:
        nt = 1 if m <= 8 else 2 if m <= 16 else 4
    if code == 0:  # int4
        rt = rt or (2 if rows % 32 == 0 else 1)
        warps = warps or 8  # one K split for every M: a token's sums do not depend on the batch
        unroll = unroll or (2 if m <= 8 else 4)
    elif code == 1:  # fp8
        rt = rt or (1 if m <= 8 or rows % 32 else 2)
        warps = warps or 8
        unroll = unroll or 4
    else:  # float: rows are not padded (the kernel reads the last row in their place)
        rt = rt or 1
        warps = warps or 8
        unroll = unroll or 4
    if code != FLOAT_CODE and rows % (16 * rt):
        raise ValueError(f"{rows} rows are not a multiple of {16 * rt}")
    if warps * rt * nt * 4 * 32 * 4 > 48 * 1024:  # the warps' partial sums (static shared memory)
        raise ValueError(f"{warps} warps x {rt} row tiles x {nt} token tiles exceed 48 KB of shared memory")
    return dict(NT=nt, RT=rt, WARPS=warps, UNROLL=unroll)


def gemm(x: torch.Tensor, layout, **config) -> torch.Tensor:
    """x [..., K] (bfloat16 / float16) @ layout.T -> [..., N] in x's dtype. `layout` is an Int4CudaWeight
    or Fp8CudaWeight (codes, scales, group, shape, padded K)."""
    n, k = layout.shape
    lead = x.shape[:-1]
    x2 = vector_rows(x.reshape(-1, x.shape[-1]), 4)
    m = x2.shape[0]
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0:
        return out.view(*lead, n)
    rows = layout.codes.shape[0]
    cfg = kernel_config(m, rows, layout.code, **config)
    kernel = compiler.get_kernel("quant_gemm.cu", "quant_gemm_kernel", x.dtype, WCODE=layout.code,
                                 GROUP=layout.group, **cfg)
    grid = (-(-m // (8 * cfg["NT"])), rows // (16 * cfg["RT"]))
    compiler.run(kernel, grid, 32 * cfg["WARPS"],
                 compiler.ptr(out), compiler.ptr(x2), compiler.ptr(layout.codes), compiler.ptr(layout.scales),
                 np.int32(m), np.int32(n), np.int32(layout.padded_k), np.int32(k), np.int64(layout.row_bytes),
                 np.int32(layout.groups_per_row), np.int64(x2.stride(0)), np.int64(n))
    return out.view(*lead, n)


def vector_rows(x: torch.Tensor, row_multiple: int) -> torch.Tensor:
    """x [M, K] as forge's kernels read activations, in vector loads: unit stride along K, a row stride that is
    a multiple of `row_multiple` elements and a 16-byte aligned start; else a contiguous copy (contiguous()
    alone would return an offset view that is contiguous but misaligned as it is)."""
    if x.stride(-1) != 1 or x.stride(0) % row_multiple or x.data_ptr() % 16:
        x = x.clone(memory_format=torch.contiguous_format)
    return x


def _aligned(*tensors: torch.Tensor) -> bool:
    return all(t.is_contiguous() and t.data_ptr() % 16 == 0 for t in tensors)


def _xs_stride(kx: int, code: int) -> int:
    """x's row stride (inputs) in the prologue's shared memory: quant_gemm.cu's xs_stride (and XS_PAD)."""
    return -(-kx // 64) * 64 + {FLOAT_CODE: 32, 0: 16, 1: 8}[code]


def _prologue_smem(m: int, kx: int, code: int, cfg: dict) -> int:
    """Dynamic shared memory of a NORM_PROLOGUE launch: the block's x rows, reused for the warps' sums."""
    rows = min(m, 8 * cfg["NT"])
    return max(rows * _xs_stride(kx, code) * 2, cfg["WARPS"] * cfg["RT"] * cfg["NT"] * 4 * 32 * 4)


def _prologue_fits(hidden: torch.Tensor, code: int, cfg: dict) -> bool:
    """Whether the norm prologue's block (its x rows and the static arrays) fits the shared memory a block may
    take (compiler.max_block_smem: 227 KB on sm_90; off a GPU, the 48 KB of any launch)."""
    limit = compiler.max_block_smem(hidden.device.index) if hidden.is_cuda else compiler.DEFAULT_SMEM
    return _prologue_smem(hidden.shape[0], hidden.shape[1], code, cfg) + 8 * cfg["NT"] * PROLOGUE_ROW_SMEM <= limit


def _weight_operands(weight, k: int) -> tuple:
    """The kernel's weight arguments for a float weight [N, K] or an int4 / fp8 layout: (WCODE, GROUP, padded K,
    bytes per row, groups per row, scales or None, the weight's rows)."""
    if isinstance(weight, torch.Tensor):
        return FLOAT_CODE, 0, k, k * 2, 0, None, weight
    return weight.code, weight.group, weight.padded_k, weight.row_bytes, weight.groups_per_row, weight.scales, \
        weight.codes


def norm_gemm_fits(hidden: torch.Tensor, residual: torch.Tensor | None, norm_weight: torch.Tensor, weight,
                   act: str | None = None) -> bool:
    """Whether rms_norm_linear's kernel takes these operands: bf16 / fp16 hidden [M, K] (residual alike),
    a float weight of hidden's dtype (K a multiple of 32; with act, 2I rows) or an int4 / fp8 layout (no
    act), 16-byte aligned contiguous tensors, and the block's x rows within the shared memory a block may
    take (compiler.max_block_smem: 227 KB on sm_90; off a GPU, the 48 KB of any launch)."""
    if hidden.dim() != 2 or hidden.dtype not in (torch.bfloat16, torch.float16) or act not in ACTS:
        return False
    m, k = hidden.shape
    if m == 0 or k % 8 or norm_weight.shape != (k,) or not _aligned(hidden, norm_weight):
        return False
    if residual is not None and (residual.shape != hidden.shape or residual.dtype != hidden.dtype
                                 or not _aligned(residual)):
        return False
    if norm._config(k, hidden, norm_weight)[0] != 8:  # norm.cu's 8-input vectors: the order the prologue repeats
        return False
    if isinstance(weight, torch.Tensor):
        if weight.dtype != hidden.dtype or weight.dim() != 2 or weight.shape[1] != k or k % FLOAT_CHUNK:
            return False
        if act is not None and weight.shape[0] % 2 or not _aligned(weight):
            return False
        code, rows, rt = FLOAT_CODE, weight.shape[0], 2 if act else None
    else:
        if act is not None or getattr(weight, "code", None) not in (0, 1) or weight.shape[1] != k:
            return False
        code, rows, rt = weight.code, weight.codes.shape[0], None
    return _prologue_fits(hidden, code, kernel_config(m, rows, code, rt=rt))


def linear(x: torch.Tensor, weight: torch.Tensor, **config) -> torch.Tensor:
    """x [M, K] @ weight.T for a float weight [N, K] of x's dtype (bf16 / fp16, K a multiple of 32, 16-byte
    aligned): the float (WCODE 2) kernel, for decode-sized M (benchmarks/quant_gemm.py compares it with cuBLAS)."""
    n, k = weight.shape
    x = x.contiguous()
    if k % FLOAT_CHUNK or x.dtype != weight.dtype or not _aligned(x, weight):
        raise ValueError(f"forge's float GEMM takes K a multiple of {FLOAT_CHUNK} (not {k}) and 16-byte aligned "
                         f"contiguous x and weight of one dtype")
    m = x.shape[0]
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0:
        return out
    cfg = kernel_config(m, n, FLOAT_CODE, **config)
    kernel = compiler.get_kernel("quant_gemm.cu", "quant_gemm_kernel", x.dtype, WCODE=FLOAT_CODE, GROUP=0, **cfg)
    grid = (-(-m // (8 * cfg["NT"])), -(-n // (16 * cfg["RT"])))
    compiler.run(kernel, grid, 32 * cfg["WARPS"], compiler.ptr(out), compiler.ptr(x), compiler.ptr(weight),
                 np.uint64(0), np.int32(m), np.int32(n), np.int32(k), np.int32(k), np.int64(k * 2), np.int32(0),
                 np.int64(k), np.int64(n))
    return out


def rms_norm_linear(hidden: torch.Tensor, residual: torch.Tensor | None, norm_weight: torch.Tensor, eps: float,
                    weight, act: str | None = None, **config) -> tuple[torch.Tensor, torch.Tensor]:
    """ops.rms_norm_linear in one launch (operands as norm_gemm_fits accepts): s = hidden + residual (hidden
    when residual is None), x = rms_norm(s) * norm_weight exactly as norm.add_rms_norm / rms_norm compute it,
    y = x @ weight.T, with act the gated activation of y's [gate, up] halves -> (y, s)."""
    m, k = hidden.shape
    n_out = weight.shape[0] // 2 if act else weight.shape[0]
    out = torch.empty(m, n_out, dtype=hidden.dtype, device=hidden.device)
    res_out = hidden if residual is None else torch.empty_like(hidden)
    code, group, kpad, row_bytes, gpr, scales, w = _weight_operands(weight, k)
    rows = w.shape[0]  # (a layout's rows padded to ROW_ALIGN)
    # (the gated epilogue: a gate and an up row tile, 2 chunks in flight each: 4 chunks of 2 float tiles
    # took 80 registers and a spill reload per batch of the main loop)
    cfg = kernel_config(m, rows, code, **{**({"rt": 2, "unroll": 2} if act else {}), **config})
    kernel = compiler.get_kernel("quant_gemm.cu", "quant_gemm_kernel", hidden.dtype, WCODE=code, GROUP=group,
                                 NORM_PROLOGUE=1, ACT=ACTS[act], FORGE_WDTYPE=compiler.dtype_code(norm_weight.dtype),
                                 **cfg)
    shmem = _prologue_smem(m, k, code, cfg)
    compiler.allow_dynamic_smem(kernel, shmem)
    row_tile = 16 if act else 16 * cfg["RT"]
    grid = (-(-m // (8 * cfg["NT"])), -(-n_out // row_tile) if code == FLOAT_CODE else rows // row_tile)
    threads = norm._config(k, hidden, norm_weight)[1]
    compiler.run(kernel, grid, 32 * cfg["WARPS"], compiler.ptr(out), compiler.ptr(hidden), compiler.ptr(w),
                 np.uint64(0) if scales is None else compiler.ptr(scales), np.int32(m), np.int32(n_out),
                 np.int32(kpad), np.int32(k), np.int64(row_bytes), np.int32(gpr), np.int64(k), np.int64(n_out),
                 np.uint64(0) if residual is None else compiler.ptr(residual),
                 np.uint64(0) if residual is None else compiler.ptr(res_out), compiler.ptr(norm_weight),
                 np.float32(eps), np.int32(threads), shmem=shmem)
    return out, res_out


def rope_kernel_config(m: int, rows: int, code: int, **config) -> dict:
    """rms_norm_qkv_rope_cache's tiles: the two row tiles of a head's halves; 2 chunks in flight, which keeps the
    weight bytes in flight per lane those of rms_norm_linear's qkv (1 row tile x 4 chunks; int4 already 2 x 2) and
    the main loop free of local memory (4 chunks of 2 float tiles: 80 registers and a spill reload per batch)."""
    return kernel_config(m, rows, code, **{"rt": 2, "unroll": 2, **config})


def rope_cache_fits(hidden: torch.Tensor, residual: torch.Tensor | None, norm_weight: torch.Tensor, weight,
                    cos_sin_cache: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, num_heads: int,
                    num_kv_heads: int, head_dim: int) -> bool:
    """Whether rms_norm_qkv_rope_cache's kernel takes these operands: what norm_gemm_fits takes (no act) for a
    qkv weight of (num_heads + 2 num_kv_heads) heads of head_dim rows, head_dim in ROPE_HEAD_DIMS (each half of a
    head whole 16-row tiles), rope_cache's float32 cos / sin table [max_pos, head_dim], and contiguous caches
    [..., num_kv_heads, head_dim] of hidden's dtype or float8 (e4m3), within the block's shared memory."""
    rows = (num_heads + 2 * num_kv_heads) * head_dim
    if head_dim not in ROPE_HEAD_DIMS or weight.shape[0] != rows or not norm_gemm_fits(hidden, residual, norm_weight, weight):
        return False
    if cos_sin_cache.dtype != torch.float32 or not cos_sin_cache.is_contiguous() or cos_sin_cache.shape[-1] != head_dim:
        return False
    if k_cache.dtype not in (hidden.dtype, torch.float8_e4m3fn) or v_cache.dtype != k_cache.dtype:
        return False
    if not (k_cache.is_contiguous() and v_cache.is_contiguous()) or k_cache.shape[-2:] != (num_kv_heads, head_dim) \
            or v_cache.shape != k_cache.shape:
        return False
    code = FLOAT_CODE if isinstance(weight, torch.Tensor) else weight.code
    if code != FLOAT_CODE and weight.codes.shape[0] != rows:  # (rows a multiple of 32: no padding)
        return False
    return _prologue_fits(hidden, code, rope_kernel_config(hidden.shape[0], rows, code))


def rms_norm_qkv_rope_cache(hidden: torch.Tensor, residual: torch.Tensor | None, norm_weight: torch.Tensor,
                            eps: float, weight, positions: torch.Tensor, cos_sin_cache: torch.Tensor,
                            k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor, num_heads: int,
                            num_kv_heads: int, head_dim: int, k_scale: float = 1.0, v_scale: float = 1.0,
                            **config) -> tuple[torch.Tensor, torch.Tensor]:
    """ops.rms_norm_qkv_rope_cache in one launch (operands as rope_cache_fits accepts): rms_norm_linear's qkv
    (bit for bit), rotated and written to the cache as rope_cache.qkv_rope_cache does (slot < 0: not written)
    -> (q [M, H, D], residual_out)."""
    m, k = hidden.shape
    q = torch.empty(m, num_heads, head_dim, dtype=hidden.dtype, device=hidden.device)
    res_out = hidden if residual is None else torch.empty_like(hidden)
    rows = weight.shape[0]
    code, group, kpad, row_bytes, gpr, scales, w = _weight_operands(weight, k)
    cfg = rope_kernel_config(m, rows, code, **config)
    kernel = compiler.get_kernel("quant_gemm.cu", "quant_gemm_kernel", hidden.dtype, WCODE=code, GROUP=group,
                                 NORM_PROLOGUE=1, ROPE_HEAD_DIM=head_dim,
                                 FORGE_WDTYPE=compiler.dtype_code(norm_weight.dtype),
                                 FORGE_CACHE_DTYPE=compiler.dtype_code(k_cache.dtype), **cfg)
    shmem = _prologue_smem(m, k, code, cfg)
    compiler.allow_dynamic_smem(kernel, shmem)
    positions, slot_mapping = positions.to(torch.int64).contiguous(), slot_mapping.to(torch.int64).contiguous()
    compiler.run(kernel, (-(-m // (8 * cfg["NT"])), rows // 32), 32 * cfg["WARPS"], compiler.ptr(q),
                 compiler.ptr(hidden), compiler.ptr(w), np.uint64(0) if scales is None else compiler.ptr(scales),
                 np.int32(m), np.int32(rows), np.int32(kpad), np.int32(k), np.int64(row_bytes), np.int32(gpr),
                 np.int64(k), np.int64(0), np.uint64(0) if residual is None else compiler.ptr(residual),
                 np.uint64(0) if residual is None else compiler.ptr(res_out), compiler.ptr(norm_weight),
                 np.float32(eps), np.int32(norm._config(k, hidden, norm_weight)[1]), compiler.ptr(positions),
                 compiler.ptr(cos_sin_cache), compiler.ptr(slot_mapping), compiler.ptr(k_cache),
                 compiler.ptr(v_cache), np.int32(num_heads), np.int32(num_kv_heads), np.float32(k_scale),
                 np.float32(v_scale), shmem=shmem)
    return q, res_out


def int4_dequantize(layout, dtype: torch.dtype, rows: torch.Tensor | None = None) -> torch.Tensor:
    """The int4 layout's weight [N, K] (or its rows `rows`, int64) in `dtype`: s * q + o rounded once."""
    n, k = layout.shape
    count = n if rows is None else rows.numel()
    out = torch.empty(count, k, dtype=dtype, device=layout.codes.device)
    if count == 0:
        return out
    words = layout.padded_k // 8
    kernel = compiler.get_kernel("quant_gemm.cu", "int4_dequant_kernel", dtype, WCODE=0, GROUP=layout.group)
    rows_ptr = np.uint64(0) if rows is None else compiler.ptr(rows.to(torch.int64).contiguous())
    compiler.run(kernel, (count, -(-words // 256)), 256, compiler.ptr(out), compiler.ptr(layout.codes),
                 compiler.ptr(layout.scales), rows_ptr, np.int32(layout.padded_k), np.int32(k),
                 np.int32(layout.groups_per_row))
    return out


def fp8_quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] (bfloat16 / float16, K a multiple of 8) -> (e4m3 codes [M, K], float32 scales [M, 1]) with
    x ~ codes * scale, scale = max |x[m]| / 448: an FP8 GEMM's dynamic per-row activation scales, one launch."""
    x = vector_rows(x, 8)
    m, k = x.shape
    codes = torch.empty(m, k, dtype=torch.float8_e4m3fn, device=x.device)
    scale = torch.empty(m, 1, dtype=torch.float32, device=x.device)
    if m:
        kernel = compiler.get_kernel("quant_gemm.cu", "fp8_quantize_rows_kernel", x.dtype, WCODE=1, GROUP=0)
        compiler.run(kernel, m, 256, compiler.ptr(codes), compiler.ptr(scale), compiler.ptr(x), np.int32(k),
                     np.int64(x.stride(0)))
    return codes, scale
