"""forge/kernels/quant_gemm.cu's never-run paths, run on the CPU from their own source: the float-weight GEMM
(WCODE 2), the residual add + RMSNorm prologue (NORM_PROLOGUE), the gated epilogue (ACT) and the RoPE + paged
KV-cache epilogue (ROPE_HEAD_DIM). The source (with common.cuh's, its asm swapped for the emulations of
tests/cuda_host_emulation.h) is compiled by the host C++ compiler and run block by block, a block's threads as
coroutines switched at barriers, MMAs and shuffles, with the launchers' own grids, shared memory and
arguments (HostKernels). The emulation counts shared-memory races (a word read or written by one thread and
written by another between two barriers, a read of a word nothing wrote) and reports global loads and stores
outside the launch's tensors and global accesses before the PDL wait; every byte's stores are counted (an
element stored twice fails; the tests check which tensors were stored, and where); shared-memory bank conflicts
are counted per warp request.

The references are forge's other kernels run the same way: norm.cu's add_rms_norm / rms_norm, activation.cu's
silu_mul / gelu_tanh_mul and rope_cache.cu's qkv_rope_cache, from the same rounded inputs, so "bit for bit as
norm.cu" is checked as such (rsqrtf, expf and tanhf are the host's in both: a GPU's approximations differ from
them, but equally in both kernels). rope_cache.cu's `a * c - b * s` / `b * c + a * s` are rewritten as the
FMUL + FFMA pairs ptxas compiles them to (sm_90 SASS of its bf16 / fp16 builds), since the
host does not contract; quant_gemm.cu's rope_rotate spells out the VEC 2 / 4 / 8 form (at VEC 1, which the launcher
takes for a qkv whose rows or pointers are not 2-element aligned, ptxas rounds o2's other product: see ROPE_O2)."""

import ctypes
import re
from typing import NamedTuple

import numpy as np
import pytest
import torch

from forge.kernels import activation, compiler, norm, rope_cache
from forge.kernels import quant_gemm as qg
from tests.host_kernels import CVT_E4M3X2, build_library, fp8_layout, int4_layout, kernel_source, needs_cxx, remove_function, substitute

pytestmark = needs_cxx
EPS = 1e-6

GLUE = r"""
static void host_entry();  // the kernel's call (ENTRIES)
union HostArg {  // one kernel argument as the launcher typed it (np.uint64 pointer, np.int32 / int64, np.float32)
    void* p;
    long long i;
    double f;
};
static HostArg A[32];
static int g_kernel;  // which kernel of the file (ENTRIES' names, in order)
extern "C" void host_reset(int check_pdl) {
    g_buffers.clear();
    g_races = g_errors = 0;
    g_check_pdl = check_pdl;
    g_rsqrt_args.clear();
    g_static_bytes = 0;
    g_banks.clear();
}
extern "C" void host_add_buffer(const void* p, long bytes, unsigned char* writes) {
    g_buffers.push_back({(const unsigned char*)p, (size_t)bytes, writes});
}
extern "C" long host_rsqrt_args(float* out, long max) {  // the launch's rsqrtf arguments, in call order
    for (size_t i = 0; i < g_rsqrt_args.size() && (long)i < max; ++i) out[i] = g_rsqrt_args[i];
    return (long)g_rsqrt_args.size();
}
extern "C" long host_races() { return g_races; }
extern "C" long host_static_bytes() { return (long)g_static_bytes; }
// Rows of (epoch, store, bytes, requests, phases, wavefronts): the launch's shared-memory bank use.
extern "C" long host_bank_stats(long long* out, long max_rows) {
    long n = 0;
    for (const auto& [key, st] : g_banks) {
        if (n < max_rows) {
            long long* r = out + 6 * n;
            r[0] = std::get<0>(key), r[1] = std::get<1>(key), r[2] = std::get<2>(key);
            r[3] = st.requests, r[4] = st.phases, r[5] = st.wavefronts;
        }
        ++n;
    }
    return n;
}
extern "C" long host_errors() { return g_errors; }
// The grid in launch order (x fastest; reversed: the last block first), each block's threads round robin.
extern "C" void host_launch(int kernel, int gx, int gy, int threads, long smem, int backward, int reversed,
                            const HostArg* args) {
    std::memcpy(A, args, sizeof A);
    g_kernel = kernel;
    g_entry = host_entry;
    g_grid_dim = {(unsigned)gx, (unsigned)gy, 1};
    for (int n = 0; n < gx * gy; ++n) {
        const int b = reversed ? gx * gy - 1 - n : n;
        g_block_idx = {(unsigned)(b % gx), (unsigned)(b / gx), 0};
        host_run_block(threads, (size_t)smem, backward);
    }
}
"""

