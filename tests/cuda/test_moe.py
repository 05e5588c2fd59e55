"""The CUDA MoE op against the CPU reference: forge's expert-by-expert kernel (forge/kernels/moe.cu) and
torch's grouped GEMM, each on its own, and CudaOps' choice between them inside a CUDA graph."""

import pytest
import torch

from forge.kernels import moe as moe_kernel
from forge.ops import CpuOps
from forge.ops import moe as moe_ops
from forge.ops.cuda import CudaOps

pytestmark = pytest.mark.cuda


def rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def random_layer(num_tokens, hidden, inter, experts, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(num_tokens, hidden, generator=g)
    router = torch.randn(experts, hidden, generator=g) * hidden ** -0.5
    gate_up = torch.randn(experts, 2 * inter, hidden, generator=g) * hidden ** -0.5
    down = torch.randn(experts, hidden, inter, generator=g) * inter ** -0.5
    return x, router, gate_up, down


def run(ops, x, router, gate_up, down, top_k, normalize=True):
    weights, ids = ops.moe_route(ops.linear(x, router), top_k, normalize)
    return ops.moe_experts(x, weights, ids, gate_up, down)


# (tokens, hidden, intermediate, experts, top_k): a tiny test model's layer; Qwen3-30B-A3B's layer
# (128 experts, top 8) at decode batch 1 and 32 and a prefill chunk; Mixtral-shaped experts at top 2.
CASES = [(7, 64, 32, 4, 2), (1, 2048, 768, 128, 8), (32, 2048, 768, 128, 8), (600, 2048, 768, 128, 8),
         (5, 1024, 1792, 8, 2)]


def kernel_path(x, weights, ids, gate_up, down):
    return moe_kernel.experts(x, weights, ids, gate_up, down)


def grouped_mm_path(x, weights, ids, gate_up, down):
    return moe_ops.experts_grouped_mm(CudaOps(), x, weights, ids, gate_up, down)


@pytest.mark.parametrize("path", [kernel_path, grouped_mm_path], ids=["kernel", "grouped_mm"])
@pytest.mark.parametrize("case", CASES, ids=[f"T{c[0]}-H{c[1]}-I{c[2]}-E{c[3]}-k{c[4]}" for c in CASES])
def test_bf16_matches_cpu(case, path):
    num_tokens, hidden, inter, experts, top_k = case
    x, router, gate_up, down = random_layer(num_tokens, hidden, inter, experts)
    # The same routing on both sides (bf16 router logits could pick another expert on a near tie).
    weights, ids = CpuOps().moe_route(x @ router.T, top_k, True)
    want = CpuOps().moe_experts(x, weights, ids, gate_up, down)
    cuda = [t.cuda().bfloat16() for t in (x, gate_up, down)]
    got = path(cuda[0], weights.cuda(), ids.cuda(), cuda[1], cuda[2])
    assert got.dtype == torch.bfloat16 and got.shape == want.shape
    assert rel_err(got.cpu(), want) < 1e-2, rel_err(got.cpu(), want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("num_experts, top_k", [(4, 2), (128, 8), (60, 4), (512, 32)])
def test_route_kernel_matches_cpu(dtype, num_experts, top_k):
    g = torch.Generator().manual_seed(num_experts)
    # distinct logits, exact in bfloat16 (multiples of 1/16 of at most 8 bits): no ties to break differently
    logits = torch.stack([torch.randperm(num_experts, generator=g) - num_experts // 2 for _ in range(33)]) / 16
    logits = logits.to(dtype)
    for normalize in (True, False):
        want_w, want_ids = CpuOps().moe_route(logits, top_k, normalize)
        got_w, got_ids = moe_kernel.route(logits.cuda(), top_k, normalize)
        assert torch.equal(got_ids.cpu(), want_ids)
        assert torch.allclose(got_w.cpu(), want_w, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("num_pairs", [1, 8, 300, 5000])
def test_align_matches_a_stable_sort(num_pairs):
    ids = torch.randint(0, 64, (num_pairs, 1), generator=torch.Generator().manual_seed(num_pairs))
    want_order, want_ends = moe_ops.sort_by_expert(ids, 64)
    order, ends, sorted_expert = moe_kernel.align(ids.cuda(), 64)
    assert torch.equal(order.cpu(), want_order) and torch.equal(ends.cpu(), want_ends)
    assert torch.equal(sorted_expert.cpu().long(), ids.flatten()[want_order])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_kernel_equals_reference_in_its_dtype(dtype):
    """The kernel rounds where the reference rounds: against CpuOps in the same dtype (on the GPU),
    with 37 tokens on 3 experts (passes of MAX_PAIRS pairs) and odd widths (the scalar path)."""
    for hidden, inter in ((256, 128), (72, 40), (66, 30)):
        x, router, gate_up, down = (t.cuda().to(dtype) for t in random_layer(37, hidden, inter, 3, seed=5))
        weights, ids = CpuOps().moe_route(CpuOps().linear(x, router), 2, False)
        want = moe_ops.experts_reference(CpuOps(), x, weights, ids, gate_up, down)
        got = kernel_path(x, weights, ids, gate_up, down)
        tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}[dtype]
        assert rel_err(got, want) < tol, (dtype, hidden, inter, rel_err(got, want))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_other_dtypes_match_cpu(dtype):
    x, router, gate_up, down = random_layer(9, 64, 32, 4, seed=1)
    want = run(CpuOps(), x, router, gate_up, down, 2)
    got = run(CudaOps(), *(t.cuda().to(dtype) for t in (x, router, gate_up, down)), 2)
    assert rel_err(got.cpu(), want) < (1e-5 if dtype == torch.float32 else 3e-3)


@pytest.mark.parametrize("num_tokens", [4, 65])  # (x top 4: 16 pairs, the kernel; 260, bf16 grouped GEMMs)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_decode_captures_into_a_graph(num_tokens, dtype):
    """No host sync on either path: a decode step's MoE replays from a CUDA graph with new tokens."""
    x, router, gate_up, down = (t.cuda().to(dtype) for t in random_layer(num_tokens, 256, 128, 16, seed=2))
    ops = CudaOps()
    static_x = x.clone()
    run(ops, static_x, router, gate_up, down, 4)  # warm up (kernel selection) outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = run(ops, static_x, router, gate_up, down, 4)
    new_x = torch.randn_like(x)
    static_x.copy_(new_x)
    graph.replay()
    assert torch.equal(static_out, run(ops, new_x, router, gate_up, down, 4))
