"""The CUDA weight layouts' packing (forge.quant.cuda), checked on the CPU: exact round trips, and the
codes each kernel lane reads (quant_gemm.cu's indexing, emulated here) are the inputs the kernel's x
fragment multiplies them with. The kernels themselves: tests/cuda/test_quant_gemm.py."""

import torch

from forge.quant import GroupQuantized
from forge.quant.cuda import FP8, Fp8CudaWeight, Int4CudaWeight


def random_groups(n: int, k: int, seed: int = 0, per: int = 32) -> GroupQuantized:
    """4-bit codes with float16-exact scales and offsets (as GGUF Q4_1 blocks decode), one pair per `per` inputs."""
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 16, (n, k), generator=g, dtype=torch.uint8)
    scale = (torch.rand(n, k // per, generator=g) * 0.01 + 1e-3).half().float()
    offset = (torch.randn(n, k // per, generator=g) * 0.05).half().float()
    return GroupQuantized(codes, scale.repeat_interleave(per // 32, 1), offset.repeat_interleave(per // 32, 1), 4)


def test_int4_repack_is_exact_with_groups_of_32_and_128():
    for n, k, per, group in [(48, 576, 32, 32), (40, 1024, 128, 128), (33, 256, 32, 32)]:
        g = random_groups(n, k, per=per)
        w = Int4CudaWeight.from_groups(g, "cpu")
        assert w.group == group and w.shape == (n, k)
        assert w.codes.shape == (-(-n // 32) * 32, -(-k // 128) * 128 // 8)
        assert torch.equal(w.dequantize(), g.dequantize())  # s * q + o, the same two roundings as the source
        assert w.nbytes == w.codes.numel() * 4 + w.scales.numel() * 2


def test_int4_layout_lane_reads_match_the_kernels_inputs():
    """Emulate quant_gemm.cu: lane (g, c) of row tile r reads 16 bytes at 16 c of each 64-byte chunk of
    rows 16 r + g and + 8; k-tile j takes word j // 2, pairs 2 (j % 2) and 2 (j % 2) + 1 for inputs
    16 j + 4 c + i. Every (row, input) must come out as the source code."""
    n, k = 32, 384
    g = random_groups(n, k, seed=1)
    w = Int4CudaWeight.from_groups(g, "cpu")
    raw = w.codes.view(torch.uint8).view(w.codes.shape[0], -1)  # bytes of each row
    seen = torch.full((n, k), -1, dtype=torch.int32)
    for row in range(n):
        for chunk in range(k // 128):
            for c in range(4):
                lane_bytes = raw[row, chunk * 64 + 16 * c: chunk * 64 + 16 * c + 16]
                words = lane_bytes.view(torch.int32)
                for j in range(8):
                    word = int(words[j // 2]) & 0xFFFFFFFF
                    for i in range(4):
                        p = 2 * (j % 2) + i // 2
                        code = (word >> (4 * p + 16 * (i % 2))) & 15
                        seen[row, chunk * 128 + 16 * j + 4 * c + i] = code
    assert torch.equal(seen, g.codes.int())


def test_int4_quantize_rounds_to_the_nearest_level():
    w = torch.randn(64, 256, generator=torch.Generator().manual_seed(2))
    q = Int4CudaWeight.quantize(w, group=128)
    step = (w.view(64, 2, 128).amax(-1) - w.view(64, 2, 128).amin(-1)) / 15
    err = (q.dequantize() - w).abs().view(64, 2, 128).amax(-1)
    assert torch.all(err <= step * 0.5 + step * 2e-3 + 1e-6)  # half a level, + the float16 scale's rounding


def test_fp8_layout_is_row_major_with_row_scales():
    w = torch.randn(50, 192, generator=torch.Generator().manual_seed(3))
    q = Fp8CudaWeight.quantize(w)
    assert q.codes.dtype == FP8 and q.codes.shape == (64, 192) and q.group == 0
    rel = (q.dequantize() - w).abs() / w.abs().amax(1, keepdim=True)
    assert rel.max() <= 2 ** -4 * 1.01  # e4m3: 3 mantissa bits; every row's amax maps to 448
    assert torch.equal(q.codes[:50].float() * q.scales[:50, None], q.dequantize())
    assert not Fp8CudaWeight.supports((8, 96)) and Fp8CudaWeight.supports((8, 128))


def test_fp8_row_scale_is_the_least_squares_candidate():
    """Each row's scale is the best of amax / 448 * 2^(j / 8): never worse than amax / 448 alone, and better
    on most rows of random weights; nothing is clipped (the largest weight keeps its magnitude to e4m3's step)."""
    from forge.quant.cuda import FP8_MAX, SCALE_STEPS

    w = torch.randn(64, 256, generator=torch.Generator().manual_seed(4))
    w[:, 0] *= 8  # an outlier column, as real layers have
    q = Fp8CudaWeight.quantize(w)
    base = w.abs().amax(1) / FP8_MAX
    candidates = base[:, None] * 2.0 ** (torch.arange(SCALE_STEPS) / SCALE_STEPS)
    chosen = q.scales[:64]
    assert torch.all((candidates - chosen[:, None]).abs().amin(1) <= 1e-6 * chosen)
    err = (q.dequantize() - w).square().sum(1)
    plain = ((w / base[:, None]).to(FP8).float() * base[:, None] - w).square().sum(1)
    for j in range(SCALE_STEPS):
        s = candidates[:, j : j + 1]
        assert torch.all(err <= ((w / s).to(FP8).float() * s - w).square().sum(1) * (1 + 1e-6))
    assert (err < plain).float().mean() > 0.5 and err.sum() < 0.9 * plain.sum()
    assert torch.all((q.dequantize().abs().amax(1) - w.abs().amax(1)).abs() <= w.abs().amax(1) * 2 ** -4)


def test_fp8_block_scales_from_a_checkpoint():
    from forge.quant import Fp8Quantized

    g = torch.Generator().manual_seed(4)
    codes = (torch.randn(40, 256, generator=g) * 50).clamp(-448, 448).to(FP8)
    scale = torch.rand(40, 2, generator=g) + 0.1
    q = Fp8CudaWeight.from_quantized(Fp8Quantized(codes, scale, 128), "cpu")
    assert q.group == 128 and torch.equal(q.dequantize(), Fp8Quantized(codes, scale, 128).dequantize())
    per_row = Fp8CudaWeight.from_quantized(Fp8Quantized(codes, scale[:, :1], 256), "cpu")
    assert per_row.group == 0 and torch.equal(per_row.dequantize(), codes.float() * scale[:, :1])


def test_quant_gemm_launchers_hand_their_kernels_aligned_rows(monkeypatch):
    """quant_gemm.gemm and fp8_quantize_rows read x in vector loads: a contiguous x at an odd offset (which
    contiguous() returns as it is) is copied to an aligned one, as are strided views; aligned rows are read in
    place."""
    from forge.kernels import compiler, quant_gemm

    runs = []
    monkeypatch.setattr(compiler, "get_kernel", lambda *a, **d: "kernel")
    monkeypatch.setattr(compiler, "run", lambda kernel, grid, block, *args, shmem=0: runs.append(args))
    layout = Int4CudaWeight.from_groups(random_groups(32, 256), "cpu")
    storage = torch.randn(4 * 256 + 3).bfloat16()
    views = (storage[3: 3 + 256].view(1, 256), storage[3: 3 + 512].view(2, 256), storage[:1024].view(2, 512)[:, :256])
    for x in views:
        runs.clear()
        quant_gemm.gemm(x, layout)
        quant_gemm.fp8_quantize_rows(x)
        (gemm_args, quantize_args) = runs
        for ptr, stride, multiple in ((gemm_args[1], gemm_args[10], 4), (quantize_args[2], quantize_args[4], 8)):
            assert int(ptr) % 16 == 0 and int(stride) % multiple == 0
    aligned = storage[:512].view(2, 256)
    runs.clear()
    quant_gemm.gemm(aligned, layout)
    assert int(runs[0][1]) == aligned.data_ptr()  # read in place
