"""ops.rms_norm_linear (a decoder layer's residual add + RMSNorm and the GEMM that reads it, with the gated
activation for gate_up): on the CPU the exact composition of the ops it replaces; the fused CUDA kernel's
eligibility rules and index math (quant_gemm.norm_gemm_fits, the shared-memory layout), which run here
without a GPU. The kernel itself: tests/cuda/test_fused_norm_gemm.py."""

import pytest
import torch

from forge import native
from forge.kernels import norm, quant_gemm
from forge.ops.cpu import CpuOps
from forge.quant import pack, quantize_groups

K, N, INTER = 64, 48, 40


def operands(dtype, seed=0, m=3):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(m, K, generator=g).to(dtype)
    residual = torch.randn(m, K, generator=g).to(dtype)
    norm_weight = (1 + 0.1 * torch.randn(K, generator=g)).to(dtype)
    return hidden, residual, norm_weight, g


def composition(ops, hidden, residual, norm_weight, weight, act):
    """What the decoder did before rms_norm_linear: the norm, the GEMM, the gated activation."""
    if residual is None:
        x, res = ops.rms_norm(hidden, norm_weight, 1e-6), hidden
    else:
        x, res = ops.add_rms_norm(hidden, residual, norm_weight, 1e-6)
    y = ops.linear(x, weight)
    if act == "silu":
        y = ops.silu_mul(y)
    elif act == "gelu_tanh":
        y = ops.gelu_tanh_mul(y)
    return y, res


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("act", [None, "silu", "gelu_tanh"])
@pytest.mark.parametrize("with_residual", [False, True])
def test_cpu_rms_norm_linear_is_the_composition(dtype, act, with_residual):
    hidden, residual, norm_weight, g = operands(dtype)
    weight = torch.randn(2 * INTER if act else N, K, generator=g).to(dtype)
    residual = residual if with_residual else None
    ops = CpuOps()
    y, res = ops.rms_norm_linear(hidden, residual, norm_weight, 1e-6, weight, act=act)
    ref_y, ref_res = composition(ops, hidden, residual, norm_weight, weight, act)
    assert torch.equal(y, ref_y) and torch.equal(res, ref_res)
    assert y.shape == (3, INTER if act else N)
    if residual is None:
        assert res is hidden  # the first layer: the residual stream starts as the embeddings


@pytest.mark.parametrize("act", [None, "silu"])
def test_cpu_rms_norm_linear_with_a_quantized_weight(act):
    """A quantized layout (forge.quant) goes through ops.linear's dispatch, as before."""
    hidden, residual, norm_weight, g = operands(torch.float32)
    weight = pack(quantize_groups(torch.randn(2 * INTER if act else N, K, generator=g), 4))
    ops = CpuOps()
    y, res = ops.rms_norm_linear(hidden, residual, norm_weight, 1e-6, weight, act=act)
    ref_y, ref_res = composition(ops, hidden, residual, norm_weight, weight, act)
    assert torch.equal(y, ref_y) and torch.equal(res, ref_res)


@pytest.mark.skipif(native.library() is None, reason="native CPU kernels unavailable")
def test_native_cpu_rms_norm_linear_is_its_composition():
    from forge.ops.cpu_native import NativeCpuOps

    ops = NativeCpuOps(native.library())
    hidden, residual, norm_weight, g = operands(torch.float32)
    weight = pack(quantize_groups(torch.randn(2 * INTER, K, generator=g), 4))
    for res_in in (None, residual):
        y, res = ops.rms_norm_linear(hidden, res_in, norm_weight, 1e-6, weight, act="silu")
        ref_y, ref_res = composition(ops, hidden, res_in, norm_weight, weight, "silu")
        assert torch.equal(y, ref_y) and torch.equal(res, ref_res)


def test_cuda_ops_without_a_gpu_tensor_is_the_composition():
    """CudaOps with the switch on still runs the composition for CPU tensors."""
    from forge.ops.cuda import CudaOps

    ops = CudaOps()
    ops.fused_norm_gemm = True
    hidden, residual, norm_weight, g = operands(torch.bfloat16, m=1)
    weight = torch.randn(2 * INTER, K, generator=g).bfloat16()
    y, res = ops.rms_norm_linear(hidden, residual, norm_weight, 1e-6, weight, act="silu")
    ref_y, ref_res = composition(CpuOps(), hidden, residual, norm_weight, weight, "silu")
    assert torch.equal(y, ref_y) and torch.equal(res, ref_res)


