"""CpuOps details that the model-level tests would only catch indirectly."""

import pytest
import torch

from forge.ops.cpu import CpuOps
from forge.ops.metadata import AttentionMetadata


@pytest.mark.parametrize("heads,kv_heads", [(9, 3), (4, 4), (8, 1)])
def test_batched_decode_attention_equals_per_sequence_attention(heads, kv_heads):
    """The pure-decode path (all sequences in one batched op sequence, padded contexts masked)
    equals the per-sequence causal path, for ragged contexts scattered over shuffled blocks."""
    g = torch.Generator().manual_seed(heads * 10 + kv_heads)
    d, bs, num_blocks = 16, 4, 64
    lens = [1, 7, 0, 4, 13, 2]  # 0: a row with no context attends to nothing (zeros)
    k_cache = torch.randn(num_blocks, bs, kv_heads, d, generator=g)
    v_cache = torch.randn(num_blocks, bs, kv_heads, d, generator=g)
    order = torch.randperm(num_blocks, generator=g).tolist()
    max_blocks = max(-(-n // bs) for n in lens)
    tables = torch.zeros(len(lens), max_blocks, dtype=torch.int32)
    for i, n in enumerate(lens):
        for j in range(-(-n // bs)):  # (a zero-length row keeps block 0: padding, masked)
            tables[i, j] = order.pop()
    q = torch.randn(len(lens), heads, d, generator=g)
    meta = AttentionMetadata(
        positions=torch.tensor([n - 1 for n in lens]), slot_mapping=torch.zeros(len(lens), dtype=torch.long),
        query_start_loc=torch.arange(len(lens) + 1, dtype=torch.int32),
        context_lens=torch.tensor(lens, dtype=torch.int32), block_tables=tables,
        max_query_len=1, max_context_len=max(lens), query_lens_cpu=[1] * len(lens), context_lens_cpu=lens,
    )
    out = CpuOps().attention(q, k_cache, v_cache, meta, 0.25)
    for i, n in enumerate(lens):
        blocks = tables[i, : -(-n // bs)].long()
        k = k_cache[blocks].flatten(0, 1)[:n]
        v = v_cache[blocks].flatten(0, 1)[:n]
        ref = CpuOps._causal_attention(q[i : i + 1], k, v, heads // kv_heads, 0.25)
        torch.testing.assert_close(out[i : i + 1], ref, rtol=1e-5, atol=1e-6)
    assert torch.all(out[2] == 0)
