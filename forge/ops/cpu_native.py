"""CpuOps with forge's own C++ kernels (forge/native/decode_ops.cpp) for the float32 per-layer ops.

A batch-1 decode step of a small quantized model is bound by how many ops it dispatches, not by
arithmetic: torch spends ~1-3 us on each of ~200 ops per layer-step. Each op here is one ctypes
call. Chosen by `forge.ops.get_ops` for quantized CPU models (the fast path); `CpuOps` stays the
exact reference, which these ops are tested against (tests/test_native_cpu.py). Anything the kernels
do not cover (another dtype, non-contiguous inputs, partial rotary, prefill attention rows) goes to
CpuOps unchanged.

The KV cache is float16 here (`kv_cache_dtype`, which the model runner allocates): a batch-16
decode step read ~45 MB of float32 K/V per step at 64 tokens of context, a third of its traffic;
float16, as llama.cpp's default cache, halves it, and the kernels compute in float32.
"""

import torch

from forge.native import threads as native_threads
from forge.ops.cpu import CpuOps
from forge.ops.metadata import AttentionMetadata

_F32 = torch.float32


def _plain(*tensors: torch.Tensor) -> bool:
    for t in tensors:
        if t.dtype != _F32 or not t.is_contiguous():
            return False
    return True


def _cache(k_cache: torch.Tensor, v_cache: torch.Tensor) -> bool:
    return (k_cache.dtype in (_F32, torch.float16) and v_cache.dtype == k_cache.dtype and k_cache.is_contiguous()
            and v_cache.is_contiguous())


class NativeCpuOps(CpuOps):
    name = "cpu-native"
    kv_cache_dtype = torch.float16

    def __init__(self, lib):
        super().__init__()
        self.lib = lib

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        if not _plain(x, weight):
            return super().rms_norm(x, weight, eps)
        h = x.shape[-1]
        out = torch.empty_like(x)
        self.lib.fq_rms_norm(x.data_ptr(), weight.data_ptr(), x.numel() // h, h, eps, out.data_ptr())
        return out

    def add_rms_norm(self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float):
        if not _plain(x, residual, weight) or x.shape != residual.shape:
            return super().add_rms_norm(x, residual, weight, eps)
        h = x.shape[-1]
        out, new_residual = torch.empty_like(x), torch.empty_like(x)
        self.lib.fq_add_rms_norm(x.data_ptr(), residual.data_ptr(), weight.data_ptr(), x.numel() // h, h, eps,
                                 out.data_ptr(), new_residual.data_ptr())
        return out, new_residual

    def silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        if not _plain(gate_up):
            return super().silu_mul(gate_up)
        inter = gate_up.shape[-1] // 2
        out = gate_up.new_empty(*gate_up.shape[:-1], inter)
        self.lib.fq_silu_mul(gate_up.data_ptr(), gate_up.numel() // (2 * inter), inter, out.data_ptr())
        return out

    def qkv_rope_cache(self, qkv, positions, cos_sin_cache, k_cache, v_cache, slot_mapping, num_heads, num_kv_heads,
                       head_dim, k_scale: float = 1.0, v_scale: float = 1.0):
        if not (_plain(qkv, cos_sin_cache) and _cache(k_cache, v_cache) and cos_sin_cache.shape[-1] == head_dim
                and positions.dtype == slot_mapping.dtype == torch.int64 and positions.is_contiguous()
                and slot_mapping.is_contiguous()):
            q = super().qkv_rope_cache(qkv, positions, cos_sin_cache, k_cache, v_cache, slot_mapping, num_heads,
                                       num_kv_heads, head_dim, k_scale, v_scale)
            return q.float()  # (CpuOps returns the cache's dtype)
        t = qkv.shape[0]
        q = qkv.new_empty(t, num_heads, head_dim)
        self.lib.fq_qkv_rope_cache(qkv.data_ptr(), t, positions.data_ptr(), cos_sin_cache.data_ptr(), num_heads,
                                   num_kv_heads, head_dim, k_cache.data_ptr(), v_cache.data_ptr(),
                                   slot_mapping.data_ptr(), k_cache.shape[1], q.data_ptr(), k_cache.dtype == torch.float16)
        return q

    def attention(self, q, k_cache, v_cache, meta: AttentionMetadata, scale: float, window: int | None = None,
                  soft_cap: float | None = None, k_scale: float = 1.0, v_scale: float = 1.0):
        """Decode rows (one query) in C, all at once; a step with prefill rows keeps CpuOps' path for
        those and runs its decode and verify rows here (_sequence_attention), so a decode row's
        result is the same in any step."""
        if meta.max_query_len == 1 and self._native_attention(q, k_cache, v_cache, meta):
            out = torch.empty_like(q)
            self._decode(q, k_cache, v_cache, meta.block_tables, meta.context_lens, scale, window, soft_cap, out)
            return out
        return super().attention(q, k_cache, v_cache, meta, scale, window, soft_cap, k_scale, v_scale)

    def _sequence_attention(self, q, k_cache, v_cache, meta: AttentionMetadata, i: int, scale: float,
                            window: int | None, soft_cap: float | None) -> torch.Tensor:
        n, ctx = q.shape[0], meta.context_lens_cpu[i]
        if not (self.attends_as_decodes(n, ctx) and self._native_attention(q, k_cache, v_cache, meta)):
            return super()._sequence_attention(q, k_cache, v_cache, meta, i, scale, window, soft_cap)
        out = torch.empty_like(q)  # each query as its decode: context ctx - n + 1 .. ctx
        own = torch.arange(ctx - n + 1, ctx + 1, dtype=torch.int32)
        self._decode(q, k_cache, v_cache, meta.block_tables[i : i + 1].expand(n, -1), own, scale, window, soft_cap, out)
        return out

    @staticmethod
    def _native_attention(q, k_cache, v_cache, meta: AttentionMetadata) -> bool:
        tables, lens = meta.block_tables, meta.context_lens
        return (_plain(q) and _cache(k_cache, v_cache) and tables.dtype == lens.dtype == torch.int32
                and tables.is_contiguous() and lens.is_contiguous() and q.shape[1] // k_cache.shape[2] <= 64)

    def _decode(self, q, k_cache, v_cache, tables, lens, scale, window, soft_cap, out) -> None:
        b, heads, d = q.shape
        self.lib.fq_decode_attention(q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), tables.data_ptr(),
                                     tables.stride(0), lens.data_ptr(), b, heads, k_cache.shape[2], d, k_cache.shape[1],
                                     scale, window or 0, soft_cap or 0.0, out.data_ptr(), native_threads.threads(),
                                     k_cache.dtype == torch.float16)