def test_fused_norm_gemm_switch(monkeypatch):
    from forge.ops.cuda import FUSED_NORM_GEMM_ENV, CudaOps

    monkeypatch.delenv(FUSED_NORM_GEMM_ENV, raising=False)
    assert not CudaOps().fused_norm_gemm  # off until measured
    monkeypatch.setenv(FUSED_NORM_GEMM_ENV, "1")
    assert CudaOps().fused_norm_gemm


def fits(m, k, n=256, dtype=torch.bfloat16, act=None, residual=True, wdtype=None, norm_dtype=None):
    hidden = torch.zeros(m, k, dtype=dtype)
    weight = torch.zeros(n, k, dtype=wdtype or dtype)
    return quant_gemm.norm_gemm_fits(hidden, torch.zeros_like(hidden) if residual else None,
                                     torch.ones(k, dtype=norm_dtype or dtype), weight, act)


def test_norm_gemm_fits():
    # the 135M / 1B / 8B hidden sizes at batch 1..8, bf16 and fp16, with and without the first layer's residual
    for k in (576, 2048, 4096):
        for m in range(1, 9):
            for dtype in (torch.bfloat16, torch.float16):
                expect = k < 4096 or m <= 5  # off a GPU, 48 KB of shared memory: 8.3 KB of x per token at 8B
                assert fits(m, k, dtype=dtype) == expect, (k, m, dtype)
                assert fits(m, k, dtype=dtype, act="silu", residual=False) == expect
    assert fits(1, 576, norm_dtype=torch.float32)  # norm.cu's float32-weight variant, repeated alike
    assert not fits(1, 576, dtype=torch.float32)  # the MMAs take bf16 / fp16
    assert not fits(1, 576, wdtype=torch.float16)  # weight and activations of one dtype
    assert not fits(1, 560)  # K a multiple of 32 (a 64-byte chunk of a row)
    assert not fits(1, 576, n=255, act="silu")  # gate_up has 2I rows
    assert fits(1, 576, n=200)  # any N: the kernel reads the last row in place of missing ones
    assert not fits(1, 576, act="relu")


def test_norm_gemm_fits_only_aligned_contiguous_operands():
    """The kernel reads hidden, residual, the norm weight and a float weight with 16-byte vector loads at
    row strides of K: a row slice starting on a 16-byte boundary fits, a view shifted by one element, a column
    slice or a transposed weight does not (CudaOps then composes)."""
    k = 576
    base = torch.zeros(10, k + 8, dtype=torch.bfloat16)
    hidden = torch.zeros(10, k, dtype=torch.bfloat16)
    norm_weight = torch.ones(k, dtype=torch.bfloat16)
    weight = torch.zeros(64, k, dtype=torch.bfloat16)
    assert quant_gemm.norm_gemm_fits(hidden[2:6], hidden[6:10], norm_weight, weight)  # 2 x 1152-byte rows in
    shifted = base.view(-1)[1: 1 + 4 * k].view(4, k)  # contiguous, 2 bytes past a 16-byte boundary
    assert not quant_gemm.norm_gemm_fits(shifted, None, norm_weight, weight)
    assert not quant_gemm.norm_gemm_fits(hidden[:4], shifted, norm_weight, weight)
    assert not quant_gemm.norm_gemm_fits(base[:4, :k], None, norm_weight, weight)  # rows K + 8 apart
    assert not quant_gemm.norm_gemm_fits(hidden[:4], None, torch.ones(k + 1, dtype=torch.bfloat16)[1:], weight)
    assert not quant_gemm.norm_gemm_fits(hidden[:4], None, norm_weight, torch.zeros(k, 64, dtype=torch.bfloat16).T)


