"""Megatron-style sharding of HF-named weights for one tensor-parallel rank. Which rule each weight
follows (column / row / vocab / replicated, and in what units) is the model's schema
(forge.models.schema); this module turns a rank into slice ranges and cuts them. The vocab-split
embedding is masked + all-reduced, the logits are all-gathered and the padding cut.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from forge.config import ModelConfig
from forge.errors import InvalidRequestError
from forge.models.schema import WeightSpec, dummy_weights, schema_of, spec_of
from forge.quant.layouts import Carrier, cat_rows


@dataclass(frozen=True)
class ShardPlan:
    rank: int
    world_size: int
    num_heads: int  # local query heads
    num_kv_heads: int  # local KV heads (1 when replicated)
    head_start: int  # first global query head of this rank
    kv_head_start: int  # first global KV head of this rank
    intermediate_size: int  # local MLP width
    vocab_size: int  # global (unpadded) vocabulary
    vocab_per_rank: int  # rows of this rank's embedding / lm_head shard (padded)
    total_kv_heads: int  # global KV heads
    moe_intermediate_size: int = 0  # local width of each expert (every rank holds every expert)

    @property
    def vocab_start(self) -> int:
        return self.rank * self.vocab_per_rank

    @property
    def kv_replicated(self) -> bool:
        """Fewer KV heads than ranks: several ranks hold (copies of) the same KV head."""
        return self.num_kv_heads * self.world_size > self.total_kv_heads

    def local_config(self, config: ModelConfig) -> ModelConfig:
        """The shape of this rank's shard, as a ModelConfig (for random dummy weights)."""
        return dataclasses.replace(config, num_heads=self.num_heads, num_kv_heads=self.num_kv_heads,
                                   intermediate_size=self.intermediate_size, vocab_size=self.vocab_per_rank,
                                   moe_intermediate_size=self.moe_intermediate_size)


