"""Reference ops in plain PyTorch. Every CUDA kernel is tested against these."""

import torch
import torch.nn.functional as F

from forge.ops import moe
from forge.ops.metadata import AttentionMetadata


def _as(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """t in `dtype`; skips the dispatch of a no-op .to(), ~1 us each, hundreds per decode step."""
    return t if t.dtype == dtype else t.to(dtype)


FP8_KV = torch.float8_e4m3fn  # the float8 KV cache's dtype (EngineConfig.kv_cache_dtype fp8, CUDA)
FP8_MAX = 448.0  # its largest finite value


def quantize_kv(x: torch.Tensor, scale: float) -> torch.Tensor:
    """x as a float8 (e4m3) KV cache stores it: x / scale in float32 (an elementwise IEEE division,
    like the CUDA kernel's), rounded to nearest even, saturated to +-448."""
    xf = x.float()
    return torch.div(xf, torch.full_like(xf, scale)).clamp_(-FP8_MAX, FP8_MAX).to(FP8_KV)


def dequantize_kv(cache: torch.Tensor, scale: float, dtype: torch.dtype) -> torch.Tensor:
    """K or V read from a float8 cache: its values times its scale, as `dtype`; any other cache as it is."""
    if cache.dtype != FP8_KV:
        return cache
    out = cache.to(dtype)
    return out if scale == 1.0 else out.mul_(scale)


def _additive_mask(valid: torch.Tensor) -> torch.Tensor:
    """[B, L] bool (True = attend) -> [B, 1, 1, L] float32 0 / -inf, built once per step (SDPA would
    convert a bool mask in every layer)."""
    return torch.zeros(valid.shape, device=valid.device).masked_fill_(~valid, float("-inf"))[:, None, None]


def _sdpa(q, k, v, mask, scale: float, group: int, soft_cap: float | None = None) -> torch.Tensor:
    """Attention of q [B, H, n, D] over k, v [B, Hkv, L, D] with `mask` (bool, True = attend, or
    additive), float32. With soft_cap the scores are capped before the mask, cap * tanh(s / cap)
    (Gemma 2), written out as HF's eager attention does (SDPA has no soft-cap)."""
    if soft_cap is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=group > 1)
    if group > 1:
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    scores = torch.tanh((q @ k.transpose(-1, -2)) * (scale / soft_cap)) * soft_cap
    scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    return torch.softmax(scores, dim=-1) @ v


def _decode_sdpa(q, k, v, mask, scale: float, group: int, soft_cap: float | None = None) -> torch.Tensor:
    """SDPA of one query per row, on one thread: with more, torch splits a small batch's keys over
    threads, and a row's sums then depend on the batch it ran in (a decode's attention is a small
    part of its step)."""
    threads = torch.get_num_threads()
    if threads > 1:
        torch.set_num_threads(1)
    try:
        return _sdpa(q, k, v, mask, scale, group, soft_cap)
    finally:
        if threads > 1:
            torch.set_num_threads(threads)


def _visible(ctx: int, n: int, window: int | None, length: int, device) -> torch.Tensor:
    """[n, length] bool: query i of the last n of ctx positions (position ctx - n + i) sees key j when
    j <= its position and, with a window, j > its position - window; keys past ctx are padding."""
    keys = torch.arange(length, device=device)
    pos = torch.arange(ctx - n, ctx, device=device)[:, None]
    seen = keys <= pos
    return seen & (keys > pos - window) if window is not None else seen


class _StepMemo:
    """A value computed from a step's small index tensors once, not in each of the model's layers;
    recomputed when the tensors differ by value (callers may refill the same buffers every step)."""

    def __init__(self):
        self.key: tuple | None = None
        self.value = None

    def get(self, tensors: tuple, extra: tuple, compute):
        key = self.key
        if (key is None or len(key[1]) != len(extra) or not all(a is b or (not isinstance(a, torch.Tensor) and a == b)
                                                                for a, b in zip(key[1], extra))
                or any(a.shape != b.shape or not torch.equal(a, b) for a, b in zip(key[0], tensors))):
            self.value = compute()
            self.key = (tuple(t.clone() for t in tensors), extra)
        return self.value


# Rows of fewer queries after a cached prefix are attended query by query as decodes
# (CpuOps._causal_attention): a verify row of up to 64 drafts + 1 (speculative_config's
# num_speculative_tokens <= 64) then gives each query exactly its decode result.
VERIFY_QUERIES = 66
LOGITS_REFINED = 32  # top logits per row recomputed in float32 after a quantized lm_head (CpuOps.logits)


