"""Compile every forge kernel variant with NVRTC for a given arch, without a GPU.

    python scripts/compile_check.py [sm_90] [--pdl off|on|both]

Prints registers/spills (ptxas -v). Used to catch compile errors before spending device time. --pdl: the
builds without FORGE_PDL (off), with FORGE_PDL=1 (on: what FORGE_PDL=1 compiles for the files of
compiler.PDL_FILES), or both (default).
Without a GPU driver (cuda.core needs libcuda), NVRTC is called through cuda.bindings directly: on a
machine without a GPU, `pip install --target DIR cuda-bindings nvidia-cuda-nvrtc-cu12
nvidia-cuda-runtime-cu12`, then `PYTHONPATH=DIR LD_LIBRARY_PATH=DIR/nvidia/cuda_nvrtc/lib
FORGE_CUDA_INCLUDE=DIR/nvidia/cuda_runtime/include python scripts/compile_check.py`.
"""

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from forge.kernels import compiler, paged_attention  # noqa: E402

ap = argparse.ArgumentParser()
ap.add_argument("arch", nargs="?", default="sm_90")
ap.add_argument("--pdl", choices=["off", "on", "both"], default="both")
cli = ap.parse_args()
arch = cli.arch
codes = compiler.DTYPE_CODES
variants = []
for dt in (torch.float32, torch.bfloat16, torch.float16):
    c = codes[dt]
    vec = 16 // torch.empty((), dtype=dt).element_size()
    for v in sorted({1, vec}):
        variants.append(("activation.cu", dict(FORGE_DTYPE=c, VEC=v)))
        variants.append(("norm.cu", dict(FORGE_DTYPE=c, VEC=v, FORGE_WDTYPE=c)))
    for v in sorted({1, 2, 4, vec}):
        variants.append(("rope_cache.cu", dict(FORGE_DTYPE=c, VEC=v, FORGE_CACHE_DTYPE=c)))
    for d, g in [(64, 3), (128, 4), (96, 2), (256, 8), (128, 8), (64, 1), (32, 4)]:
        try:
            cfg = paged_attention.kernel_config(d, g, dt)
        except ValueError as e:
            print("skip", d, g, dt, e)
            continue
        for bs in (16, 32):
            variants.append((paged_attention.KERNEL_FILE, dict(FORGE_DTYPE=c, FORGE_CACHE_DTYPE=c, BLOCK_SIZE=bs, **cfg)))
    # float8 (e4m3) KV cache under each compute dtype
    fp8 = codes[torch.float8_e4m3fn]
    for v in sorted({1, 2, 4, vec}):
        variants.append(("rope_cache.cu", dict(FORGE_DTYPE=c, VEC=v, FORGE_CACHE_DTYPE=fp8)))
    for d, g in [(64, 3), (128, 4), (96, 2), (256, 8), (128, 8), (64, 1), (32, 4), (16, 2), (80, 4)]:
        cfg = paged_attention.kernel_config(d, g, torch.float8_e4m3fn)
        for bs in (16, 32):
            variants.append((paged_attention.KERNEL_FILE, dict(FORGE_DTYPE=c, FORGE_CACHE_DTYPE=fp8, BLOCK_SIZE=bs, **cfg)))
variants.append(("sampling.cu", dict()))
variants.append(("token_bitmask.cu", dict()))
# quant_gemm.cu: each weight format at the launcher's tile shapes (M = 1, 16, 64); the float-weight GEMM with
# the norm prologue (also under int4 / fp8, and a float32 norm weight) and the gated epilogues (rms_norm_linear)
# and the RoPE epilogue (rms_norm_qkv_rope_cache)
from forge.kernels import quant_gemm  # noqa: E402

