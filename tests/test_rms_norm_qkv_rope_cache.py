"""ops.rms_norm_qkv_rope_cache (a layer's residual add + input RMSNorm, qkv GEMM, neox RoPE and KV-cache write): on
the CPU the exact composition of rms_norm_linear and qkv_rope_cache; the fused CUDA kernel's eligibility rules
(quant_gemm.rope_cache_fits) and its index math (quant_gemm.cu's ROPE_HEAD_DIM: which weight rows a block's two row
tiles hold, which q / cache elements each epilogue thread writes), which run here without a GPU; the decoder's
wiring. The kernel itself: tests/cuda/test_fused_qkv_rope_cache.py."""

import pytest
import torch

from forge import native
from forge.kernels import quant_gemm
from forge.ops.cpu import FP8_KV, CpuOps
from forge.quant import pack, quantize_groups

EPS = 1e-6
H, HKV, D, HIDDEN = 4, 2, 32, 64
BLOCKS, BLOCK_SIZE = 4, 8


def operands(dtype, m=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(m, HIDDEN, generator=g).to(dtype)
    residual = torch.randn(m, HIDDEN, generator=g).to(dtype)
    norm_weight = (1 + 0.1 * torch.randn(HIDDEN, generator=g)).to(dtype)
    weight = (torch.randn((H + 2 * HKV) * D, HIDDEN, generator=g) * HIDDEN ** -0.5).to(dtype)
    positions = torch.tensor([5, 17, 3, 40, 9, 2, 33, 21][:m])
    slots = torch.tensor([3, 12, 20, 31, 0, 9, 17, 26][:m])  # (block 0 slot 3, block 1 slot 4, ...)
    inv_freq = 1.0 / 10000 ** (torch.arange(0, D, 2).float() / D)
    angles = torch.arange(64).float()[:, None] * inv_freq[None]
    cos_sin = torch.cat([angles.cos(), angles.sin()], dim=-1)
    return hidden, residual, norm_weight, weight, positions, cos_sin, slots


def caches(dtype):
    # filled (not zeros): the composition zeroes a block at its first slot, the rest must be left as it was
    k = torch.randn(BLOCKS, BLOCK_SIZE, HKV, D).to(dtype)
    return k, torch.randn(BLOCKS, BLOCK_SIZE, HKV, D).to(dtype)


def run_both(ops, dtype, cache_dtype, weight=None, residual_on=True, scales=(1.0, 1.0)):
    hidden, residual, norm_weight, w, positions, cos_sin, slots = operands(dtype)
    weight = w if weight is None else weight
    residual = residual if residual_on else None
    k_fused, v_fused = caches(cache_dtype)
    k_ref, v_ref = k_fused.clone(), v_fused.clone()
    q, res = ops.rms_norm_qkv_rope_cache(hidden, residual, norm_weight, EPS, weight, positions, cos_sin, k_fused,
                                         v_fused, slots, H, HKV, D, *scales)
    qkv, res_ref = ops.rms_norm_linear(hidden, residual, norm_weight, EPS, weight)
    q_ref = ops.qkv_rope_cache(qkv, positions, cos_sin, k_ref, v_ref, slots, H, HKV, D, *scales)
    return (q, res, k_fused, v_fused), (q_ref, res_ref, k_ref, v_ref)


def assert_identical(got, ref):
    for a, b in zip(got, ref):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert torch.equal(a.view(torch.uint8) if a.dtype == FP8_KV else a, b.view(torch.uint8) if b.dtype == FP8_KV
                           else b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("residual_on", [False, True])
def test_cpu_op_is_the_composition(dtype, residual_on):
    got, ref = run_both(CpuOps(), dtype, dtype, residual_on=residual_on)
    assert_identical(got, ref)
    assert got[0].shape == (3, H, D)


def test_cpu_op_with_an_fp8_cache_and_scales():
    got, ref = run_both(CpuOps(), torch.bfloat16, FP8_KV, scales=(0.37, 1.9))
    assert_identical(got, ref)


def test_cpu_op_with_a_quantized_weight():
    hidden, *_ = operands(torch.float32)
    w = pack(quantize_groups(torch.randn((H + 2 * HKV) * D, HIDDEN, generator=torch.Generator().manual_seed(3)), 4))
    got, ref = run_both(CpuOps(), torch.float32, torch.float32, weight=w)
    assert_identical(got, ref)


@pytest.mark.skipif(native.library() is None, reason="native CPU kernels unavailable")
def test_native_cpu_op_is_its_composition():
    from forge.ops.cpu_native import NativeCpuOps

    got, ref = run_both(NativeCpuOps(native.library()), torch.float32, torch.float32)
    assert_identical(got, ref)


# ---- quant_gemm.rope_cache_fits ---------------------------------------------------------------------------------
SHAPES = {"135M": (576, 9, 3, 64), "1B": (2048, 32, 8, 64), "8B": (4096, 32, 8, 128)}  # hidden, H, Hkv, D


def fits(m, hidden_size, heads, kv_heads, d, dtype=torch.bfloat16, cache_dtype=None, weight=None, cos_dtype=None,
         rows=None, cache_shape=None):
    hidden = torch.zeros(m, hidden_size, dtype=dtype)
    rows = rows or (heads + 2 * kv_heads) * d
    weight = torch.zeros(rows, hidden_size, dtype=dtype) if weight is None else weight
    cos_sin = torch.zeros(64, d, dtype=cos_dtype or torch.float32)
    k = torch.zeros(*(cache_shape or (4, 16, kv_heads, d)), dtype=cache_dtype or dtype)
    return quant_gemm.rope_cache_fits(hidden, hidden.clone(), torch.ones(hidden_size, dtype=dtype), weight, cos_sin,
                                      k, k.clone(), heads, kv_heads, d)


def test_rope_cache_fits_the_models():
    for name, (hidden_size, heads, kv_heads, d) in SHAPES.items():
        for m in range(1, 9):
            expect = hidden_size < 4096 or m <= 5  # off a GPU, 48 KB of shared memory (as rms_norm_linear)
            for dtype in (torch.bfloat16, torch.float16):
                assert fits(m, hidden_size, heads, kv_heads, d, dtype=dtype) == expect, (name, m, dtype)
                assert fits(m, hidden_size, heads, kv_heads, d, dtype=dtype, cache_dtype=FP8_KV) == expect


def test_rope_cache_fits_refuses():
    args = (1, 576, 9, 3, 64)
    assert fits(*args)
    assert not fits(1, 576, 3, 1, 80)  # a head's halves are not whole 16-row tiles
    assert not fits(1, 576, 9, 3, 16)
    assert not fits(1, 576, 3, 1, 96)  # whole tiles, but not among ROPE_HEAD_DIMS (spills: quant_gemm.py)
    assert not fits(*args, cos_dtype=torch.bfloat16)  # rope_cache's float32 table only
    assert not fits(*args, cache_dtype=torch.float16)  # the cache in x's dtype (or float8)
    assert not fits(*args, rows=14 * 64)  # the weight is not the heads' qkv
    assert not fits(*args, cache_shape=(4, 16, 3, 32))
    assert not fits(*args, dtype=torch.float32)  # the MMAs take bf16 / fp16
    assert not fits(1, 560, 9, 3, 64)  # K a multiple of 32


def test_rope_cache_fits_layouts():
    from forge.quant.cuda import Fp8CudaWeight, Int4CudaWeight

    w = torch.randn((8 + 2 * 2) * 64, 2048)
    for layout in (Int4CudaWeight.quantize(w), Fp8CudaWeight.quantize(w)):
        assert fits(2, 2048, 8, 2, 64, weight=layout)


# ---- quant_gemm.cu's ROPE_HEAD_DIM index math, mirrored ---------------------------------------------------------
def emulate_writes(m, heads, kv_heads, d, slots, nt=1, warps=8):
    """quant_gemm.cu with ROPE_HEAD_DIM = d, block by block: each lane's accumulators acc[r][t][i] (mma D fragment:
    rows g / g + 8 of row tile r, which starts at row0 + TILE_ROWS r, TILE_ROWS = d / 2; token columns 2c, 2c + 1)
    and, thread by thread, the epilogue's sums red[v] (tile 0) and red[NT * 4 + v] (tile 1) with its (row, token)
    and its two writes. Returns {(target, index): (qkv column of x1, qkv column of x2, token, cos/sin column, which)},
    `which` 0: x1 cos - x2 sin (or v's x1), 1: x2 cos + x1 sin (or v's x2); asserts that no element is written twice."""
    half = d // 2
    n = (heads + 2 * kv_heads) * d
    writes = {}

    def write(key, value):
        assert key not in writes, key
        writes[key] = value

    for bx in range(-(-m // (8 * nt))):
        tok0 = bx * 8 * nt
        for by in range(n // 32):
            row0 = by // (d // 32) * d + 16 * (by % (d // 32))
            acc = {}  # (red index v, lane) -> (weight row, token) the lane's accumulator summed
            for r in range(2):
                for t in range(nt):
                    for i in range(4):
                        for lane in range(32):
                            g, c = lane >> 2, lane & 3
                            weight_row = row0 + half * r + g + 8 * (i >> 1)  # wrow[r][i >> 1]: rows g, g + 8
                            acc[(r * nt + t) * 4 + i, lane] = (weight_row, tok0 + 8 * t + 2 * c + (i & 1))
            head = by // (d // 32)
            for thread in range(warps * 32):
                for idx in range(thread, nt * 4 * 32, warps * 32):
                    v, lane = idx >> 5, idx & 31
                    t, iv = v >> 2, v & 3
                    row = row0 + (lane >> 2) + 8 * (iv >> 1)
                    tok = tok0 + 8 * t + 2 * (lane & 3) + (iv & 1)
                    if tok >= m:
                        continue
                    assert acc[v, lane] == (row, tok) and acc[nt * 4 + v, lane] == (row + half, tok)
                    i = row - head * d
                    assert 0 <= i < half
                    pair = (row, row + half, tok, i)
                    if head < heads:
                        write(("q", (tok, head, i)), (*pair, 0))
                        write(("q", (tok, head, i + half)), (*pair, 1))
                    elif slots[tok] >= 0:
                        target = "k" if head < heads + kv_heads else "v"
                        kh = head - heads - (kv_heads if target == "v" else 0)
                        write((target, (slots[tok], kh, i)), (*pair, 0))
                        write((target, (slots[tok], kh, i + half)), (*pair, 1))
    return writes


def expected_writes(m, heads, kv_heads, d, slots):
    """rope_cache.cu's: q row (t, h) and the k / v rows of token t at its slot (none for slot < 0), element e of
    a head from columns e, e + d/2 of the head's qkv rows, cos / sin column e mod d/2."""
    half = d // 2
    out = {}
    for tok in range(m):
        for head in range(heads + 2 * kv_heads):
            if head >= heads and slots[tok] < 0:
                continue
            target = "q" if head < heads else "k" if head < heads + kv_heads else "v"
            kh = head - heads - (kv_heads if target == "v" else 0)
            for e in range(d):
                i = e % half
                index = (tok, head, e) if target == "q" else (slots[tok], kh, e)
                out[target, index] = (head * d + i, head * d + i + half, tok, i, e // half)
    return out


@pytest.mark.parametrize("name", list(SHAPES))
@pytest.mark.parametrize("m", [1, 3, 8])
def test_rope_epilogue_indexing_emulated(name, m):
    _, heads, kv_heads, d = SHAPES[name]
    slots = [37, -1, 5, 900, -1, 64, 2, 15][:m]  # -1: a padded token (CUDA graphs), never written
    assert emulate_writes(m, heads, kv_heads, d, slots) == expected_writes(m, heads, kv_heads, d, slots)


def test_rope_epilogue_indexing_with_two_token_tiles():
    """(The launcher uses one token tile; the kernel's NT loop is general.)"""
    slots = list(range(13))
    assert emulate_writes(13, 4, 2, 32, slots, nt=2) == expected_writes(13, 4, 2, 32, slots)


# ---- the decoder ------------------------------------------------------------------------------------------------
class CountingOps(CpuOps):
    def __init__(self):
        super().__init__()
        self.calls = {"rms_norm_qkv_rope_cache": 0, "rms_norm_linear": 0, "qkv_rope_cache": 0}

    def rms_norm_qkv_rope_cache(self, *args, **kwargs):
        self.calls["rms_norm_qkv_rope_cache"] += 1
        return super().rms_norm_qkv_rope_cache(*args, **kwargs)

    def rms_norm_linear(self, *args, **kwargs):
        self.calls["rms_norm_linear"] += 1
        return super().rms_norm_linear(*args, **kwargs)

    def qkv_rope_cache(self, *args, **kwargs):
        self.calls["qkv_rope_cache"] += 1
        return super().qkv_rope_cache(*args, **kwargs)


@pytest.mark.parametrize("bias", [False, True])
def test_decoder_uses_the_fused_op_without_a_qkv_bias(bias):
    """Each layer's attention: one rms_norm_qkv_rope_cache (which composes rms_norm_linear + qkv_rope_cache here);
    with a qkv bias (Qwen2) the bias comes between the GEMM and RoPE, so the decoder composes them itself."""
    from forge.models.decoder import DecoderModel
    from forge.ops.metadata import AttentionMetadata
    from tests.util import random_weights, tiny_config

    config = tiny_config(vocab_size=128, family="qwen2" if bias else "llama")
    ops = CountingOps()
    model = DecoderModel(config, random_weights(config, 0), ops, "cpu", torch.float32, max_positions=64)
    assert all((layer.qkv_bias is not None) == bias for layer in model.layers)
    caches = [(torch.zeros(4, 16, config.num_kv_heads, config.head_dim),
               torch.zeros(4, 16, config.num_kv_heads, config.head_dim)) for _ in range(config.num_layers)]
    meta = AttentionMetadata(
        positions=torch.arange(3), slot_mapping=torch.arange(3), query_start_loc=torch.tensor([0, 3], dtype=torch.int32),
        context_lens=torch.tensor([3], dtype=torch.int32), block_tables=torch.zeros(1, 1, dtype=torch.int32),
        max_query_len=3, max_context_len=3, query_lens_cpu=[3], context_lens_cpu=[3],
    )
    model.forward(torch.tensor([5, 6, 7]), meta, caches)
    layers = config.num_layers
    assert ops.calls == {"rms_norm_qkv_rope_cache": 0 if bias else layers, "rms_norm_linear": 2 * layers,
                         "qkv_rope_cache": layers}
    assert all(k.abs().sum() > 0 for k, _ in caches)


def test_pdl_build_of_the_rope_variant_waits_once():
    """FORGE_PDL=1: the RoPE epilogue's reads (positions, slots, cos / sin) and cache writes come after the kernel's
    one griddepcontrol.wait (tests/test_pdl.py checks the source's order for every kernel of quant_gemm.cu)."""
    from tests.test_pdl import nvrtc_ptx

    defines = dict(FORGE_DTYPE=1, WCODE=2, GROUP=0, NORM_PROLOGUE=1, ROPE_HEAD_DIM=128, FORGE_CACHE_DTYPE=3,
                   **quant_gemm.rope_kernel_config(1, 64, 2))
    ptx = nvrtc_ptx("quant_gemm.cu", "sm_90", FORGE_PDL=1, **defines)
    kernels = ptx.count(".entry")
    assert ptx.count("griddepcontrol.wait") == kernels and ptx.count("griddepcontrol.launch_dependents") == kernels
    assert "griddepcontrol" not in nvrtc_ptx("quant_gemm.cu", "sm_90", **defines)
