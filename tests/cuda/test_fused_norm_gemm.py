"""quant_gemm.cu's NORM_PROLOGUE / ACT variants (ops.rms_norm_linear in one launch: residual add + RMSNorm
on load, SiLU / GELU-tanh x up on store) and its float-weight GEMM (WCODE 2), against norm.cu, cuBLAS in
float32 and CpuOps; the decoder with FORGE_FUSED_NORM_GEMM=1 against the default composition.

Tolerances. The prologue repeats norm.cu's arithmetic in its order, so x (seen through an identity weight),
residual_out and every product with the same kernel configuration are compared bit for bit. Against a
float32 product (cuBLAS or torch), what differs is the order of K float32 additions (relative ~K * 2^-24 of
the row's |x| |w|, far below the output's rounding) and the output's rounding to bf16 / fp16 (one ulp, <=
2^-8 / 2^-11 relative), which can flip by one ulp when the sums differ: rtol 2^-7 (one bf16 ulp), atol
1e-2 x the reference's mean magnitude (outputs near zero, where relative error means nothing). With act,
gate and up are each rounded before the activation and the product (as silu_mul does): rtol 2^-6.
"""

import pytest
import torch

from forge import LLM, SamplingParams
from forge.kernels import activation, compiler, norm, quant_gemm
from forge.ops.cpu import CpuOps
from forge.ops.cuda import FUSED_NORM_GEMM_ENV, CudaOps
from forge.quant.cuda import Fp8CudaWeight, Int4CudaWeight
from tests.util import default_tokenizer, make_random_model_dir

pytestmark = pytest.mark.cuda
DEV = torch.device("cuda")
EPS = 1e-5
HIDDEN_SIZES = (576, 2048, 4096)  # SmolLM2-135M, Llama-3.2-1B, Llama-3.1-8B


def operands(m, k, dtype, seed=0, residual=True, norm_dtype=None):
    g = torch.Generator(device=DEV).manual_seed(seed)
    hidden = torch.randn(m, k, generator=g, device=DEV).to(dtype)
    res = (torch.randn(m, k, generator=g, device=DEV) * 4).to(dtype) if residual else None
    norm_weight = (1 + 0.2 * torch.randn(k, generator=g, device=DEV)).to(norm_dtype or dtype)
    return hidden, res, norm_weight


def float_weight(n, k, dtype, seed=1):
    g = torch.Generator(device=DEV).manual_seed(seed)
    return (torch.randn(n, k, generator=g, device=DEV) * k ** -0.5).to(dtype)


def cuda_norm(hidden, residual, norm_weight):
    """norm.cu's x and residual sum: what the prologue must reproduce bit for bit."""
    if residual is None:
        return norm.rms_norm(hidden, norm_weight, EPS), hidden
    return norm.add_rms_norm(hidden, residual, norm_weight, EPS)


def composition_ops() -> CudaOps:
    """CudaOps with the switch off whatever the environment says: norm.cu + cuBLAS (+ activation.cu)."""
    ops = CudaOps()
    ops.fused_norm_gemm = False
    return ops


def close(out, ref, rtol):
    torch.testing.assert_close(out.float(), ref.float(), rtol=rtol, atol=1e-2 * ref.float().abs().mean().item())


def not_fitting(k, m) -> bool:
    """Where the kernel may refuse a case: 6+ tokens of K = 4096 (8.3 KB of x each) on a GPU whose blocks
    cannot take more than 48 KB of shared memory (sm_90 takes 227 KB: everything fits)."""
    return compiler.max_block_smem() == compiler.DEFAULT_SMEM and k == 4096 and m > 5


def test_opting_in_to_more_shared_memory():
    """8 tokens of K = 4096 need 66 KB: the launcher raises the kernel's limit (sm_80+ allow it)."""
    assert compiler.max_block_smem() > 66 * 1024
    hidden, res, norm_weight = operands(8, 4096, torch.bfloat16)
    w = float_weight(2 * 512, 4096, torch.bfloat16)
    assert quant_gemm.norm_gemm_fits(hidden, res, norm_weight, w, "silu")
    y, _ = quant_gemm.rms_norm_linear(hidden, res, norm_weight, EPS, w, "silu")
    x, _ = cuda_norm(hidden, res, norm_weight)
    assert torch.equal(y, activation.silu_mul(quant_gemm.linear(x, w)))


