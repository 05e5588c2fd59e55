"""forge/kernels/quant_gemm_pipe.cu (int4 / fp8 weights through a cp.async ring) against the float32 product
with the layout's exact dequantized weight, against quant_gemm.cu, in CUDA graphs, and batch-invariant. The
index math and bit tricks are also checked on the CPU: tests/test_quant_gemm_pipe.py."""

import pytest
import torch

import forge.quant.cuda as quant_cuda
from forge import LLM, SamplingParams
from forge.kernels import quant_gemm, quant_gemm_pipe
from forge.quant.cuda import Fp8CudaWeight, Int4CudaWeight
from tests.cuda.test_quant_gemm import fp8_layout, int4_layout
from tests.util import default_tokenizer, forward_logits, make_random_model_dir

pytestmark = pytest.mark.cuda
DEV = torch.device("cuda")
MS = (1, 2, 3, 7, 8, 9, 13, 16, 17, 31, 32, 33, 45, 63, 64, 65, 100, 128)


def check(layout, x, **config):
    """The kernel vs x @ W.T in float32 with W the layout's exact weight: it multiplies exact weights in
    float32 (int4: s * sum((B + q) x) + (o - B s) * sum(x), B = 128 / 1024: the bias costs at most
    2^-24 * B * |s sum(x)| per group, far below the output's rounding), so what differs is the summation
    order and the output's rounding to x's dtype (2^-9 / 2^-12): tolerance 1% of the mean |out| plus 2^-7
    relative, as tests/cuda/test_quant_gemm.py."""
    out = quant_gemm_pipe.gemm(x, layout, **config)
    ref = x.float() @ layout.dequantize().T
    assert out.shape == (x.shape[0], layout.shape[0]) and out.dtype == x.dtype
    torch.testing.assert_close(out.float(), ref, rtol=2 ** -7, atol=1e-2 * ref.abs().mean().item())
    return out


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind,group", [("int4", 32), ("int4", 64), ("int4", 128), ("fp8", 0), ("fp8", 128)])
@pytest.mark.parametrize("n,k", [(96, 576), (256, 1024), (80, 4096), (33, 256), (160, 640)])
def test_pipe_matches_dequantized_weight(kind, group, n, k, dtype):
    if group and k % group or kind == "fp8" and k % 64:
        pytest.skip("groups must tile K (fp8: K a multiple of 64)")
    layout = int4_layout(n, k, group) if kind == "int4" else fp8_layout(n, k, group)
    g = torch.Generator(device=DEV).manual_seed(1)
    x = torch.randn(max(MS), k, generator=g, device=DEV).to(dtype)
    for m in MS:
        check(layout, x[:m])


@pytest.mark.parametrize("kind", ["int4", "fp8"])
def test_pipe_agrees_with_quant_gemm_and_every_split_and_ring(kind):
    layout = int4_layout(512, 2048, 128) if kind == "int4" else fp8_layout(512, 2048, 0)
    x = torch.randn(40, 2048, device=DEV).bfloat16()
    old = quant_gemm.gemm(x, layout).float()
    ref = x.float() @ layout.dequantize().T
    tol = dict(rtol=2 ** -7, atol=1e-2 * ref.abs().mean().item())
    for splits in (1, 2, 3, 4, 16):
        for stages in (2, 3, 4, 6):
            out = check(layout, x, splits=splits, stages=stages)
            torch.testing.assert_close(out.float(), old, **tol)
            if stages != 2:  # the ring's depth never changes the sums
                assert torch.equal(out, quant_gemm_pipe.gemm(x, layout, splits=splits, stages=2))


def test_pipe_rows_do_not_depend_on_the_batch():
    """A token's output is the same bits alone or in any batch: the tiling changes with M, the K split and
    each token's sums do not (more than 64 tokens: more token blocks)."""
    for layout in (int4_layout(192, 1536, 32), int4_layout(4096, 1024, 128), fp8_layout(192, 1536, 0),
                   fp8_layout(4096, 1024, 128)):
        x = torch.randn(130, layout.shape[1], device=DEV).bfloat16()
        full = quant_gemm_pipe.gemm(x, layout)
        for m in (1, 5, 8, 9, 16, 17, 32, 33, 64, 65, 129):
            assert torch.equal(quant_gemm_pipe.gemm(x[:m], layout), full[:m]), m


