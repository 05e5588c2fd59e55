"""forge/kernels/quant_gemm_pipe.cu's own source, run on the CPU: its asm helpers (cp.async, mma.sync, lop3,
cvt, createpolicy) are swapped for the emulations in tests/cuda_host_emulation.h and the rest (the ring, the
copies' addresses and predicates, the fragment loads, the folds, the token blocks, the split-K tickets) is
compiled by the host C++ compiler and run block by block, each block's threads as coroutines. The emulation
counts shared-memory races (a read not ordered after its cp.async by wait_group + __syncthreads, a copy issued
while another thread may still read the word, copies in flight overlapping), misaligned or out-of-bounds
copies and stores past the outputs; the launches use quant_gemm_pipe.launch_plan, so the launcher's sizes are
checked against what the kernel indexes. tests/test_quant_gemm_pipe.py re-derives the same math in numpy."""

import ctypes

import numpy as np
import pytest
import torch

from forge.kernels import compiler
from forge.kernels import quant_gemm_pipe as pipe
from tests.host_kernels import CVT_E4M3X2, build_library, fp8_layout, int4_layout, kernel_source, needs_cxx, remove_function, substitute

pytestmark = needs_cxx
SMS = 132
GUARD = 256  # bytes around every buffer the kernel writes, checked after the launch
# The functions of the .cu whose bodies are asm (or CUDA-only builtins): the header defines host versions.
REPLACED = ("mma16816", "mma16816_first", "smem_addr", "cp_async", "cp_async_stream16", "evict_first_policy",
            "cp_async_commit", "cp_async_wait", "pin")

LAUNCH = r"""
static struct {
    scalar_t* out; const scalar_t* x; const unsigned char* w; const unsigned char* scales; float* ws; int* tickets;
    int M, N, rows, Kx, nchunks, groups_per_row, splits, slabs_per_split; long long w_row_bytes, ldx, ldo;
} g_args;
static void host_entry() {
    quant_gemm_pipe_kernel(g_args.out, g_args.x, g_args.w, g_args.scales, g_args.ws, g_args.tickets, g_args.M,
                           g_args.N, g_args.rows, g_args.Kx, g_args.nchunks, g_args.groups_per_row, g_args.splits,
                           g_args.slabs_per_split, g_args.w_row_bytes, g_args.ldx, g_args.ldo);
}
// blocks: (x, y, z) triples in launch order; buffers: (pointer, bytes) pairs the copies may read.
extern "C" long host_launch(const int* blocks, int nblocks, int gx, int gy, int gz, int threads, long smem,
                            int late, int backward, const void** buffers, const long* buffer_bytes, int nbuffers,
                            void* out, const void* x, const void* w, const void* scales, void* ws, void* tickets,
                            int M, int N, int rows, int Kx, int nchunks, int groups_per_row, int splits,
                            int slabs_per_split, long long w_row_bytes, long long ldx, long long ldo, long* errors) {
    g_args = {(scalar_t*)out, (const scalar_t*)x, (const unsigned char*)w, (const unsigned char*)scales,
              (float*)ws, (int*)tickets, M, N, rows, Kx, nchunks, groups_per_row, splits, slabs_per_split,
              w_row_bytes, ldx, ldo};
    g_buffers.clear();
    for (int i = 0; i < nbuffers; ++i) g_buffers.push_back({(const unsigned char*)buffers[i], (size_t)buffer_bytes[i]});
    g_races = g_errors = 0;
    g_late = late;
    g_grid_dim = {(unsigned)gx, (unsigned)gy, (unsigned)gz};
    g_entry = host_entry;
    for (int b = 0; b < nblocks; ++b) {
        g_block_idx = {(unsigned)blocks[3 * b], (unsigned)blocks[3 * b + 1], (unsigned)blocks[3 * b + 2]};
        host_run_block(threads, (size_t)smem, backward);
    }
    *errors = g_errors;
    return g_races;
}
"""