for c in (1, 2):
    for code, group in ((0, 32), (0, 64), (0, 128), (1, 0), (1, 128), (2, 0)):
        for m in (1, 16, 64):
            variants.append(("quant_gemm.cu", dict(FORGE_DTYPE=c, WCODE=code, GROUP=group,
                                                   **quant_gemm.kernel_config(m, 64, code))))
        variants.append(("quant_gemm.cu", dict(FORGE_DTYPE=c, WCODE=code, GROUP=group, NORM_PROLOGUE=1,
                                               **quant_gemm.kernel_config(1, 64, code))))
    for act in (1, 2):
        variants.append(("quant_gemm.cu", dict(FORGE_DTYPE=c, WCODE=2, GROUP=0, NORM_PROLOGUE=1, ACT=act,
                                               **quant_gemm.kernel_config(1, 64, 2, rt=2, unroll=2))))
    variants.append(("quant_gemm.cu", dict(FORGE_DTYPE=c, WCODE=2, GROUP=0, NORM_PROLOGUE=1, FORGE_WDTYPE=0,
                                           **quant_gemm.kernel_config(1, 64, 2))))
    # rms_norm_qkv_rope_cache (ROPE_HEAD_DIM): float weights under a cache of x's dtype and float8; int4 / fp8 layouts
    for d in quant_gemm.ROPE_HEAD_DIMS:
        for cache in (c, codes[torch.float8_e4m3fn]):
            variants.append(("quant_gemm.cu", dict(FORGE_DTYPE=c, WCODE=2, GROUP=0, NORM_PROLOGUE=1, ROPE_HEAD_DIM=d,
                                                   FORGE_CACHE_DTYPE=cache, **quant_gemm.rope_kernel_config(1, 64, 2))))
    for code, group in ((0, 32), (0, 128), (1, 0), (1, 128)):
        variants.append(("quant_gemm.cu", dict(FORGE_DTYPE=c, WCODE=code, GROUP=group, NORM_PROLOGUE=1, ROPE_HEAD_DIM=128,
                                               FORGE_CACHE_DTYPE=c, **quant_gemm.rope_kernel_config(1, 64, code))))
# quant_gemm_pipe.cu: every format, group, dtype and token tiling, at the launcher's ring depth
from forge.kernels import quant_gemm_pipe  # noqa: E402

for c in (1, 2):
    for code, group in ((0, 32), (0, 64), (0, 128), (1, 0), (1, 128)):
        for m in (8, 16, 32, 64):
            cfg = quant_gemm_pipe.tile_config(m)
            cfg["STAGES"] = quant_gemm_pipe.stages_for(code, group, cfg["WM"], cfg["NT"])
            variants.append(("quant_gemm_pipe.cu", dict(FORGE_DTYPE=c, WCODE=code, GROUP=group, **cfg)))
for c in (0, 1, 2):  # moe.cu at moe.py's defines
    for v in sorted({1, 16 // (4 if c == 0 else 2)}):
        variants.append(("moe.cu", dict(FORGE_DTYPE=c, VEC=v, WARPS=4, ROWS=4, MAX_PAIRS=8, PER_LANE=4)))
# decode-kernel variants swept by the benchmark
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from kernels import DECODE_VARIANTS  # noqa: E402

for kw in DECODE_VARIANTS:
    cfg = paged_attention.kernel_config(128, 4, torch.bfloat16, **kw)
    variants.append((paged_attention.KERNEL_FILE, dict(FORGE_DTYPE=1, FORGE_CACHE_DTYPE=1, BLOCK_SIZE=16, **cfg)))



def nvrtc_compile(file: str, defines: dict, arch: str) -> str:
    """Compile with NVRTC through cuda.bindings (no driver needed); returns ptxas's resource lines."""
    from cuda.bindings import nvrtc

    source = (compiler.KERNEL_DIR / file).read_bytes()
    _, prog = nvrtc.nvrtcCreateProgram(source, file.encode(), 0, [], [])
    opts = [f"--gpu-architecture={arch}", "-std=c++17", "--ptxas-options=-v", f"-I{compiler.KERNEL_DIR}",
            *(f"-I{d}" for d in compiler.cuda_include_dirs()), *(f"-D{k}={v}" for k, v in defines.items())]
    (result,) = nvrtc.nvrtcCompileProgram(prog, len(opts), [o.encode() for o in opts])
    _, size = nvrtc.nvrtcGetProgramLogSize(prog)
    log = b" " * size
    nvrtc.nvrtcGetProgramLog(prog, log)
    text = log.decode(errors="replace")
    if result != nvrtc.nvrtcResult.NVRTC_SUCCESS:
        raise RuntimeError(text.strip())
    return " | ".join(line.split("Used ")[-1].strip() for line in text.splitlines() if "Used " in line)


if cli.pdl != "off":
    pdl = [(file, {**defines, "FORGE_PDL": 1}) for file, defines in variants if file in compiler.PDL_FILES]
    variants = pdl if cli.pdl == "on" else variants + pdl

use_bindings = compiler.Program is None or not torch.cuda.is_available()
failed = 0
t_all = time.perf_counter()
for file, defines in variants:
    t0 = time.perf_counter()
    try:
        if use_bindings:
            info = nvrtc_compile(file, defines, arch)
        else:
            compiler.compile_source(file, defines, arch)
            info = ""
    except Exception as e:  # noqa: BLE001
        failed += 1
        print(f"FAIL {file} {defines}: {e}")
        continue
    print(f"ok   {time.perf_counter() - t0:5.2f}s {file} {defines} {info}")
print(f"{len(variants) - failed}/{len(variants)} compiled, {time.perf_counter() - t_all:.2f} s")
sys.exit(1 if failed else 0)