# Each file's kernels (by name, in the order g_kernel counts them) called with the launcher's arguments A[i]:
# (the call, the number of arguments) per name; the argument counts are checked against the launcher's.
ENTRIES = {
    "quant_gemm.cu": ({"quant_gemm_kernel": 12}, r"""
static void host_entry() {
    quant_gemm_kernel((scalar_t*)A[0].p, (const scalar_t*)A[1].p, (const unsigned char*)A[2].p, A[3].p, A[4].i,
                      A[5].i, A[6].i, A[7].i, A[8].i, A[9].i, A[10].i, A[11].i
#if NORM_PROLOGUE
                      , (const scalar_t*)A[12].p, (scalar_t*)A[13].p, (const wscalar_t*)A[14].p, (float)A[15].f,
                      A[16].i
#endif
#if ROPE_HEAD_DIM
                      , (const long long*)A[17].p, (const float*)A[18].p, (const long long*)A[19].p,
                      (cache_t*)A[20].p, (cache_t*)A[21].p, A[22].i, A[23].i, (float)A[24].f, (float)A[25].f
#endif
    );
}
"""),
    "norm.cu": ({"rms_norm_kernel": 5, "add_rms_norm_kernel": 7}, r"""
static void host_entry() {
    if (g_kernel == 0)
        rms_norm_kernel((scalar_t*)A[0].p, (const scalar_t*)A[1].p, (const wscalar_t*)A[2].p, A[3].i, (float)A[4].f);
    else
        add_rms_norm_kernel((scalar_t*)A[0].p, (scalar_t*)A[1].p, (const scalar_t*)A[2].p, (const scalar_t*)A[3].p,
                            (const wscalar_t*)A[4].p, A[5].i, (float)A[6].f);
}
"""),
    "activation.cu": ({"silu_mul_kernel": 3, "gelu_tanh_mul_kernel": 3}, r"""
static void host_entry() {
    if (g_kernel == 0) silu_mul_kernel((scalar_t*)A[0].p, (const scalar_t*)A[1].p, A[2].i);
    else gelu_tanh_mul_kernel((scalar_t*)A[0].p, (const scalar_t*)A[1].p, A[2].i);
}
"""),
    "rope_cache.cu": ({"qkv_rope_cache_kernel": 13}, r"""
static void host_entry() {
    qkv_rope_cache_kernel((scalar_t*)A[0].p, (cache_t*)A[1].p, (cache_t*)A[2].p, (const scalar_t*)A[3].p,
                          (const long long*)A[4].p, (const float*)A[5].p, (const long long*)A[6].p, A[7].i, A[8].i,
                          A[9].i, A[10].i, (float)A[11].f, (float)A[12].f);
}
"""),
}


def _common() -> str:
    """common.cuh without its CUDA includes and with its memory / PDL helpers left to the header's host_*."""
    src = (compiler.KERNEL_DIR / "common.cuh").read_text()
    for line in ("#include <cuda_bf16.h>\n", "#include <cuda_fp16.h>\n", "#include <cuda_fp8.h>\n"):
        assert line in src
        src = src.replace(line, "")
    for name in ("load_vec", "load_vec_stream", "store_vec", "forge_wait_prior_grid", "forge_allow_dependents",
                 "forge_prefetch_l2"):
        src = remove_function(src, name)
    src = substitute(src, [(r"float block_sum\(float x, float\* scratch\)", "float block_sum(float x, Sh<float>* scratch)", 1)])
    assert "asm" not in src
    return src


# Shared to every kernel file: shared arrays as tracked elements, reinterpreted loads through the checks.
SHARED_SUBS = [
    (r"__shared__ (\w+) (\w+)((?:\[[^\]]+\])+);", r"auto& \2 = host_shared<Sh<\1>\3>(__LINE__);", None),
    (r"\*reinterpret_cast<const ((?:[\w:]+)(?:<[^<>]*>)?)\*>", r"host_deref<\1>", None),
]


# rope_cache.cu's `b * c + a * s` (o2) as ptxas contracts it (sm_90 SASS of its bf16 / fp16 builds, same-dtype and
# float8 caches): the product a * sin rounded at VEC 2 / 4 / 8, b * cos at VEC 1. (`a * c - b * s` is
# FFMA(a, c, -(b * s)) at every VEC.) quant_gemm.cu's rope_rotate is the first form.
ROPE_O2 = """#if VEC == 1
#define ROPE_O2(a, b, c, s) __fmaf_rn(a, s, __fmul_rn(b, c))
#else
#define ROPE_O2(a, b, c, s) __fmaf_rn(b, c, __fmul_rn(a, s))
#endif
"""


def host_source(file: str) -> str:
    """`file` (forge/kernels) as the host compiles it: common.cuh's text in place of its include, asm swapped."""
    src = kernel_source(file)
    assert '#include "common.cuh"\n' in src
    src = src.replace('#include "common.cuh"\n', _common())
    src = src.replace("#include <cuda_fp8.h>\n", "")
    src = src.replace('#include "activation.cuh"\n', (compiler.KERNEL_DIR / "activation.cuh").read_text())
    for pattern, repl, _ in SHARED_SUBS:
        src = re.sub(pattern, repl, src)
    if file == "quant_gemm.cu":
        for name in ("mma16816", "load_stream16"):
            src = remove_function(src, name)
        src = substitute(src, [
            (r'asm\("sub\.rn\.(?:bf16|f16)x2 %0, %1, %2;\\n" : "=r"\((\w+)\) : "r"\((\w+)\), "r"\((\w+)\)\);',
             r"\1 = host_sub_x2(\2, \3);", 2),
            (*CVT_E4M3X2, 1),
            (r"extern __shared__ __align__\(16\) unsigned char smem\[\];",
             "unsigned char* smem = g_block_state->smem.data();", 1),
            (r"float\(\*red\)\[RT \* NT \* 4\]\[32\] = reinterpret_cast<float\(\*\)",
             "Sh<float>(*red)[RT * NT * 4][32] = reinterpret_cast<Sh<float>(*)", 1),
            (r"\bload_stream16\(", "host_load_stream16(", 1),
            # global scalars read by index, and the epilogues' scalar stores: through the bounds checks
            (r"\b(sz|cs|positions|slot_mapping|s)\[([^\[\]]+)\]", r"host_ld(&\1[\2])", 9),
            (r"(reinterpret_cast<const float\*>\(scales\))\[([^\[\]]+)\]", r"host_ld(&\1[\2])", 3),
            (r"^(\s*)(out|dst)\[([^\[\]]+)\] = (.+);$", r"\1host_store(&\2[\3], \4);", 8),
        ])
    elif file == "rope_cache.cu":
        src = substitute(src, [
            (r"a \* c\.v\[e\] - b \* s\.v\[e\]", "__fmaf_rn(a, c.v[e], -__fmul_rn(b, s.v[e]))", 1),
            (r"b \* c\.v\[e\] \+ a \* s\.v\[e\]", "ROPE_O2(a, b, c.v[e], s.v[e])", 1),
            (r'^extern "C" __global__ void qkv_rope_cache_kernel\(', ROPE_O2 + 'extern "C" __global__ void qkv_rope_cache_kernel(', 1),
            (r"= (positions|slot_mapping)\[t\];", r"= host_ld(&\1[t]);", 2),
        ])
    assert "asm" not in src and "__shared__" not in src, f"{file} has asm the emulation does not know"
    return src + GLUE + ENTRIES[file][1]


