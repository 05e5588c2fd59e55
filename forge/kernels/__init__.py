"""forge's CUDA kernels: readable CUDA C sources compiled at run time with NVRTC (cuda.core).

Each kernel is a `.cu` file in this folder (a comment block at its top gives the grid/block
layout and the bytes it must move) with a small Python launcher beside it:

    activation.py      silu_mul
    norm.py            rms_norm, add_rms_norm
    rope_cache.py      qkv_rope_cache (split QKV, neox RoPE, KV-cache write)
    paged_attention.py paged_decode_attention (split-K flash-decoding over the paged cache:
                       paged_attention.cu = cp.async pipeline; paged_attention_combine.cuh = the
                       split-K merge)
    sampling.py        sample, top_k_candidates (Gumbel-max with per-row seeded noise)
    token_bitmask.py   apply_token_bitmask (structured outputs: grammar masks on constrained rows)
    moe.py             route, align, experts (mixture-of-experts layers of decode-sized steps)
    quant_gemm.py      gemm (int4 / fp8 weight layouts dequantized in registers), int4_dequantize,
                       fp8_quantize_rows, linear / rms_norm_linear (float weights, the norm fused in)
    quant_gemm_pipe.py gemm (the same layouts with the weights through a cp.async ring in shared
                       memory; FORGE_QUANT_KERNEL=pipe)

common.cuh holds the dtype plumbing and vector/warp helpers, quant_common.cuh the device helpers the
two quantized GEMMs share (mma.sync, e4m3 pairs). compiler.py compiles and caches
them per (file, kernel, dtype, defines, arch) and launches them on torch's current stream (so they are
captured by CUDA graphs); FORGE_PDL=1 launches them with programmatic dependent launch. NOTES.md has
the measured bandwidths (and PDL's design); scripts/compile_check.py compiles every variant without a GPU.
"""

from forge.kernels.compiler import available

__all__ = ["available"]