def test_pipe_e4m3_and_int4_codes_are_exact():
    """One-hot rows of x read single weights back: every finite e4m3 code and every int4 code, exactly."""
    codes = torch.arange(256, dtype=torch.uint8)
    codes[codes == 0x7F] = 0
    codes[codes == 0xFF] = 0  # the two NaNs
    w = torch.stack([codes.roll(17 * r) for r in range(32)]).view(torch.float8_e4m3fn).to(DEV)
    fp8 = Fp8CudaWeight.from_codes(w, torch.ones(32, device=DEV), 0)
    q = torch.stack([(torch.arange(256) + r) % 16 for r in range(32)]).to(torch.uint8).to(DEV)
    one, zero = torch.ones(32, 2, device=DEV), torch.zeros(32, 2, device=DEV)
    int4 = Int4CudaWeight.pack(q, one, zero, 128)
    for dtype in (torch.bfloat16, torch.float16):
        for k0 in range(0, 256, 64):
            x = torch.eye(256, device=DEV, dtype=dtype)[k0: k0 + 64]
            assert torch.equal(quant_gemm_pipe.gemm(x, fp8).float(), w.float()[:, k0: k0 + 64].T)
            assert torch.equal(quant_gemm_pipe.gemm(x, int4).float(), q.float()[:, k0: k0 + 64].T)


def test_pipe_reads_x_at_an_odd_offset_and_strided():
    """A contiguous x whose first element is not 16-byte aligned (the launcher copies it) and x rows a column
    slice apart (read in place, ldx = the slice's row stride) give the contiguous x's bits."""
    layout = int4_layout(256, 1024, 128)
    storage = torch.randn(4 * 1024 + 8, device=DEV).bfloat16()
    for m in (1, 4):
        x = storage[3: 3 + m * 1024].view(m, 1024)
        assert torch.equal(quant_gemm_pipe.gemm(x, layout), quant_gemm_pipe.gemm(x.clone(), layout))
    wide = torch.randn(9, 1024 + 64, device=DEV).bfloat16()
    assert torch.equal(quant_gemm_pipe.gemm(wide[:, 64:], layout), quant_gemm_pipe.gemm(wide[:, 64:].clone(), layout))


def test_pipe_in_a_cuda_graph_with_split_tickets():
    """Graph replays equal eager runs; split-K tickets are reset by each launch (repeated calls, replays and
    another shape in between give the same bits)."""
    layout = int4_layout(128, 4096, 32)
    other = fp8_layout(256, 2048, 0)
    x = torch.randn(4, 4096, device=DEV).bfloat16()
    eager = quant_gemm_pipe.gemm(x, layout, splits=4)
    for _ in range(3):
        assert torch.equal(quant_gemm_pipe.gemm(x, layout, splits=4), eager)
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        quant_gemm_pipe.gemm(x, layout, splits=4)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = quant_gemm_pipe.gemm(x, layout, splits=4)
    for _ in range(3):
        graph.replay()
        quant_gemm_pipe.gemm(torch.randn(9, 2048, device=DEV).bfloat16(), other, splits=3)
    torch.cuda.synchronize()
    assert torch.equal(out, eager)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_random_model_dir(tmp_path_factory.mktemp("quant_pipe"), default_tokenizer(), seed=3,
                                 hidden_size=256, intermediate_size=768, num_layers=3, num_heads=4, num_kv_heads=2,
                                 head_dim=64)


@pytest.mark.parametrize("quantization", ["int4", "fp8"])
def test_model_with_the_pipe_kernel(model_dir, quantization, monkeypatch):
    """FORGE_QUANT_KERNEL=pipe (the module switch): a prefill runs the pipe kernel in every quantized linear;
    its logits match the default kernels' and greedy decoding runs. The default kernels are weight-only up to
    64 (int4) / 16 (fp8) tokens, W8A8 (scaled_mm) above: fp8 is compared at 16 tokens, int4 at 40 with its fp8
    lm_head kept on the default path (W8A8 at 40 tokens: x in e4m3 alone moves the logits ~2.5%)."""
    ids = default_tokenizer().encode("The quick brown fox jumps over the lazy dog. " * 8)[: 40 if quantization == "int4"
                                                                                          else 16]
    llm = LLM(str(model_dir), device="cuda", quantization=quantization, num_kv_blocks=64, enforce_eager=True)
    runner = llm.llm_engine.runner
    ref = forward_logits(runner, ids).float()
    monkeypatch.setattr(quant_cuda, "QUANT_KERNEL", "pipe")
    if quantization == "int4":
        monkeypatch.setitem(quant_cuda.PIPE_MAX_M, 1, 0)
    got = forward_logits(runner, ids).float()
    assert ((got - ref).norm() / ref.norm()).item() < 2e-2  # same exact weights, other sums: bf16 rounding flips
    out = llm.generate([{"prompt_token_ids": ids}], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    assert len(out[0].outputs[0].token_ids) == 8
