"""Run-time compilation (NVRTC through `cuda.core`) and launching of forge's CUDA C kernels.

Every kernel lives in a readable `.cu` file beside this one. A launcher asks for
`get_kernel(file, name, dtype, defines)`; the source is compiled once per
(file, kernel, dtype, extra defines, GPU arch) and cached for the life of the process.
The dtype reaches the source as `-DFORGE_DTYPE=<n>` (see common.cuh), shape constants as more
`-D` macros.

Kernels launch on torch's current stream, so they order correctly with torch ops and are
captured by `torch.cuda.graph`. Arguments are tensors (passed as their device pointer) or
numpy-typed scalars (np.int32 / np.int64 / np.float32), as `cuda.core` requires.

Programmatic dependent launch (PDL, issue 18; off unless FORGE_PDL=1, sm_90+): the kernels of PDL_FILES
are then compiled with -DFORGE_PDL=1 (they wait for the previous kernel before touching its output, see
common.cuh) and launched with CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION, so each may start
while the kernel before it finishes; captured into a CUDA graph such a launch becomes a programmatic edge.
Other launches (cuBLAS, torch) keep ordinary stream order. `set_pdl` switches it for what is compiled and
launched (and captured) afterwards.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger("forge")

KERNEL_DIR = Path(__file__).resolve().parent

# float8 e4m3 (3) is a KV-cache storage type only (FORGE_CACHE_DTYPE; see common.cuh)
DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2, torch.float8_e4m3fn: 3}

try:  # cuda.core >= 0.4 exports the stable API at the top level
    from cuda.core import Device, LaunchConfig, Program, ProgramOptions, launch
except ImportError:  # pragma: no cover - older cuda.core
    try:
        from cuda.core.experimental import Device, LaunchConfig, Program, ProgramOptions, launch
    except ImportError:  # no cuda.core at all: kernels unavailable, CudaOps falls back to torch
        Device = LaunchConfig = Program = ProgramOptions = launch = None

PDL_ENV = "FORGE_PDL"
# Files whose every kernel calls forge_wait_prior_grid() on every path before touching another kernel's
# output (common.cuh): only their kernels may launch with the PDL attribute.
PDL_FILES = frozenset({"norm.cu", "activation.cu", "rope_cache.cu", "paged_attention.cu", "quant_gemm.cu",
                       "sampling.cu", "token_bitmask.cu", "moe.cu"})

_lock = threading.Lock()
_kernels: dict[tuple, object] = {}
_modules: dict[tuple, object] = {}  # one compiled module per (file, arch, defines)
_fast: dict[tuple, object] = {}  # call-site key -> kernel, skips the arch lookup
_streams: dict[int, object] = {}
_local = threading.local()
_include_dirs: list[str] | None = None
compile_seconds = 0.0  # total time spent in NVRTC, for the benchmark notes
_pdl: bool | None = None  # None: FORGE_PDL not read yet
_pdl_functions: dict[int, object] = {}  # id(kernel) -> its CUfunction, for the kernels compiled with FORGE_PDL=1
_pdl_refused = None  # the driver's error, once a PDL launch has been refused


def available() -> bool:
    return Program is not None and torch.cuda.is_available()


def dtype_code(dtype: torch.dtype) -> int:
    try:
        return DTYPE_CODES[dtype]
    except KeyError:
        raise TypeError(f"forge kernels support float32, bfloat16, float16 (and a float8_e4m3fn KV cache), "
                        f"not {dtype}") from None


def _has_cuda_headers(path: Path) -> bool:
    return (path / "cuda_bf16.h").is_file() and (path / "cuda_fp16.h").is_file()


def cuda_include_dirs() -> list[str]:
    """Directories holding cuda_bf16.h / cuda_fp16.h (and what they include) for NVRTC."""
    global _include_dirs
    if _include_dirs is not None:
        return _include_dirs
    candidates: list[Path] = []
    if os.environ.get("FORGE_CUDA_INCLUDE"):
        candidates.append(Path(os.environ["FORGE_CUDA_INCLUDE"]))
    for var in ("CUDA_HOME", "CUDA_PATH", "CUDA_ROOT"):
        if os.environ.get(var):
            candidates.append(Path(os.environ[var]) / "include")
    try:  # cuda-pathfinder knows where the pip-installed CUDA headers live
        from cuda.pathfinder import find_nvidia_header_directory

        for lib in ("cudart", "nvrtc"):
            try:
                found = find_nvidia_header_directory(lib)
            except Exception:  # noqa: BLE001 - best effort
                found = None
            if found:
                candidates.append(Path(found))
    except ImportError:
        pass
    for entry in sys.path:  # pip wheels: nvidia/cu13/include (CUDA 13), nvidia/cuda_runtime/include (12)
        base = Path(entry) / "nvidia"
        candidates += [base / "cu13" / "include", base / "cuda_runtime" / "include"]
    try:
        from torch.utils.cpp_extension import CUDA_HOME

        if CUDA_HOME:
            candidates.append(Path(CUDA_HOME) / "include")
    except Exception:  # noqa: BLE001
        pass
    candidates += [Path("/usr/local/cuda/include"), Path("/usr/include")]
    for c in candidates:
        if _has_cuda_headers(c):
            _include_dirs = [str(c)]
            # CUDA 13 keeps libcu++ (cuda/std/...) under include/cccl; cuda_fp16.h may need it.
            if (c / "cccl").is_dir():
                _include_dirs.append(str(c / "cccl"))
            log.debug("forge kernels: CUDA headers from %s", c)
            return _include_dirs
    raise RuntimeError(
        "forge kernels: cuda_bf16.h not found; set FORGE_CUDA_INCLUDE or CUDA_HOME to the CUDA toolkit"
    )


def arch_of(device: int | None = None) -> str:
    major, minor = torch.cuda.get_device_capability(device)
    return f"sm_{major}{minor}"


def compile_source(file: str, defines: dict[str, object], arch: str):
    """Compile `file` (in forge/kernels) with NVRTC for `arch`; returns cuda.core ObjectCode."""
    global compile_seconds
    source = (KERNEL_DIR / file).read_text()
    options = ProgramOptions(
        arch=arch,
        std="c++17",
        include_path=[str(KERNEL_DIR), *cuda_include_dirs()],
        define_macro=[(k, str(v)) for k, v in defines.items()] or None,
        # Fast-math flags stay off: exp2f/logf use their accurate versions; results match torch.
    )
    t0 = time.perf_counter()
    program = Program(source, "c++", options=options)
    obj = program.compile("cubin")
    compile_seconds += time.perf_counter() - t0
    return obj


def _ensure_device_current():
    dev_index = torch.cuda.current_device()
    if getattr(_local, "device", None) != dev_index:
        torch.cuda.init()
        dev = Device(dev_index)
        dev.set_current()  # the primary context, which torch uses as well
        _local.device = dev_index
    return dev_index


def parse_pdl(value: str | None) -> bool:
    """FORGE_PDL's value: 1/on/true turn PDL on; unset, empty, 0/off/false leave it off."""
    text = (value or "").strip().lower()
    if text in ("", "0", "off", "false"):
        return False
    if text in ("1", "on", "true"):
        return True
    raise ValueError(f"{PDL_ENV}={value!r}: use 1 (on) or 0 (off)")


