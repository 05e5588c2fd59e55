"""CUDA graphs for decode steps: one graph per batch-size bucket, replayed with padded inputs.

A decode step of a small model is a few hundred kernel launches of a few microseconds each, so
launch overhead, not the GPU, sets its speed. Capturing the whole forward (and the lm_head GEMM)
once per bucket turns a step into one replay. Padding rows write no KV (slot -1) and attend over
nothing (context length 0).
"""

import logging

import torch

from forge.ops.metadata import AttentionMetadata

logger = logging.getLogger("forge")


def batch_buckets(max_batch: int) -> list[int]:
    sizes = [1, 2, 4, 8]
    while sizes[-1] < max_batch:
        sizes.append(sizes[-1] + (8 if sizes[-1] < 32 else 16))
    return [s for s in sizes if s < max_batch] + [max_batch]


class DecodeGraphs:
    def __init__(self, model, kv_caches, max_batch: int, max_model_len: int, block_size: int):
        self.model = model
        self.kv_caches = kv_caches
        self.max_model_len = max_model_len
        device = model.device
        max_blocks = -(-max_model_len // block_size)
        self.max_batch = max_batch
        self.input_ids = torch.zeros(max_batch, dtype=torch.long, device=device)
        self.positions = torch.zeros(max_batch, dtype=torch.long, device=device)
        self.slot_mapping = torch.full((max_batch,), -1, dtype=torch.long, device=device)
        self.context_lens = torch.zeros(max_batch, dtype=torch.int32, device=device)
        self.block_tables = torch.zeros(max_batch, max_blocks, dtype=torch.int32, device=device)
        self.query_start_loc = torch.arange(max_batch + 1, dtype=torch.int32, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.logits: dict[int, torch.Tensor] = {}
        self.buckets = batch_buckets(max_batch)
        self.pool = None

    def _meta(self, bs: int) -> AttentionMetadata:
        return AttentionMetadata(
            positions=self.positions[:bs], slot_mapping=self.slot_mapping[:bs],
            query_start_loc=self.query_start_loc[: bs + 1], context_lens=self.context_lens[:bs],
            block_tables=self.block_tables[:bs], max_query_len=1, max_context_len=self.max_model_len,
            query_lens_cpu=[1] * bs, context_lens_cpu=[self.max_model_len] * bs,
        )

    def _forward(self, bs: int) -> torch.Tensor:
        hidden = self.model.forward(self.input_ids[:bs], self._meta(bs), self.kv_caches)
        return self.model.compute_logits(hidden)

    @torch.inference_mode()
    def capture(self) -> None:
        ops = self.model.ops
        ops.decode_max_context_len = self.max_model_len  # split-K plan for the longest context
        try:
            for bs in reversed(self.buckets):  # largest first, so smaller graphs reuse its memory pool
                self._forward(bs)  # warm up: compiles kernels, settles allocations
                torch.cuda.synchronize()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=self.pool):
                    self.logits[bs] = self._forward(bs)
                if self.pool is None:
                    self.pool = graph.pool()
                self.graphs[bs] = graph
            torch.cuda.synchronize()
        finally:
            ops.decode_max_context_len = None
        logger.info("captured CUDA graphs for decode batch sizes %s", self.buckets)

    def can_run(self, num_seqs: int, meta: AttentionMetadata) -> bool:
        return meta.is_decode_only and num_seqs <= self.max_batch

    def run(self, input_ids: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """Replay the smallest bucket that fits; returns logits [n, vocab] (a view valid until the next replay)."""
        n = input_ids.shape[0]
        bs = next(b for b in self.buckets if b >= n)
        self.input_ids[:n].copy_(input_ids, non_blocking=True)
        self.positions[:n].copy_(meta.positions, non_blocking=True)
        self.slot_mapping[:n].copy_(meta.slot_mapping, non_blocking=True)
        self.context_lens[:n].copy_(meta.context_lens, non_blocking=True)
        width = meta.block_tables.shape[1]
        self.block_tables[:n, :width].copy_(meta.block_tables, non_blocking=True)
        if bs > n:  # padding rows: no KV write, empty context
            self.slot_mapping[n:bs].fill_(-1)
            self.context_lens[n:bs].zero_()
        self.graphs[bs].replay()
        return self.logits[bs][:n]
