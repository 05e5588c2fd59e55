"""silu_mul and gelu_tanh_mul launchers (kernels: activation.cu)."""

import numpy as np
import torch

from forge.kernels import compiler

THREADS = 256


def silu_mul(gate_up: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """[..., 2I] -> silu(gate) * up, [..., I]."""
    return _gated(gate_up, out, "silu_mul_kernel")


def gelu_tanh_mul(gate_up: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """[..., 2I] -> gelu_tanh(gate) * up, [..., I]."""
    return _gated(gate_up, out, "gelu_tanh_mul_kernel")


def _gated(gate_up: torch.Tensor, out: torch.Tensor | None, kernel_name: str) -> torch.Tensor:
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
    kernel = compiler.get_kernel("activation.cu", kernel_name, gate_up.dtype, VEC=vec)
    grid = (rows, (inter + vec * THREADS - 1) // (vec * THREADS))
    compiler.run(kernel, grid, THREADS, compiler.ptr(out), compiler.ptr(gate_up), np.int64(inter))
    return out
