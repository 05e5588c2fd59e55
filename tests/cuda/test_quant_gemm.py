"""forge/kernels/quant_gemm.cu (int4 and fp8 weights, dequantized in registers, tensor-core MMAs) against
the float32 product with the layout's exact dequantized weight, and the quantized model against the same
model built from those dequantized weights."""

import pytest
import torch

from forge import LLM
from forge.kernels import quant_gemm
from forge.quant.cuda import Fp8CudaWeight, Int4CudaWeight
from forge.quant.layouts import Fp8Quantized, GroupQuantized
from tests.util import default_tokenizer, forward_logits, make_random_model_dir

pytestmark = pytest.mark.cuda
DEV = torch.device("cuda")


def int4_layout(n, k, group, seed=0):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 16, (n, k), generator=g, dtype=torch.uint8)
    scale = (torch.rand(n, k // group, generator=g) * 0.02 + 1e-3).half().float()
    offset = (torch.randn(n, k // group, generator=g) * 0.1).half().float()
    if group == 64:  # no checkpoint format has groups of 64: packed directly
        return Int4CudaWeight.pack(codes.to(DEV), scale.to(DEV), offset.to(DEV), 64)
    per = group // 32
    w = Int4CudaWeight.from_groups(GroupQuantized(codes, scale.repeat_interleave(per, 1),
                                                  offset.repeat_interleave(per, 1), 4), DEV)
    assert w.group == group
    return w


def fp8_layout(n, k, group, seed=0):
    g = torch.Generator(device=DEV).manual_seed(seed)
    w = torch.randn(n, k, generator=g, device=DEV)
    if group == 0:
        return Fp8CudaWeight.quantize(w)
    scale = torch.rand(n, k // 128, generator=g, device=DEV) / 100 + 1e-3
    codes = (w.view(n, -1, 128) / scale[..., None] / 8).clamp(-448, 448).to(torch.float8_e4m3fn).view(n, k)
    return Fp8CudaWeight.from_quantized(Fp8Quantized(codes, scale, 128), DEV)


def check(layout, m, dtype, seed=1, **config):
    """The kernel's output vs x @ W.T in float32 with W the layout's exact weight. The kernel multiplies
    exact weights (int4: s * sum(q x) + o * sum(x); fp8: codes are exact in bf16/fp16) in float32, so
    what differs is the summation order and the output's rounding to `dtype` (2^-9 / 2^-12 relative):
    tolerance 1% of the row's scale, plus 2^-7 relative."""
    g = torch.Generator(device=DEV).manual_seed(seed)
    x = torch.randn(m, layout.shape[1], generator=g, device=DEV).to(dtype)
    out = quant_gemm.gemm(x, layout, **config)
    ref = x.float() @ layout.dequantize().T
    assert out.shape == (m, layout.shape[0]) and out.dtype == dtype
    torch.testing.assert_close(out.float(), ref, rtol=2 ** -7, atol=1e-2 * ref.abs().mean().item())
    return out


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind,group", [("int4", 32), ("int4", 128), ("fp8", 0), ("fp8", 128)])
@pytest.mark.parametrize("n,k", [(96, 576), (256, 1024), (80, 4096)])
def test_quant_gemm_matches_dequantized_weight(kind, group, n, k, dtype):
    if group == 128 and k % 128:
        pytest.skip("groups of 128 need K a multiple of 128")
    layout = int4_layout(n, k, group) if kind == "int4" else fp8_layout(n, k, group)
    for m in (1, 3, 8, 13, 16, 31, 32, 45, 128):
        check(layout, m, dtype)


@pytest.mark.parametrize("kind", ["int4", "fp8"])
def test_every_tile_shape_gives_the_same_product(kind):
    layout = int4_layout(256, 2048, 128) if kind == "int4" else fp8_layout(256, 2048, 0)
    base = check(layout, 24, torch.bfloat16, warps=8)
    for nt in (1, 2, 4):
        for rt in (1, 2):
            for warps in (4, 8, 16):
                for unroll in (1, 2, 4):
                    if warps * rt * nt * 512 > 48 * 1024:  # the partial sums' shared memory: kernel_config refuses
                        continue
                    out = check(layout, 24, torch.bfloat16, nt=nt, rt=rt, warps=warps, unroll=unroll)
                    if warps == 8:  # the same split of K: the same sums, whatever the token/row tiling
                        assert torch.equal(out, base), (nt, rt, unroll)


def test_quant_gemm_rows_do_not_depend_on_the_batch():
    """A token's output is the same bits alone or in any batch (its sums never mix with other tokens')."""
    for layout in (int4_layout(192, 1536, 32), fp8_layout(192, 1536, 0)):
        x = torch.randn(37, 1536, device=DEV).bfloat16()
        full = quant_gemm.gemm(x, layout)
        for m in (1, 5, 16):
            assert torch.equal(quant_gemm.gemm(x[:m], layout), full[:m])


def test_large_m_paths_and_rows():
    torch.manual_seed(0)
    int4 = int4_layout(256, 1024, 128)
    x = torch.randn(300, 1024, device=DEV).bfloat16()
    ref = x.float() @ int4.dequantize().T
    torch.testing.assert_close(int4.matmul(x).float(), ref, rtol=2 ** -7, atol=1e-2 * ref.abs().mean().item())
    assert torch.equal(quant_gemm.int4_dequantize(int4, torch.bfloat16), int4.dequantize().bfloat16())
    ids = torch.tensor([[0, 255], [17, 17]], device=DEV)
    assert torch.equal(int4.rows(ids), int4.dequantize().bfloat16()[ids])

    fp8 = fp8_layout(256, 1024, 0)
    ref = x.float() @ fp8.dequantize().T
    got = fp8.matmul(x).float()  # W8A8: x rounded to e4m3 per row (3 mantissa bits)
    assert ((got - ref).norm() / ref.norm()).item() < 0.05
    assert torch.equal(fp8.rows(ids), fp8.dequantize().bfloat16()[ids])


def test_fp8_quantize_rows_matches_torch():
    x = (torch.randn(37, 1024, device=DEV) * torch.rand(37, 1, device=DEV) * 10).bfloat16()
    x[3] = 0  # an all-zero row: the smallest scale, zero codes
    codes, scale = quant_gemm.fp8_quantize_rows(x)
    ref_scale = (x.float().abs().amax(-1, keepdim=True) / 448).clamp(min=1e-12)
    torch.testing.assert_close(scale, ref_scale, rtol=2e-7, atol=0)  # (the division may differ by an ulp)
    ref = (x.float() / scale).clamp(-448, 448).to(torch.float8_e4m3fn)  # with the kernel's own scales
    assert torch.equal(codes.view(torch.uint8), ref.view(torch.uint8))


def test_quant_gemm_in_a_cuda_graph():
    layout = int4_layout(128, 1024, 32)
    x = torch.randn(4, 1024, device=DEV).bfloat16()
    eager = quant_gemm.gemm(x, layout)
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        quant_gemm.gemm(x, layout)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = quant_gemm.gemm(x, layout)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, eager)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_random_model_dir(tmp_path_factory.mktemp("quant"), default_tokenizer(), seed=3,
                                 hidden_size=256, intermediate_size=768, num_layers=3, num_heads=4, num_kv_heads=2,
                                 head_dim=64)


def dequantized_twin(model):
    """The same model with every quantized layout replaced by its dequantized weight (compute dtype)."""
    for obj in [model] + model.layers:
        for name, value in vars(obj).items():
            if isinstance(value, (Int4CudaWeight, Fp8CudaWeight)):
                setattr(obj, name, value.dequantize().to(model.dtype))


@pytest.mark.parametrize("quantization", ["int4", "fp8"])
def test_quantized_model_logits_match_its_dequantized_weights(model_dir, quantization):
    ids = default_tokenizer().encode("The quick brown fox jumps over the lazy dog. " * 8)
    llm = LLM(str(model_dir), device="cuda", quantization=quantization, num_kv_blocks=64, enforce_eager=True)
    runner = llm.llm_engine.runner
    kinds = {type(w).__name__ for layer in runner.model.layers for w in (layer.qkv_proj, layer.down_proj)}
    assert kinds == {"Int4CudaWeight" if quantization == "int4" else "Fp8CudaWeight"}
    got = forward_logits(runner, ids).float()  # prefill: large-M path
    dequantized_twin(runner.model)
    ref = forward_logits(runner, ids).float()
    # int4: exact float32 weights vs their bfloat16 rounding, 3 random layers (the bf16-vs-fp32 model test's 3e-2);
    # fp8 prefill is W8A8: every activation rounded to e4m3 per row (2^-4 relative), measured 0.065
    assert ((got - ref).norm() / ref.norm()).item() < (3e-2 if quantization == "int4" else 0.1)
    # decode-sized steps (the kernels): the last 8 positions one at a time
    del llm
    llm = LLM(str(model_dir), device="cuda", quantization=quantization, num_kv_blocks=64, enforce_eager=True)
    from forge import SamplingParams

    out = llm.generate([{"prompt_token_ids": ids}], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    assert len(out[0].outputs[0].token_ids) == 8


def agreement(a: list[list[int]], b: list[list[int]]) -> float:
    return sum(x == y for ra, rb in zip(a, b) for x, y in zip(ra, rb)) / sum(map(len, a))


@pytest.mark.parametrize("quantization", ["int4", "fp8"])
def test_quantized_greedy_graphs_equal_eager_and_batch_equals_alone(model_dir, quantization):
    """The quantized linears are batch-invariant while every step stays on the kernel (test above: up to 16
    tokens for fp8, whose larger steps are W8A8), so the prompts' prefill together is too; the bfloat16
    attention's split-K depends on the batch and on graph capture, so greedy tokens of a random model may
    part after a near-tie: the first token of every prompt must agree, and 80% of all tokens."""
    from forge import SamplingParams

    tok = default_tokenizer()
    prompts = [{"prompt_token_ids": tok.encode(t)[:5]} for t in ("Once upon a time", "def fib(n):", "1, 2, 3,")]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    graphs = LLM(str(model_dir), device="cuda", quantization=quantization, num_kv_blocks=64)
    assert graphs.llm_engine.runner.graphs is not None
    batch = [o.outputs[0].token_ids for o in graphs.generate(prompts, params)]
    alone = [graphs.generate([p], params)[0].outputs[0].token_ids for p in prompts]
    del graphs
    eager = LLM(str(model_dir), device="cuda", quantization=quantization, num_kv_blocks=64, enforce_eager=True)
    eager_out = [o.outputs[0].token_ids for o in eager.generate(prompts, params)]
    for other in (alone, eager_out):
        assert [r[0] for r in other] == [r[0] for r in batch]
        assert agreement(other, batch) >= 0.8, (other, batch)