def test_norm_gemm_fits_layouts():
    """int4 / fp8 layouts take the prologue without the gated epilogue (their rows are padded: the gate and
    up halves do not line up with row tiles)."""
    from forge.quant.cuda import Fp8CudaWeight, Int4CudaWeight

    hidden = torch.zeros(2, 2048, dtype=torch.bfloat16)
    w = torch.randn(96, 2048)
    for layout in (Int4CudaWeight.quantize(w), Fp8CudaWeight.quantize(w)):
        assert quant_gemm.norm_gemm_fits(hidden, hidden.clone(), torch.ones(2048, dtype=torch.bfloat16), layout)
        assert not quant_gemm.norm_gemm_fits(hidden, hidden.clone(), torch.ones(2048, dtype=torch.bfloat16), layout,
                                             act="silu")


def test_norm_threads_suit_the_prologue():
    """The prologue repeats norm.cu's sum of squares with norm.py's thread count: whole warps (32 items of
    a row are one warp of the prologue) and at most 32 of them (32 partial sums per row)."""
    x = torch.zeros(1, 32768, dtype=torch.bfloat16)
    for k in range(8, 32768 + 1, 8):
        vec, threads = norm._config(k, x[:, :k])
        assert vec == 8 and threads % 32 == 0 and threads <= 1024, k


def banks(words: list[int]) -> list[int]:
    return [w % 32 for w in words]


