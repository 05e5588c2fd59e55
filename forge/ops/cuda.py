"""CUDA ops: torch GEMMs plus forge's own NVRTC-compiled kernels for the memory-bound steps.

Same interface and semantics as `CpuOps` (the reference every kernel is tested against), for
bfloat16, float16 and float32 CUDA tensors. Ops called with CPU tensors fall back to CpuOps.

Attention:
  * decode-only steps (every sequence has one new token): forge's paged decode kernel
    (forge/kernels/paged_attention.cu), graph-capturable;
  * prefill / mixed steps: each sequence's K/V is gathered from the paged cache and run through
    torch's varlen flash attention (bottom-right-aligned causal, checked once at first use
    against a reference; a sliding window is its window_size), or per-sequence SDPA with an
    explicit bottom-right causal mask where varlen is unavailable, misaligned, the dtype is
    float32, or the scores are soft-capped (Gemma 2: flash attention here has no soft-cap).
  * a float8 (e4m3) KV cache holds k / k_scale and v / v_scale (per-layer floats, the ops' k_scale /
    v_scale keywords; other caches ignore them): written by the cache-write kernel, read by the
    decode kernel (the scales folded into q's scale and the output), dequantized to q's dtype after
    a prefill step's gather.
"""

from __future__ import annotations

import inspect
import logging
import os

import torch
import torch.nn.functional as F

from forge.kernels import activation, norm, paged_attention, quant_gemm, rope_cache
from forge.kernels import moe as moe_kernel
from forge.ops import moe
from forge.ops.cpu import FP8_KV, CpuOps, _sdpa, _visible, dequantize_kv
from forge.ops.metadata import AttentionMetadata

log = logging.getLogger("forge")

try:
    from torch.nn.attention.varlen import varlen_attn as _varlen_attn
except ImportError:  # torch < 2.10
    _varlen_attn = None


# Above this many (token, expert) pairs a bfloat16 MoE step runs as grouped GEMMs (tensor cores) rather
# than forge's GEMV-style kernel (benchmarks/moe.py measures both).
MOE_KERNEL_MAX_PAIRS = 64
# rms_norm_linear (and rms_norm_qkv_rope_cache, the qkv GEMM's RoPE and KV-cache write in its epilogue) as one
# kernel (quant_gemm.cu with NORM_PROLOGUE) for steps of at most this many tokens, when FORGE_FUSED_NORM_GEMM=1
# (off by default until measured: benchmarks/quant_gemm.py --fused-norm).
FUSED_NORM_GEMM_ENV = "FORGE_FUSED_NORM_GEMM"
FUSED_NORM_GEMM_MAX_M = 8


def _is_cuda(*tensors: torch.Tensor) -> bool:
    return all(t.is_cuda for t in tensors)


def _causal_mask(n: int, ctx: int, device) -> torch.Tensor:
    """[n, ctx] bool, True = may attend: query i (position ctx - n + i) sees keys <= its position."""
    q_pos = torch.arange(ctx - n, ctx, device=device)[:, None]
    return torch.arange(ctx, device=device)[None, :] <= q_pos


