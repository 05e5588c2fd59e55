"""The MoE op (forge.ops.moe) against a plain per-token reference and against transformers' own MoE blocks."""

import pytest
import torch
import torch.nn.functional as F

from forge.ops import CpuOps
from forge.ops.moe import experts_grouped_mm, experts_reference, route, sort_by_expert

H, INTER, E, K = 64, 32, 4, 2


def plain_moe(x, router, gate_up, down, top_k, normalize):
    """The textbook definition, one token at a time (the test's reference, never the engine's path)."""
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        probs = torch.softmax(x[t] @ router.T, -1)
        w, ids = probs.topk(top_k)
        if normalize:
            w = w / w.sum()
        for weight, e in zip(w, ids):
            gate, up = (gate_up[e] @ x[t]).chunk(2)
            out[t] += weight * (down[e] @ (F.silu(gate) * up))
    return out


def random_moe(seed=0, num_tokens=13, experts=E, hidden=H, inter=INTER, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(num_tokens, hidden, generator=g)
    router = torch.randn(experts, hidden, generator=g) * 0.3
    gate_up = torch.randn(experts, 2 * inter, hidden, generator=g) * 0.1
    down = torch.randn(experts, hidden, inter, generator=g) * 0.1
    return (t.to(dtype) for t in (x, router, gate_up, down))


def forge_moe(x, router, gate_up, down, top_k, normalize, experts=experts_reference):
    ops = CpuOps()
    weights, ids = ops.moe_route(ops.linear(x, router), top_k, normalize)
    return experts(ops, x, weights, ids, gate_up, down)


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("experts", [experts_reference, experts_grouped_mm], ids=["reference", "grouped_mm"])
def test_moe_equals_plain_definition(normalize, experts):
    x, router, gate_up, down = random_moe()
    want = plain_moe(x, router, gate_up, down, K, normalize)
    got = forge_moe(x, router, gate_up, down, K, normalize, experts)
    assert (got - want).abs().max() < 1e-5


def test_unpicked_experts_and_one_token():
    """Experts no token picks are empty groups; a single token (a decode step) touches only its k experts."""
    x, router, gate_up, down = random_moe(seed=1, num_tokens=1, experts=8)
    order, ends = sort_by_expert(torch.tensor([[6, 2]]), 8)
    assert order.tolist() == [1, 0] and ends.tolist() == [0, 0, 1, 1, 1, 1, 2, 2]
    for experts in (experts_reference, experts_grouped_mm):
        got = forge_moe(x, router, gate_up, down, 3, True, experts)
        assert (got - plain_moe(x, router, gate_up, down, 3, True)).abs().max() < 1e-5


def test_token_result_does_not_depend_on_its_batch():
    """A token's output is the same alone or in a batch with others (batch == sequential)."""
    x, router, gate_up, down = random_moe(seed=2, num_tokens=9)
    batch = forge_moe(x, router, gate_up, down, K, True)
    alone = torch.cat([forge_moe(x[t:t + 1], router, gate_up, down, K, True) for t in range(9)])
    assert (batch - alone).abs().max() < 1e-6


def test_route_matches_transformers_routers():
    from transformers import MixtralConfig, Qwen3MoeConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralTopKRouter
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeTopKRouter

    x = torch.randn(11, H, generator=torch.Generator().manual_seed(3))
    for normalize in (True, False):
        router = Qwen3MoeTopKRouter(Qwen3MoeConfig(hidden_size=H, num_experts=8, num_experts_per_tok=3,
                                                   norm_topk_prob=normalize))
        torch.nn.init.normal_(router.weight)
        _, want_w, want_ids = router(x)
        w, ids = route(x @ router.weight.T, 3, normalize)
        assert torch.equal(ids, want_ids) and torch.allclose(w, want_w, atol=1e-6)
    router = MixtralTopKRouter(MixtralConfig(hidden_size=H, num_local_experts=8, num_experts_per_tok=2))
    torch.nn.init.normal_(router.weight)
    _, want_w, want_ids = router(x)
    w, ids = route(x @ router.weight.T, 2, True)
    assert torch.equal(ids, want_ids) and torch.allclose(w, want_w, atol=1e-6)


@torch.no_grad()
@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
def test_moe_equals_transformers_block(family):
    """transformers' sparse MoE block with the same weights (its experts as [E, 2I, H] / [E, H, I])."""
    if family == "qwen3_moe":
        from transformers import Qwen3MoeConfig
        from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

        cfg = Qwen3MoeConfig(hidden_size=H, moe_intermediate_size=INTER, num_experts=E, num_experts_per_tok=K,
                             norm_topk_prob=True)
        block, normalize = Qwen3MoeSparseMoeBlock(cfg), cfg.norm_topk_prob
    else:
        from transformers import MixtralConfig
        from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

        cfg = MixtralConfig(hidden_size=H, intermediate_size=INTER, num_local_experts=E, num_experts_per_tok=K)
        block, normalize = MixtralSparseMoeBlock(cfg), True
    g = torch.Generator().manual_seed(4)
    for p in block.parameters():
        p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    x = torch.randn(1, 17, H, generator=g)
    want = block(x)
    want = want[0] if isinstance(want, tuple) else want
    got = forge_moe(x[0], block.gate.weight, block.experts.gate_up_proj, block.experts.down_proj, K, normalize)
    assert (got - want[0]).abs().max() < 1e-5
