"""forge/kernels/quant_gemm_pipe.cu's index math and bit tricks, on the CPU: a numpy model of the int4
lop3 / magic-number conversion (every 16-bit pattern), e4m3 -> bf16 / fp16 exactness, the shared-memory
banks of every fragment load, the K split plan, and an emulation of the kernel's data movement (the ring's
copies, each lane's fragment loads, the MMAs' slots, the group folds, the split-K sum) that must reproduce
x @ W.T from the layouts' bytes. The kernel itself: tests/cuda/test_quant_gemm_pipe.py."""

import numpy as np
import pytest
import torch

from forge.kernels import quant_gemm_pipe as pipe
from forge.quant import GroupQuantized
from forge.quant.cuda import Int4CudaWeight, parse_quant_kernel
from tests.host_kernels import fp8_layout

BN, RT, WN, SLAB_K = pipe.BLOCK_ROWS, 2, 4, pipe.SLAB_K
MAGIC2 = {"bf16": 0x43004300, "fp16": 0x64006400}
MAGIC = {"bf16": 128.0, "fp16": 1024.0}


def half_value(bits: np.ndarray, dtype: str) -> np.ndarray:
    """16-bit patterns -> their bf16 / fp16 values (float64)."""
    bits = bits.astype(np.uint32)
    if dtype == "bf16":
        return (bits << 16).astype(np.uint32).view(np.float32).astype(np.float64)
    return bits.astype(np.uint16).view(np.float16).astype(np.float64)


def int4_biased_pair(word: np.ndarray, shift: int, dtype: str) -> tuple[np.ndarray, np.ndarray]:
    """The kernel's lop3 (a & 0x000F000F) | MAGIC2 on word >> shift: the two halves' values."""
    r = ((word.astype(np.uint64) >> shift) & 0x000F000F | MAGIC2[dtype]).astype(np.uint32)
    return half_value(r & 0xFFFF, dtype), half_value(r >> 16, dtype)


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_int4_magic_conversion_gives_magic_plus_code_for_every_pattern(dtype):
    """Every 16-bit pattern in both halves of a word, every pair p (shift 4p): the lop3 result is exactly
    (MAGIC + q_lo, MAGIC + q_hi) with q the nibbles of pair p."""
    lo = np.arange(1 << 16, dtype=np.uint64)
    for hi in (lo, (lo * 40503 + 7) % (1 << 16), lo[::-1].copy()):
        word = lo | (hi << 16)
        for p in range(4):
            a, b = int4_biased_pair(word, 4 * p, dtype)
            assert np.array_equal(a - MAGIC[dtype], ((lo >> (4 * p)) & 15).astype(np.float64))
            assert np.array_equal(b - MAGIC[dtype], ((hi >> (4 * p)) & 15).astype(np.float64))


def test_int4_fold_with_the_magic_bias_is_the_group_sum():
    """s * sum((B + q) x) + (o - B s) * sum(x) = sum((s q + o) x): the bias leaves through the offset."""
    rng = np.random.default_rng(0)
    q, x = rng.integers(0, 16, 128), rng.standard_normal(128)
    s, o = 0.013, -0.11
    for magic in MAGIC.values():
        got = s * np.sum((magic + q) * x) + (o - magic * s) * np.sum(x)
        assert abs(got - np.sum((s * q + o) * x)) < 1e-9


def test_e4m3_codes_are_exact_in_bf16_and_fp16():
    codes = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    finite = codes[~codes.isnan()]
    assert finite.numel() == 254
    for dtype in (torch.bfloat16, torch.float16):  # cvt.rn.f16x2.e4m3x2, then (bf16) through float32
        assert torch.equal(finite.to(dtype).float(), finite)


def test_quant_kernel_switch_values():
    assert parse_quant_kernel(None) == "default" and parse_quant_kernel("") == "default"
    assert parse_quant_kernel(" PIPE ") == "pipe" and parse_quant_kernel("default") == "default"
    with pytest.raises(ValueError):
        parse_quant_kernel("marlin")