def _pdl_unsupported() -> str | None:
    """Why PDL cannot run here (None: it can): it needs sm_90+, a CUDA 12.3+ driver (graph capture of PDL
    launches) and cuda.bindings' launch attribute."""
    if not available():
        return "no CUDA device or cuda.core"
    if _pdl_refused is not None:
        return f"cuLaunchKernelEx refused it ({_pdl_refused})"
    major, minor = torch.cuda.get_device_capability()
    if major < 9:
        return f"the GPU is sm_{major}{minor} (PDL needs sm_90+)"
    try:
        from cuda.bindings import driver

        driver.CUlaunchAttributeID.CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION  # noqa: B018
        _param_holder()
        err, version = driver.cuDriverGetVersion()
    except (ImportError, AttributeError) as e:
        return f"cuda.bindings / cuda.core lack it ({e})"
    if err != driver.CUresult.CUDA_SUCCESS or version < 12030:
        return f"the driver supports CUDA {version // 1000}.{version % 1000 // 10} (PDL needs 12.3+)"
    return None


def set_pdl(on: bool) -> bool:
    """Compile and launch PDL_FILES' kernels with PDL from now on (or not); returns whether it is on:
    where it cannot run it stays off, with a log line. Kernels already captured in CUDA graphs keep how
    they were launched."""
    global _pdl
    if on:
        why = _pdl_unsupported()
        if why is not None:
            log.info("forge kernels: programmatic dependent launch off: %s", why)
            on = False
    _pdl = on
    return on


