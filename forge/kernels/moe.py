"""MoE launchers (kernels: moe.cu): routing, sorting pairs by expert, and the experts of decode-sized
steps with each picked expert's weights read once."""

import numpy as np
import torch

from forge.kernels import compiler

WARPS = 4  # warps per block of the expert kernels
ROWS = 4  # down rows per warp
MAX_PAIRS = 8  # (token, slot) pairs of one expert per pass over its weights
MAX_ALIGN_PAIRS = 4096  # the one-block sort's O(P^2 / 1024) stays under ~30 us; more pairs: torch.sort
MAX_ROUTE_EXPERTS = 32 * 16  # experts the route kernel holds in a warp's registers


def route(logits: torch.Tensor, top_k: int, normalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """[T, E] router logits -> (weights [T, k] float32, expert ids [T, k] int64), as forge.ops.moe.route."""
    num_tokens, num_experts = logits.shape
    logits = logits.contiguous()
    weights = torch.empty(num_tokens, top_k, dtype=torch.float32, device=logits.device)
    ids = torch.empty(num_tokens, top_k, dtype=torch.int64, device=logits.device)
    kernel = compiler.get_kernel("moe.cu", "moe_route_kernel", logits.dtype, PER_LANE=-(-num_experts // 32), VEC=1)
    p = compiler.ptr
    compiler.run(kernel, -(-num_tokens // 4), 128, p(weights), p(ids), p(logits), np.int32(num_tokens),
                 np.int32(num_experts), np.int32(top_k), np.int32(normalize))
    return weights, ids


def align(expert_ids: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[T, k] expert ids -> (order [P] int64: the pairs sorted by expert, stably; ends [E] int32;
    sorted_expert [P] int32: the expert of each sorted pair)."""
    ids = expert_ids.flatten().contiguous()
    num_pairs = ids.numel()
    if num_pairs > MAX_ALIGN_PAIRS:
        sorted_ids, order = ids.sort(stable=True)
        experts = torch.arange(num_experts, device=ids.device, dtype=sorted_ids.dtype)
        return order, torch.searchsorted(sorted_ids, experts, right=True).to(torch.int32), sorted_ids.to(torch.int32)
    order = torch.empty(num_pairs, dtype=torch.int64, device=ids.device)
    ends = torch.empty(num_experts, dtype=torch.int32, device=ids.device)
    sorted_expert = torch.empty(num_pairs, dtype=torch.int32, device=ids.device)
    kernel = compiler.get_kernel("moe.cu", "moe_align_kernel", None, VEC=1)
    p = compiler.ptr
    compiler.run(kernel, 1, 1024, p(order), p(ends), p(sorted_expert), p(ids), np.int32(num_pairs),
                 np.int32(num_experts), shmem=4 * num_experts)
    return order, ends, sorted_expert


def experts(x: torch.Tensor, weights: torch.Tensor, expert_ids: torch.Tensor, gate_up: torch.Tensor,
            down: torch.Tensor) -> torch.Tensor:
    """x [T, H]; weights [T, k] float32 and expert_ids [T, k] from the router; gate_up [E, 2I, H],
    down [E, H, I] -> [T, H] (x's dtype), as forge.ops.moe.experts_reference."""
    num_tokens, hidden = x.shape
    top_k = weights.shape[1]
    num_experts, two_i, _ = gate_up.shape
    inter = two_i // 2
    order, ends, sorted_expert = align(expert_ids, num_experts)
    x, gate_up, down, weights = x.contiguous(), gate_up.contiguous(), down.contiguous(), weights.float().contiguous()
    num_pairs = num_tokens * top_k
    act = torch.empty(num_pairs, inter, dtype=x.dtype, device=x.device)
    y = torch.empty(num_pairs, hidden, dtype=torch.float32, device=x.device)
    out = torch.empty_like(x)
    vec = 16 // x.element_size()
    if hidden % vec or inter % vec or any(t.data_ptr() % 16 for t in (x, gate_up, down, act)):
        vec = 1
    defines = dict(VEC=vec, WARPS=WARPS, ROWS=ROWS, MAX_PAIRS=MAX_PAIRS)
    gate_up_kernel = compiler.get_kernel("moe.cu", "moe_gate_up_kernel", x.dtype, **defines)
    down_kernel = compiler.get_kernel("moe.cu", "moe_down_kernel", x.dtype, **defines)
    sum_kernel = compiler.get_kernel("moe.cu", "moe_sum_kernel", x.dtype, **defines)
    p = compiler.ptr
    compiler.run(gate_up_kernel, (-(-inter // WARPS), num_pairs), WARPS * 32, p(act), p(x), p(order), p(ends),
                 p(sorted_expert), p(gate_up), np.int32(hidden), np.int32(inter), np.int32(top_k))
    compiler.run(down_kernel, (-(-hidden // (WARPS * ROWS)), num_pairs), WARPS * 32, p(y), p(act), p(order), p(ends),
                 p(sorted_expert), p(down), p(weights), np.int32(hidden), np.int32(inter))
    compiler.run(sum_kernel, (num_tokens, -(-hidden // 256)), 256, p(out), p(y), np.int32(hidden), np.int32(top_k))
    return out
