"""Launcher of quant_gemm_pipe.cu: x @ W.T for the int4 / fp8 layouts of forge.quant.cuda with the weights
streamed through a cp.async ring in shared memory (Marlin-style). Opt-in: FORGE_QUANT_KERNEL=pipe routes
Int4CudaWeight / Fp8CudaWeight.matmul here (forge.quant.cuda)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from forge.kernels import compiler, quant_gemm

BLOCK_ROWS = 128  # rows per block (the kernel's BN): fixed, so the K split never depends on M
SLAB_K = 128  # inputs per ring stage
MAX_SPLITS = 4  # K splits at most (each adds 8 bytes per output to write and read back)
WAVE_BLOCKS_PER_SM = 2  # blocks per SM the split plan counts as one wave (two rings fit in an SM)
STAGE_TARGET_BYTES = 40 * 1024  # weight bytes in flight per block the ring aims for
MAX_SMEM = 112 * 1024  # per block: two blocks fit in an H100 / H200 SM
MAX_TICKETS = 1 << 16  # split-K tiles of one launch (token blocks x row blocks)

# Per device: zeroed int32 counters, each reset by the block that used it. Shared by every launch: two split
# launches must not run at the same time on different streams (forge runs a device's forward on one stream).
_tickets: dict[int, torch.Tensor] = {}


def tile_config(m: int) -> dict:
    """Warps along tokens (WM) and token tiles of 8 per warp (NT) for M tokens: BM = 8 NT WM covers M up to 64."""
    if m <= 8:
        return dict(WM=1, NT=1)
    if m <= 16:
        return dict(WM=1, NT=2)
    if m <= 32:  # one warp per row group: its dequantized fragments feed 4 token tiles
        return dict(WM=1, NT=4)
    return dict(WM=2, NT=4)  # 8 token tiles in one warp spill: two warps dequantize the same fragments


def weight_stage_bytes(code: int) -> int:
    """A slab of the block's rows: one 64-byte chunk per row (int4, 128 inputs) or two (fp8, 64 inputs each)."""
    return SLAB_K // (128 if code == 0 else 64) * BLOCK_ROWS * 64