def pdl_enabled() -> bool:
    """Whether PDL is on: FORGE_PDL, read at the first call, unless set_pdl decided it."""
    if _pdl is None:
        set_pdl(parse_pdl(os.environ.get(PDL_ENV)))
    return _pdl


def get_kernel(file: str, name: str, dtype: torch.dtype | None = None, **defines):
    """The compiled kernel `name` of `file` for `dtype` with macros `defines` (cached); with PDL on, the
    FORGE_PDL=1 build of PDL_FILES' kernels."""
    pdl = _pdl if _pdl is not None else pdl_enabled()
    fast_key = (file, name, dtype, tuple(defines.items()), torch.cuda.current_device(), pdl)
    kernel = _fast.get(fast_key)
    if kernel is None:
        kernel = _fast[fast_key] = _get_kernel(file, name, dtype, defines, pdl and file in PDL_FILES)
    return kernel


def _get_kernel(file: str, name: str, dtype: torch.dtype | None, defines: dict, pdl: bool = False):
    dev_index = _ensure_device_current()
    arch = arch_of(dev_index)
    all_defines = dict(defines)
    if dtype is not None:
        all_defines["FORGE_DTYPE"] = dtype_code(dtype)
    if pdl:
        all_defines["FORGE_PDL"] = 1
    key = (file, name, arch, tuple(sorted(all_defines.items())))
    kernel = _kernels.get(key)
    if kernel is None:
        with _lock:
            kernel = _kernels.get(key)
            if kernel is None:
                mod_key = (file, arch, key[3])
                obj = _modules.get(mod_key)
                if obj is None:
                    obj = _modules[mod_key] = compile_source(file, all_defines, arch)
                kernel = obj.get_kernel(name)
                if pdl:
                    _pdl_functions[id(kernel)] = _cu_function(kernel)
                _kernels[key] = kernel
    return kernel


class _TorchStream:
    """Exposes a raw cudaStream_t through the `__cuda_stream__` protocol."""

    __slots__ = ("handle",)

    def __init__(self, handle: int):
        self.handle = handle

    def __cuda_stream__(self):
        return (0, self.handle)


def current_stream():
    """torch's current stream as a cuda.core Stream (cached by handle; wraps, does not own)."""
    handle = torch.cuda.current_stream().cuda_stream
    stream = _streams.get(handle)
    if stream is None:
        _ensure_device_current()
        stream = Device().create_stream(_TorchStream(handle))
        _streams[handle] = stream
    return stream


def ptr(t: torch.Tensor) -> np.uint64:
    return np.uint64(t.data_ptr())


def run(kernel, grid, block, *args, shmem: int = 0) -> None:
    """Launch `kernel` on torch's current stream. grid/block: int or tuple; args already typed. A kernel
    compiled with FORGE_PDL=1 launches with programmatic stream serialization."""
    function = _pdl_functions.get(id(kernel))
    if function is not None:
        err = _launch_pdl(function, grid, block, shmem, args)
        if err is None:
            return
        _pdl_failed(err)  # (a FORGE_PDL=1 build is correct without the attribute: it launches plainly)
    config = LaunchConfig(grid=grid, block=block, shmem_size=shmem)
    launch(current_stream(), config, kernel, *args)


def _param_holder():
    try:  # cuda.core >= 0.4
        from cuda.core._kernel_arg_handler import ParamHolder
    except ImportError:
        from cuda.core.experimental._kernel_arg_handler import ParamHolder
    return ParamHolder


def _kernel_handle(kernel) -> int:
    """The address of a cuda.core Kernel's CUkernel."""
    handle = getattr(kernel, "handle", None)
    if handle is None:  # cuda.core < 0.4
        handle = kernel._handle
    return int(handle)