def build(file: str, dtype: torch.dtype, source: str | None = None, **defines) -> ctypes.CDLL:
    flags = ["-DFORGE_HOST_COMMON=1", f"-DFORGE_DTYPE={compiler.dtype_code(dtype)}",
             *(f"-D{k}={v}" for k, v in sorted(defines.items()))]
    dll = build_library(source or host_source(file), flags)
    dll.host_races.restype = dll.host_errors.restype = dll.host_static_bytes.restype = ctypes.c_long
    dll.host_bank_stats.restype = ctypes.c_long
    return dll


class Launch(NamedTuple):
    name: str
    defines: dict
    writes: dict  # data_ptr -> stores per element of that tensor (contiguous tensors)
    rsqrt: np.ndarray  # rsqrtf's arguments, in call order
    static_bytes: int  # the static shared memory a block declared
    banks: np.ndarray  # rows (epoch, store, bytes, requests, phases, wavefronts): host_bank_stats


class HostKernels:
    """Within `with HostKernels():`, forge's launchers (quant_gemm, norm, activation, rope_cache) run their kernels
    on the host: compiler.get_kernel builds the file's host source with the launcher's defines, compiler.run
    launches it with the launcher's grid, block, shared memory and arguments on the CPU tensors' own memory.
    Every tensor the launcher passed is a buffer the kernel may touch (bounds-checked); each launch fails on an
    error the emulation reports or an element stored twice, and records the races and the writes per element.
    sources: {file: a modified host source} (mutations); backward / reversed: the threads' and blocks' order;
    pdl: the FORGE_PDL=1 builds of compiler.PDL_FILES (as for sm_90: FORGE_PDL_ACTIVE, the PDL-only prefetches)."""

    def __init__(self, sources=None, backward=False, reversed_blocks=False, pdl=False):
        self.sources, self.backward, self.reversed, self.pdl = sources or {}, backward, reversed_blocks, pdl
        self.races, self.launches = 0, []
        self._tensors: dict[int, torch.Tensor] = {}
        self._saved = {}

    def __enter__(self):
        for name in ("get_kernel", "run", "ptr", "allow_dynamic_smem"):
            self._saved[name] = getattr(compiler, name)
        compiler.get_kernel = lambda file, name, dtype=None, **defines: (file, name, dtype, defines)
        compiler.run = self._run
        compiler.ptr = self._ptr
        compiler.allow_dynamic_smem = lambda kernel, nbytes: None
        return self

    def __exit__(self, *exc):
        for name, f in self._saved.items():
            setattr(compiler, name, f)

    def _ptr(self, t: torch.Tensor) -> np.uint64:
        assert t.device.type == "cpu"
        self._tensors[t.data_ptr()] = t
        return np.uint64(t.data_ptr())

    @staticmethod
    def _extent(t: torch.Tensor) -> int:
        """Bytes from t's first element to past its last (a strided view's rows and the gaps between them)."""
        return (sum((n - 1) * st for n, st in zip(t.shape, t.stride())) + 1) * t.element_size() if t.numel() else 0

    def _run(self, kernel, grid, block, *args, shmem=0):
        file, name, dtype, defines = kernel
        names, _ = ENTRIES[file]
        base = names[name]
        expect = base + (5 if defines.get("NORM_PROLOGUE") else 0) + (9 if defines.get("ROPE_HEAD_DIM") else 0)
        assert len(args) == expect, f"{name}: the launcher passes {len(args)} arguments, the kernel takes {expect}"
        if self.pdl and file in compiler.PDL_FILES:
            defines = {**defines, "FORGE_PDL": 1, "__CUDA_ARCH__": 900}
        lib = build(file, dtype, self.sources.get(file), **defines)
        slots = (ctypes.c_ubyte * (8 * 32))()
        view = np.frombuffer(slots, dtype=np.uint8)
        buffers = {}
        for i, a in enumerate(args):
            if isinstance(a, np.uint64):
                if int(a):
                    t = self._tensors[int(a)]
                    buffers[int(a)] = t
                view[8 * i: 8 * i + 8] = np.array([int(a)], dtype=np.uint64).view(np.uint8)
            elif isinstance(a, (np.int32, np.int64)):
                view[8 * i: 8 * i + 8] = np.array([int(a)], dtype=np.int64).view(np.uint8)
            else:
                assert isinstance(a, np.float32), (name, i, type(a))
                view[8 * i: 8 * i + 8] = np.array([float(a)], dtype=np.float64).view(np.uint8)
        lib.host_reset(1)
        writes = {}
        for p, t in buffers.items():
            writes[p] = np.zeros(self._extent(t), dtype=np.uint8)
            lib.host_add_buffer(ctypes.c_void_p(p), ctypes.c_long(writes[p].size),
                                writes[p].ctypes.data_as(ctypes.POINTER(ctypes.c_ubyte)))
        gx, gy = (grid, 1) if isinstance(grid, int) else (tuple(grid) + (1,))[:2]
        lib.host_launch(list(names).index(name), gx, gy, block, ctypes.c_long(shmem), int(self.backward),
                        int(self.reversed), slots)
        errors = lib.host_errors()
        assert errors == 0, f"{name}: {errors} errors (stderr has the first)"
        self.races += lib.host_races()
        launch = {}
        for p, t in buffers.items():
            assert writes[p].max(initial=0) <= 1, f"{name}: an element stored twice"
            if t.is_contiguous():  # (strided views are inputs here)
                w = writes[p].reshape(-1, t.element_size())
                assert (w == w[:, :1]).all(), f"{name}: an element partly stored"
                launch[p] = w[:, 0].reshape(t.shape)
        n = lib.host_rsqrt_args(None, 0)
        rsqrt = np.zeros(n, dtype=np.float32)
        lib.host_rsqrt_args(rsqrt.ctypes.data_as(ctypes.POINTER(ctypes.c_float)), n)
        rows = lib.host_bank_stats(None, 0)
        banks = np.zeros((rows, 6), dtype=np.int64)
        lib.host_bank_stats(banks.ctypes.data_as(ctypes.POINTER(ctypes.c_longlong)), rows)
        self.launches.append(Launch(name, defines, launch, rsqrt, lib.host_static_bytes(), banks))

    def rsqrt_args(self, launch=-1) -> set[int]:
        """The float32 bits of the rsqrtf arguments (mean square + eps per token) of a launch."""
        return set(self.launches[launch].rsqrt.view(np.uint32).tolist())

    def writes(self, t: torch.Tensor, launch=-1) -> np.ndarray:
        """Stores per element of t in a launch (zeros where the kernel was not given t)."""
        counts = self.launches[launch].writes.get(t.data_ptr())
        return np.zeros(t.shape, dtype=np.uint8) if counts is None else counts


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def operands(m, k, dtype, seed=0, wdtype=None):
    """hidden spans 2^-6 .. 2^6 times normal values: its sums of squares then depend on their order at the scale
    of the total (with unit normals a reordering's one-ulp changes of the partial sums are mostly rounded away)."""
    g = _gen(seed)
    hidden = (torch.randn(m, k, generator=g) * 2.0 ** torch.randint(-6, 7, (m, k), generator=g).float()).to(dtype)
    residual = torch.randn(m, k, generator=g).to(dtype)
    norm_weight = (1 + 0.1 * torch.randn(k, generator=g)).to(wdtype or dtype)
    return hidden, residual, norm_weight


