"""silu_mul launcher (kernel: activation.cu)."""

import numpy as np
import torch

from forge.kernels import compiler

THREADS = 256


def silu_mul(gate_up: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """[..., 2I] -> silu(gate) * up, [..., I]."""
    gate_up = gate_up.contiguous()
    two_i = gate_up.shape[-1]
    inter = two_i // 2
    rows = gate_up.numel() // two_i if two_i else 0
    if out is None:
        out = torch.empty(*gate_up.shape[:-1], inter, dtype=gate_up.dtype, device=gate_up.device)
    if rows == 0 or inter == 0:
        return out
    vec = 16 // gate_up.element_size()
    if inter % vec or gate_up.data_ptr() % 16 or out.data_ptr() % 16:
        vec = 1
    kernel = compiler.get_kernel("activation.cu", "silu_mul_kernel", gate_up.dtype, VEC=vec)
    grid = (rows, (inter + vec * THREADS - 1) // (vec * THREADS))
    compiler.run(kernel, grid, THREADS, compiler.ptr(out), compiler.ptr(gate_up), np.int64(inter))
    return out