class CpuOps:
    """Plain-PyTorch implementation of the ops interface (float32 or bfloat16).

    A decode step of a small model is bound by how many ops it dispatches, so values every layer
    needs (the step's RoPE rows, the blocks it starts, the decode attention's context blocks and
    mask) are computed once per step (_StepMemo).
    """

    name = "cpu"

    def __init__(self):
        self._rope, self._fresh = _StepMemo(), _StepMemo()
        self._decode_plans: dict[int | None, _StepMemo] = {}  # by attention window (layers may differ)

    def linear(self, x: torch.Tensor, weight) -> torch.Tensor:
        """x @ weight.T; weight is a float tensor or a quantized layout (forge.quant), whose kernel
        returns bfloat16 (the callers' float32 adds and norms promote it back)."""
        if isinstance(weight, torch.Tensor):
            return F.linear(x, weight)
        return weight.matmul(x)

    def logits(self, hidden: torch.Tensor, weight) -> torch.Tensor:
        """The lm_head: hidden @ weight.T. From a quantized layout, the kernel's bfloat16 output
        steps by 2^-8 of a logit (1/8 nat at logits of 16-32), so the top LOGITS_REFINED of each
        row are recomputed in float32 from the layout's rows: the likely tokens' logprobs come out
        float32-accurate (mean KL to the exact path over benchmarks/data/kl_text.txt: 8.2e-4 -> 4.4e-4;
        refining every logit: 3.7e-4)."""
        if isinstance(weight, torch.Tensor):
            return self.linear(hidden, weight)
        logits = weight.matmul(hidden)
        top = logits.topk(min(LOGITS_REFINED, logits.shape[-1]), dim=-1).indices  # [n, k]
        return logits.float().scatter_(-1, top, weight.row_dots(top, hidden))

    def embedding(self, token_ids: torch.Tensor, weight) -> torch.Tensor:
        if isinstance(weight, torch.Tensor):
            return F.embedding(token_ids, weight)
        return weight.rows(token_ids)

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        xf = _as(x, torch.float32)
        inv_rms = xf.pow(2).mean(-1, keepdim=True).add_(eps).rsqrt_()
        return _as((xf * inv_rms).mul_(weight), x.dtype)

    def add_rms_norm(
        self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """residual = x + residual; return (rms_norm(residual) * weight, residual)."""
        residual = x + residual
        return self.rms_norm(residual, weight, eps), residual

    def rms_norm_linear(self, hidden: torch.Tensor, residual: torch.Tensor | None, norm_weight: torch.Tensor,
                        eps: float, weight, act: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """A decoder layer's norm and the GEMM that reads it: residual_out = hidden + residual (hidden itself
        when residual is None: the first layer), y = linear(rms_norm(residual_out) * norm_weight, weight),
        with act ("silu" / "gelu_tanh") the gated activation of y's [gate, up] halves -> (y, residual_out).
        Here the composition of add_rms_norm / rms_norm, linear and silu_mul / gelu_tanh_mul; CudaOps may
        run it as one kernel at decode sizes."""
        if residual is None:
            x, residual = self.rms_norm(hidden, norm_weight, eps), hidden
        else:
            x, residual = self.add_rms_norm(hidden, residual, norm_weight, eps)
        y = self.linear(x, weight)
        if act is not None:
            y = {"silu": self.silu_mul, "gelu_tanh": self.gelu_tanh_mul}[act](y)
        return y, residual

    def rms_norm_qkv_rope_cache(self, hidden: torch.Tensor, residual: torch.Tensor | None, norm_weight: torch.Tensor,
                                eps: float, qkv_weight, positions: torch.Tensor, cos_sin_cache: torch.Tensor,
                                k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor,
                                num_heads: int, num_kv_heads: int, head_dim: int, k_scale: float = 1.0,
                                v_scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
        """A layer's input norm through its KV-cache write, for a family without a qkv bias or q/k norms:
        qkv = rms_norm_linear(hidden, residual, norm_weight, eps, qkv_weight), then qkv_rope_cache(qkv, ...)
        -> (q [T, H, D], residual_out). Here that composition; CudaOps may run it as one kernel at decode sizes."""
        qkv, residual = self.rms_norm_linear(hidden, residual, norm_weight, eps, qkv_weight)
        q = self.qkv_rope_cache(qkv, positions, cos_sin_cache, k_cache, v_cache, slot_mapping, num_heads,
                                num_kv_heads, head_dim, k_scale, v_scale)
        return q, residual

    def silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        """[T, 2I] (gate then up, from one fused GEMM) -> silu(gate) * up, [T, I]."""
        gate, up = gate_up.chunk(2, dim=-1)
        return F.silu(gate) * up

    def gelu_tanh_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        """[T, 2I] -> gelu_tanh(gate) * up, [T, I] (GeGLU: Gemma's MLP)."""
        gate, up = gate_up.chunk(2, dim=-1)
        return F.gelu(gate, approximate="tanh") * up

    def moe_route(self, router_logits: torch.Tensor, top_k: int, normalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """[T, E] router logits -> (weights [T, k] float32, expert ids [T, k]): softmax top-k (forge.ops.moe)."""
        return moe.route(router_logits, top_k, normalize)

    def moe_experts(self, x: torch.Tensor, weights: torch.Tensor, expert_ids: torch.Tensor, gate_up, down) -> torch.Tensor:
        """x [T, H] through each token's k experts (gate_up [E, 2I, H], down [E, H, I]), summed with the
        router's weights -> [T, H]: tokens sorted by expert, one GEMM pair per expert with rows (forge.ops.moe)."""
        return moe.experts_reference(self, x, weights, expert_ids, gate_up, down)

    def qkv_rope_cache(
        self,
        qkv: torch.Tensor,
        positions: torch.Tensor,
        cos_sin_cache: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        slot_mapping: torch.Tensor,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        k_scale: float = 1.0,
        v_scale: float = 1.0,
    ) -> torch.Tensor:
        """Split the fused QKV GEMM output, rotate q and k, write k and v into their cache slots.

        qkv: [T, (H + 2 Hkv) D]; cos_sin_cache: [max_pos, D] float32 (cos half, then sin half);
        k_cache/v_cache: [num_blocks, block_size, Hkv, D]. Returns q: [T, H, D]. A float8 cache
        (CUDA; here the reference) stores quantize_kv(k, k_scale), k rounded to qkv's dtype first as
        the CUDA kernel does, and quantize_kv(v, v_scale); other caches ignore the scales.
        """
        t = qkv.shape[0]
        qk_size = (num_heads + num_kv_heads) * head_dim
        cos, sin = self._rope_rows(positions, cos_sin_cache)
        # q and k rotated together: x * cos + swap_halves(x) * (-sin, sin), in float32
        qk = qkv[:, :qk_size].view(t, num_heads + num_kv_heads, head_dim)
        rotated = torch.addcmul(qk * cos, qk.roll(head_dim // 2, -1), sin)
        q, k = rotated[:, :num_heads], rotated[:, num_heads:]
        v = qkv[:, qk_size:].view(t, num_kv_heads, head_dim)
        q_dtype = k_cache.dtype  # the model's dtype (a quantized matmul's bfloat16 qkv is rotated in float32)
        if k_cache.dtype == FP8_KV:  # written as bytes: torch's CPU index ops have no float8 kernels
            q_dtype = qkv.dtype
            k, v = quantize_kv(k.to(qkv.dtype), k_scale).view(torch.uint8), quantize_kv(v, v_scale).view(torch.uint8)
            k_cache, v_cache = k_cache.view(torch.uint8), v_cache.view(torch.uint8)
        fresh = self._fresh_blocks(slot_mapping, k_cache.shape[1])
        if fresh is not None:  # a block's first write zeroes it: the decode attention reads whole blocks
            k_cache.index_fill_(0, fresh, 0.0)
            v_cache.index_fill_(0, fresh, 0.0)
        k_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, _as(k, k_cache.dtype))
        v_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, _as(v, v_cache.dtype))
        return _as(q, q_dtype)

    def _fresh_blocks(self, slot_mapping: torch.Tensor, block_size: int) -> torch.Tensor | None:
        """Blocks whose first slot this step writes (a sequence's tokens fill a block from its slot 0),
        or None; once per step. The model runner leaves the CPU cache unwritten (no resident pages
        until used), so a block's unwritten slots could hold NaN bits; zeroed, the masked padding of
        the decode attention multiplies a zero weight by a finite value."""
        def compute():
            starts = slot_mapping[slot_mapping % block_size == 0]
            return starts // block_size if starts.numel() else None

        return self._fresh.get((slot_mapping,), (block_size,), compute)

    def _rope_rows(self, positions: torch.Tensor, cos_sin_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, cos) and (-sin, sin) of the step's positions, [T, 1, D]; once per step."""
        def compute():
            cos, sin = cos_sin_cache[positions].chunk(2, dim=-1)
            return torch.cat([cos, cos], -1)[:, None], torch.cat([-sin, sin], -1)[:, None]

        return self._rope.get((positions,), (cos_sin_cache,), compute)

    def attention(
        self,
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
        window: int | None = None,
        soft_cap: float | None = None,
        k_scale: float = 1.0,
        v_scale: float = 1.0,
    ) -> torch.Tensor:
        """Causal attention of each sequence's new queries over its paged context.

        q: [T, H, D] -> [T, H, D]. The query token i of a sequence with context length L and query
        length n sits at position L - n + i and sees keys 0 .. L - n + i; with a window, only the
        last `window` of those (itself included: HF's sliding window). soft_cap: scores become
        soft_cap * tanh(scores / soft_cap) before the softmax (Gemma 2). A float8 cache (the CUDA
        path's; here the reference) is read as its values times k_scale / v_scale.
        """
        if k_cache.dtype == FP8_KV:  # (the whole cache, in float32: a reference, not a fast path)
            k_cache, v_cache = dequantize_kv(k_cache, k_scale, torch.float32), dequantize_kv(v_cache, v_scale, torch.float32)
        num_heads, num_kv_heads = q.shape[1], k_cache.shape[2]
        group = num_heads // num_kv_heads
        if meta.max_query_len == 1:  # pure decode: every sequence at once
            return self._decode_attention(q, k_cache, v_cache, meta, group, scale, window, soft_cap)
        out = torch.empty_like(q)
        start = 0
        for i, n in enumerate(meta.query_lens_cpu):
            out[start : start + n] = self._sequence_attention(q[start : start + n], k_cache, v_cache, meta, i, scale,
                                                              window, soft_cap)
            start += n
        return out

    def _sequence_attention(self, q, k_cache, v_cache, meta: AttentionMetadata, i: int, scale: float,
                            window: int | None, soft_cap: float | None) -> torch.Tensor:
        """Sequence i's queries q [n, H, D] over its paged context, in a step with prefill rows."""
        ctx, block_size = meta.context_lens_cpu[i], k_cache.shape[1]
        blocks = meta.block_tables[i, : (ctx + block_size - 1) // block_size].long()
        k = k_cache[blocks].flatten(0, 1)[:ctx]  # [ctx, Hkv, D]
        v = v_cache[blocks].flatten(0, 1)[:ctx]
        return self._causal_attention(q, k, v, q.shape[1] // k_cache.shape[2], scale, window, soft_cap)

    @staticmethod
    def attends_as_decodes(n: int, ctx: int) -> bool:
        """Whether a sequence's n queries (context ctx) are attended query by query, each exactly as
        a decode step would: a decode row in a mixed step, or a verify row (a few queries after a
        cached prefix, forge.spec_decode), so its result does not depend on the step it ran in."""
        return n == 1 or n < min(ctx, VERIFY_QUERIES)

    def _decode_attention(self, q, k_cache, v_cache, meta: AttentionMetadata, group: int, scale: float,
                          window: int | None = None, soft_cap: float | None = None) -> torch.Tensor:
        """One query per sequence (its last position) over its whole context, all sequences in one
        SDPA call: contexts are gathered padded to the longest and the padding is masked. The same
        math as `_causal_attention` (float32 softmax); one op sequence instead of a Python loop over
        sequences, which dominated CPU decode steps at batch 16."""
        b, num_heads, d = q.shape
        num_kv_heads = k_cache.shape[2]
        index, mask, empty = self._decode_slots(meta, k_cache.shape[1], q.device, window)
        rows = k_cache if index.numel() * k_cache.shape[1] == mask.shape[0] * mask.shape[-1] else None
        if rows is not None:  # whole blocks (block_size a multiple of 16): a few long copies
            k, v = k_cache.index_select(0, index), v_cache.index_select(0, index)
        else:
            k = k_cache.view(-1, num_kv_heads, d).index_select(0, index)
            v = v_cache.view(-1, num_kv_heads, d).index_select(0, index)
        k, v = (t.view(b, -1, num_kv_heads, d).transpose(1, 2) for t in (k, v))  # [B, Hkv, L, D]
        f32 = torch.float32
        out = _decode_sdpa(_as(q, f32)[:, :, None], _as(k, f32), _as(v, f32), mask, scale, group, soft_cap)  # [B, H, 1, D]
        if empty:  # a row with no context (every key masked) attends to nothing: 0, not NaN
            out = out.nan_to_num_(0.0)
        return _as(out.view(b, num_heads, d), q.dtype)

    def _decode_slots(self, meta: AttentionMetadata, block_size: int, device, window: int | None = None) -> tuple:
        """What every layer's decode attention gathers, once per step (and window): the context's
        cache blocks [B * L / block_size] when block_size is a multiple of 16 (else its slots, [B * L]),
        the padding mask [B, 1, 1, L] (0 / -inf; with a window, keys before the window are masked
        too) and whether a row is empty. L is the longest
        context rounded up to a multiple of 16, and the mask is always applied: a row then gives
        bit-identical results alone or in any batch (SDPA's sums over L differ only by whole vectors
        of exact zeros; unpadded, rows came out ~1e-7 apart, enough to flip near-tied greedy picks).
        Padding reads the row's own zeroed block tail (CpuOps._fresh_blocks) or block 0, which the
        model runner zeroes."""

        def compute():
            padded = -(-max(meta.max_context_len, 1) // 16) * 16
            num_blocks = -(-padded // block_size)
            tables = meta.block_tables[:, :num_blocks].long()
            if tables.shape[1] < num_blocks:  # the table is narrower than the padding: pad it with block 0
                tables = F.pad(tables, (0, num_blocks - tables.shape[1]))
            if block_size % 16 == 0:
                index, length = tables.flatten(), num_blocks * block_size
            else:
                offsets = torch.arange(block_size, device=device)
                index, length = (tables[:, :, None] * block_size + offsets).flatten(1)[:, :padded], padded
            keys = torch.arange(length, device=device)
            ctx = meta.context_lens.to(torch.long)[:, None]
            valid = keys < ctx
            if window is not None:
                valid &= keys >= ctx - window
            if block_size % 16:
                index = index.masked_fill(keys >= ctx, 0).flatten()
            return index, _additive_mask(valid), min(meta.context_lens_cpu) == 0

        memo = self._decode_plans.setdefault(window, _StepMemo())
        return memo.get((meta.block_tables, meta.context_lens), (block_size,), compute)

    @staticmethod
    def _causal_attention(q, k, v, group: int, scale: float, window: int | None = None,
                          soft_cap: float | None = None) -> torch.Tensor:
        """q: [n, H, D] (the last n positions); k, v: [ctx, Hkv, D]. Float32 softmax (torch's SDPA:
        flash attention on the CPU, GQA without repeating K/V)."""
        n, ctx = q.shape[0], k.shape[0]
        if CpuOps.attends_as_decodes(n, ctx):  # exactly _decode_attention's padded, masked, one-thread call
            padded = -(-ctx // 16) * 16
            k, v = (F.pad(t, (0, 0, 0, 0, 0, padded - ctx)) for t in (k, v))
            mask = _additive_mask(_visible(ctx, n, window, padded, q.device))  # [n, 1, 1, L]
            kh, vh = (t.float().transpose(0, 1)[None].expand(n, -1, -1, -1) for t in (k, v))  # (one SDPA batch row
            # per query: several queries in one row are blocked differently, ~2e-7 apart)
            return _decode_sdpa(q.float()[:, :, None], kh, vh, mask, scale, group, soft_cap)[:, :, 0].to(q.dtype)
        qh, kh, vh = (t.float().transpose(0, 1)[None] for t in (q, k, v))  # [1, heads, len, D]
        if n == ctx and window is None and soft_cap is None:  # no cached prefix: the usual top-left causal mask
            out = F.scaled_dot_product_attention(qh, kh, vh, is_causal=n > 1, scale=scale, enable_gqa=group > 1)
        else:  # query i sits at position ctx - n + i
            out = _sdpa(qh, kh, vh, _visible(ctx, n, window, ctx, q.device), scale, group, soft_cap)
        return out[0].transpose(0, 1).to(q.dtype)
