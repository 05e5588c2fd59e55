"""Per-step attention metadata, built by the model runner and passed explicitly through the model."""

from dataclasses import dataclass

import torch


@dataclass
class AttentionMetadata:
    """Describes one step's batch: B sequences contributing T query tokens in total.

    Every sequence has `query_len` new tokens (1 for a decode, up to a whole chunk for a prefill)
    whose K/V are written to the paged cache first; attention then reads the sequence's whole
    context (cached prefix + new tokens) through its block table.
    """

    positions: torch.Tensor  # [T] int64, position of each query token in its sequence
    slot_mapping: torch.Tensor  # [T] int64, cache slot (block * block_size + offset) of each token
    query_start_loc: torch.Tensor  # [B + 1] int32, cumulative query lengths (cu_seqlens_q)
    context_lens: torch.Tensor  # [B] int32, tokens of context after this step's tokens are written
    block_tables: torch.Tensor  # [B, max_blocks] int32, padded with 0
    max_query_len: int
    max_context_len: int
    # Host copies of the two length lists, so CPU loops and launch decisions need no device sync.
    query_lens_cpu: list[int]
    context_lens_cpu: list[int]

    @property
    def num_seqs(self) -> int:
        return len(self.query_lens_cpu)

    @property
    def is_decode_only(self) -> bool:
        return self.max_query_len == 1
