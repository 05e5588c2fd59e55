"""forge's own CPU kernels: C++ sources in this folder, built once with the machine's compiler and
loaded with ctypes (which releases the GIL during a call).

    q32_gemm.cpp    x @ W.T for 4-/8-bit weights with float16 scales per 32 inputs, int8
                    activations, AVX-512 VNNI (forge.quant.Q32Weight)
    decode_ops.cpp  rms_norm, add_rms_norm, silu_mul, qkv_rope_cache, decode attention in float32
                    (forge.ops.cpu_native.NativeCpuOps)

The library is compiled on first use (`make install` does it ahead: `python -m forge.native`) into
forge's cache directory (~/.cache/forge/native, or $FORGE_CACHE_DIR), keyed by a hash of the sources
and flags, so a changed source rebuilds; it takes ~5 s. It needs x86-64 with AVX-512 (F, BW, VL)
and VNNI and a C++ compiler ($CXX, else c++ / g++ / clang++). Without them `library()` is None and
forge runs torch's kernels instead (the pure-torch fallback); FORGE_NATIVE=0 forces that. OpenMP
comes from torch's own libgomp (already loaded by torch under the same soname), so forge's kernels
and torch's share one thread pool.
"""

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

SOURCES = [Path(__file__).with_name(name) for name in ("q32_gemm.cpp", "decode_ops.cpp")]
FLAGS = ["-O3", "-std=c++17", "-shared", "-fPIC", "-fopenmp", "-ffp-contract=off", "-mavx512f", "-mavx512bw",
         "-mavx512vl", "-mavx512vnni", "-mf16c", "-mfma"]
CPU_FLAGS = ("avx512f", "avx512bw", "avx512vl", "avx512_vnni", "f16c", "fma")  # as /proc/cpuinfo names them

_I64, _PTR, _INT, _F32 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int, ctypes.c_float
SIGNATURES = {  # the extern "C" functions, in the order of their C parameters
    "fq_linear": [_PTR, _I64, _I64, _PTR, _INT, _I64, _PTR, _INT],
    "fq_dequantize_rows": [_PTR, _INT, _I64, _I64, _PTR, _I64, _PTR],
    "fq_rms_norm": [_PTR, _PTR, _I64, _I64, _F32, _PTR],
    "fq_add_rms_norm": [_PTR, _PTR, _PTR, _I64, _I64, _F32, _PTR, _PTR],
    "fq_silu_mul": [_PTR, _I64, _I64, _PTR],
    "fq_qkv_rope_cache": [_PTR, _I64, _PTR, _PTR, _I64, _I64, _I64, _PTR, _PTR, _PTR, _I64, _PTR, _INT],
    "fq_decode_attention": [_PTR, _PTR, _PTR, _PTR, _I64, _PTR, _I64, _I64, _I64, _I64, _I64, _F32, _I64, _F32, _PTR,
                            _INT, _INT],
}

_lock = threading.Lock()
_state: dict = {}


def cache_dir() -> Path:
    base = os.environ.get("FORGE_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "forge")
    return Path(base) / "native"


def cpu_supported() -> bool:
    """Linux's /proc/cpuinfo lists every instruction set the kernels use (elsewhere: no native kernels)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    for line in text.splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            return all(f in flags for f in CPU_FLAGS)
    return False


def _compiler() -> str | None:
    for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def build() -> Path:
    """Compile the library unless its cached build exists; returns its path, raises RuntimeError."""
    cxx = _compiler()
    if cxx is None:
        raise RuntimeError("no C++ compiler found (set CXX)")
    digest = hashlib.sha256(" ".join([cxx, *FLAGS]).encode())
    for source in SOURCES:
        digest.update(source.read_bytes())
    path = cache_dir() / f"libforge_native_{digest.hexdigest()[:16]}.so"
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:  # built aside, then renamed: atomic
        out = Path(tmp) / path.name
        result = subprocess.run([cxx, *FLAGS, *map(str, SOURCES), "-o", str(out)], capture_output=True, text=True)
        if result.returncode != 0:
            last = result.stderr.strip().splitlines()[-1] if result.stderr.strip() else f"exit {result.returncode}"
            raise RuntimeError(f"{Path(cxx).name} failed: {last}")
        os.replace(out, path)
    return path


def _load():
    if os.environ.get("FORGE_NATIVE", "1") == "0":
        return None, "turned off by FORGE_NATIVE=0"
    if not cpu_supported():
        return None, "this CPU lacks AVX-512 VNNI"
    try:
        import torch  # noqa: F401  (its libgomp first: the library links against the same soname)

        lib = ctypes.CDLL(str(build()))
    except (RuntimeError, OSError) as e:
        return None, str(e)
    for name, argtypes in SIGNATURES.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = argtypes, None
    return lib, None


def library():
    """The loaded kernels (a ctypes.CDLL) or None; `why_unavailable()` says why not."""
    with _lock:
        if "lib" not in _state:
            _state["lib"], _state["why"] = _load()
        return _state["lib"]


def why_unavailable() -> str | None:
    library()
    return _state.get("why")