class CudaOps(CpuOps):
    name = "cuda"

    def __init__(self):
        super().__init__()  # (the CPU fallback for CPU tensors uses CpuOps's per-step memos)
        self._prefill_backend: dict[torch.dtype, str] = {}
        self._logged: set[str] = set()
        # Upper bound on context length for decode split planning, e.g. max_model_len while
        # capturing CUDA graphs; None = use meta.max_context_len.
        self.decode_max_context_len: int | None = None
        self.fused_norm_gemm = os.environ.get(FUSED_NORM_GEMM_ENV, "0") == "1"

    def logits(self, hidden, weight):
        """A quantized lm_head (forge.quant.cuda) computes in the model's dtype like a float one does, so
        no rows are refined in float32 (CpuOps.logits does that for the CPU's bfloat16 kernels)."""
        if isinstance(weight, torch.Tensor) or not hidden.is_cuda:
            return super().logits(hidden, weight)
        return weight.matmul(hidden)

    # ---- elementwise / norms -------------------------------------------------------------
    def rms_norm(self, x, weight, eps):
        if not _is_cuda(x, weight):
            return super().rms_norm(x, weight, eps)
        return norm.rms_norm(x, weight, eps)

    def add_rms_norm(self, x, residual, weight, eps):
        if not _is_cuda(x, residual, weight):
            return super().add_rms_norm(x, residual, weight, eps)
        return norm.add_rms_norm(x, residual, weight, eps)

    def rms_norm_linear(self, hidden, residual, norm_weight, eps, weight, act=None):
        """With fused_norm_gemm (FORGE_FUSED_NORM_GEMM=1), steps of at most FUSED_NORM_GEMM_MAX_M tokens whose
        operands the kernel takes (quant_gemm.norm_gemm_fits: a bf16 / fp16 weight, or an int4 / fp8 layout
        without act) run as one launch: the residual add and RMSNorm computed bit for bit as add_rms_norm /
        rms_norm, in each block, into the GEMM's input, and act applied to its output; else the composition."""
        if (self.fused_norm_gemm and hidden.is_cuda and hidden.shape[0] <= FUSED_NORM_GEMM_MAX_M
                and quant_gemm.norm_gemm_fits(hidden, residual, norm_weight, weight, act)):
            return quant_gemm.rms_norm_linear(hidden, residual, norm_weight, eps, weight, act)
        return super().rms_norm_linear(hidden, residual, norm_weight, eps, weight, act)

    def rms_norm_qkv_rope_cache(self, hidden, residual, norm_weight, eps, qkv_weight, positions, cos_sin_cache,
                                k_cache, v_cache, slot_mapping, num_heads, num_kv_heads, head_dim,
                                k_scale: float = 1.0, v_scale: float = 1.0):
        """With fused_norm_gemm, where rms_norm_linear would be one kernel and quant_gemm.rope_cache_fits (head_dim
        a multiple of 32, rope_cache's float32 cos / sin table, a cache of hidden's dtype or float8): one launch,
        the qkv GEMM's output rotated and written to the cache in its epilogue bit for bit as qkv_rope_cache
        does; else the composition."""
        if (self.fused_norm_gemm and hidden.is_cuda and hidden.shape[0] <= FUSED_NORM_GEMM_MAX_M
                and quant_gemm.rope_cache_fits(hidden, residual, norm_weight, qkv_weight, cos_sin_cache, k_cache,
                                               v_cache, num_heads, num_kv_heads, head_dim)):
            return quant_gemm.rms_norm_qkv_rope_cache(hidden, residual, norm_weight, eps, qkv_weight, positions,
                                                      cos_sin_cache, k_cache, v_cache, slot_mapping, num_heads,
                                                      num_kv_heads, head_dim, k_scale, v_scale)
        return super().rms_norm_qkv_rope_cache(hidden, residual, norm_weight, eps, qkv_weight, positions,
                                               cos_sin_cache, k_cache, v_cache, slot_mapping, num_heads,
                                               num_kv_heads, head_dim, k_scale, v_scale)

    def silu_mul(self, gate_up):
        if not gate_up.is_cuda:
            return super().silu_mul(gate_up)
        return activation.silu_mul(gate_up)

    def gelu_tanh_mul(self, gate_up):
        if not gate_up.is_cuda:
            return super().gelu_tanh_mul(gate_up)
        return activation.gelu_tanh_mul(gate_up)

    def moe_route(self, router_logits, top_k, normalize):
        if not router_logits.is_cuda or router_logits.shape[-1] > moe_kernel.MAX_ROUTE_EXPERTS or top_k > 32:
            return super().moe_route(router_logits, top_k, normalize)
        return moe_kernel.route(router_logits, top_k, normalize)

    def moe_experts(self, x, weights, expert_ids, gate_up, down):
        """Decode-sized bfloat16 steps (at most MOE_KERNEL_MAX_PAIRS (token, expert) pairs) and float16 /
        float32 steps: forge's expert-by-expert kernels (forge/kernels/moe.cu), which read each picked
        expert's weights once; larger bfloat16 steps: two grouped GEMMs (torch's CUTLASS kernel, sm90).
        Neither syncs with the host, so decode steps capture into CUDA graphs."""
        if not _is_cuda(x, gate_up):
            return super().moe_experts(x, weights, expert_ids, gate_up, down)
        pairs = expert_ids.numel()
        if pairs <= MOE_KERNEL_MAX_PAIRS or (x.dtype != torch.bfloat16 and pairs < 2**16):  # (grid.y: < 2^16 pairs)
            return moe_kernel.experts(x, weights, expert_ids, gate_up, down)
        return moe.experts_grouped_mm(self, x, weights, expert_ids, gate_up, down)

    def qkv_rope_cache(self, qkv, positions, cos_sin_cache, k_cache, v_cache, slot_mapping,
                       num_heads, num_kv_heads, head_dim, k_scale: float = 1.0, v_scale: float = 1.0):
        if not _is_cuda(qkv, k_cache):
            return super().qkv_rope_cache(qkv, positions, cos_sin_cache, k_cache, v_cache, slot_mapping,
                                          num_heads, num_kv_heads, head_dim, k_scale, v_scale)
        return rope_cache.qkv_rope_cache(qkv, positions, cos_sin_cache, k_cache, v_cache, slot_mapping,
                                         num_heads, num_kv_heads, head_dim, k_scale, v_scale)

    # ---- attention -----------------------------------------------------------------------
    def attention(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                  meta: AttentionMetadata, scale: float, window: int | None = None,
                  soft_cap: float | None = None, k_scale: float = 1.0, v_scale: float = 1.0) -> torch.Tensor:
        if not _is_cuda(q, k_cache):
            return super().attention(q, k_cache, v_cache, meta, scale, window, soft_cap, k_scale, v_scale)
        if meta.is_decode_only:
            self._log_once("decode", "forge attention: decode steps use the paged decode kernel (split-K)")
            max_ctx = self.decode_max_context_len or meta.max_context_len
            return paged_attention.paged_decode_attention(
                q, k_cache, v_cache, meta.block_tables, meta.context_lens, scale, max_context_len=max_ctx,
                window=window, soft_cap=soft_cap, k_scale=k_scale, v_scale=v_scale,
            )
        return self.prefill_attention(q, k_cache, v_cache, meta, scale, window, soft_cap, k_scale, v_scale)

    def prefill_attention(self, q, k_cache, v_cache, meta: AttentionMetadata, scale: float,
                          window: int | None = None, soft_cap: float | None = None, k_scale: float = 1.0,
                          v_scale: float = 1.0) -> torch.Tensor:
        k, v, cu_k = self.gather_kv(k_cache, v_cache, meta)
        k, v = dequantize_kv(k, k_scale, q.dtype), dequantize_kv(v, v_scale, q.dtype)  # (a float8 cache; else as is)
        backend = self._backend_for(q.dtype, q.shape[-1])
        if backend.startswith("varlen") and soft_cap is None:
            max_k = max(meta.context_lens_cpu) if meta.context_lens_cpu else 0
            return self._run_varlen(backend, q, k, v, meta.query_start_loc, cu_k, meta.max_query_len, max_k, scale,
                                    window)
        return self._sdpa_per_sequence(q, k, v, meta.query_lens_cpu, meta.context_lens_cpu, scale, window, soft_cap)

    @staticmethod
    def gather_kv(k_cache, v_cache, meta: AttentionMetadata):
        """Each sequence's whole context, packed: k, v [sum(ctx), Hkv, D]; cu_seq_k int32 [B + 1]."""
        block_size, hkv, d = k_cache.shape[1], k_cache.shape[2], k_cache.shape[3]
        device = k_cache.device
        ctx = meta.context_lens_cpu
        cu = [0]
        for c in ctx:
            cu.append(cu[-1] + c)
        total = cu[-1]
        cu_k = torch.tensor(cu, dtype=torch.int32, device=device)
        b = len(ctx)
        lens = torch.tensor(ctx, dtype=torch.int64, device=device)
        seq_ids = torch.repeat_interleave(torch.arange(b, device=device), lens, output_size=total)
        pos = torch.arange(total, device=device) - cu_k[:-1].long()[seq_ids]
        blocks = meta.block_tables[seq_ids, pos // block_size].long()
        slots = blocks * block_size + pos % block_size
        if k_cache.dtype == FP8_KV:  # gathered as bytes (not every torch has float8 index_select kernels)
            k = k_cache.view(torch.uint8).view(-1, hkv, d).index_select(0, slots).view(FP8_KV)
            v = v_cache.view(torch.uint8).view(-1, hkv, d).index_select(0, slots).view(FP8_KV)
            return k, v, cu_k
        k = k_cache.view(-1, hkv, d).index_select(0, slots)
        v = v_cache.view(-1, hkv, d).index_select(0, slots)
        return k, v, cu_k

    def _run_varlen(self, backend, q, k, v, cu_q, cu_k, max_q, max_k, scale, window: int | None = None):
        # (left, right) keys around the bottom-right-aligned diagonal: -1 = unbounded
        kwargs = dict(scale=scale, window_size=(-1 if window is None else window - 1, 0))
        if backend == "varlen":
            kwargs["enable_gqa"] = True
        elif backend == "varlen-repeat" and k.shape[1] != q.shape[1]:
            group = q.shape[1] // k.shape[1]
            k = k.repeat_interleave(group, dim=1)
            v = v.repeat_interleave(group, dim=1)
        return _varlen_attn(q.contiguous(), k, v, cu_q.to(torch.int32), cu_k, max_q, max_k, **kwargs)

    @staticmethod
    def _sdpa_per_sequence(q, k, v, query_lens, context_lens, scale, window: int | None = None,
                           soft_cap: float | None = None):
        out = torch.empty_like(q)
        qs = ks = 0
        group = q.shape[1] // k.shape[1]
        for n, ctx in zip(query_lens, context_lens):
            qi = q[qs:qs + n].transpose(0, 1)[None]  # [1, H, n, D]
            ki = k[ks:ks + ctx].transpose(0, 1)[None]  # [1, Hkv, ctx, D]
            vi = v[ks:ks + ctx].transpose(0, 1)[None]
            if window is not None or soft_cap is not None:  # the CPU reference's math, in float32
                o = _sdpa(qi.float(), ki.float(), vi.float(), _visible(ctx, n, window, ctx, q.device), scale, group,
                          soft_cap).to(q.dtype)
            else:
                if group > 1:
                    ki = ki.repeat_interleave(group, dim=1)
                    vi = vi.repeat_interleave(group, dim=1)
                if n == ctx:
                    o = F.scaled_dot_product_attention(qi, ki, vi, is_causal=True, scale=scale)
                elif n == 1:
                    o = F.scaled_dot_product_attention(qi, ki, vi, scale=scale)
                else:
                    mask = _causal_mask(n, ctx, q.device)
                    o = F.scaled_dot_product_attention(qi, ki, vi, attn_mask=mask, scale=scale)
            out[qs:qs + n] = o[0].transpose(0, 1)
            qs += n
            ks += ctx
        return out

    # ---- backend choice ------------------------------------------------------------------
    def _backend_for(self, dtype: torch.dtype, head_dim: int) -> str:
        key = (dtype, head_dim)
        backend = self._prefill_backend.get(key)
        if backend is None:
            backend = self._probe_varlen(dtype, head_dim)
            self._prefill_backend[key] = backend
            log.info("forge attention: prefill uses %s for %s, head_dim %d", backend, dtype, head_dim)
        return backend

    def _probe_varlen(self, dtype: torch.dtype, head_dim: int) -> str:
        """Pick a varlen mode whose causal mask is bottom-right aligned (else 'sdpa')."""
        if _varlen_attn is None or dtype not in (torch.float16, torch.bfloat16) or head_dim % 8 or head_dim > 256:
            return "sdpa"
        params = inspect.signature(_varlen_attn).parameters
        modes = (["varlen"] if "enable_gqa" in params else []) + ["varlen-native-gqa", "varlen-repeat"]
        if "window_size" not in params:
            return "sdpa"
        gen = torch.Generator(device="cuda").manual_seed(0)
        dev = torch.device("cuda")
        h, hkv, d = 4, 2, head_dim
        query_lens, context_lens = [3, 4, 1], [7, 4, 5]
        q = torch.randn(sum(query_lens), h, d, generator=gen, device=dev).to(dtype)
        k = torch.randn(sum(context_lens), hkv, d, generator=gen, device=dev).to(dtype)
        v = torch.randn(sum(context_lens), hkv, d, generator=gen, device=dev).to(dtype)
        cu_q = torch.tensor([0, 3, 7, 8], dtype=torch.int32, device=dev)
        cu_k = torch.tensor([0, 7, 11, 16], dtype=torch.int32, device=dev)
        scale = d ** -0.5
        ref = self._sdpa_per_sequence(q.float(), k.float(), v.float(), query_lens, context_lens, scale)
        for mode in modes:
            try:
                out = self._run_varlen(mode, q, k, v, cu_q, cu_k, max(query_lens), max(context_lens), scale)
                err = ((out.float() - ref).norm() / ref.norm()).item()
            except Exception as e:  # noqa: BLE001 - any failure: try the next mode
                log.debug("forge attention: varlen mode %s failed: %s", mode, e)
                continue
            if err < 2e-2:
                return mode
            log.warning("forge attention: varlen mode %s disagrees with the reference (rel err %.3g); "
                        "not bottom-right aligned?", mode, err)
        return "sdpa"

    def _log_once(self, key: str, msg: str) -> None:
        if key not in self._logged:
            self._logged.add(key)
            log.info(msg)