def float_weight(n, k, dtype, seed=1):
    return (torch.randn(n, k, generator=_gen(seed)) * k ** -0.5).to(dtype)


def weight_of(kind, n, k, dtype):
    return {"float": lambda: float_weight(n, k, dtype), "int4-g128": lambda: int4_layout(n, k, 128),
            "int4-g64": lambda: int4_layout(n, k, 64), "int4-g32": lambda: int4_layout(n, k, 32), "fp8-row": lambda: fp8_layout(n, k, 0),
            "fp8-b128": lambda: fp8_layout(n, k, 128)}[kind]()


def gemm(x, weight):
    """quant_gemm.linear (float) / gemm (int4, fp8)."""
    return qg.linear(x, weight) if isinstance(weight, torch.Tensor) else qg.gemm(x, weight)


def assert_bits(a: torch.Tensor, b: torch.Tensor, what=""):
    assert a.shape == b.shape and a.dtype == b.dtype, what
    ua, ub = a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8)
    bad = (ua != ub).sum().item()
    assert bad == 0, f"{what}: {bad} bytes differ"


# ---- tests ----

@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("k", [576, 2048])
def test_float_gemm_computes_the_product(dtype, k):
    """WCODE 2 (quant_gemm.linear) for M = 1..8, N a multiple of the 16-row tile and not (a lane past row N reads
    row N - 1: the weight's buffer ends at row N, so a read past it is an error); each output stored once."""
    eps = 2 ** -8 if dtype == torch.bfloat16 else 2 ** -11
    for n in (48, 40):
        w = float_weight(n, k, dtype)
        for m in range(1, 9):
            x = torch.randn(m, k, generator=_gen(m)).to(dtype)
            with HostKernels() as hk:
                out = qg.linear(x, w)
            assert hk.races == 0 and (hk.writes(out) == 1).all()
            ref = x.double() @ w.double().T
            torch.testing.assert_close(out.double(), ref, rtol=eps, atol=1e-3 * ref.abs().max().item())


