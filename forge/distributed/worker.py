"""Tensor-parallel processes: rank 0 (the engine) schedules and broadcasts each step; workers follow.

`TensorParallelExecutor` lives in the engine's process (rank 0). It starts N - 1 worker processes
(torch.multiprocessing, spawn context), joins the process group with them, and, before each of
rank 0's forwards, broadcasts the step's plan (forge.engine.plan.StepPlan: plain data) over the
host-side group. Each worker (`worker_main`) loads the model, keeps its own shard and its own KV
cache (the same number of blocks on every rank), and runs the very same `ModelRunner.execute` on
the same plan: the same eager/graph decision, the same collectives in the same order. Workers
discard their logits; only rank 0 samples.

Commands broadcast to workers: ("execute", StepPlan) and ("shutdown", None).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
import threading
import time
import traceback

import torch

from forge.distributed import parallel_state as ps

logger = logging.getLogger("forge")

READY_KEY = "forge_tp_workers_ready"
TEARDOWN_S = 2.0  # how long to wait for destroy_process_group before going on without it


# -- worker process ---------------------------------------------------------------------------
def _watch_parent(parent_pid: int) -> None:
    """Exit if rank 0 dies without a shutdown (a killed engine must leave no orphan workers)."""
    while True:
        if os.getppid() != parent_pid:
            os._exit(1)
        time.sleep(1.0)


def worker_main(rank: int, world_size: int, port: int, config, max_model_len: int, parent_pid: int,
                num_threads: int | None = None) -> None:
    ps.disable_multicast()
    threading.Thread(target=_watch_parent, args=(parent_pid,), daemon=True).start()
    if num_threads:
        torch.set_num_threads(num_threads)
    from forge.engine.model_runner import ModelRunner
    from forge.loader import load_model

    config = dataclasses.replace(config, device=ps.rank_device(config.device, rank))
    try:
        if config.device.startswith("cuda"):
            torch.cuda.set_device(torch.device(config.device))
        # Load first, then check in: rank 0 waits for every worker's check-in while watching that
        # none has died, so a worker that cannot load its model fails the engine's start at once.
        loaded = load_model(config.model, config.load_format, shard=(rank, world_size))
        store = ps.create_store(rank, world_size, port)
        store.add(READY_KEY, 1)
        group = ps.init_tp_group(rank, world_size, port, config.device, store=store)
        runner = ModelRunner(loaded.config, loaded.weights, config, max_model_len, tp=group, weights_sharded=True)
        del loaded
        while True:
            cmd, payload = group.broadcast_object()
            if cmd == "execute":  # (the runner's HostStager fences its own pinned-buffer reuse)
                runner.execute(payload)
            elif cmd == "shutdown":
                break
            else:
                raise RuntimeError(f"unknown tensor-parallel command {cmd!r}")
    except BaseException:  # noqa: BLE001 - report, then exit non-zero so rank 0 sees it
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)
    del runner
    # At the same time as rank 0. NCCL's teardown can hang once CUDA graphs have captured collectives
    # (pytorch/pytorch#115388; seen on H200): bounded, then the process exits regardless.
    _bounded(ps.destroy_tp_group, TEARDOWN_S)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _bounded(fn, timeout: float) -> bool:
    """Run fn in a daemon thread; False if it has not returned within `timeout` seconds."""
    done = threading.Event()

    def target():
        try:
            fn()
        except Exception:  # noqa: BLE001
            logger.warning("tensor parallel: %s failed", getattr(fn, "__name__", fn), exc_info=True)
        finally:
            done.set()

    threading.Thread(target=target, daemon=True).start()
    return done.wait(timeout)


# -- rank 0 ------------------------------------------------------------------------------------
class TensorParallelExecutor:
    """Rank 0's side: starts the workers, holds the group, broadcasts steps, shuts everything down."""

    def __init__(self, config, max_model_len: int, model_config=None):
        from forge.distributed.sharding import plan_shard
        from forge.errors import InvalidRequestError  # (plan_shard raises it too)

        world_size = config.tensor_parallel_size
        if config.device.startswith("cuda"):
            base = int(config.device.split(":", 1)[1]) if ":" in config.device else 0
            if base + world_size > torch.cuda.device_count():
                raise InvalidRequestError(
                    f"tensor_parallel_size {world_size} needs GPUs {base}..{base + world_size - 1} "
                    f"but torch sees {torch.cuda.device_count()}", param="tensor_parallel_size")
        if model_config is not None:  # fail here, not in N processes, when the model does not split
            plan_shard(model_config, 0, world_size)
        ps.disable_multicast()  # before the workers start: they inherit the environment
        self.world_size = world_size
        self.group = None
        self.closed = False
        port = ps.free_port()
        store = ps.create_store(0, world_size, port)
        ctx = torch.multiprocessing.get_context("spawn")
        # CPU ranks share the cores: each worker gets its share of rank 0's threads.
        threads = max(1, torch.get_num_threads() // world_size) if not config.device.startswith("cuda") else None
        self.procs = []
        for rank in range(1, world_size):
            p = ctx.Process(target=worker_main, name=f"forge-tp-worker-{rank}", daemon=True,
                            args=(rank, world_size, port, config, max_model_len, os.getpid(), threads))
            p.start()
            self.procs.append(p)
        try:
            self._wait_for_workers(store)
            self.group = ps.init_tp_group(0, world_size, port, config.device, store=store)
        except BaseException:
            self.shutdown()
            raise
        logger.info("tensor parallel: %d ranks (%s), worker pids %s", world_size, self.group.backend,
                    [p.pid for p in self.procs])

    def _wait_for_workers(self, store) -> None:
        deadline = time.monotonic() + ps.timeout_seconds()
        while store.add(READY_KEY, 0) < len(self.procs):
            self.check_workers()
            if time.monotonic() > deadline:
                raise RuntimeError(f"tensor-parallel workers did not start within {ps.timeout_seconds():.0f} s")
            time.sleep(0.05)

    @property
    def worker_pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def check_workers(self) -> None:
        for rank, p in enumerate(self.procs, start=1):
            if not p.is_alive():
                raise RuntimeError(f"tensor-parallel worker {rank} (pid {p.pid}) exited with code {p.exitcode}")

    def broadcast_step(self, plan) -> None:
        """Called by rank 0's ModelRunner.execute with the step's plan, before its own forward."""
        self.check_workers()
        self.group.broadcast_object(("execute", plan))

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop the workers and leave the process group. Idempotent; also run at garbage collection/exit."""
        if self.closed:
            return
        self.closed = True
        # Every blocking step is bounded: a worker stuck elsewhere must not hang the engine's exit.
        if self.group is not None:
            if any(p.is_alive() for p in self.procs):
                _bounded(self._send_shutdown, timeout)
            # Leave the group while the workers leave theirs. NCCL's teardown can hang once CUDA graphs
            # captured collectives (pytorch/pytorch#115388); the group is already unregistered by
            # then, so a new one can be made in this process (seen on 2x H200): do not wait for it.
            if not _bounded(ps.destroy_tp_group, TEARDOWN_S):
                logger.info("tensor parallel: NCCL teardown still running after %.0f s; going on", TEARDOWN_S)
            self.group = None
        deadline = time.monotonic() + timeout
        for p in self.procs:
            p.join(max(0.0, deadline - time.monotonic()))
        for p in self.procs:
            if p.is_alive():
                p.terminate()
                p.join(2.0)
            if p.is_alive():
                p.kill()
                p.join(2.0)

    def _send_shutdown(self) -> None:
        self.group.broadcast_object(("shutdown", None))
