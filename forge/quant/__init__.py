"""Weight quantization: GGUF blocks and quantized checkpoints kept quantized, float weights quantized at load.

Kernels: forge's own AVX-512 VNNI kernel (forge/native/q32_gemm.cpp, `Q32Weight`) where the CPU and
a C++ compiler allow (forge.native), else torch's weight-only kernels (`Int4Weight`,
`Int8Weight`): the pure-torch fallback, same modes, same math up to rounding.

On CUDA the layouts are forge.quant.cuda's (Int4CudaWeight, Fp8CudaWeight), computed by
forge/kernels/quant_gemm.cu.

`quantization` (EngineConfig / LLM / --quantization):
- "auto": GGUF quantized tensors stay quantized: on the CPU (where torch has the kernels) all of them;
  on CUDA the 4-bit ones (Q4_0, Q4_1, Q4_K: Int4CudaWeight), other GGUF types run in the compute dtype.
  HF FP8 / AWQ / GPTQ checkpoints (forge.loader) stay in their format; float checkpoints run in float.
- "none": every weight is dequantized to float: the exact reference path.
- "int8" (CPU): every matrix quantized at load to 8 bits (native: per 32 inputs, min/max; torch: per row).
- "int4": the decoder's matrices to 4 bits (CPU: per 32 inputs; CUDA: per 128), min/max; the
  embedding / lm_head, the most sensitive matrix, to 8 bits (CPU: as "int8"; CUDA: fp8 per row).
- "fp8" (CUDA): the decoder's matrices to float8 e4m3 with a scale per output row; the embedding / lm_head
  stay in the compute dtype (as in vLLM's FP8).
"""

import torch

from forge import native
from forge.config import QUANTIZATION_MODES
from forge.quant.layouts import GROUP, Fp8Quantized, GroupQuantized, Int4Weight, Int8Weight, Q32Weight, cat_fp8, cat_groups, quantize_groups


def cpu_kernels_available() -> bool:
    """torch's CPU weight-only kernels (torch >= 2.6 names)."""
    aten = torch.ops.aten
    return all(hasattr(aten, op) for op in (
        "_weight_int4pack_mm_for_cpu", "_convert_weight_to_int4pack_for_cpu", "_weight_int8pack_mm"))


def keeps_gguf_quantized(quantization: str, device: str, sharded: bool):
    """Which GGUF blocks the loader hands over quantized (one rank): on the CPU with "auto", every block
    format with a kernel layout (True); on CUDA with "auto" / "int4", the 4-bit ones (a set of types),
    which repack exactly (forge.quant.cuda); otherwise none (False)."""
    if sharded:
        return False
    if device.startswith("cuda"):
        from gguf import GGMLQuantizationType as Q

        return frozenset({Q.Q4_0, Q.Q4_1, Q.Q4_K}) if quantization in ("auto", "int4") else False
    return quantization == "auto" and cpu_kernels_available()


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
    if device.type == "cuda":  # (float32 on CUDA: quantized parts dequantized, as "none")
        return _cuda_weight(parts, quantization if dtype != torch.float32 else "none", device, dtype, embedding)
    if any(isinstance(p, Fp8Quantized) for p in parts):
        parts = [p.dequantize() if isinstance(p, Fp8Quantized) else p for p in parts]
    if quantization != "none" and all(isinstance(p, GroupQuantized) for p in parts):
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


def _cuda_weight(parts: list, quantization: str, device: torch.device, dtype: torch.dtype, embedding: bool):
    """runtime_weight on CUDA (bfloat16 / float16 compute): see the module docstring for what each mode keeps."""
    from forge.quant.cuda import Fp8CudaWeight, Int4CudaWeight

    layout = None
    if quantization != "none":
        if all(isinstance(p, GroupQuantized) and p.bits == 4 for p in parts) and quantization in ("auto", "int4"):
            layout = Int4CudaWeight.from_groups(cat_groups(parts) if len(parts) > 1 else parts[0], device)
        elif all(isinstance(p, Fp8Quantized) for p in parts) and quantization in ("auto", "fp8") and \
                len({p.group for p in parts}) == 1 and Fp8CudaWeight.supports(parts[0].shape):
            layout = Fp8CudaWeight.from_quantized(cat_fp8(parts) if len(parts) > 1 else parts[0], device)
    if layout is None:
        floats = [p.dequantize() if isinstance(p, (GroupQuantized, Fp8Quantized)) else p for p in parts]
        weight = torch.cat([f.to(device) for f in floats]) if len(floats) > 1 else floats[0].to(device)
        # fp8 keeps the embedding / lm_head in the compute dtype, as vLLM's FP8 does (per-row e4m3 there
        # measured a mean KL of 4.8e-2 on the default model); int4 takes them to fp8 (8 bits, like the CPU's int8)
        if ((quantization == "fp8" and not embedding) or (quantization == "int4" and embedding)) and \
                Fp8CudaWeight.supports(weight.shape):
            layout = Fp8CudaWeight.quantize(weight)
        elif quantization == "int4" and weight.shape[1] % 128 == 0:
            layout = Int4CudaWeight.quantize(weight, group=128)
        else:
            return weight.to(dtype)
    layout.dtype = dtype
    return layout


def weight_nbytes(weight) -> int:
    if isinstance(weight, torch.Tensor):
        return weight.numel() * weight.element_size()
    return weight.nbytes


__all__ = [
    "GROUP", "Fp8Quantized", "GroupQuantized", "Int4Weight", "Int8Weight", "Q32Weight", "QUANTIZATION_MODES", "cat_groups", "pack",
    "cpu_kernels_available", "keeps_gguf_quantized", "quantize_groups", "runtime_weight", "weight_nbytes",
]