@pytest.mark.parametrize("dtype,k,residual_on,wdtype", [
    (torch.bfloat16, 576, True, None),
    (torch.float16, 576, True, None),
    (torch.bfloat16, 2048, True, None),
    (torch.bfloat16, 576, False, None),  # the first layer: rms_norm(hidden)
    (torch.float16, 2048, False, torch.float32),  # a float32 norm weight
], ids=["bf16-576", "fp16-576", "bf16-2048", "bf16-576-nores", "fp16-2048-f32w"])
def test_prologue_is_norm_cu_bit_for_bit(dtype, k, residual_on, wdtype):
    """x read back through an identity weight (exact: one product with 1, zeros elsewhere) equals norm.cu's
    output bit for bit, for 1..8 tokens, and so does each token's mean square + eps in float32 (rsqrtf's argument:
    the sum of squares' order, which x's rounding to bf16 / fp16 would mostly hide); residual_out equals norm.cu's sum, is its own buffer, and is stored
    exactly once per element (residual and hidden not at all)."""
    eye = torch.eye(k).to(dtype)
    for m in (1, 3, 8):
        hidden, residual, norm_weight = operands(m, k, dtype, seed=m, wdtype=wdtype)
        residual = residual if residual_on else None
        with HostKernels() as hk:
            out, res_out = qg.rms_norm_linear(hidden, residual, norm_weight, EPS, eye)
            ref, ref_res = (norm.add_rms_norm(hidden, residual, norm_weight, EPS) if residual_on
                            else (norm.rms_norm(hidden, norm_weight, EPS), hidden))
        assert hk.races == 0
        assert hk.rsqrt_args(0) == hk.rsqrt_args(1) and len(hk.rsqrt_args(1)) == m, "1 / rms differs"
        assert_bits(out, ref, f"x, m={m}")
        assert_bits(res_out, ref_res, f"residual_out, m={m}")
        assert (hk.writes(out, 0) == 1).all() and not hk.writes(hidden, 0).any()
        if residual_on:
            assert res_out.data_ptr() not in (hidden.data_ptr(), residual.data_ptr())
            assert (hk.writes(res_out, 0) == 1).all() and not hk.writes(residual, 0).any()


@pytest.mark.parametrize("k", [3072, 4096, 8192])
def test_prologue_sums_squares_in_norm_cu_order_over_several_warps(k):
    """Hidden sizes where norm.cu's block has 3, 4 and 8 warps (96, 128, 256 threads): the prologue's x (through
    the plain GEMM of norm.cu's output, same weights) bit for bit."""
    m, dtype = 2, torch.bfloat16
    hidden, residual, norm_weight = operands(m, k, dtype, seed=k)
    w = float_weight(32, k, dtype)
    with HostKernels() as hk:
        out, res_out = qg.rms_norm_linear(hidden, residual, norm_weight, EPS, w)
        x, ref_res = norm.add_rms_norm(hidden, residual, norm_weight, EPS)
        ref = qg.linear(x, w)
    assert hk.races == 0
    assert hk.rsqrt_args(0) == hk.rsqrt_args(1) and len(hk.rsqrt_args(1)) == m, "1 / rms differs"
    assert_bits(out, ref, f"K={k}")
    assert_bits(res_out, ref_res)


@pytest.mark.parametrize("kind,k", [("float-bf16", 512), ("float-fp16", 576), ("int4-g128", 512), ("int4-g64", 512),
                                    ("int4-g32", 576), ("fp8-row", 576), ("fp8-b128", 512)])
def test_prologue_gemm_is_the_gemm_of_norm_cu(kind, k):
    """rms_norm_linear = the plain GEMM of norm.cu's output, bit for bit (the prologue's x in shared memory feeds
    the same MMAs as x from global memory), for float (88 rows: not whole tiles), int4 and fp8 weights; int4 at
    K = 576 pads its rows to 640 (x past K never read: the prologue leaves those shared words unwritten)."""
    dtype = torch.float16 if kind.endswith("fp16") else torch.bfloat16
    weight = weight_of(kind.split("-")[0] if kind.startswith("float") else kind,
                       88 if kind.startswith("float") else 96, k, dtype)
    for m in (2, 7):
        hidden, residual, norm_weight = operands(m, k, dtype, seed=10 + m)
        with HostKernels() as hk:
            out, _ = qg.rms_norm_linear(hidden, residual, norm_weight, EPS, weight)
            x, _ = norm.add_rms_norm(hidden, residual, norm_weight, EPS)
            ref = gemm(x, weight)
        assert hk.races == 0
        assert_bits(out, ref, f"{kind} m={m}")


@pytest.mark.parametrize("m", [12, 16, 20, 33])
def test_token_tiles(m):
    """M past 8: NT = 2 (9..16) and 4 (17..: two blocks of tokens, the second partly empty), bit for bit as the
    plain GEMM of norm.cu's output."""
    k, dtype = 256, torch.bfloat16
    w = float_weight(48, k, dtype)
    hidden, residual, norm_weight = operands(m, k, dtype, seed=50 + m)
    with HostKernels() as hk:
        out, res_out = qg.rms_norm_linear(hidden, residual, norm_weight, EPS, w)
        x, ref_res = norm.add_rms_norm(hidden, residual, norm_weight, EPS)
        ref = qg.linear(x, w)
    assert hk.races == 0
    assert_bits(out, ref, f"m={m}")
    assert_bits(res_out, ref_res)


def test_fits_counts_the_static_shared_memory():
    """norm_gemm_fits / rope_cache_fits add 8 NT x PROLOGUE_ROW_SMEM bytes of static shared memory to the dynamic:
    what the prologue's __shared__ arrays take."""
    k, dtype = 256, torch.bfloat16
    for m in (1, 8, 12, 20):
        hidden, residual, norm_weight = operands(m, k, dtype, seed=80 + m)
        with HostKernels() as hk:
            qg.rms_norm_linear(hidden, residual, norm_weight, EPS, float_weight(32, k, dtype))
        assert hk.launches[0].static_bytes == 8 * hk.launches[0].defines["NT"] * qg.PROLOGUE_ROW_SMEM, m


@pytest.mark.parametrize("kind,k", [("float", 2048), ("float", 576), ("int4-g128", 2048), ("int4-g32", 576),
                                    ("fp8-row", 2048), ("fp8-b128", 512)])
