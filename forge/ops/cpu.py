"""Reference ops in plain PyTorch. Every CUDA kernel is tested against these."""

import torch
import torch.nn.functional as F

from forge.ops.metadata import AttentionMetadata


def rotate_neox(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE on the two halves of the head dim (HF `rotate_half` layout). x: [T, H, D]; cos/sin: [T, D/2]."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half].float(), x[..., half:].float()
    cos, sin = cos[:, None, :], sin[:, None, :]
    out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    return out.to(x.dtype)


class CpuOps:
    """Plain-PyTorch implementation of the ops interface (float32 or bfloat16)."""

    name = "cpu"

    def linear(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return F.linear(x, weight)

    def embedding(self, token_ids: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return F.embedding(token_ids, weight)

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
        return (weight.float() * xf).to(x.dtype)

    def add_rms_norm(
        self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """residual = x + residual; return (rms_norm(residual) * weight, residual)."""
        residual = x + residual
        return self.rms_norm(residual, weight, eps), residual

    def silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        """[T, 2I] (gate then up, from one fused GEMM) -> silu(gate) * up, [T, I]."""
        gate, up = gate_up.chunk(2, dim=-1)
        return F.silu(gate) * up

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
    ) -> torch.Tensor:
        """Split the fused QKV GEMM output, rotate q and k, write k and v into their cache slots.

        qkv: [T, (H + 2 Hkv) D]; cos_sin_cache: [max_pos, D] float32 (cos half, then sin half);
        k_cache/v_cache: [num_blocks, block_size, Hkv, D]. Returns q: [T, H, D].
        """
        t = qkv.shape[0]
        q, k, v = qkv.split([num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim], -1)
        cos, sin = cos_sin_cache[positions].chunk(2, dim=-1)
        q = rotate_neox(q.view(t, num_heads, head_dim), cos, sin)
        k = rotate_neox(k.view(t, num_kv_heads, head_dim), cos, sin)
        k_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, k.to(k_cache.dtype))
        v_cache.view(-1, num_kv_heads, head_dim).index_copy_(
            0, slot_mapping, v.reshape(t, num_kv_heads, head_dim).to(v_cache.dtype)
        )
        return q

    def attention(
        self,
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor:
        """Causal attention of each sequence's new queries over its whole paged context.

        q: [T, H, D] -> [T, H, D]. The query token i of a sequence with context length L and query
        length n sits at position L - n + i and sees keys 0 .. L - n + i.
        """
        block_size = k_cache.shape[1]
        num_heads, num_kv_heads = q.shape[1], k_cache.shape[2]
        group = num_heads // num_kv_heads
        if meta.max_query_len == 1:  # pure decode: every sequence at once
            return self._decode_attention(q, k_cache, v_cache, meta, group, scale)
        out = torch.empty_like(q)
        start = 0
        for i, (n, ctx) in enumerate(zip(meta.query_lens_cpu, meta.context_lens_cpu)):
            blocks = meta.block_tables[i, : (ctx + block_size - 1) // block_size].long()
            k = k_cache[blocks].flatten(0, 1)[:ctx]  # [ctx, Hkv, D]
            v = v_cache[blocks].flatten(0, 1)[:ctx]
            out[start : start + n] = self._causal_attention(q[start : start + n], k, v, group, scale)
            start += n
        return out

    @staticmethod
    def _decode_attention(q, k_cache, v_cache, meta: AttentionMetadata, group: int, scale: float) -> torch.Tensor:
        """One query per sequence (its last position) over its whole context, all sequences in two
        batched matmuls: contexts are gathered padded to the longest and the padding is masked.
        The same math as `_causal_attention` (float32 softmax); one op sequence instead of a
        Python loop over sequences, which dominated CPU decode steps at batch 16."""
        b, num_heads, d = q.shape
        block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
        max_ctx = meta.max_context_len
        tables = meta.block_tables[:, : (max_ctx + block_size - 1) // block_size].long()
        k = k_cache[tables].flatten(1, 2)[:, :max_ctx].float()  # [B, L, Hkv, D]; rows past a context are padding
        v = v_cache[tables].flatten(1, 2)[:, :max_ctx].float()
        qg = q.view(b, num_kv_heads, group, d).float()
        scores = torch.einsum("bhgd,blhd->bhgl", qg, k) * scale  # [B, Hkv, group, L]
        padding = torch.arange(max_ctx) >= meta.context_lens.to(torch.long)[:, None]  # [B, L]
        scores.masked_fill_(padding[:, None, None, :], float("-inf"))
        # Zeroing the padding again makes an empty context (all -inf: NaN) attend to nothing: 0.
        probs = torch.softmax(scores, dim=-1).masked_fill_(padding[:, None, None, :], 0.0)
        out = torch.einsum("bhgl,blhd->bhgd", probs, v)
        return out.reshape(b, num_heads, d).to(q.dtype)

    @staticmethod
    def _causal_attention(q, k, v, group: int, scale: float) -> torch.Tensor:
        """q: [n, H, D] (the last n positions); k, v: [ctx, Hkv, D]. Float32 softmax.

        The query heads of each KV head are stacked as rows of one matrix (no K/V repeat for GQA).
        """
        n, num_heads, d = q.shape
        ctx, num_kv_heads = k.shape[0], k.shape[1]
        # [Hkv, group * n, D], rows ordered (head in group, query index)
        qg = q.view(n, num_kv_heads, group, d).permute(1, 2, 0, 3).reshape(num_kv_heads, group * n, d)
        scores = torch.matmul(qg.float(), k.permute(1, 2, 0).float()) * scale  # [Hkv, group * n, ctx]
        if n > 1:
            query_pos = torch.arange(ctx - n, ctx).repeat(group)[:, None]
            scores.masked_fill_(torch.arange(ctx)[None, :] > query_pos, float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        out = torch.matmul(probs, v.permute(1, 0, 2).float())  # [Hkv, group * n, D]
        return out.view(num_kv_heads, group, n, d).permute(2, 0, 1, 3).reshape(n, num_heads, d).to(q.dtype)
