"""Mixture-of-experts math: the router's top-k and the experts as grouped GEMMs over tokens sorted by expert.

Expert weights are stacked: gate_up [E, 2I, H] (each expert's gate rows, then its up rows) and down
[E, H, I]. A step's T tokens each pick k experts; the T*k (token, expert) pairs are sorted by
expert, so each expert's rows are one contiguous slice of the gathered input and the whole layer is
two grouped GEMMs (one per expert that has rows) around one silu_mul. The outputs are put back in
(token, slot) order and summed over the k slots with the router's weights, in float32.

`CpuOps.moe_experts` runs `experts_reference` (one GEMM per expert that has rows, a Python loop
over experts, never over tokens); `CudaOps.moe_experts` runs `experts_grouped_mm`: the same
steps with torch's grouped GEMM (CUTLASS on sm90), no host sync, so decode steps capture into CUDA
graphs.
"""

from __future__ import annotations

import torch


def route(router_logits: torch.Tensor, top_k: int, normalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """[T, E] router logits -> (weights [T, k] float32, expert ids [T, k] int64).

    Softmax over all experts in float32, then the top k; `normalize` rescales the k weights to sum
    to 1 (Qwen3-MoE's norm_topk_prob; Mixtral always, which equals a softmax over the k top logits).
    """
    probs = torch.softmax(router_logits.float(), dim=-1)
    weights, ids = probs.topk(top_k, dim=-1)
    if normalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids


def sort_by_expert(expert_ids: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[T, k] expert ids -> (order [T k]: the flattened (token, slot) pairs sorted by expert, stably;
    ends [E] int32: the end of each expert's rows in that order, i.e. the grouped GEMM's offsets).
    Computed on the ids' device without a host sync (searchsorted, not bincount)."""
    sorted_ids, order = expert_ids.flatten().sort(stable=True)
    experts = torch.arange(num_experts, device=expert_ids.device, dtype=sorted_ids.dtype)
    ends = torch.searchsorted(sorted_ids, experts, right=True).to(torch.int32)
    return order, ends


def combine(expert_out: torch.Tensor, order: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """expert_out [T k, H] in expert order -> [T, H]: back to (token, slot) order, each slot scaled by
    its router weight and the k slots summed in float32 (a fixed order: no atomics, so a token's
    result does not depend on the other tokens of its step)."""
    num_tokens, top_k = weights.shape
    unsorted = torch.empty_like(expert_out).index_copy_(0, order, expert_out).view(num_tokens, top_k, -1)
    return torch.einsum("tkh,tk->th", unsorted.float(), weights.float()).to(expert_out.dtype)


def experts_reference(ops, x: torch.Tensor, weights: torch.Tensor, expert_ids: torch.Tensor, gate_up, down) -> torch.Tensor:
    """x [T, H] -> [T, H]: sum over k of weights[t, j] * expert_{ids[t, j]}(x[t]), where expert e is
    down[e] @ silu_mul(gate_up[e] @ x). One GEMM pair per expert that has rows (gate_up[e] and
    down[e] may be quantized layouts: ops.linear dispatches on them)."""
    num_experts = len(gate_up)
    top_k = expert_ids.shape[1]
    order, ends = sort_by_expert(expert_ids, num_experts)
    rows = x.index_select(0, order // top_k)  # [T k, H], grouped by expert
    out = torch.empty_like(rows)
    start = 0
    for e, end in enumerate(ends.tolist()):
        if end > start:
            out[start:end] = ops.linear(ops.silu_mul(ops.linear(rows[start:end], gate_up[e])), down[e])
        start = end
    return combine(out, order, weights)


def grouped_mm(x: torch.Tensor, weight: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    """x [N, K] with each group's rows contiguous (group g: rows ends[g-1] .. ends[g]); weight
    [G, M, K] (row-major per group, as checkpoints store it) -> [N, M]: x_g @ weight[g].T per group.
    The transposed view is what the sm90 kernel wants (K contiguous in both operands)."""
    return torch._grouped_mm(x, weight.transpose(1, 2), offs=ends)


def experts_grouped_mm(ops, x: torch.Tensor, weights: torch.Tensor, expert_ids: torch.Tensor, gate_up: torch.Tensor,
                       down: torch.Tensor) -> torch.Tensor:
    """`experts_reference` as two grouped GEMMs (torch._grouped_mm) over all experts at once; an
    expert with no rows is an empty group. Bytes moved at decode: the weights of the experts the step's
    tokens picked (each read once however many of its rows there are), plus T k (3H + 2I) activations."""
    num_experts = gate_up.shape[0]
    top_k = expert_ids.shape[1]
    order, ends = sort_by_expert(expert_ids, num_experts)
    rows = x.index_select(0, order // top_k)
    hidden = ops.silu_mul(grouped_mm(rows, gate_up, ends))
    return combine(grouped_mm(hidden, down, ends), order, weights)