def test_split_plan_covers_k_without_empty_splits_and_ignores_m():
    for rows in (96, 4096, 6144, 28672, 14336 * 2):
        for slabs in (1, 2, 5, 32, 112):
            s, per = pipe.split_plan(-(-rows // BN), slabs, 132)
            assert 1 <= s <= pipe.MAX_SPLITS and (s - 1) * per < slabs <= s * per
    # Llama-3.1-8B on an H200: qkv 4, o 4, gate_up 1, down 4 splits
    assert [pipe.split_plan(-(-n // BN), -(-k // SLAB_K), 132)[0] for n, k in
            [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336)]] == [4, 4, 1, 4]
    assert pipe.split_plan(1, 5, 132, splits=4) == (3, 2)  # forced: ceil(5 / 4) = 2 slabs each, 3 splits


@pytest.mark.parametrize("code,group", [(0, 32), (0, 64), (0, 128), (1, 0), (1, 128)])
def test_ring_fits_and_tiles_cover_m(code, group):
    for m in range(1, 65):
        cfg = pipe.tile_config(m)
        assert m <= 8 * cfg["NT"] * cfg["WM"] <= max(8, 2 * m)
        stages = pipe.stages_for(code, group, cfg["WM"], cfg["NT"])
        assert stages >= 3 and stages * pipe.stage_bytes(code, group, cfg["WM"], cfg["NT"]) <= pipe.MAX_SMEM
    assert pipe.stages_for(code, group, 1, 1) == (6 if code == 0 else 4)


# ---- the kernel's shared-memory layout, as quant_gemm_pipe.cu computes it ----

def kernel_consts(code: int, group: int, wm: int, nt: int) -> dict:
    kc = SLAB_K // (128 if code == 0 else 64)
    sb = 4 * (SLAB_K // group) if code == 0 else (4 if group else 0)
    x_pitch = 2 * SLAB_K + (32 if code == 0 else 16)
    return dict(KC=kc, SB=sb, X_PITCH=x_pitch, W_BYTES=kc * BN * 64, S_BYTES=BN * sb, THREADS=128 * wm,
                BM=8 * nt * wm, STAGE=pipe.stage_bytes(code, group, wm, nt))


def phys_row(r, kc):
    return r ^ (kc & 1)


def w_copies(k: dict):
    """Loader's weight copies: (thread, copy, row of the block, chunk of the slab, 16-byte part, stage offset)."""
    for tid in range(k["THREADS"]):
        for i in range(k["W_BYTES"] // 16 // k["THREADS"]):
            piece = tid + i * k["THREADS"]
            r, q = divmod(piece, 4 * k["KC"])
            kc, part = divmod(q, 4)
            yield tid, i, r, kc, part, (kc * BN + phys_row(r, kc)) * 64 + part * 16


def lane_w_offset(k: dict, wn: int, g: int, c: int, kc: int, r: int, h: int) -> int:
    return (kc * BN + phys_row(wn * 32 + g, kc)) * 64 + 16 * c + (16 * r + 8 * h) * 64


def lane_x_offset(k: dict, code: int, wm: int, nt: int, g: int, c: int) -> int:
    return k["W_BYTES"] + k["S_BYTES"] + (wm * nt * 8 + g) * k["X_PITCH"] + (8 if code == 0 else 32) * c


@pytest.mark.parametrize("code", [0, 1])
def test_weight_copies_fill_each_stage_byte_once_and_rows_stay_whole(code):
    k = kernel_consts(code, 128 if code == 0 else 0, 1, 1)
    dst = sorted(off for *_, off in w_copies(k))
    assert dst == list(range(0, k["W_BYTES"], 16))  # a bijection onto the stage's W bytes
    for _, _, r, kc, part, off in w_copies(k):  # where a lane looks for row r's part of chunk kc
        wn, rest = divmod(r, 32)
        rt, rest = divmod(rest, 16)
        h, g = divmod(rest, 8)
        assert lane_w_offset(k, wn, g, part, kc, rt, h) == off
    # one warp-wide copy (i = 0 of threads 0..31) takes whole rows: 16-byte parts q = 0 .. 4 KC - 1 of a row,
    # global bytes 16 q (chunk q // 4, part q % 4): 64 KC contiguous bytes
    warp_copy = [divmod(tid, 4 * k["KC"]) for tid in range(32)]
    for row in {r for r, _ in warp_copy}:
        assert sorted(q for r, q in warp_copy if r == row) == list(range(4 * k["KC"]))


def conflicts(addresses: list[int], width: int) -> int:
    """Extra shared-memory wavefronts of one load instruction: per phase (128 bytes of requests), the most
    distinct 4-byte words that fall in one bank, minus one."""
    per_phase = 128 // width
    extra = 0
    for p in range(0, len(addresses), per_phase):
        banks: dict[int, set] = {}
        for a in addresses[p: p + per_phase]:
            for word in range(a // 4, (a + width) // 4):
                banks.setdefault(word % 32, set()).add(word)
        extra += max(len(v) for v in banks.values()) - 1
    return extra


@pytest.mark.parametrize("code,wm,nt", [(0, 1, 1), (0, 1, 4), (0, 2, 4), (1, 1, 2), (1, 1, 4), (1, 2, 4)])
def test_fragment_loads_have_no_bank_conflicts(code, wm, nt):
    k = kernel_consts(code, 128 if code == 0 else 0, wm, nt)
    lanes = [(lane >> 2, lane & 3) for lane in range(32)]
    for wn in range(WN):
        for kc in range(k["KC"]):
            for r in range(RT):
                for h in range(2):
                    assert conflicts([lane_w_offset(k, wn, g, c, kc, r, h) for g, c in lanes], 16) == 0
    for w in range(wm):
        for t in range(nt):
            base = [lane_x_offset(k, code, w, nt, g, c) + t * 8 * k["X_PITCH"] for g, c in lanes]
            if code == 0:  # 8 bytes per k-tile j
                for j in range(8):
                    assert conflicts([b + 32 * j for b in base], 8) == 0
            else:  # 16 bytes per two k-tiles
                for kc in range(2):
                    for jj in range(2):
                        assert conflicts([b + 2 * (kc * 64 + 8 * jj) for b in base], 16) == 0
    # the weight copies' shared-memory stores (fp8: the two chunks' rows swapped in pairs), 8 threads a phase
    for i in range(k["W_BYTES"] // 16 // k["THREADS"]):
        assert conflicts([off for tid, i_, *_, off in w_copies(k) if i_ == i], 16) == 0


# ---- emulation: the kernel's data movement on the layouts' bytes ----

FP8_TABLE = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).double().numpy()


def emulate(layout, x: torch.Tensor, dtype: str = "bf16", splits: int | None = None) -> np.ndarray:
    """out [M, N] (float64, before rounding) as quant_gemm_pipe.cu computes it, from the layout's bytes."""
    code, group = layout.code, layout.group
    n, kx = layout.shape
    rows, m = layout.codes.shape[0], x.shape[0]
    wbytes = layout.codes.contiguous().view(torch.uint8).numpy().reshape(rows, -1)
    if code == 0:
        sbytes = layout.scales.contiguous().view(torch.uint8).numpy().reshape(rows, -1)
    else:
        sbytes = layout.scales.float().contiguous().view(torch.uint8).numpy().reshape(rows, -1)
    xbits = (x.bfloat16() if dtype == "bf16" else x.half()).view(torch.int16).numpy().view(np.uint16)
    cfg = pipe.tile_config(m)
    wm, nt = cfg["WM"], cfg["NT"]
    k = kernel_consts(code, group, wm, nt)
    kc_n, sb, xp, bm = k["KC"], k["SB"], k["X_PITCH"], k["BM"]
    nchunks = layout.padded_k // (128 if code == 0 else 64)
    slabs = -(-layout.padded_k // SLAB_K)
    row_blocks = -(-rows // BN)
    s_count, per = pipe.split_plan(row_blocks, slabs, 132, splits)
    fold_kt = group // 16 if code == 0 else SLAB_K // 16
    out = np.zeros((m, n))
    lane_g, lane_c = np.arange(32) >> 2, np.arange(32) & 3
    for tb in range(-(-m // bm)):
        tok0 = tb * bm
        for rb in range(row_blocks):
            row0 = rb * BN
            partials = []
            for z in range(s_count):
                acc = np.zeros((WN * wm, RT, nt, 16, 8))  # [warp, row tile, token tile, row, token]
                part = np.zeros_like(acc)
                xsum = np.zeros((WN * wm, nt, 8))
                for slab in range(z * per, min(z * per + per, slabs)):
                    st = np.zeros(k["STAGE"], dtype=np.uint8)
                    for _, _, r, kc, p_, off in w_copies(k):
                        row, chunk = row0 + r, slab * kc_n + kc
                        if row < rows and chunk < nchunks:
                            st[off: off + 16] = wbytes[row, chunk * 64 + p_ * 16: chunk * 64 + p_ * 16 + 16]
                    for t in range(BN if sb else 0):
                        if row0 + t < rows:
                            st[k["W_BYTES"] + t * sb: k["W_BYTES"] + (t + 1) * sb] = \
                                sbytes[row0 + t, slab * sb: slab * sb + sb]
                    for piece in range(bm * 16):
                        t, u = divmod(piece, 16)
                        tok, kk = tok0 + t, slab * SLAB_K + 8 * u
                        if tok < m and kk < kx:
                            off = k["W_BYTES"] + k["S_BYTES"] + t * xp + 16 * u
                            st[off: off + 16] = xbits[tok, kk: kk + 8].view(np.uint8)
                    for warp in range(WN * wm):
                        wn, wmi = warp % WN, warp // WN
                        x_lane = lane_x_offset(k, code, wmi, nt, lane_g, lane_c)
                        for kc in range(kc_n):
                            wv = np.stack([[np.stack([st[o: o + 16].view(np.uint32) for o in
                                                      lane_w_offset(k, wn, lane_g, lane_c, kc, r, h)])
                                            for h in range(2)] for r in range(RT)])  # [r, h, lane, 4 words]
                            for j in range(8 if code == 0 else 4):
                                # B fragments: [token tile, lane, 4 values] (b0 = values 0, 1; b1 = 2, 3)
                                if code == 0:
                                    offs = x_lane[None] + np.arange(nt)[:, None] * 8 * xp + 32 * j
                                else:
                                    offs = (x_lane[None] + np.arange(nt)[:, None] * 8 * xp
                                            + 2 * (kc * 64 + 8 * (j // 2)) + 8 * (j % 2))
                                bvals = half_value(np.stack([[st[o: o + 8].view(np.uint16) for o in row]
                                                             for row in offs]), dtype)
                                B = np.zeros((nt, 16, 8))
                                for e in range(2):
                                    B[:, 2 * lane_c + e, lane_g] = bvals[:, :, e]
                                    B[:, 2 * lane_c + 8 + e, lane_g] = bvals[:, :, 2 + e]
                                kt = kc * 4 + j  # k-tile within the slab
                                first = kt % fold_kt == 0
                                if code == 0:
                                    xsum[warp] = (0 if first else xsum[warp]) + B.sum(1)
                                for r in range(RT):
                                    A = np.zeros((16, 16))
                                    lo, hi = wv[r, 0, :, j >> 1 if code == 0 else j], wv[r, 1, :, j >> 1 if code == 0 else j]
                                    if code == 0:
                                        sh = (j & 1) * 8
                                        regs = [int4_biased_pair(lo, sh, dtype), int4_biased_pair(hi, sh, dtype),
                                                int4_biased_pair(lo, sh + 4, dtype), int4_biased_pair(hi, sh + 4, dtype)]
                                    else:
                                        regs = [(FP8_TABLE[w & 255], FP8_TABLE[(w >> 8) & 255]) for w in
                                                (lo & 0xFFFF, hi & 0xFFFF, lo >> 16, hi >> 16)]
                                    for e in range(2):
                                        A[lane_g, 2 * lane_c + e] = regs[0][e]
                                        A[lane_g + 8, 2 * lane_c + e] = regs[1][e]
                                        A[lane_g, 2 * lane_c + 8 + e] = regs[2][e]
                                        A[lane_g + 8, 2 * lane_c + 8 + e] = regs[3][e]
                                    prod = np.einsum("rk,tkn->trn", A, B)
                                    if code == 1 and group == 0:
                                        acc[warp, r] += prod
                                    else:
                                        part[warp, r] = (0 if first else part[warp, r]) + prod
                                if code == 0 and (kt + 1) % fold_kt == 0:
                                    grp = kt // fold_kt
                                    for r in range(RT):
                                        trow = wn * 32 + 16 * r + np.arange(16)  # the tile's rows in the block
                                        so = np.stack([st[k["W_BYTES"] + q * sb + 4 * grp:
                                                          k["W_BYTES"] + q * sb + 4 * grp + 4].view(np.float16)
                                                       for q in trow]).astype(np.float64)
                                        s, o = so[:, 0], so[:, 1] - MAGIC[dtype] * so[:, 0]
                                        acc[warp, r] += (s[None, :, None] * part[warp, r]
                                                         + o[None, :, None] * xsum[warp][:, None, :])
                        if code == 1 and group:
                            for r in range(RT):
                                trow = wn * 32 + 16 * r + np.arange(16)
                                s = np.array([st[k["W_BYTES"] + q * sb: k["W_BYTES"] + q * sb + 4].view(np.float32)[0]
                                              for q in trow], dtype=np.float64)
                                acc[warp, r] += s[None, :, None] * part[warp, r]
                # the block's tile [token, row] from the warps' fragments
                tile = np.zeros((bm, BN))
                for warp in range(WN * wm):
                    wn, wmi = warp % WN, warp // WN
                    for r in range(RT):
                        for t in range(nt):
                            tok = wmi * nt * 8 + 8 * t
                            tile[tok: tok + 8, wn * 32 + 16 * r: wn * 32 + 16 * r + 16] = acc[warp, r, t].T
                partials.append(tile)
            total = partials[0].copy()
            for p_ in partials[1:]:
                total += p_
            if code == 1 and group == 0:
                row_scale = np.zeros(BN)
                row_scale[: min(BN, rows - row0)] = layout.scales.float().numpy()[row0: row0 + BN]
                total *= row_scale[None]
            hi_t, hi_r = min(bm, m - tok0), min(BN, n - row0)
            out[tok0: tok0 + hi_t, row0: row0 + hi_r] = total[:hi_t, :hi_r]
    return out


def int4_layout(n, k, per, seed=0):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 16, (n, k), generator=g, dtype=torch.uint8)
    if per == 64:  # no checkpoint format has groups of 64: packed directly
        scale = (torch.rand(n, k // 64, generator=g) * 0.02 + 1e-3).half().float()
        return Int4CudaWeight.pack(codes, scale, (torch.randn(n, k // 64, generator=g) * 0.1).half().float(), 64)
    scale = (torch.rand(n, k // per, generator=g) * 0.02 + 1e-3).half().float().repeat_interleave(per // 32, 1)
    offset = (torch.randn(n, k // per, generator=g) * 0.1).half().float().repeat_interleave(per // 32, 1)
    return Int4CudaWeight.from_groups(GroupQuantized(codes, scale, offset, 4), "cpu")


@pytest.mark.parametrize("case", [
    ("int4", 160, 576, 32, 11, None, "bf16"),   # K padded 576 -> 640, a half-empty second row block
    ("int4", 96, 1024, 128, 1, None, "fp16"),
    ("int4", 64, 512, 128, 70, 3, "bf16"),      # two token blocks (64 + 6), three K splits
    ("int4", 32, 768, 64, 40, None, "bf16"),    # groups of 64, 2 x 4 token tiles
    ("int4", 48, 256, 32, 29, 2, "fp16"),       # 1 x 4 token tiles
    ("fp8", 96, 576, 0, 5, 2, "bf16"),          # 9 chunks: the last slab's second chunk zero-filled
    ("fp8", 64, 512, 128, 17, None, "fp16"),
])
def test_emulated_kernel_reproduces_the_product(case):
    kind, n, k, group, m, splits, dtype = case
    layout = int4_layout(n, k, group) if kind == "int4" else fp8_layout(n, k, group)
    assert layout.group == group
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(1))
    x = (x.bfloat16() if dtype == "bf16" else x.half()).double()
    got = emulate(layout, x.float(), dtype, splits)
    ref = (x @ layout.dequantize().double().T).numpy()
    # float64 sums of the same products; fp8's reference multiplies float32-rounded w = code * s (2^-24):
    # a misplaced byte or slot would be off by O(|ref|)
    np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-5 * np.abs(ref).max())


def test_matmul_routes_to_the_pipe_kernel_only_when_switched_on(monkeypatch):
    """FORGE_QUANT_KERNEL=pipe (the module's QUANT_KERNEL) sends steps of up to PIPE_MAX_M tokens to
    quant_gemm_pipe; off, and above it, the paths are as before."""
    import forge.quant.cuda as quant_cuda

    calls = []
    monkeypatch.setattr(quant_cuda.quant_gemm_pipe, "gemm", lambda x, w: calls.append(("pipe", x.shape[0])))
    monkeypatch.setattr(quant_cuda.quant_gemm, "gemm", lambda x, w: calls.append(("kernel", x.shape[0])))
    monkeypatch.setattr(quant_cuda.quant_gemm, "int4_dequantize", lambda w, dtype: torch.zeros(w.shape, dtype=dtype))
    monkeypatch.setattr(quant_cuda, "scaled_mm_rowwise", lambda x, codes, s: calls.append(("scaled_mm", x.shape[0])))
    int4, fp8 = int4_layout(32, 256, 32), fp8_layout(32, 256, 0)
    for switch, expect in (("default", [("kernel", 1), ("kernel", 64), ("kernel", 1), ("kernel", 16),
                                        ("scaled_mm", 64)]),
                           ("pipe", [("pipe", 1), ("pipe", 64), ("pipe", 128), ("pipe", 1), ("pipe", 64),
                                     ("scaled_mm", 65)])):
        monkeypatch.setattr(quant_cuda, "QUANT_KERNEL", switch)
        calls.clear()
        for m in (1, 64, 128):  # int4 at 128 tokens off: dequantized + cuBLAS (not recorded)
            int4.matmul(torch.zeros(m, 256))
        for m in ((1, 64, 65) if switch == "pipe" else (1, 16, 64)):
            fp8.matmul(torch.zeros(m, 256))
        assert calls == expect, (switch, calls)


def _stub_launches(monkeypatch) -> list:
    """gemm's compiler calls recorded instead of run (CPU): ("smem", kernel, bytes) and ("run", grid, block,
    args, shmem)."""
    calls = []
    monkeypatch.setattr(pipe.compiler, "num_sms", lambda: 132)
    monkeypatch.setattr(pipe, "_tickets_for", lambda device: torch.zeros(pipe.MAX_TICKETS, dtype=torch.int32))
    monkeypatch.setattr(pipe.compiler, "get_kernel", lambda *a, **d: ("kernel", d))
    monkeypatch.setattr(pipe.compiler, "allow_dynamic_smem", lambda k, n: calls.append(("smem", k, n)))
    monkeypatch.setattr(pipe.compiler, "run", lambda k, grid, block, *args, shmem=0:
                        calls.append(("run", grid, block, args, shmem)))
    return calls


def test_gemm_hands_the_kernel_16_byte_aligned_x(monkeypatch):
    """A contiguous x at an odd offset (contiguous() returns it as it is) is copied: the kernel's 16-byte
    cp.async of x rows would fault on it."""
    calls = _stub_launches(monkeypatch)
    layout = int4_layout(32, 256, 128)
    storage = torch.randn(2 * 256 + 3).bfloat16()
    for x in (storage[3: 3 + 256].view(1, 256), storage[3: 3 + 512].view(2, 256), storage[:512].view(2, 256)):
        calls.clear()
        pipe.gemm(x, layout)
        (_, _, _, args, _), = [c for c in calls if c[0] == "run"]
        assert int(args[1]) % 16 == 0 and int(args[15]) % 8 == 0  # x's pointer; its row stride (ldx)


def test_gemm_launches_the_plan_and_opts_in_through_the_compiler(monkeypatch):
    """One shared-memory opt-in (compiler.allow_dynamic_smem) for exactly the plan's bytes, which the launch
    asks for; grid, block and K split as launch_plan says."""
    calls = _stub_launches(monkeypatch)
    for layout, m in ((int4_layout(160, 576, 32), 11), (fp8_layout(96, 576, 0), 40)):
        calls.clear()
        pipe.gemm(torch.randn(m, layout.shape[1]).bfloat16(), layout, splits=2)
        plan = pipe.launch_plan(layout, m, 132, splits=2)
        (smem,), (run,) = [c for c in calls if c[0] == "smem"], [c for c in calls if c[0] == "run"]
        assert smem[1] == ("kernel", plan.defines) and smem[2] == plan.smem == run[4] > 48 * 1024
        assert run[1] == plan.grid and run[2] == plan.threads and int(run[3][12]) == plan.splits == 2


def test_split_tickets_are_not_first_allocated_inside_a_graph_capture(monkeypatch):
    """Allocated (and zeroed) inside a capture, the counters would be zeroed only when the graph replays:
    an eager launch before that would read garbage tickets."""
    monkeypatch.setattr(pipe, "_tickets", {})
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    with pytest.raises(RuntimeError, match="capture"):
        pipe._tickets_for(torch.device("cuda", 0))