@pytest.mark.parametrize("k", [576, 896, 1536, 2048, 3072, 4096, 5120])
@pytest.mark.parametrize("code", [0, 1, 2])
def test_prologue_x_loads_are_free_of_bank_conflicts(k, code):
    """quant_gemm.cu's x fragment loads from the prologue's shared memory, lane (g, c) of a warp, token g,
    row stride _xs_stride (rows 16-byte aligned: the prologue moves 8 inputs at a time): the lanes of one
    load phase (8 lanes for 16-byte loads, 16 for 8-byte ones) touch distinct banks, except fp8's, two ways
    (its four rows g of a phase, 8 banks apart in each of 4 runs of 2, cannot all be apart with 16-byte
    aligned rows). Float: inputs 8c .. 8c + 7 of a 32-input chunk; int4: 16j + 4c ..; fp8: 16c + 4j .."""
    stride = quant_gemm._xs_stride(k, code)
    assert stride % 8 == 0
    stride_words = stride // 2
    width, phase = (4, 8) if code == 2 else (2, 16)  # words per lane, lanes per phase
    ways = 2 if code == 1 else 1
    for j in range(1 if code == 2 else (8 if code == 0 else 4)):
        for first in range(0, 32, phase):
            used = []
            for lane in range(first, first + phase):
                g, c = lane // 4, lane % 4
                inp = 8 * c if code == 2 else 16 * j + 4 * c if code == 0 else 16 * c + 4 * j
                used += banks([g * stride_words + inp // 2 + w for w in range(width)])
            assert max(used.count(b) for b in used) == ways, (code, j, first)


def emulate_float_kernel(x: torch.Tensor, w: torch.Tensor, act: bool) -> torch.Tensor:
    """quant_gemm.cu's float-weight (WCODE 2) indexing, lane by lane, in float64: grid.y row tiles (with act:
    16 gate rows and the matching up rows), each lane's 16-byte weight words of rows wr(r, h) and x words, the
    m16n8k16 fragment layouts (PTX ISA: A rows g / g + 8, columns 2c.. / 2c + 8..; B rows 2c.. / 2c + 8..,
    column g; D rows g / g + 8, columns 2c, 2c + 1), the warps' sums through red[v][lane] and the epilogue's
    (row, token) of each. Returns the [M, N] product (with act: [gate, up] pairs as [M, 2, I])."""
    m, k = x.shape
    n_rows = w.shape[0]
    n = n_rows // 2 if act else n_rows
    rt = 2 if act else 1
    out = torch.zeros(m, 2, n, dtype=torch.float64) if act else torch.zeros(m, n, dtype=torch.float64)
    for by in range(-(-n // (16 if act else 16 * rt))):
        row0 = by * (16 if act else 16 * rt)
        red = torch.zeros(rt * 4, 32, dtype=torch.float64)  # summed over warps: addition order aside, the same
        for r in range(rt):
            def wr(g, h):
                return r * n + min(row0 + g + 8 * h, n - 1) if act else min(row0 + 16 * r + g + 8 * h, n - 1)
            acc = torch.zeros(16, 8, dtype=torch.float64)
            for chunk in range(k // 32):
                for j in range(2):
                    a = torch.zeros(16, 16, dtype=torch.float64)
                    b = torch.zeros(16, 8, dtype=torch.float64)
                    for lane in range(32):
                        g, c = lane // 4, lane % 4
                        e0 = chunk * 32 + 8 * c  # the lane's 8 inputs: word q holds inputs e0 + 2q, e0 + 2q + 1
                        def word(row_vals, q):
                            return row_vals[e0 + 2 * q: e0 + 2 * q + 2].double()
                        a[g, 2 * c: 2 * c + 2] = word(w[wr(g, 0)], 2 * j)  # a[0]
                        a[g + 8, 2 * c: 2 * c + 2] = word(w[wr(g, 1)], 2 * j)  # a[1]
                        a[g, 2 * c + 8: 2 * c + 10] = word(w[wr(g, 0)], 2 * j + 1)  # a[2]
                        a[g + 8, 2 * c + 8: 2 * c + 10] = word(w[wr(g, 1)], 2 * j + 1)  # a[3]
                        if g < m:
                            b[2 * c: 2 * c + 2, g] = word(x[g], 2 * j)  # b[0]
                            b[2 * c + 8: 2 * c + 10, g] = word(x[g], 2 * j + 1)  # b[1]
                    acc += a @ b
            for lane in range(32):  # acc[r][0][i] -> red[(r * NT + 0) * 4 + i][lane]
                g, c = lane // 4, lane % 4
                for i in range(4):
                    red[r * 4 + i, lane] = acc[g + 8 * (i >> 1), 2 * c + (i & 1)]
        for v in range(4):  # the epilogue: with act, v of tile 0 (gate) and NT * 4 + v of tile 1 (up)
            for lane in range(32):
                for r in range(1 if act else rt):
                    i = v
                    row = row0 + 16 * r + (lane >> 2) + 8 * (i >> 1)
                    tok = 2 * (lane & 3) + (i & 1)
                    if row < n and tok < m:
                        if act:
                            out[tok, 0, row], out[tok, 1, row] = red[v, lane], red[4 + v, lane]
                        else:
                            out[tok, row] = red[r * 4 + v, lane]
    return out


def test_float_kernel_indexing_emulated():
    g = torch.Generator().manual_seed(7)
    x = torch.randn(5, 96, generator=g)
    w = torch.randn(40, 96, generator=g)  # 40 rows: the last tile's rows 40..47 clamp to row 39
    torch.testing.assert_close(emulate_float_kernel(x, w, act=False), x.double() @ w.double().T)
    gate_up = emulate_float_kernel(x, w, act=True)  # I = 20: two tiles; the second one's rows 20..31 read 19 / 39
    ref = x.double() @ w.double().T
    torch.testing.assert_close(gate_up[:, 0], ref[:, :20])
    torch.testing.assert_close(gate_up[:, 1], ref[:, 20:])


def test_cuda_ops_fall_back_to_the_cpu_reference_for_cpu_tensors():
    """CudaOps given CPU tensors runs CpuOps's code, which keeps per-step memos that CpuOps.__init__ makes."""
    from forge.ops.cuda import CudaOps

    g = torch.Generator().manual_seed(0)
    t, h, hkv, d = 3, 4, 2, 16
    qkv = torch.randn(t, (h + 2 * hkv) * d, generator=g)
    positions = torch.tensor([0, 1, 2])
    cos_sin = torch.randn(8, d, generator=g)
    slots = torch.tensor([0, 1, 2])
    outs = []
    for ops in (CpuOps(), CudaOps()):
        k_cache, v_cache = torch.zeros(2, 4, hkv, d), torch.zeros(2, 4, hkv, d)
        q = ops.qkv_rope_cache(qkv, positions, cos_sin, k_cache, v_cache, slots, h, hkv, d)
        outs.append((q, k_cache, v_cache))
    for a, b in zip(*outs):
        assert torch.equal(a, b)
