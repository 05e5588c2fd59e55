"""What the CPU runs of forge's CUDA sources share (tests/test_quant_gemm_host.py, test_quant_gemm_pipe_host.py):
a kernel file's text with its quant_common.cuh inlined (so that the tests swap that header's asm helpers as the
file's own), counted regex substitutions, the build of one shared library per source and flags with
tests/cuda_host_emulation.h force-included; and the CPU int4 / fp8 weight layouts they (and the numpy model in
tests/test_quant_gemm_pipe.py) multiply."""

import ctypes
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
import torch

from forge.kernels import compiler
from forge.quant.cuda import Fp8CudaWeight, Int4CudaWeight

HEADER = Path(__file__).resolve().parent / "cuda_host_emulation.h"
CXX = next((c for c in (os.environ.get("CXX"), "c++", "g++", "clang++") if c and shutil.which(c)), None)
needs_cxx = pytest.mark.skipif(CXX is None, reason="no C++ compiler")

# fp8_pair's e4m3x2 -> f16x2 conversion (quant_common.cuh) as the emulation's.
CVT_E4M3X2 = (r'asm\("cvt\.rn\.f16x2\.e4m3x2 %0, %1;\\n" : "=r"\((\w+)\) : "h"\((\w+)\)\);',
              r"\1 = host_cvt_e4m3x2_f16x2(\2);")


def kernel_source(file: str) -> str:
    """forge/kernels/`file` with quant_common.cuh's text in place of its include (its other includes as they are)."""
    src = (compiler.KERNEL_DIR / file).read_text()
    return src.replace('#include "quant_common.cuh"\n', (compiler.KERNEL_DIR / "quant_common.cuh").read_text())


def remove_function(src: str, name: str) -> str:
    """src without the __device__ function `name` (the emulation header defines a host version)."""
    m = re.search(rf"^(template <[^\n]*> )?__device__ __forceinline__ [^\n(]*\b{name}\(", src, re.M)
    assert m, f"no function {name}"
    depth, i = 0, src.index("{", m.end())
    while True:
        depth += {"{": 1, "}": -1}.get(src[i], 0)
        i += 1
        if depth == 0:
            return src[: m.start()] + src[i:]


def substitute(src: str, subs) -> str:
    """(pattern, replacement, count) in turn; each must match `count` times (None: at least once)."""
    for pattern, repl, count in subs:
        src, n = re.subn(pattern, repl, src, flags=re.M)
        assert n == count if count is not None else n > 0, (pattern, n, count)
    return src


_libs: dict[str, ctypes.CDLL] = {}


def build_library(src: str, flags: list[str]) -> ctypes.CDLL:
    """src (with cuda_host_emulation.h force-included) compiled by the host C++ compiler into a shared library,
    once per source, header and flags (kept under the temp dir between runs)."""
    key = hashlib.sha256((src + HEADER.read_text() + " ".join(flags)).encode()).hexdigest()[:20]
    if key not in _libs:
        work = Path(tempfile.gettempdir()) / "forge_host_kernels"
        work.mkdir(exist_ok=True)
        lib = work / f"{key}.so"
        if not lib.exists():
            cpp = work / f"{key}.cpp"
            cpp.write_text(src)
            cmd = [CXX, "-std=c++20", "-O1", "-shared", "-fPIC", "-w", "-ffp-contract=off", *flags,
                   "-include", str(HEADER), str(cpp), "-o", str(lib) + ".tmp"]
            done = subprocess.run(cmd, capture_output=True, text=True)
            assert done.returncode == 0, done.stderr[-4000:]
            os.replace(str(lib) + ".tmp", lib)
        _libs[key] = ctypes.CDLL(str(lib))
    return _libs[key]


def int4_layout(n, k, group, seed=0) -> Int4CudaWeight:
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 16, (n, k), generator=g, dtype=torch.uint8)
    scale = (torch.rand(n, k // group, generator=g) * 0.02 + 1e-3).half().float()
    offset = (torch.randn(n, k // group, generator=g) * 0.1).half().float()
    return Int4CudaWeight.pack(codes, scale, offset, group)


def fp8_layout(n, k, group, seed=0) -> Fp8CudaWeight:
    """Per-row scales (group 0) or 128-input blocks whose codes span e4m3's range."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g)
    if group == 0:
        return Fp8CudaWeight.quantize(w)
    scale = torch.rand(n, k // 128, generator=g) / 100 + 1e-3
    codes = (w.view(n, -1, 128) / scale[..., None] / 8).clamp(-448, 448).to(torch.float8_e4m3fn).view(n, k)
    return Fp8CudaWeight.from_codes(codes, scale, 128)