def host_source() -> str:
    """quant_gemm_pipe.cu with its asm swapped for tests/cuda_host_emulation.h's functions."""
    src = kernel_source("quant_gemm_pipe.cu")
    for line in ('#include "common.cuh"\n', "#include <cuda_fp8.h>\n"):
        assert line in src
        src = src.replace(line, "")
    for name in REPLACED:
        src = remove_function(src, name)
    subs = [  # (pattern, replacement, expected count)
        (r'asm\("lop3\.b32 %0, %1, %2, %3, (0x[0-9A-Fa-f]+);\\n" : "=r"\((\w+)\) : "r"\((.*?)\), "r"\((.*?)\), '
         r'"r"\((.*?)\)\);', r"\2 = host_lop3(\3, \4, \5, \1);", 1),
        (*CVT_E4M3X2, 1),
        (r'asm\("mov\.u32 %0, %%dynamic_smem_size;" : "=r"\((\w+)\)\);',
         r"\1 = (unsigned)g_block_state->smem.size();", 1),
        (r"extern __shared__ __align__\(\d+\) unsigned char smem\[\];",
         "unsigned char* smem = g_block_state->smem.data();", 1),
        (r"__shared__ int (\w+);", r"int& \1 = g_block_state->last_block_int;", 1),
        (r"\*reinterpret_cast<const ([\w:]+)\*>", r"host_deref<\1>", None),
    ]
    src = substitute(src, subs)
    assert "asm" not in src and "__shared__" not in src, "quant_gemm_pipe.cu has asm the emulation does not know"
    return src + LAUNCH


def _guarded(nbytes: int) -> np.ndarray:
    return np.full(nbytes + 2 * GUARD, 0xCD, dtype=np.uint8)


def run(layout, x: torch.Tensor, splits=None, stages=None, late=True, backward=False, order="natural",
        ldx=None, source=None) -> tuple[torch.Tensor, int]:
    """out = x @ layout.T by the kernel's source on the host (x's rows `ldx` apart); returns (out, races).
    Errors fail here."""
    m, k = x.shape
    ldx = ldx or k
    n = layout.shape[0]
    plan = pipe.launch_plan(layout, m, SMS, splits, stages)
    flags = [f"-DFORGE_DTYPE={compiler.dtype_code(x.dtype)}", *(f"-D{k}={v}" for k, v in sorted(plan.defines.items()))]
    lib = build_library(source or host_source(), flags)
    rows = layout.codes.shape[0]
    xs = torch.zeros(m, ldx, dtype=x.dtype)
    xs[:, :k] = x
    xb = np.ascontiguousarray(xs.view(torch.int16).numpy()).view(np.uint8)
    wb = np.ascontiguousarray(layout.codes.contiguous().view(torch.uint8).numpy())
    sc = layout.scales.contiguous()
    sb = np.ascontiguousarray((sc.view(torch.int16) if sc.dtype == torch.float16 else sc.view(torch.int32)).numpy())
    out = _guarded(m * n * 2)
    ws = _guarded(plan.splits * m * rows * 4 if plan.splits > 1 else 0)
    tickets = np.zeros(pipe.MAX_TICKETS, dtype=np.int32)
    gx, gy, gz = plan.grid
    blocks = [(bx, by, bz) for bz in range(gz) for by in range(gy) for bx in range(gx)]
    if order == "reversed":
        blocks.reverse()
    elif order == "shuffled":
        blocks = [blocks[i] for i in np.random.default_rng(0).permutation(len(blocks))]
    barr = np.array(blocks, dtype=np.int32).reshape(-1)
    reads = [xb, wb, sb, ws[GUARD: GUARD + (ws.size - 2 * GUARD)]]
    ptrs = (ctypes.c_void_p * len(reads))(*[a.ctypes.data for a in reads])
    sizes = (ctypes.c_long * len(reads))(*[a.nbytes for a in reads])
    errors = ctypes.c_long(0)
    ws_ptr = ws.ctypes.data + GUARD if plan.splits > 1 else out.ctypes.data + GUARD
    tk_ptr = tickets.ctypes.data if plan.splits > 1 else out.ctypes.data + GUARD
    i32, i64, vp = ctypes.c_int, ctypes.c_longlong, ctypes.c_void_p
    lib.host_launch.restype = ctypes.c_long
    races = lib.host_launch(
        barr.ctypes.data_as(ctypes.POINTER(ctypes.c_int)), i32(len(blocks)), i32(gx), i32(gy), i32(gz),
        i32(plan.threads), ctypes.c_long(plan.smem), i32(late), i32(backward), ptrs, sizes, i32(len(reads)),
        vp(out.ctypes.data + GUARD), vp(xb.ctypes.data), vp(wb.ctypes.data), vp(sb.ctypes.data), vp(ws_ptr),
        vp(tk_ptr), i32(m), i32(n), i32(rows), i32(k), i32(plan.nchunks), i32(layout.groups_per_row),
        i32(plan.splits), i32(plan.slabs_per_split), i64(layout.row_bytes), i64(ldx), i64(n), ctypes.byref(errors))
    assert errors.value == 0, f"{errors.value} errors (stderr has the first)"
    for buf in (out, ws):
        assert (buf[:GUARD] == 0xCD).all() and (buf[buf.size - GUARD:] == 0xCD).all(), "a store past a buffer"
    assert not tickets.any(), "split-K tickets not reset"
    result = torch.from_numpy(out[GUARD: GUARD + m * n * 2].copy().view(np.int16)).view(x.dtype).view(m, n)
    return result, races


