"""rms_norm / add_rms_norm launchers (kernel: norm.cu)."""

import numpy as np
import torch

from forge.kernels import compiler


def _config(hidden: int, x: torch.Tensor, *others: torch.Tensor) -> tuple[int, int]:
    vec = 16 // x.element_size()
    if hidden % vec or any(t.data_ptr() % 16 for t in (x, *others)):
        vec = 1
    nvec = (hidden + vec - 1) // vec
    # Enough threads for <= 4 passes over the row, at least one warp, at most 1024.
    threads = min(1024, max(32, ((nvec + 3) // 4 + 31) // 32 * 32))
    if nvec <= 1024:
        threads = min(threads, max(32, (nvec + 31) // 32 * 32))
    return vec, threads


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    hidden = x.shape[-1]
    x2 = x.contiguous()
    weight = weight.contiguous()
    out = torch.empty_like(x2)
    rows = x2.numel() // hidden if hidden else 0
    if rows == 0:
        return out
    vec, threads = _config(hidden, x2, weight, out)
    kernel = compiler.get_kernel(
        "norm.cu", "rms_norm_kernel", x.dtype, VEC=vec, FORGE_WDTYPE=compiler.dtype_code(weight.dtype)
    )
    compiler.run(
        kernel, rows, threads, compiler.ptr(out), compiler.ptr(x2), compiler.ptr(weight),
        np.int32(hidden), np.float32(eps),
    )
    return out


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """residual_sum = x + residual; returns (rms_norm(residual_sum) * weight, residual_sum)."""
    hidden = x.shape[-1]
    x2 = x.contiguous()
    r2 = residual.contiguous()
    if r2.dtype != x2.dtype:
        r2 = r2.to(x2.dtype)
    weight = weight.contiguous()
    out = torch.empty_like(x2)
    res_out = torch.empty_like(x2)
    rows = x2.numel() // hidden if hidden else 0
    if rows == 0:
        return out, res_out
    vec, threads = _config(hidden, x2, r2, weight, out, res_out)
    kernel = compiler.get_kernel(
        "norm.cu", "add_rms_norm_kernel", x.dtype, VEC=vec, FORGE_WDTYPE=compiler.dtype_code(weight.dtype)
    )
    compiler.run(
        kernel, rows, threads, compiler.ptr(out), compiler.ptr(res_out), compiler.ptr(x2), compiler.ptr(r2),
        compiler.ptr(weight), np.int32(hidden), np.float32(eps),
    )
    return out, res_out
