"""Launchers of quant_gemm.cu: x @ W.T for int4 / fp8 weight layouts (forge.quant.cuda), and the int4
layout's dequantization for prefill-sized steps."""

from __future__ import annotations

import numpy as np
import torch

from forge.kernels import compiler

ROW_ALIGN = 32  # layouts pad their rows to this (2 row tiles of 16)


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
    else:  # fp8
        rt = rt or (1 if m <= 8 or rows % 32 else 2)
        warps = warps or 8
        unroll = unroll or 4
    if rows % (16 * rt):
        raise ValueError(f"{rows} rows are not a multiple of {16 * rt}")
    if warps * rt * nt * 4 * 32 * 4 > 48 * 1024:  # the warps' partial sums (static shared memory)
        raise ValueError(f"{warps} warps x {rt} row tiles x {nt} token tiles exceed 48 KB of shared memory")
    return dict(NT=nt, RT=rt, WARPS=warps, UNROLL=unroll)


def gemm(x: torch.Tensor, layout, **config) -> torch.Tensor:
    """x [..., K] (bfloat16 / float16) @ layout.T -> [..., N] in x's dtype. `layout` is an Int4CudaWeight
    or Fp8CudaWeight (codes, scales, group, shape, padded K)."""
    n, k = layout.shape
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    if x2.stride(-1) != 1 or x2.data_ptr() % 16 or x2.stride(0) % 4:
        x2 = x2.contiguous()
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
    if x.stride(-1) != 1 or x.data_ptr() % 16 or x.stride(0) % 8:
        x = x.contiguous()
    m, k = x.shape
    codes = torch.empty(m, k, dtype=torch.float8_e4m3fn, device=x.device)
    scale = torch.empty(m, 1, dtype=torch.float32, device=x.device)
    if m:
        kernel = compiler.get_kernel("quant_gemm.cu", "fp8_quantize_rows_kernel", x.dtype, WCODE=1, GROUP=0)
        compiler.run(kernel, m, 256, compiler.ptr(codes), compiler.ptr(scale), compiler.ptr(x), np.int32(k),
                     np.int64(x.stride(0)))
    return codes, scale