def fitting_cases():
    for k in HIDDEN_SIZES:
        for m in range(1, 9):
            for residual in (False, True):
                yield k, m, residual


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("k,m,residual", list(fitting_cases()))
def test_prologue_x_and_residual_are_norm_cu_bit_for_bit(dtype, k, m, residual):
    """With an identity weight the GEMM's output is x itself (one exact product per output): the normed
    input equals norm.cu's add_rms_norm / rms_norm bit for bit, and so does the residual sum."""
    hidden, res, norm_weight = operands(m, k, dtype, residual=residual)
    eye = torch.eye(k, device=DEV, dtype=dtype)
    if not quant_gemm.norm_gemm_fits(hidden, res, norm_weight, eye):
        assert not_fitting(k, m)
        return
    y, res_out = quant_gemm.rms_norm_linear(hidden, res, norm_weight, EPS, eye)
    x_ref, res_ref = cuda_norm(hidden, res, norm_weight)
    assert torch.equal(y, x_ref)
    assert torch.equal(res_out, res_ref)
    assert torch.equal(res_out, CpuOps().rms_norm_linear(hidden.cpu(), None if res is None else res.cpu(),
                                                         norm_weight.cpu(), EPS, eye.cpu())[1].to(DEV))


def test_prologue_with_a_float32_norm_weight():
    hidden, res, norm_weight = operands(3, 2048, torch.bfloat16, norm_dtype=torch.float32)
    eye = torch.eye(2048, device=DEV, dtype=torch.bfloat16)
    y, res_out = quant_gemm.rms_norm_linear(hidden, res, norm_weight, EPS, eye)
    x_ref, res_ref = cuda_norm(hidden, res, norm_weight)
    assert torch.equal(y, x_ref) and torch.equal(res_out, res_ref)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("k", HIDDEN_SIZES)
@pytest.mark.parametrize("n", [16, 200, 960, 3072])  # 200: not a multiple of the 16-row tile
def test_float_gemm_matches_float32(dtype, k, n):
    w = float_weight(n, k, dtype)
    for m in (1, 2, 5, 8, 13):
        x = torch.randn(m, k, device=DEV).to(dtype)
        out = quant_gemm.linear(x, w)
        assert out.shape == (m, n) and out.dtype == dtype
        close(out, x.float() @ w.float().T, 2 ** -7)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("act", [None, "silu", "gelu_tanh"])
@pytest.mark.parametrize("k,m,residual", [c for c in fitting_cases() if c[1] in (1, 2, 5, 8)])
def test_rms_norm_linear_matches_the_composition(dtype, act, k, m, residual):
    """Fused == the same kernel's GEMM of norm.cu's x (+ activation.cu) bit for bit, and within the GEMM
    tolerance of CudaOps' composition (norm.cu + cuBLAS + silu_mul) and of CpuOps in the same dtype."""
    n = 200 if act is None else 2 * 328  # gate_up: I = 328 (not a multiple of 16)
    hidden, res, norm_weight = operands(m, k, dtype, residual=residual)
    w = float_weight(n, k, dtype)
    if not quant_gemm.norm_gemm_fits(hidden, res, norm_weight, w, act):
        assert not_fitting(k, m)
        return
    y, res_out = quant_gemm.rms_norm_linear(hidden, res, norm_weight, EPS, w, act)
    x, res_ref = cuda_norm(hidden, res, norm_weight)
    same_kernel = quant_gemm.linear(x, w)
    if act is not None:
        same_kernel = activation.silu_mul(same_kernel) if act == "silu" else activation.gelu_tanh_mul(same_kernel)
    assert torch.equal(y, same_kernel)
    assert torch.equal(res_out, res_ref)
    rtol = 2 ** -7 if act is None else 2 ** -6
    composed, _ = composition_ops().rms_norm_linear(hidden, res, norm_weight, EPS, w, act)
    close(y, composed, rtol)
    # CpuOps in the same dtype rounds where the kernel does (the residual sum, x, the GEMM's output, the
    # activation): only the order of the float32 sums differs. (Against CpuOps in float32 the roundings of the
    # sum and of x shift a K-term product by ~2^-8 / sqrt(3) of its scale: outputs near zero, where atol is
    # all there is, then miss a 1e-2 x mean atol by 2.5x in a CPU model of the bf16 gated case.)
    cpu, _ = CpuOps().rms_norm_linear(hidden.cpu(), None if res is None else res.cpu(), norm_weight.cpu(), EPS,
                                     w.cpu(), act)
    close(y.cpu(), cpu, rtol)


@pytest.mark.parametrize("kind", ["int4", "fp8"])
def test_prologue_with_quantized_layouts(kind):
    """The prologue does not depend on the weight code: int4 / fp8 layouts give quant_gemm.gemm's product
    of norm.cu's x, bit for bit."""
    w = torch.randn(192, 2048, device=DEV)
    layout = Int4CudaWeight.quantize(w) if kind == "int4" else Fp8CudaWeight.quantize(w)
    for m in (1, 3, 8):
        for residual in (False, True):
            hidden, res, norm_weight = operands(m, 2048, torch.bfloat16, seed=m, residual=residual)
            assert quant_gemm.norm_gemm_fits(hidden, res, norm_weight, layout)
            y, res_out = quant_gemm.rms_norm_linear(hidden, res, norm_weight, EPS, layout)
            x, res_ref = cuda_norm(hidden, res, norm_weight)
            assert torch.equal(y, quant_gemm.gemm(x, layout)) and torch.equal(res_out, res_ref)


