"""Runs one scheduled step: builds the flat input tensors, runs the model, returns sampling logits."""

import ctypes
import logging
import os

import numpy as np
import torch

from forge.config import EngineConfig, ModelConfig
from forge.engine.scheduler import SchedulerOutput
from forge.models.llama import LlamaModel
from forge.ops import get_ops
from forge.ops.metadata import AttentionMetadata
from forge.sequence import PLACEHOLDER

logger = logging.getLogger("forge")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(dtype: str, device: str) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r} (choose from auto, {', '.join(DTYPES)})")
    return DTYPES[dtype]


class HostStager:
    """Copies a step's integer inputs to the device through persistent pinned buffers per dtype.

    Allocating pinned memory every step costs more than the copy itself, so buffers are reused,
    two per dtype in turn: with async scheduling the host prepares step t+1 while step t's copy
    may not have run yet. Each buffer's copy is fenced by an event, waited on before reuse (it
    has normally long finished). Each dtype is staged once per step.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.host: dict[torch.dtype, list[torch.Tensor]] = {}
        self.dev: dict[torch.dtype, torch.Tensor] = {}
        self.done: dict[torch.dtype, list] = {}
        self.turn: dict[torch.dtype, int] = {}

    def stage(self, dtype: torch.dtype, values: np.ndarray) -> torch.Tensor:
        src = torch.from_numpy(values)
        if self.device.type != "cuda":
            return src
        n = src.numel()
        if dtype not in self.host or self.host[dtype][0].numel() < n:
            if dtype in self.done:  # copies out of the old buffers must end before they are freed
                for event in self.done[dtype]:
                    event.synchronize()
            size = max(n, 2 * self.host[dtype][0].numel() if dtype in self.host else 4096)
            self.host[dtype] = [torch.empty(size, dtype=dtype, pin_memory=True) for _ in range(2)]
            self.dev[dtype] = torch.empty(size, dtype=dtype, device=self.device)
            self.done[dtype] = [torch.cuda.Event(), torch.cuda.Event()]
            self.turn[dtype] = 0
        k = self.turn[dtype] = 1 - self.turn[dtype]
        host, done = self.host[dtype][k], self.done[dtype][k]
        done.synchronize()  # this buffer's previous copy (two steps ago) has ended
        host[:n].copy_(src)
        out = self.dev[dtype][:n]  # one device buffer: copies into it follow the earlier steps' reads in stream order
        out.copy_(host[:n], non_blocking=True)
        done.record()
        return out


def release_freed_memory() -> None:
    """Hand freed heap back to the OS (glibc keeps it otherwise: RSS after loading the default model
    with quantization="auto" drops ~160 MB)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def default_cpu_threads() -> int:
    """Physical cores of this process's CPUs, minus one (at least 1). One core is left to the
    rest of the machine: on a busy 2-core machine, torch with 2 threads ran 4-10x slower than with 1
    (each op's threads wait for a descheduled partner; benchmarks/cpu_generate.py measures both),
    and vLLM's CPU backend likewise keeps a core for the serving process."""
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else range(os.cpu_count() or 1)
    cores = set()
    for cpu in cpus:
        try:
            topology = f"/sys/devices/system/cpu/cpu{cpu}/topology/"
            cores.add((open(topology + "physical_package_id").read().strip(), open(topology + "core_id").read().strip()))
        except OSError:  # no sysfs topology: count logical CPUs
            cores.add(cpu)
    return max(1, len(cores) - 1)