def stage_bytes(code: int, group: int, wm: int, nt: int) -> int:
    """One ring stage (quant_gemm_pipe.cu's STAGE_BYTES): W, scales and x of one slab, rounded up to 128."""
    sb = 4 * (SLAB_K // group) if code == 0 else (4 if group else 0)
    x = 8 * nt * wm * (2 * SLAB_K + (32 if code == 0 else 16))
    return -(-(weight_stage_bytes(code) + BLOCK_ROWS * sb + x) // 128) * 128


def stages_for(code: int, group: int, wm: int, nt: int) -> int:
    """Ring depth: enough stages for STAGE_TARGET_BYTES of weights in flight (int4: 6, fp8: 4), fewer where the
    token block's x would take the ring past MAX_SMEM. Speed only: the sums do not depend on it."""
    stages = 1 + -(-STAGE_TARGET_BYTES // weight_stage_bytes(code))
    while stages > 2 and stages * stage_bytes(code, group, wm, nt) > MAX_SMEM:
        stages -= 1
    return stages


def split_plan(row_blocks: int, slabs: int, sms: int, splits: int | None = None) -> tuple[int, int]:
    """(S, slabs per split) for a grid of `row_blocks` x S blocks over `slabs` slabs of K: the S (<= MAX_SPLITS)
    with the fewest (waves of WAVE_BLOCKS_PER_SM blocks per SM x slabs per block), the fewest splits among
    equals; no split is left empty. A function of the weight's shape and the GPU only, never of M: a token's
    sums (and their order) are the same in every batch."""
    if splits is None:
        best = None
        for s in range(1, min(MAX_SPLITS, slabs) + 1):
            per = -(-slabs // s)
            cost = -(-row_blocks * -(-slabs // per) // (sms * WAVE_BLOCKS_PER_SM)) * per
            if best is None or cost < best[0]:
                best = (cost, s)
        splits = best[1]
    per = -(-slabs // max(1, min(splits, slabs)))
    return -(-slabs // per), per


def _tickets_for(device: torch.device) -> torch.Tensor:
    index = device.index if device.index is not None else torch.cuda.current_device()
    t = _tickets.get(index)
    if t is None:
        if torch.cuda.is_current_stream_capturing():  # the zeroing would only run at replay
            raise RuntimeError("quant_gemm_pipe: the first K-split launch on a device is inside a CUDA graph "
                               "capture; run the step once eagerly first (forge's graph capture warms up)")
        t = _tickets[index] = torch.zeros(MAX_TICKETS, dtype=torch.int32, device=device)
    return t


@dataclass(frozen=True)
class Plan:
    """A launch of quant_gemm_pipe_kernel: its defines, grid, block, dynamic shared memory and K split."""

    defines: dict
    grid: tuple[int, int, int]
    threads: int
    smem: int
    splits: int
    slabs_per_split: int
    nchunks: int


def launch_plan(layout, m: int, sms: int, splits: int | None = None, stages: int | None = None) -> Plan:
    """How gemm launches the kernel for M = m tokens of x @ layout.T on a GPU of `sms` SMs."""
    code, group = layout.code, layout.group
    rows = layout.codes.shape[0]
    slabs = -(-layout.padded_k // SLAB_K)
    row_blocks = -(-rows // BLOCK_ROWS)
    cfg = tile_config(m)
    cfg["STAGES"] = stages or stages_for(code, group, cfg["WM"], cfg["NT"])
    nsplit, per = split_plan(row_blocks, slabs, sms, splits)
    grid = (-(-m // (8 * cfg["NT"] * cfg["WM"])), row_blocks, nsplit)
    if nsplit > 1 and grid[0] * row_blocks > MAX_TICKETS:
        raise ValueError(f"quant_gemm_pipe: {grid[0] * row_blocks} split tiles exceed {MAX_TICKETS}")
    return Plan(dict(WCODE=code, GROUP=group, **cfg), grid, 32 * 4 * cfg["WM"],
                cfg["STAGES"] * stage_bytes(code, group, cfg["WM"], cfg["NT"]), nsplit, per,
                layout.padded_k // (128 if code == 0 else 64))


def gemm(x: torch.Tensor, layout, splits: int | None = None, stages: int | None = None) -> torch.Tensor:
    """x [..., K] (bfloat16 / float16) @ layout.T -> [..., N] in x's dtype, for an Int4CudaWeight or
    Fp8CudaWeight. `splits` / `stages` override the plan (benchmark sweeps; splits changes the sums' order)."""
    n, k = layout.shape
    if k % 8:
        raise ValueError(f"quant_gemm_pipe copies x 8 inputs at a time: K = {k} is not a multiple of 8")
    lead = x.shape[:-1]
    x2 = quant_gemm.vector_rows(x.reshape(-1, x.shape[-1]), 8)  # (the 16-byte copies of x need aligned rows)
    m = x2.shape[0]
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0:
        return out.view(*lead, n)
    plan = launch_plan(layout, m, compiler.num_sms(), splits, stages)
    rows = layout.codes.shape[0]
    if plan.splits > 1:
        ws = torch.empty(plan.splits, m, rows, dtype=torch.float32, device=x.device)
        tickets = _tickets_for(x.device)
    else:
        ws = tickets = out  # unused by the kernel when S = 1
    kernel = compiler.get_kernel("quant_gemm_pipe.cu", "quant_gemm_pipe_kernel", x.dtype, **plan.defines)
    compiler.allow_dynamic_smem(kernel, plan.smem)
    p = compiler.ptr
    compiler.run(kernel, plan.grid, plan.threads, p(out), p(x2), p(layout.codes), p(layout.scales), p(ws),
                 p(tickets), np.int32(m), np.int32(n), np.int32(rows), np.int32(k), np.int32(plan.nchunks),
                 np.int32(layout.groups_per_row), np.int32(plan.splits), np.int32(plan.slabs_per_split),
                 np.int64(layout.row_bytes), np.int64(x2.stride(0)), np.int64(n), shmem=plan.smem)
    return out.view(*lead, n)