def test_rows_do_not_depend_on_the_batch():
    hidden, res, norm_weight = operands(8, 2048, torch.bfloat16)
    w = float_weight(2 * 1024, 2048, torch.bfloat16)
    for act in (None, "silu"):
        full, full_res = quant_gemm.rms_norm_linear(hidden, res, norm_weight, EPS, w, act)
        for m in (1, 3, 7):
            y, r = quant_gemm.rms_norm_linear(hidden[:m].contiguous(), res[:m].contiguous(), norm_weight, EPS, w, act)
            assert torch.equal(y, full[:m]) and torch.equal(r, full_res[:m])


def test_rms_norm_linear_in_a_cuda_graph():
    hidden, res, norm_weight = operands(4, 576, torch.bfloat16)
    w = float_weight(2 * 1536, 576, torch.bfloat16)
    eager = quant_gemm.rms_norm_linear(hidden, res, norm_weight, EPS, w, "silu")
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        quant_gemm.rms_norm_linear(hidden, res, norm_weight, EPS, w, "silu")  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y, res_out = quant_gemm.rms_norm_linear(hidden, res, norm_weight, EPS, w, "silu")
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(y, eager[0]) and torch.equal(res_out, eager[1])


def test_cuda_ops_takes_the_kernel_only_where_it_fits(monkeypatch):
    monkeypatch.setenv(FUSED_NORM_GEMM_ENV, "1")
    ops = CudaOps()
    calls = []
    fused = quant_gemm.rms_norm_linear
    monkeypatch.setattr(quant_gemm, "rms_norm_linear", lambda *a, **kw: calls.append(a[0].shape) or fused(*a, **kw))
    w = float_weight(512, 2048, torch.bfloat16)
    for m, dtype, expect in ((1, torch.bfloat16, True), (8, torch.bfloat16, True), (9, torch.bfloat16, False),
                             (2, torch.float32, False)):
        hidden, res, norm_weight = operands(m, 2048, dtype)
        calls.clear()
        y, _ = ops.rms_norm_linear(hidden, res, norm_weight, EPS, w.to(dtype))
        assert bool(calls) == expect, (m, dtype)
        composed, _ = composition_ops().rms_norm_linear(hidden, res, norm_weight, EPS, w.to(dtype))
        close(y, composed, 2 ** -7)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_random_model_dir(tmp_path_factory.mktemp("fused"), default_tokenizer(), seed=5, hidden_size=512,
                                 intermediate_size=1408, num_layers=3, num_heads=8, num_kv_heads=2, head_dim=64)


def generate(model_dir, monkeypatch, fused: bool, prompts, enforce_eager=False):
    monkeypatch.setenv(FUSED_NORM_GEMM_ENV, "1" if fused else "0")
    llm = LLM(str(model_dir), device="cuda", dtype="bfloat16", num_kv_blocks=128, max_num_seqs=8,
              enforce_eager=enforce_eager)
    assert llm.llm_engine.runner.model.ops.fused_norm_gemm == fused
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=2)
    out = [o.outputs[0] for o in llm.generate(prompts, params)]
    del llm
    torch.cuda.empty_cache()
    return out


def assert_same_greedy(a, b, margin=0.05):
    """The same greedy tokens with logprobs within bf16 GEMM noise, up to where they part, if they do; there
    the two tokens were a near tie in b (within `margin` nats), which a GEMM's rounding may break either way."""
    for i, (ta, tb) in enumerate(zip(a.token_ids, b.token_ids)):
        if ta != tb:
            assert ta in b.logprobs[i] and b.logprobs[i][tb].logprob - b.logprobs[i][ta].logprob < margin, i
            return
        assert abs(a.logprobs[i][ta].logprob - b.logprobs[i][tb].logprob) < 0.1, i


def test_decoder_with_the_fused_kernel_generates_the_same_tokens(model_dir, monkeypatch):
    """Greedy decode (batch 4 and alone; CUDA graphs and eager) with FORGE_FUSED_NORM_GEMM=1 picks the
    default path's tokens."""
    tok = default_tokenizer()
    prompts = [{"prompt_token_ids": tok.encode(t)} for t in ("Once upon a time", "def fib(n):", "1, 2, 3,", "Hi")]
    base = generate(model_dir, monkeypatch, False, prompts)
    for eager in (False, True):
        for a, b in zip(generate(model_dir, monkeypatch, True, prompts, enforce_eager=eager), base):
            assert_same_greedy(a, b)
    for p, b in zip(prompts, base):
        assert_same_greedy(generate(model_dir, monkeypatch, True, [p])[0], b)