def _cu_function(kernel):
    """The driver handle of a cuda.core Kernel (a CUkernel, which cuLaunchKernelEx takes as a CUfunction)."""
    from cuda.bindings import driver

    return driver.CUfunction(_kernel_handle(kernel))


def _dim3(d) -> tuple[int, int, int]:
    if isinstance(d, int):
        return d, 1, 1
    return (tuple(d) + (1, 1))[:3]


def _pdl_failed(err) -> None:
    """A PDL launch was refused: PDL is off for the rest of the process (one warning; set_pdl(True) is refused
    too, since the PDL builds already made would launch plainly), every kernel launches as before."""
    global _pdl, _pdl_refused
    log.warning("forge kernels: cuLaunchKernelEx with programmatic dependent launch failed (%s): PDL off", err)
    _pdl_functions.clear()
    _pdl, _pdl_refused = False, err


def _launch_pdl(function, grid, block, shmem: int, args: tuple):
    """cuLaunchKernelEx with CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION = 1 (cuda.core's
    LaunchConfig has no such attribute): the arguments are packed by cuda.core's own ParamHolder, and one
    CUlaunchConfig per thread is reused. Returns None, or the driver's error."""
    from cuda.bindings import driver

    config = getattr(_local, "pdl_config", None)
    if config is None:
        attr = driver.CUlaunchAttribute()
        attr.id = driver.CUlaunchAttributeID.CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION
        attr.value.programmaticStreamSerializationAllowed = 1
        config = driver.CUlaunchConfig()
        config.attrs = [attr]
        config.numAttrs = 1
        _local.pdl_config = config
        _local.param_holder = _param_holder()
    config.gridDimX, config.gridDimY, config.gridDimZ = _dim3(grid)
    config.blockDimX, config.blockDimY, config.blockDimZ = _dim3(block)
    config.sharedMemBytes = shmem
    config.hStream = torch.cuda.current_stream().cuda_stream
    params = _local.param_holder(args)  # (alive until the launch has copied the arguments)
    (err,) = driver.cuLaunchKernelEx(config, function, params.ptr, 0)
    return None if err == driver.CUresult.CUDA_SUCCESS else err


DEFAULT_SMEM = 48 * 1024  # dynamic + static shared memory a launch may take without opting in
_smem_optin: dict[int, int] = {}
_smem_allowed: dict[tuple[int, int], int] = {}  # (id(kernel), device) -> dynamic shared memory allowed (bytes)


def max_block_smem(device: int | None = None) -> int:
    """The most shared memory (static + dynamic) one block may take on the device, dynamic memory above
    DEFAULT_SMEM after allow_dynamic_smem (227 KB on sm_90; DEFAULT_SMEM where torch does not say)."""
    index = torch.cuda.current_device() if device is None else device
    if index not in _smem_optin:
        props = torch.cuda.get_device_properties(index)
        _smem_optin[index] = max(DEFAULT_SMEM, getattr(props, "shared_memory_per_block_optin", DEFAULT_SMEM))
    return _smem_optin[index]


def allow_dynamic_smem(kernel, nbytes: int) -> None:
    """Let `kernel` launch with `nbytes` of dynamic shared memory on the current device: above DEFAULT_SMEM a
    kernel must opt in (CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES on its CUkernel, once per size)."""
    key = (id(kernel), torch.cuda.current_device())
    if nbytes <= DEFAULT_SMEM or _smem_allowed.get(key, 0) >= nbytes:
        return
    from cuda.bindings import driver

    (err,) = driver.cuKernelSetAttribute(
        driver.CUfunction_attribute.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, nbytes,
        driver.CUkernel(_kernel_handle(kernel)), driver.CUdevice(key[1]))
    if err != driver.CUresult.CUDA_SUCCESS:
        raise RuntimeError(f"forge kernels: {nbytes} bytes of dynamic shared memory refused ({err})")
    _smem_allowed[key] = nbytes


_num_sms: dict[int, int] = {}


def num_sms(device: int | None = None) -> int:
    index = torch.cuda.current_device() if device is None else device
    if index not in _num_sms:
        _num_sms[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _num_sms[index]