def test_shared_memory_bank_use(kind, k):
    """Bank conflicts of every shared access of the prologue, the main loop and the epilogues, counted per warp
    request (16-byte accesses in phases of 8 lanes, 8-byte of 16): none, but for the fp8 main loop's 8-byte x loads
    (lanes c = 0..3 of rows g..g + 3 at words 8c + 2j: rows 4 words apart, two ways per bank), as NOTES says."""
    dtype, heads, kv_heads, d = torch.bfloat16, 2, 1, 64
    for m in (8, 16):
        hidden, residual, norm_weight = operands(m, k, dtype, seed=90 + m)
        ops = rope_operands(min(m, 8), kv_heads, d, dtype)
        with HostKernels() as hk:
            qg.rms_norm_linear(hidden, residual, norm_weight, EPS, weight_of(kind, 64, k, dtype))
            qg.rms_norm_qkv_rope_cache(hidden[:8], residual[:8], norm_weight, EPS,
                                       weight_of(kind, (heads + 2 * kv_heads) * d, k, dtype), ops["positions"],
                                       ops["cos_sin_cache"], ops["k_cache"], ops["v_cache"], ops["slot_mapping"],
                                       heads, kv_heads, d)
            if kind == "float":
                qg.rms_norm_linear(hidden, residual, norm_weight, EPS, float_weight(64, k, dtype), act="silu")
        for launch in hk.launches:
            for epoch, store, nbytes, _, phases, wavefronts in launch.banks:
                main_loop_x = kind.startswith("fp8") and not store and nbytes == 8
                assert wavefronts == (2 if main_loop_x else 1) * phases, (launch.name, epoch, store, nbytes)


