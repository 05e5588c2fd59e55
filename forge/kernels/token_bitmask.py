"""apply_token_bitmask launcher (kernel: token_bitmask.cu), with the same in torch ops as the CPU path.

Structured outputs fill one xgrammar bitmask row per constrained sequence (int32 words; bit t % 32
of word t / 32 set = token t allowed) and apply them to just those rows of the step's logits.
"""

import numpy as np
import torch

from forge.kernels import compiler

THREADS = 256


def apply_token_bitmask(logits: torch.Tensor, bitmask: torch.Tensor, rows: torch.Tensor) -> None:
    """In place: logits[rows[j], t] = -inf where bit t of bitmask[j] is 0; tokens past the mask
    (a padded logits row) too. logits [B, V]; bitmask int32 [R, W]; rows int32 [R], all on one
    device. float32 CUDA logits with contiguous rows take the kernel; anything else torch ops."""
    num_masked, words = bitmask.shape
    if rows.shape != (num_masked,) or rows.dtype != torch.int32 or bitmask.dtype != torch.int32:
        raise ValueError("apply_token_bitmask needs an int32 bitmask [R, W] and int32 rows [R]")
    if num_masked == 0:
        return
    if not (logits.is_cuda and logits.dtype == torch.float32 and logits.stride(-1) == 1 and compiler.available()):
        return apply_token_bitmask_torch(logits, bitmask, rows)
    bitmask, rows = bitmask.contiguous(), rows.contiguous()
    vocab = logits.shape[-1]
    kernel = compiler.get_kernel("token_bitmask.cu", "apply_token_bitmask_kernel")
    grid = ((vocab + THREADS - 1) // THREADS, num_masked)
    compiler.run(kernel, grid, THREADS, compiler.ptr(logits), compiler.ptr(bitmask), compiler.ptr(rows),
                 np.int32(vocab), np.int32(words), np.int64(logits.stride(0)))


@torch.inference_mode()  # the engine's logits are inference tensors (written in place here)
def apply_token_bitmask_torch(logits: torch.Tensor, bitmask: torch.Tensor, rows: torch.Tensor) -> None:
    """The same in torch ops, on any device: unpack the bits, mask the listed rows."""
    vocab = logits.shape[-1]
    bits = torch.arange(32, device=bitmask.device, dtype=torch.int32)
    allowed = ((bitmask[:, :, None] >> bits) & 1).bool().flatten(1)  # [R, 32 * W]
    if allowed.shape[1] < vocab:
        allowed = torch.cat([allowed, allowed.new_zeros(allowed.shape[0], vocab - allowed.shape[1])], 1)
    idx = rows.to(logits.device, torch.long)
    logits[idx] = logits[idx].masked_fill(~allowed[:, :vocab].to(logits.device), float("-inf"))