def plan_shard(config: ModelConfig, rank: int, world_size: int) -> ShardPlan:
    """This rank's share of the model; a model that does not split in `world_size` is a request
    error naming the shape that does not divide (InvalidRequestError, a ValueError)."""
    tp = world_size
    if not 0 <= rank < tp:
        raise ValueError(f"rank {rank} outside a world of {tp}")
    h, hkv = config.num_heads, config.num_kv_heads
    if h % tp:
        raise _cannot_split(f"tensor_parallel_size {tp} must divide the number of attention heads ({h})")
    if config.num_experts:  # (no dense MLP: its intermediate_size is unused)
        if config.moe_intermediate_size % tp:
            raise _cannot_split(f"tensor_parallel_size {tp} must divide the experts' width moe_intermediate_size "
                                f"({config.moe_intermediate_size})")
    elif config.intermediate_size % tp:
        raise _cannot_split(f"tensor_parallel_size {tp} must divide intermediate_size ({config.intermediate_size})")
    if hkv >= tp:
        if hkv % tp:
            raise _cannot_split(f"tensor_parallel_size {tp} must divide the number of KV heads ({hkv})")
        local_kv, kv_start = hkv // tp, rank * (hkv // tp)
    else:  # fewer KV heads than ranks: each rank keeps the one KV head its query heads attend with
        if tp % hkv:
            raise _cannot_split(f"with {hkv} KV heads, tensor_parallel_size {tp} must be a multiple of {hkv}")
        local_kv, kv_start = 1, rank * hkv // tp
    plan = ShardPlan(
        rank=rank, world_size=tp, num_heads=h // tp, num_kv_heads=local_kv, head_start=rank * (h // tp),
        kv_head_start=kv_start, intermediate_size=config.intermediate_size // tp, vocab_size=config.vocab_size,
        vocab_per_rank=-(-config.vocab_size // tp), total_kv_heads=hkv,
        moe_intermediate_size=config.moe_intermediate_size // tp,
    )
    return plan


def _cannot_split(message: str) -> InvalidRequestError:
    return InvalidRequestError(message, param="tensor_parallel_size")


def _vocab_rows(t: torch.Tensor, plan: ShardPlan) -> torch.Tensor:
    start = plan.vocab_start
    n = max(0, min(plan.vocab_per_rank, plan.vocab_size - start))
    out = t.new_zeros((plan.vocab_per_rank,) + tuple(t.shape[1:]))
    if n:
        out[:n] = t[start:start + n]
    return out


def shard_ranges(spec: WeightSpec, config: ModelConfig, plan: ShardPlan) -> list[tuple[int, int]]:
    """(start, count) of this rank's slices along the split dim of a "column" or "row" weight: one,
    or one per part of a checkpoint's fused matrix (q, k, v or gate, up)."""
    d = config.head_dim
    heads = (plan.head_start * d, plan.num_heads * d)
    kv_heads = (plan.kv_head_start * d, plan.num_kv_heads * d)
    width = (plan.rank * plan.intermediate_size, plan.intermediate_size)
    if spec.split == "heads":
        return [heads]
    if spec.split == "kv_heads":
        return [kv_heads]
    if spec.split == "intermediate":
        return [width]
    if spec.split == "qkv":
        q, kv = config.q_size, config.kv_size
        return [heads, (q + kv_heads[0], kv_heads[1]), (q + kv + kv_heads[0], kv_heads[1])]
    if spec.split == "gate_up":
        return [width, (config.intermediate_size + width[0], width[1])]
    if spec.split == "experts":
        return [(plan.rank * plan.moe_intermediate_size, plan.moe_intermediate_size)]
    raise ValueError(f"{spec.hf_name}: a {spec.shard} shard needs a split unit, not {spec.split!r}")


def _cut(t: torch.Tensor, dim: int, ranges: list[tuple[int, int]]) -> torch.Tensor:
    if len(ranges) == 1:
        return t.narrow(dim, *ranges[0]).clone(memory_format=torch.contiguous_format)
    return torch.cat([t.narrow(dim, start, count) for start, count in ranges], dim)


def _cut_carrier(w: Carrier, dim: int, ranges: list[tuple[int, int]]) -> Carrier:
    """A quantized matrix (forge.quant.layouts) cut like its float form: rows with their codes and
    scales, or inputs (row-parallel: one range, on scale-group boundaries, else ValueError)."""
    if dim == 0:
        parts = [w.map_rows(lambda x, r=r: _cut(x, 0, [r])) for r in ranges]
        return parts[0] if len(parts) == 1 else cat_rows(parts)
    (start, count), = ranges
    return w.narrow_inputs(start, count)


def shard_tensor(name: str, t: torch.Tensor, config: ModelConfig, plan: ShardPlan) -> torch.Tensor:
    """This rank's slice of one HF-named weight, by its schema rule (a new tensor, so the full one can
    be freed). The loaders call it on each tensor as it is read, so a rank never holds the checkpoint.
    Stacked experts [E, out, in] are cut per expert (dims 1 / 2; one expert's [out, in], as the HF
    loader reads them, dims 0 / 1)."""
    spec = spec_of(name, schema_of(config))
    rule = spec.shard if spec is not None else "replicated"
    if isinstance(t, Carrier):
        return _shard_carrier(name, t, rule, spec, config, plan)
    stacked = t.dim() == 3
    if rule == "vocab":
        return _vocab_rows(t, plan)
    if rule == "column":
        return _cut(t, 1 if stacked else 0, shard_ranges(spec, config, plan))
    if rule == "row":
        return _cut(t, 2 if stacked else 1, shard_ranges(spec, config, plan))
    return t


def _shard_carrier(name: str, w: Carrier, rule: str, spec: WeightSpec | None, config: ModelConfig,
                   plan: ShardPlan) -> Carrier:
    """shard_tensor for a quantized matrix; a row-parallel cut inside a scale group is a request
    error naming the weight and its shape."""
    if rule == "vocab":
        return w.map_rows(lambda x: _vocab_rows(x, plan))
    if rule not in ("column", "row"):
        return w
    try:
        return _cut_carrier(w, 0 if rule == "column" else 1, shard_ranges(spec, config, plan))
    except ValueError as e:
        raise _cannot_split(f"tensor_parallel_size {plan.world_size} cuts {name} {list(w.shape)} "
                            f"({type(w).__name__}) between its quantization groups: {e}") from None


def tensor_sharder(config: ModelConfig, shard: tuple[int, int] | None):
    """(name, tensor) -> the tensor, or its slice for rank shard[0] of shard[1]: what the loaders
    apply to each tensor as they read it. Checks that the model splits before any tensor is read."""
    if shard is None or shard[1] == 1:
        return lambda name, t: t
    plan = plan_shard(config, *shard)
    return lambda name, t: shard_tensor(name, t, config, plan)


def shard_weights(weights: dict[str, torch.Tensor], config: ModelConfig, plan: ShardPlan) -> dict[str, torch.Tensor]:
    """This rank's slice of every HF-named weight."""
    return {name: shard_tensor(name, t, config, plan) for name, t in weights.items()}


def rank_weights(weights: dict, config: ModelConfig, plan: ShardPlan, sharded: bool, device, dtype: torch.dtype) -> dict:
    """The HF-named weights this rank's model is built from: `weights` when the loader already cut
    them (or there is one rank), their slices otherwise, and for the dummy load format (no weights)
    random ones of the schema's shapes for this rank, made on the device."""
    if not weights:
        return dummy_weights(plan.local_config(config), device, dtype, seed=plan.rank, lazy=True)
    if plan.world_size > 1 and not sharded:
        return shard_weights(weights, config, plan)
    return weights


def vocab_parallel_embedding(ops, token_ids: torch.Tensor, weight: torch.Tensor, plan: ShardPlan, tp) -> torch.Tensor:
    """Embedding lookup with the vocabulary split over ranks: each rank fills the rows of the ids it
    holds (zeros elsewhere) and one all-reduce sums them. Graph-capturable (no host sync)."""
    local = token_ids - plan.vocab_start
    outside = (local < 0) | (local >= plan.vocab_per_rank)
    hidden = ops.embedding(local.masked_fill(outside, 0), weight)
    hidden = hidden.masked_fill(outside[:, None], 0)
    return tp.all_reduce(hidden)


def gather_logits(logits: torch.Tensor, plan: ShardPlan, tp) -> torch.Tensor:
    """[n, vocab_per_rank] on every rank -> [n, vocab] (rank order, padding cut)."""
    return tp.all_gather(logits, dim=-1)[:, : plan.vocab_size]
