"""The tensor-parallel process group: one process per device, joined through torch.distributed.

Backends: NCCL on CUDA (collectives on the GPU, capturable by CUDA graphs), gloo on the CPU. On
CUDA a second, gloo, group carries the per-step metadata that rank 0 broadcasts as Python objects,
so the step's description never round-trips through the GPU.

`TPGroup` is what the model and the runner hold: its collectives are no-ops at world size 1, so a
model built with `tp=None` (or a group of one) is the plain single-device model.

NVLink multicast (NVLS) stays off: the environment variables below are set before the group is
created, in rank 0 and in every worker.
"""

from __future__ import annotations

import datetime
import os
import pickle
import socket

import torch
import torch.distributed as dist

BROADCAST_BYTES = 1 << 16  # one step plan (token ids, positions, block tables) fits in one broadcast

# NVLink multicast must stay off (a program that uses it can take a shared host's GPUs down).
MULTICAST_OFF_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


def disable_multicast() -> None:
    for key, value in MULTICAST_OFF_ENV.items():
        os.environ.setdefault(key, value)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_device(device: str, rank: int) -> str:
    """The device of `rank` when rank 0 runs on `device`: cuda -> cuda:rank, cuda:k -> cuda:k+rank."""
    if not device.startswith("cuda"):
        return device
    base = int(device.split(":", 1)[1]) if ":" in device else 0
    return f"cuda:{base + rank}"


def timeout_seconds() -> float:
    return float(os.environ.get("FORGE_TP_TIMEOUT_S", "600"))


class TPGroup:
    """Rank, world size and the few collectives tensor parallelism needs."""

    def __init__(self, rank: int, world_size: int, device_group=None, cpu_group=None, backend: str = "none"):
        self.rank = rank
        self.world_size = world_size
        self.device_group = device_group
        self.cpu_group = cpu_group
        self.backend = backend
        self._bcast_buf: torch.Tensor | None = None

    # -- tensor collectives (on the model's device; graph-capturable with NCCL) ----------------
    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum over ranks, in place; returns x."""
        if self.world_size > 1:
            dist.all_reduce(x, group=self.device_group)
        return x

    def all_gather(self, x: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """Concatenate every rank's x along `dim` (rank order)."""
        if self.world_size == 1:
            return x
        x = x.contiguous()
        if self.backend == "nccl":
            out = torch.empty((self.world_size,) + tuple(x.shape), dtype=x.dtype, device=x.device)
            dist.all_gather_into_tensor(out, x, group=self.device_group)
            parts = out.unbind(0)
        else:
            parts = [torch.empty_like(x) for _ in range(self.world_size)]
            dist.all_gather(parts, x, group=self.device_group)
        return torch.cat(parts, dim=dim)

    # -- host-side collectives (gloo) ----------------------------------------------------------
    def broadcast_object(self, obj=None):
        """Rank 0 sends `obj` (picklable); every rank returns it.

        One gloo broadcast of a fixed-size buffer (length header + pickle) carries a step's plan;
        only a larger object needs a second one. (broadcast_object_list always costs two.)
        """
        if self.world_size == 1:
            return obj
        buf = self._bcast_buf
        if buf is None:
            with torch.inference_mode(False):  # a normal tensor: writable in and out of inference mode
                buf = self._bcast_buf = torch.zeros(BROADCAST_BYTES, dtype=torch.uint8)
        if self.rank == 0:
            data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
            n = len(data)
            buf[:8] = torch.tensor([n], dtype=torch.int64).view(torch.uint8)
            payload = torch.frombuffer(bytearray(data), dtype=torch.uint8)
            if 8 + n <= BROADCAST_BYTES:
                buf[8 : 8 + n] = payload
                dist.broadcast(buf, src=0, group=self.cpu_group)
            else:
                dist.broadcast(buf, src=0, group=self.cpu_group)
                dist.broadcast(payload, src=0, group=self.cpu_group)
            return obj
        dist.broadcast(buf, src=0, group=self.cpu_group)
        n = int(buf[:8].view(torch.int64).item())
        if 8 + n <= BROADCAST_BYTES:
            data = buf[8 : 8 + n].numpy().tobytes()
        else:
            payload = torch.empty(n, dtype=torch.uint8)
            dist.broadcast(payload, src=0, group=self.cpu_group)
            data = payload.numpy().tobytes()
        return pickle.loads(data)

    def min_int(self, value: int) -> int:
        """The smallest of every rank's `value` (e.g. KV blocks: every rank keeps the same number)."""
        if self.world_size == 1:
            return value
        t = torch.tensor([value], dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self.cpu_group)
        return int(t.item())


SINGLE = TPGroup(0, 1)


def create_store(rank: int, world_size: int, port: int) -> dist.TCPStore:
    """The rendezvous store on 127.0.0.1:port (rank 0 serves it and does not wait for the others)."""
    return dist.TCPStore("127.0.0.1", port, world_size, is_master=rank == 0,
                         timeout=datetime.timedelta(seconds=timeout_seconds()), wait_for_workers=False)


def init_tp_group(rank: int, world_size: int, port: int, device: str, store: dist.Store | None = None) -> TPGroup:
    """Join (or, on rank 0, open) the process group of `world_size` ranks on 127.0.0.1:port.

    Only one tensor-parallel group can exist per process (torch.distributed's default group).
    """
    disable_multicast()
    if dist.is_initialized():
        raise RuntimeError("a tensor-parallel process group already exists in this process "
                           "(shut the other tensor-parallel engine down first)")
    timeout = datetime.timedelta(seconds=timeout_seconds())
    if store is None:
        store = create_store(rank, world_size, port)
    kw = dict(store=store, rank=rank, world_size=world_size, timeout=timeout)
    if device.startswith("cuda"):
        dev = torch.device(device)
        if dev.index is None:  # plain "cuda": the current device (NCCL needs an explicit index)
            dev = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(dev)
        dist.init_process_group("nccl", device_id=dev, **kw)
        cpu_group = dist.new_group(backend="gloo", timeout=timeout)
        return TPGroup(rank, world_size, dist.group.WORLD, cpu_group, backend="nccl")
    dist.init_process_group("gloo", **kw)
    return TPGroup(rank, world_size, dist.group.WORLD, dist.group.WORLD, backend="gloo")


def destroy_tp_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