class ModelRunner:
    def __init__(self, model_config: ModelConfig, weights: dict, config: EngineConfig, max_model_len: int, tp=None,
                 weights_sharded: bool = False):
        self.config = config
        self.model_config = model_config
        self.device = torch.device(config.device)
        self.dtype = resolve_dtype(config.dtype, config.device)
        self.block_size = config.block_size
        self.max_model_len = max_model_len
        self.ops = get_ops(config.device)
        if self.device.type == "cpu":
            torch.set_num_threads(config.threads or default_cpu_threads())
        self.stager = HostStager(self.device)
        self.tp = tp  # forge.distributed.TPGroup (tensor parallelism) or None
        self.step_hook = None  # rank 0 of tensor parallelism: broadcasts each step to the workers
        self.model = LlamaModel(model_config, weights, self.ops, config.device, self.dtype, max_model_len, tp=tp,
                                weights_sharded=weights_sharded, quantization=config.quantization)
        if self.device.type == "cpu":
            release_freed_memory()  # the loader's weights, freed while the model was built
        self.activation_peak_bytes = self._profile_activations() if self.device.type == "cuda" else 0
        self.num_kv_blocks = self._plan_kv_blocks()
        if tp is not None:  # every rank keeps the same number of blocks (the smallest plan)
            self.num_kv_blocks = tp.min_int(self.num_kv_blocks)
        self.kv_caches = self._allocate_kv_caches(self.num_kv_blocks)
        logger.info("KV cache: %d blocks of %d tokens (%d tokens, %.2f GiB)", self.num_kv_blocks, self.block_size,
                    self.num_kv_blocks * self.block_size, self.num_kv_blocks * self.kv_block_bytes / 2**30)
        self.graphs = None
        if self.device.type == "cuda" and not config.enforce_eager:
            from forge.engine.cuda_graphs import DecodeGraphs

            self.graphs = DecodeGraphs(self.model, self.kv_caches, config.max_num_seqs, max_model_len, self.block_size)
            self.graphs.capture()

    def _allocate_kv_caches(self, num_blocks: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        c = self.model_config
        shape = (num_blocks, self.block_size, self.model.num_kv_heads, c.head_dim)  # this rank's KV heads
        if self.device.type == "cpu":
            # Left unwritten, a block's pages join the resident set only when a sequence first uses it.
            # CpuOps zeroes a block when a sequence writes its first slot, and block 0 is zeroed here:
            # the decode attention's padding reads only zeros or written values (CpuOps._decode_slots).
            caches = [(torch.empty(shape, dtype=self.dtype), torch.empty(shape, dtype=self.dtype))
                      for _ in range(c.num_layers)]
            for k, v in caches:
                k[0].zero_()
                v[0].zero_()
            return caches
        return [
            (torch.zeros(shape, dtype=self.dtype, device=self.device), torch.zeros(shape, dtype=self.dtype, device=self.device))
            for _ in range(c.num_layers)
        ]

    @torch.inference_mode()
    def _profile_activations(self) -> int:
        """Peak extra memory of the largest step (a full token budget of prefill), measured, not guessed."""
        tokens = min(self.config.max_num_batched_tokens, self.max_model_len)
        blocks = -(-tokens // self.block_size)
        caches = self._allocate_kv_caches(blocks)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(self.device)
        base = torch.cuda.memory_allocated(self.device)
        from forge.ops.metadata import AttentionMetadata

        meta = AttentionMetadata(
            positions=torch.arange(tokens, device=self.device),
            slot_mapping=torch.arange(tokens, device=self.device),
            query_start_loc=torch.tensor([0, tokens], dtype=torch.int32, device=self.device),
            context_lens=torch.tensor([tokens], dtype=torch.int32, device=self.device),
            block_tables=torch.arange(blocks, dtype=torch.int32, device=self.device)[None],
            max_query_len=tokens, max_context_len=tokens, query_lens_cpu=[tokens], context_lens_cpu=[tokens],
        )
        hidden = self.model.forward(torch.zeros(tokens, dtype=torch.long, device=self.device), meta, caches)
        self.model.compute_logits(hidden[-self.config.max_num_seqs:])
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated(self.device) - base
        del caches, hidden
        torch.cuda.empty_cache()
        logger.info("profiled activation peak: %.1f MiB for %d tokens", peak / 2**20, tokens)
        return peak

    @property
    def kv_block_bytes(self) -> int:
        c = self.model_config
        return 2 * c.num_layers * self.block_size * self.model.num_kv_heads * c.head_dim * self.dtype.itemsize

    def _default_cpu_kv_bytes(self) -> int:
        """max_model_len tokens for each of min(max_num_seqs, 8) sequences (CPU batches past ~8-16 stop
        paying), at most a quarter of the machine's memory; unwritten blocks cost no RSS."""
        tokens = self.max_model_len * min(self.config.max_num_seqs, 8)
        per_token = self.kv_block_bytes // self.block_size
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        return min(tokens * per_token, ram // 4)

    def _plan_kv_blocks(self) -> int:
        if self.config.num_kv_blocks:
            return self.config.num_kv_blocks
        if self.device.type == "cuda":
            # Weights are loaded; of what is left under the utilization cap, keep room for the
            # profiled activation peak (and a margin for CUDA graphs), give the rest to the KV cache.
            free, total = torch.cuda.mem_get_info(self.device)
            budget = free - (1 - self.config.gpu_memory_utilization) * total - self.activation_peak_bytes * 1.1
        else:
            budget = self.config.kv_cache_memory or self._default_cpu_kv_bytes()
        # Never more than every sequence at full length could use.
        cap = self.config.max_num_seqs * -(-self.max_model_len // self.block_size)
        return max(1, min(int(budget // self.kv_block_bytes), cap))

    def prepare_inputs(self, sched: SchedulerOutput, token_source=None) -> tuple[torch.Tensor, AttentionMetadata, torch.Tensor]:
        """Flatten the scheduled sequences into one token batch; returns (ids, metadata, logits rows).

        token_source: (row of each seq_id, device token ids) of the previous step, whose sampled
        tokens are still PLACEHOLDERs on the host (async scheduling): they are copied into the
        input ids on the device."""
        bs = self.block_size
        input_ids, positions, slots = [], [], []
        fill_dst, fill_src = [], []  # input positions whose token is on the device only, and its row there
        query_lens, context_lens, logits_rows = [], [], []
        num_seqs = len(sched.scheduled)
        max_blocks = max(len(s.seq.block_table) for s in sched.scheduled)
        block_tables = np.zeros((num_seqs, max_blocks), dtype=np.int32)
        for i, item in enumerate(sched.scheduled):
            seq, n = item.seq, item.num_new_tokens
            start = seq.num_computed_tokens
            table = seq.block_table
            block_tables[i, : len(table)] = table
            if n == 1:  # decode: the common case, without ranges
                token = seq.token_ids[start]
                if token == PLACEHOLDER:
                    fill_dst.append(len(input_ids))
                    fill_src.append(token_source[0][seq.seq_id])
                input_ids.append(token)
                positions.append(start)
                slots.append(table[start // bs] * bs + start % bs)
            else:
                input_ids.extend(seq.token_ids[start : start + n])
                pos = range(start, start + n)
                positions.extend(pos)
                slots.extend(table[p // bs] * bs + p % bs for p in pos)
            query_lens.append(n)
            context_lens.append(start + n)
            if item.wants_prompt_logprobs:  # every row: prompt logprobs, then (maybe) the sample
                logits_rows.extend(range(len(input_ids) - n, len(input_ids)))
            elif item.samples:
                logits_rows.append(len(input_ids) - 1)
        query_start = [0]
        for n in query_lens:
            query_start.append(query_start[-1] + n)
        num_tokens = len(input_ids)
        # Two host->device copies per step (int64 and int32 fields), through persistent pinned buffers.
        longs = self.stager.stage(
            torch.long, np.array(input_ids + positions + slots + logits_rows + fill_dst + fill_src, dtype=np.int64)
        )
        ints = self.stager.stage(
            torch.int32, np.concatenate([np.array(query_start + context_lens, dtype=np.int32), block_tables.ravel()])
        )
        t = num_tokens
        meta = AttentionMetadata(
            positions=longs[t : 2 * t],
            slot_mapping=longs[2 * t : 3 * t],
            query_start_loc=ints[: num_seqs + 1],
            context_lens=ints[num_seqs + 1 : 2 * num_seqs + 1],
            block_tables=ints[2 * num_seqs + 1 :].view(num_seqs, max_blocks),
            max_query_len=max(query_lens),
            max_context_len=max(context_lens),
            query_lens_cpu=query_lens,
            context_lens_cpu=context_lens,
        )
        ids = longs[:t]
        rows_end = 3 * t + len(logits_rows)
        if fill_dst:
            k = len(fill_dst)
            ids.index_copy_(0, longs[rows_end : rows_end + k], token_source[1].index_select(0, longs[rows_end + k :]))
        return ids, meta, longs[3 * t : rows_end]

    @torch.inference_mode()
    def execute(self, sched: SchedulerOutput, token_source=None) -> torch.Tensor:
        """Run the step; returns float32 logits of the rows the engine reads, in scheduled order: one
        row per sampling sequence, or every row of a chunk whose prompt logprobs were asked for."""
        if self.step_hook is not None:
            self.step_hook(sched)
        input_ids, meta, logits_rows = self.prepare_inputs(sched, token_source)
        all_rows = logits_rows.shape[0] == input_ids.shape[0]  # pure decode: every row samples
        if self.graphs is not None and self.graphs.can_run(len(sched.scheduled), meta):
            logits = self.graphs.run(input_ids, meta)
            return logits if all_rows else logits[logits_rows]
        hidden = self.model.forward(input_ids, meta, self.kv_caches)
        return self.model.compute_logits(hidden if all_rows else hidden[logits_rows])