def reference(layout, x: torch.Tensor) -> torch.Tensor:
    return x.double() @ layout.dequantize().double().T


def check(layout, x, **kw) -> torch.Tensor:
    out, races = run(layout, x, **kw)
    assert races == 0, f"{races} shared-memory races (stderr has the first)"
    ref = reference(layout, x)
    # float32 sums of exact weights, rounded once to x's dtype: 2^-8 (bf16) of |out| plus a little
    eps = 2 ** -8 if x.dtype == torch.bfloat16 else 2 ** -11
    torch.testing.assert_close(out.double(), ref, rtol=eps, atol=1e-3 * ref.abs().max().item())
    return out


CASES = [  # kind, N, K, group, M, splits, dtype[, x's row stride]
    ("int4", 160, 576, 32, 11, None, torch.bfloat16),  # K padded to 640, a half-empty second row block
    ("int4", 96, 1024, 128, 1, 3, torch.float16),
    ("int4", 64, 512, 128, 70, 3, torch.bfloat16),  # two token blocks (64 + 6), three K splits
    ("int4", 32, 768, 64, 40, None, torch.float16),  # groups of 64, 2 x 4 token tiles
    ("int4", 48, 256, 32, 29, 2, torch.bfloat16),  # 1 x 4 token tiles, one slab per split
    ("fp8", 96, 576, 0, 5, 2, torch.bfloat16),  # 9 chunks: the last slab's second chunk zero-filled
    ("fp8", 64, 640, 128, 17, None, torch.float16),  # block scales
    ("fp8", 200, 512, 0, 33, 4, torch.float16),
    ("int4", 128, 384, 64, 64, 1, torch.float16, 392),  # rows of x 392 apart (a column slice gemm keeps)
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c[:6])) + str(c[6])[-4:])
def test_kernel_source_on_the_host_computes_the_product(case):
    kind, n, k, group, m, splits, dtype, *ldx = case
    layout = int4_layout(n, k, group) if kind == "int4" else fp8_layout(n, k, group)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(1)).to(dtype)
    check(layout, x, splits=splits, ldx=ldx[0] if ldx else None)


def test_ring_depth_schedule_and_block_order_do_not_change_the_bits():
    """Copies landing at issue (early) or at the wait (late), threads forward or backward, blocks in any order
    (which block of a tile is last), rings of 2..6 stages: race-free and the same bits."""
    layout = int4_layout(96, 1280, 32)
    x = torch.randn(9, 1280, generator=torch.Generator().manual_seed(2)).bfloat16()
    base = check(layout, x, splits=3)
    for kw in (dict(late=False), dict(backward=True), dict(order="reversed"), dict(order="shuffled", late=False),
               dict(stages=2), dict(stages=3), dict(stages=6)):
        assert torch.equal(check(layout, x, splits=3, **kw), base), kw


def test_rows_do_not_depend_on_the_batch():
    layout = fp8_layout(80, 384, 128)
    x = torch.randn(40, 384, generator=torch.Generator().manual_seed(3)).bfloat16()
    full, races = run(layout, x)
    assert races == 0
    for m in (1, 8, 9, 17, 33):
        part, races = run(layout, x[:m])
        assert races == 0 and torch.equal(part, full[:m]), m


@pytest.mark.parametrize("mutation,expect", [
    ("cp_async_wait<STAGES - 2>();", "cp_async_wait<STAGES - 1>();"),  # waits one slab too few: reads in flight
    ("__syncthreads();              // ... and everyone's", "// no barrier"),  # refills a stage others still read
])
def test_the_emulation_catches_pipeline_races(mutation, expect):
    """The race counter is not vacuous: the kernel with one wait or barrier wrong races."""
    src = host_source()
    assert mutation in src
    layout = int4_layout(64, 768, 128)
    x = torch.randn(3, 768, generator=torch.Generator().manual_seed(4)).bfloat16()
    _, races = run(layout, x, source=src.replace(mutation, expect))
    assert races > 0
