"""Weight quantization on the CPU: GGUF blocks kept quantized, float weights quantized at load.

Kernels: forge's own AVX-512 VNNI kernel (forge/native/q32_gemm.cpp, `Q32Weight`) where the CPU and
a C++ compiler allow (forge.native), else torch's weight-only kernels (`Int4Weight`,
`Int8Weight`): the pure-torch fallback, same modes, same math up to rounding.

`quantization` (EngineConfig / LLM / --quantization):
- "auto": GGUF quantized tensors stay quantized on the CPU (where torch has the kernels); float
  checkpoints, and every model on CUDA, run in float.
- "none": every weight is dequantized to float: the exact reference path.
- "int8": every matrix quantized at load to 8 bits (native: per 32 inputs, min/max; torch: per row).
- "int4": the decoder's matrices to 4 bits per 32 inputs (min/max); the embedding / lm_head, the
  most sensitive matrix, to 8 bits as in "int8".
"""

import torch

from forge import native
from forge.config import QUANTIZATION_MODES
from forge.quant.layouts import GROUP, GroupQuantized, Int4Weight, Int8Weight, Q32Weight, cat_groups, quantize_groups


def cpu_kernels_available() -> bool:
    """torch's CPU weight-only kernels (torch >= 2.6 names)."""
    aten = torch.ops.aten
    return all(hasattr(aten, op) for op in (
        "_weight_int4pack_mm_for_cpu", "_convert_weight_to_int4pack_for_cpu", "_weight_int8pack_mm"))


def keeps_gguf_quantized(quantization: str, device: str, sharded: bool) -> bool:
    """Whether the loader should hand GGUF blocks over quantized (auto, on the CPU, one rank)."""
    return quantization == "auto" and not device.startswith("cuda") and not sharded and cpu_kernels_available()


def pack(g: GroupQuantized) -> "Q32Weight | Int4Weight":
    """The kernel layout for group-quantized codes: forge's own kernel's where it runs here."""
    lib = native.library()
    packed = Q32Weight.from_groups(g, lib) if lib is not None else None
    return packed if packed is not None else Int4Weight.from_groups(g)


def runtime_weight(parts: list, quantization: str, device: torch.device, dtype: torch.dtype,
                   embedding: bool = False):
    """The weight the model computes with, from the loader's parts stacked along the output dim
    (fused q/k/v, gate/up): a kernel layout for quantized parts or a quantizing mode, else a float
    tensor of `dtype` on `device`."""
    if all(isinstance(p, GroupQuantized) for p in parts):
        return pack(cat_groups(parts) if len(parts) > 1 else parts[0])
    floats = [p.dequantize() if isinstance(p, GroupQuantized) else p for p in parts]
    weight = torch.cat(floats) if len(floats) > 1 else floats[0]
    if quantization == "int8" or (quantization == "int4" and embedding):
        if native.library() is not None and weight.shape[1] % GROUP == 0:
            return pack(quantize_groups(weight, 8))
        return Int8Weight.quantize(weight)  # (per row: any width)
    if quantization == "int4":
        return pack(quantize_groups(weight, 4))
    return weight.to(device=device, dtype=dtype)


def weight_nbytes(weight) -> int:
    if isinstance(weight, torch.Tensor):
        return weight.numel() * weight.element_size()
    return weight.nbytes


__all__ = [
    "GROUP", "GroupQuantized", "Int4Weight", "Int8Weight", "Q32Weight", "QUANTIZATION_MODES", "cat_groups", "pack",
    "cpu_kernels_available", "keeps_gguf_quantized", "quantize_groups", "runtime_weight", "weight_nbytes",
]