@pytest.mark.parametrize("act", ["silu", "gelu_tanh"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_gated_epilogue_is_activation_cu(act, dtype):
    """ACT: act(gate rows j) * (up rows I + j) from one block equals activation.cu's silu_mul / gelu_tanh_mul of
    rms_norm_linear's rounded [gate, up], bit for bit; I not a multiple of 16 (and not of 8: VEC 1 there)."""
    k = 576
    for inter, m in ((40, 3), (64, 8), (20, 1), (40, 12)):  # (12 tokens: two token tiles)
        hidden, residual, norm_weight = operands(m, k, dtype, seed=20 + m)
        w = float_weight(2 * inter, k, dtype, seed=inter)
        with HostKernels() as hk:
            out, _ = qg.rms_norm_linear(hidden, residual, norm_weight, EPS, w, act=act)
            gate_up, _ = qg.rms_norm_linear(hidden, residual, norm_weight, EPS, w)
            ref = (activation.silu_mul if act == "silu" else activation.gelu_tanh_mul)(gate_up)
        assert hk.races == 0 and (hk.writes(out, 0) == 1).all()
        assert_bits(out, ref, f"{act} I={inter}")


def rope_operands(m, kv_heads, d, cache_dtype, seed=0):
    g = _gen(seed)
    blocks, block_size, max_pos = 3, 4, 64
    inv_freq = 1.0 / 10000 ** (torch.arange(0, d, 2).float() / d)
    angles = torch.arange(max_pos).float()[:, None] * inv_freq[None]
    positions = torch.randint(0, max_pos, (m,), generator=g)
    slots = torch.randperm(blocks * block_size, generator=g)[:m] if m <= blocks * block_size else None
    slots[m // 2] = -1  # a padded token: its k / v not written
    fill = torch.randn(2, blocks, block_size, kv_heads, d, generator=g)  # what is not written must stay as it was
    fp8 = cache_dtype == torch.float8_e4m3fn
    return dict(positions=positions, cos_sin_cache=torch.cat([angles.cos(), angles.sin()], dim=-1).contiguous(),
                k_cache=fill[0].to(cache_dtype), v_cache=fill[1].to(cache_dtype), slot_mapping=slots,
                k_scale=0.005 if fp8 else 1.0, v_scale=0.5 if fp8 else 1.0)  # k / 0.005: some codes saturate


def rope_run(hidden, residual, norm_weight, weight, heads, kv_heads, d, ops, **host):
    """rms_norm_qkv_rope_cache (fused) and rms_norm_linear + rope_cache.qkv_rope_cache on the host, from copies
    of the same caches -> ((q, residual_out, k_cache, v_cache), reference's, HostKernels)."""
    ref_ops = {**ops, "k_cache": ops["k_cache"].clone(), "v_cache": ops["v_cache"].clone()}
    with HostKernels(**host) as hk:
        q, res_out = qg.rms_norm_qkv_rope_cache(hidden, residual, norm_weight, EPS, weight, ops["positions"],
                                                ops["cos_sin_cache"], ops["k_cache"], ops["v_cache"],
                                                ops["slot_mapping"], heads, kv_heads, d, ops["k_scale"],
                                                ops["v_scale"])
    with HostKernels() as ref_hk:
        qkv, ref_res = qg.rms_norm_linear(hidden, residual, norm_weight, EPS, weight)
        q_ref = rope_cache.qkv_rope_cache(qkv, ref_ops["positions"], ref_ops["cos_sin_cache"], ref_ops["k_cache"],
                                          ref_ops["v_cache"], ref_ops["slot_mapping"], heads, kv_heads, d,
                                          ref_ops["k_scale"], ref_ops["v_scale"])
    assert ref_hk.races == 0
    return (q, res_out, ops["k_cache"], ops["v_cache"]), (q_ref, ref_res, ref_ops["k_cache"], ref_ops["v_cache"]), hk


ROPE_CASES = [  # weight kind, dtype, cache, hidden, H, Hkv, D, M
    ("float", torch.bfloat16, None, 576, 4, 2, 64, 5),
    ("float", torch.float16, "fp8", 576, 6, 2, 64, 8),
    ("float", torch.bfloat16, "fp8", 512, 4, 1, 128, 3),
    ("float", torch.float16, None, 256, 2, 2, 128, 8),
    ("float", torch.bfloat16, None, 256, 3, 1, 64, 12),  # two token tiles
    ("int4-g128", torch.bfloat16, "fp8", 512, 2, 1, 128, 4),
    ("int4-g32", torch.float16, None, 256, 2, 2, 64, 1),
    ("fp8-row", torch.float16, None, 384, 4, 2, 64, 6),  # per-row scales applied before the rounding
    ("fp8-b128", torch.bfloat16, "fp8", 512, 2, 1, 64, 2),
]


@pytest.mark.parametrize("case", ROPE_CASES, ids=lambda c: f"{c[0]}-{str(c[1])[-4:]}-{c[2]}-D{c[6]}-H{c[4]}x{c[5]}-M{c[7]}")
def test_rope_epilogue_is_rope_cache_cu(case):
    """ROPE_HEAD_DIM: q, the k / v caches and residual_out equal rms_norm_linear's qkv run through rope_cache.cu
    bit for bit (fp8 caches with scales, some codes saturated); each slot of the step's tokens stored once, slot
    -1 and every other slot untouched."""
    kind, dtype, cache, k, heads, kv_heads, d, m = case
    cache_dtype = torch.float8_e4m3fn if cache == "fp8" else dtype
    weight = weight_of(kind, (heads + 2 * kv_heads) * d, k, dtype)
    hidden, residual, norm_weight = operands(m, k, dtype, seed=30 + m)
    ops = rope_operands(m, kv_heads, d, cache_dtype)
    before = (ops["k_cache"].clone(), ops["v_cache"].clone())
    got, ref, hk = rope_run(hidden, residual, norm_weight, weight, heads, kv_heads, d, ops)
    assert hk.races == 0
    for a, b, what in zip(got, ref, ("q", "residual_out", "k_cache", "v_cache")):
        assert_bits(a, b, what)
    assert (hk.writes(got[0]) == 1).all() and (hk.writes(got[1]) == 1).all()
    slots = ops["slot_mapping"]
    stored = np.zeros(ops["k_cache"].numel() // (kv_heads * d), dtype=np.uint8)
    stored[slots[slots >= 0].numpy()] = 1
    for cache_t, old in zip(got[2:], before):
        per_slot = hk.writes(cache_t).reshape(-1, kv_heads * d)
        assert (per_slot == stored[:, None]).all(), "a slot stored twice, or one not the step's"
        keep = torch.from_numpy(stored == 0)
        assert_bits(cache_t.view(-1, kv_heads * d)[keep], old.view(-1, kv_heads * d)[keep], "untouched slots")
    if cache == "fp8":
        assert (got[2].view(torch.uint8) & 0x7F == 0x7E).any(), "no k code saturated: the scale tests less"


def test_block_order_and_thread_schedule_do_not_change_the_bits():
    """Blocks in reverse order (row tile 0's blocks, which store residual_out, last) and threads switched in
    reverse: race-free and the same bits."""
    k, m, dtype, heads, kv_heads, d = 576, 6, torch.bfloat16, 4, 2, 64
    hidden, residual, norm_weight = operands(m, k, dtype, seed=40)
    weight = float_weight((heads + 2 * kv_heads) * d, k, dtype)
    ops = rope_operands(m, kv_heads, d, torch.float8_e4m3fn)
    for host in (dict(backward=True), dict(reversed_blocks=True)):
        got, ref, hk = rope_run(hidden, residual, norm_weight, weight, heads, kv_heads, d,
                                {**ops, "k_cache": ops["k_cache"].clone(), "v_cache": ops["v_cache"].clone()}, **host)
        assert hk.races == 0
        for a, b in zip(got, ref):
            assert_bits(a, b, str(host))


def test_fp8_conversion_matches_torch():
    """The emulation's float -> e4m3 (round to nearest even, saturated to +-448), seen through rope_cache.cu's
    v copy into an fp8 cache, against torch's conversion of the clamped values (torch's own does not saturate)."""
    signs = torch.tensor([1.0, -1.0]).repeat(20)
    vals = torch.cat([torch.linspace(-500, 500, 20), torch.tensor([2.0 ** -9, 3 * 2.0 ** -10, 0.0, -0.0]),
                      torch.logspace(-10, 8.9, 40, base=2) * signs]).to(torch.bfloat16)
    qkv = torch.zeros(1, 3 * 64, dtype=torch.bfloat16)
    qkv[0, 128:] = vals
    ops = rope_operands(1, 1, 64, torch.float8_e4m3fn)
    with HostKernels():
        rope_cache.qkv_rope_cache(qkv, ops["positions"], ops["cos_sin_cache"], ops["k_cache"], ops["v_cache"],
                                  torch.tensor([0]), 1, 1, 64, 1.0, 1.0)
    ref = vals.float().clamp(-448, 448).to(torch.float8_e4m3fn).view(torch.uint8)
    assert torch.equal(ops["v_cache"].view(torch.uint8)[0, 0, 0], ref)


def test_launcher_pdl_order_is_checked():
    """The PDL check is live: a kernel that reads x before forge_wait_prior_grid() fails."""
    src = host_source("quant_gemm.cu")
    wait = "    forge_wait_prior_grid();  // PDL: x (hidden / residual) is the previous kernel's output (common.cuh)\n"
    assert src.count(wait) == 1
    moved = src.replace(wait, "").replace("    // This lane's token of each token tile", wait + "    // This lane's token of each token tile")
    hidden, residual, norm_weight = operands(2, 256, torch.bfloat16)
    with pytest.raises(AssertionError, match="1 errors|errors"), HostKernels(sources={"quant_gemm.cu": moved}):
        qg.rms_norm_linear(hidden, residual, norm_weight, EPS, float_weight(32, 256, torch.bfloat16))


def test_pdl_builds_touch_nothing_before_the_wait():
    """FORGE_PDL=1 builds (decode tiles prefetch their first weight chunks before the wait): every global access
    after forge_wait_prior_grid(), the prefetches inside the weights, and the same bits as without PDL."""
    k, dtype, heads, kv_heads, d = 256, torch.bfloat16, 2, 1, 64
    hidden, residual, norm_weight = operands(3, k, dtype, seed=60)
    w = float_weight(40, k, dtype)
    qkv_w = float_weight((heads + 2 * kv_heads) * d, k, dtype)
    layout = int4_layout(64, k, 128)
    results = []
    for pdl in (False, True):
        ops = rope_operands(3, kv_heads, d, torch.float8_e4m3fn)
        with HostKernels(pdl=pdl) as hk:
            out = [qg.linear(hidden[:1], w), qg.gemm(hidden, layout), *qg.rms_norm_linear(hidden, residual, norm_weight, EPS, w),
                   *qg.rms_norm_qkv_rope_cache(hidden, residual, norm_weight, EPS, qkv_w, ops["positions"],
                                               ops["cos_sin_cache"], ops["k_cache"], ops["v_cache"],
                                               ops["slot_mapping"], heads, kv_heads, d, 0.005, 0.5),
                   ops["k_cache"], ops["v_cache"]]
        assert hk.races == 0
        results.append(out)
    for a, b in zip(*results):
        assert_bits(a, b, "PDL")


MUTATIONS = [  # (what, text of the host source, its replacement, caught as)
    ("no barrier after the prologue's x stores",
     "        store_vec<scalar_t, 8>(xs + m * xs_stride + i, s);\n    }\n    __syncthreads();\n}",
     "        store_vec<scalar_t, 8>(xs + m * xs_stride + i, s);\n    }\n}", "races"),
    ("no barrier between the last x reads and the sums stored over x",
     "    __syncthreads();  // every warp is done with x, whose shared memory now takes the sums\n", "", "races"),
    ("no barrier between the partial sums of squares and their reduction",
     "        if (lane == 0) part[m][lt >> 5] = ss;\n    }\n    __syncthreads();\n", "        if (lane == 0) part[m][lt >> 5] = ss;\n    }\n",
     "races"),
    ("the RoPE pair one element off", "host_store(&dst[HALF], o2);", "host_store(&dst[HALF + 1], o2);", "values"),
    ("the head's second row tile 16 rows too far",
     "#define TILE_ROWS (ROPE_HEAD_DIM ? ROPE_HEAD_DIM / 2 : 16)",
     "#define TILE_ROWS (ROPE_HEAD_DIM ? ROPE_HEAD_DIM / 2 + 16 : 16)", "values"),
    ("sin taken from the cos half", "host_ld(&cs[HALF + i])", "host_ld(&cs[i])", "values"),
    ("the sum of squares in another order",
     "            for (int e = 0; e < 8; ++e) {\n                const float f = to_float(s.v[e]);",
     "            for (int e = 7; e >= 0; --e) {\n                const float f = to_float(s.v[e]);", "rsqrt"),
    ("the mean square as ss * (1 / H)", "rsqrtf(ss / (float)H + eps)", "rsqrtf(ss * (1.f / (float)H) + eps)", "rsqrt"),
    ("the warp sums' shuffles in another order", "for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync",
     "for (int o = 1; o < 32; o <<= 1) x += __shfl_xor_sync", "rsqrt"),
    ("the sum of squares without its warp reduction",
     "        ss = warp_sum(ss);\n        if (lane == 0) part[m][lt >> 5] = ss;", "        if (lane == 0) part[m][lt >> 5] = ss;",
     "values"),
]


@pytest.mark.parametrize("mutation", MUTATIONS, ids=lambda mu: mu[0].replace(" ", "-"))
def test_the_emulation_catches_broken_variants(mutation):
    """The checks are not vacuous: the RoPE kernel with one barrier, offset or reduction wrong races, stores
    out of place or differs from rope_cache.cu; the norm with its sum of squares reordered differs from norm.cu's
    in float32."""
    _, text, replacement, caught_as = mutation
    src = host_source("quant_gemm.cu")
    assert src.count(text) == 1, text
    if caught_as == "rsqrt":  # within x's rounding: seen in float32, as each token's mean square + eps
        hidden, residual, norm_weight = operands(8, 576, torch.bfloat16, seed=70)
        with HostKernels(sources={"quant_gemm.cu": src.replace(text, replacement)}) as hk:
            qg.rms_norm_linear(hidden, residual, norm_weight, EPS, float_weight(32, 576, torch.bfloat16))
            norm.add_rms_norm(hidden, residual, norm_weight, EPS)
        assert hk.races == 0 and hk.rsqrt_args(0) != hk.rsqrt_args(1)
        return
    kind, dtype, _, _, heads, kv_heads, d, m = ROPE_CASES[0]
    k = 2048  # norm.cu's block: 2 warps, so the partial sums of squares cross warps
    hidden, residual, norm_weight = operands(m, k, dtype, seed=30 + m)
    weight = float_weight((heads + 2 * kv_heads) * d, k, dtype)
    try:
        got, ref, hk = rope_run(hidden, residual, norm_weight, weight, heads, kv_heads, d,
                                rope_operands(m, kv_heads, d, dtype), sources={"quant_gemm.cu": src.replace(text, replacement)})
    except AssertionError:  # an element stored twice, or an error the emulation reported
        assert caught_as == "values"
        return
    if caught_as == "races":
        assert hk.races > 0
    else:
        assert not all(torch.equal(a.view(torch.uint8), b.view(torch.uint8)) for a, b in zip(got, ref))
