"""Tensor parallelism across devices of one host (torch.distributed: NCCL on CUDA, gloo on CPU).

parallel_state: the process group and its collectives (no-ops at world size 1);
sharding: Megatron-style split of the HF-named weights for one rank;
worker: rank 0's executor (spawns the workers, broadcasts each step) and the worker loop.
"""

from forge.distributed.parallel_state import SINGLE, TPGroup
from forge.distributed.sharding import ShardPlan, plan_shard, shard_weights


def __getattr__(name: str):
    if name == "TensorParallelExecutor":  # imported lazily: it pulls in multiprocessing
        from forge.distributed.worker import TensorParallelExecutor

        return TensorParallelExecutor
    raise AttributeError(name)


__all__ = ["SINGLE", "ShardPlan", "TPGroup", "TensorParallelExecutor", "plan_shard", "shard_weights"]
