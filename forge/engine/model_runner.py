"""Runs one step plan (forge.engine.plan): builds the named input tensors, runs the model, returns its logits."""

import ctypes
import itertools
import logging
import os
from dataclasses import dataclass

import numpy as np
import torch

from forge.config import EngineConfig, ModelConfig
from forge.distributed.sharding import plan_shard, rank_weights
from forge.engine.plan import StepPlan
from forge.models.decoder import DecoderModel
from forge.native import threads as native_threads
from forge.ops import get_ops
from forge.ops.metadata import AttentionMetadata
from forge.quant import GroupQuantized

logger = logging.getLogger("forge")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(dtype: str, device: str) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r} (choose from auto, {', '.join(DTYPES)})")
    return DTYPES[dtype]


class InputLayout:
    """Named inputs laid out one after another in a flat staging buffer: each input's view (of its
    shape) in each host buffer (numpy: the host writes through these) and on the device."""

    def __init__(self, shapes: tuple[tuple[str, tuple[int, ...]], ...], host: list[torch.Tensor], dev: list[torch.Tensor]):
        self.slices: dict[str, tuple[slice, tuple[int, ...]]] = {}
        start = 0
        for name, shape in shapes:
            n = int(np.prod(shape))
            self.slices[name] = (slice(start, start + n), shape)
            start += n
        self.numel = start
        self.host = [self.carve(buf.numpy()) for buf in host]
        self.dev = [self.carve(buf) for buf in dev]

    def carve(self, flat) -> dict:
        return {name: flat[sl].reshape(shape) for name, (sl, shape) in self.slices.items()}


class HostStager:
    """Moves one dtype's step inputs to the device through persistent buffers, in one copy: the
    host writes a step's values straight into named views of a staging buffer (`host`), then
    `upload` copies the buffer and gives the same views on the device.

    Allocating pinned memory every step costs more than the copy itself, so buffers are reused,
    two host buffers in turn: with async scheduling the host prepares step t+1 while step t's copy
    may not have run yet. On a GPU each buffer's copy is fenced by an event, waited on before the
    buffer is written again (it has normally long finished); one device buffer, as copies into it
    follow the earlier steps' reads in stream order. On the CPU the host buffer is the input.
    Layouts (and their views) are kept per set of shapes: a decode step's usually repeat.
    """

    MAX_LAYOUTS = 256

    def __init__(self, dtype: torch.dtype, device: torch.device):
        self.dtype = dtype
        self.device = device
        self.cuda = device.type == "cuda"
        self.buffers: list[torch.Tensor] = []  # the host buffers, used in turn
        self.fences: list = []  # per host buffer: its last copy to the device
        self.dev: torch.Tensor | None = None
        self.layouts: dict[tuple, InputLayout] = {}
        self.layout: InputLayout | None = None  # this step's
        self.turn = 0

    def host(self, **shapes: tuple[int, ...]) -> dict[str, np.ndarray]:
        """This step's inputs of these shapes, as named views of the next host buffer, free to be
        written (in this order in the buffer)."""
        key = tuple(shapes.items())
        layout = self.layouts.get(key)
        if layout is None:
            numel = sum(int(np.prod(shape)) for shape in shapes.values())
            if not self.buffers or self.buffers[0].numel() < numel:
                self._grow(numel)
            if len(self.layouts) >= self.MAX_LAYOUTS:
                self.layouts.clear()
            dev = [self.dev] * 2 if self.cuda else self.buffers
            layout = self.layouts[key] = InputLayout(key, self.buffers, dev)
        self.layout = layout
        self.turn = 1 - self.turn
        if self.cuda:
            self.fences[self.turn].synchronize()  # its previous copy (two steps ago) has ended
        return layout.host[self.turn]

    def upload(self) -> dict[str, torch.Tensor]:
        """The inputs last given by `host`, on the device (views of the device buffer)."""
        layout = self.layout
        if self.cuda:
            self.dev[: layout.numel].copy_(self.buffers[self.turn][: layout.numel], non_blocking=True)
            self.fences[self.turn].record()
        return layout.dev[self.turn]

    def _grow(self, numel: int) -> None:
        for fence in self.fences:  # copies out of the old buffers must end before they are freed
            fence.synchronize()
        size = max(numel, 2 * self.buffers[0].numel() if self.buffers else 4096)
        self.buffers = [torch.empty(size, dtype=self.dtype, pin_memory=self.cuda) for _ in range(2)]
        if self.cuda:
            self.dev = torch.empty(size, dtype=self.dtype, device=self.device)
            self.fences = [torch.cuda.Event(), torch.cuda.Event()]
        self.layouts.clear()  # (their views are of the old buffers)


@dataclass
class StepInputs:
    input_ids: torch.Tensor  # [T] int64
    meta: AttentionMetadata
    logits_rows: torch.Tensor | None  # [R] int64: the positions whose logits are returned; None: all


MAX_FLAT_VERIFY = 65  # tokens of a row that a verify step may flatten into decode rows (ModelRunner._flat_verify)
CPU_EXPECTED_CONCURRENCY = 4  # full-length sequences the default CPU KV cache holds (--kv-cache-memory overrides)


def release_freed_memory() -> None:
    """Hand freed heap back to the OS (glibc keeps it otherwise: RSS after loading the default model
    with quantization="auto" drops ~160 MB)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def physical_cores() -> int:
    """Physical cores of this process's CPUs (logical CPUs where sysfs has no topology)."""
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else range(os.cpu_count() or 1)
    cores = set()
    for cpu in cpus:
        try:
            topology = f"/sys/devices/system/cpu/cpu{cpu}/topology/"
            cores.add((open(topology + "physical_package_id").read().strip(), open(topology + "core_id").read().strip()))
        except OSError:  # no sysfs topology: count logical CPUs
            cores.add(cpu)
    return max(1, len(cores))


def default_cpu_threads() -> int:
    """torch's threads: physical cores minus one (at least 1). One core is left to the rest of the
    machine: on a busy 2-core machine, torch with 2 threads ran 4-10x slower than with 1 (each op's
    threads wait for a descheduled partner; benchmarks/cpu_generate.py measures both), and vLLM's
    CPU backend likewise keeps a core for the serving process. (forge's native kernels take every
    core while the machine is idle: forge.native.threads.)"""
    return max(1, physical_cores() - 1)


class ModelRunner:
    def __init__(self, model_config: ModelConfig, weights: dict, config: EngineConfig, max_model_len: int, tp=None,
                 weights_sharded: bool = False):
        self.config = config
        self.model_config = model_config
        self.device = torch.device(config.device)
        self.dtype = resolve_dtype(config.dtype, config.device)
        self.block_size = config.block_size
        self.max_model_len = max_model_len
        # Quantized matrices (kept from a GGUF, or quantized at load) take the CPU fast path's ops.
        quantized = config.quantization in ("int8", "int4") or any(isinstance(w, GroupQuantized) for w in weights.values())
        self.ops = get_ops(config.device, quantized=quantized)
        # float8 e4m3 on CUDA with kv_cache_dtype fp8 (1 byte an element: twice the blocks); NativeCpuOps: float16
        self.kv_dtype = torch.float8_e4m3fn if config.kv_cache_dtype != "auto" else \
            getattr(self.ops, "kv_cache_dtype", None) or self.dtype
        if self.device.type == "cpu":
            torch.set_num_threads(config.threads or default_cpu_threads())
            native_threads.configure(config.threads, physical_cores())
        # Verify steps as decode rows (_flat_verify) where decode attention reads the paged cache in
        # place (the CUDA kernel, forge's native CPU kernel); CpuOps' would gather each context once per
        # query, so there a row keeps its queries together (CpuOps._causal_attention gives them decode numerics).
        self.flat_verify = self.ops.name in ("cuda", "cpu-native")
        self.long_stager = HostStager(torch.long, self.device)  # input ids, positions, slots, rows
        self.int_stager = HostStager(torch.int32, self.device)  # query starts, context lengths, block tables
        self.tp = tp  # forge.distributed.TPGroup (tensor parallelism) or None
        self.step_hook = None  # rank 0 of tensor parallelism: broadcasts each step to the workers
        # This rank's weights: as loaded (already cut by the loader), sliced, or dummy ones of the
        # schema's shapes; the model itself never sees a load format or a TP slice rule.
        plan = plan_shard(model_config, tp.rank if tp else 0, tp.world_size if tp else 1)
        weights = rank_weights(weights, model_config, plan, weights_sharded, self.device, self.dtype)
        self.model = DecoderModel(model_config, weights, self.ops, config.device, self.dtype, max_model_len, tp=tp,
                                  quantization=config.quantization)
        if self.device.type == "cpu":
            release_freed_memory()  # the loader's weights, freed while the model was built
        self.activation_peak_bytes = self._profile_activations() if self.device.type == "cuda" else 0
        self.num_kv_blocks = self._plan_kv_blocks()
        if tp is not None:  # every rank keeps the same number of blocks (the smallest plan)
            self.num_kv_blocks = tp.min_int(self.num_kv_blocks)
        self.kv_caches = self._allocate_kv_caches(self.num_kv_blocks)
        logger.info("KV cache: %d blocks of %d tokens (%d tokens, %.2f GiB, %s)", self.num_kv_blocks, self.block_size,
                    self.num_kv_blocks * self.block_size, self.num_kv_blocks * self.kv_block_bytes / 2**30,
                    str(self.kv_dtype).removeprefix("torch."))
        self.graphs = None
        if self.device.type == "cuda" and not config.enforce_eager:
            from forge.engine.cuda_graphs import DecodeGraphs

            # (speculative decoding: a verify step runs as a decode step of one row per token, _flat_verify)
            spec = config.speculative_config
            rows = config.max_num_seqs * (1 + spec.num_speculative_tokens) if spec is not None else config.max_num_seqs
            self.graphs = DecodeGraphs(self.model, self.kv_caches, rows, max_model_len, self.block_size)
            self.graphs.capture()

    def _allocate_kv_caches(self, num_blocks: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        c = self.model_config
        shape = (num_blocks, self.block_size, self.model.num_kv_heads, c.head_dim)  # this rank's KV heads
        if self.device.type == "cpu":
            # Left unwritten, a block's pages join the resident set only when a sequence first uses it.
            # CpuOps zeroes a block when a sequence writes its first slot, and block 0 is zeroed here:
            # the decode attention's padding reads only zeros or written values (CpuOps._decode_slots).
            caches = [(torch.empty(shape, dtype=self.kv_dtype), torch.empty(shape, dtype=self.kv_dtype))
                      for _ in range(c.num_layers)]
            for k, v in caches:
                k[0].zero_()
                v[0].zero_()
            return caches
        return [
            (torch.zeros(shape, dtype=self.kv_dtype, device=self.device),
             torch.zeros(shape, dtype=self.kv_dtype, device=self.device))
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
        return 2 * c.num_layers * self.block_size * self.model.num_kv_heads * c.head_dim * self.kv_dtype.itemsize

    def _default_cpu_kv_bytes(self) -> int:
        """max_model_len tokens for each of min(max_num_seqs, CPU_EXPECTED_CONCURRENCY) sequences, at
        most a quarter of the machine's memory. Pages become resident as blocks are first used; the
        prefix cache reuses freed blocks least recently freed first, so a long-running engine ends up
        with the whole pool resident: this, not the weights, sets its steady RSS."""
        tokens = self.max_model_len * min(self.config.max_num_seqs, CPU_EXPECTED_CONCURRENCY)
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

    def _flat_verify(self, plan: StepPlan) -> bool:
        """On a GPU, a step whose rows are decodes and verify rows (forge.spec_decode: a few tokens after
        a cached prefix, each returning logits) runs as a decode step of one row per token: query j of a
        row is a decode at its position, over the row's blocks. The paged decode kernel then serves it
        (the queries' K/V are all written before any attends) and so do the decode CUDA graphs."""
        return self.flat_verify and plan.num_tokens > plan.num_rows and all(
            n == k and (n == 1 or start > 0) and n <= MAX_FLAT_VERIFY
            for n, k, start in zip(plan.query_lens, plan.num_logits, plan.starts))

    def prepare_inputs(self, plan: StepPlan, prev_sampled: torch.Tensor | None = None) -> StepInputs:
        """The plan's inputs as named views of two staging buffers (int64, int32): two host->device
        copies per step.

        prev_sampled: the previous step's sampled token ids, on the device (async scheduling); the
        plan's `from_prev_step` tokens are copied from there into the input ids on the device."""
        num_rows, num_tokens = plan.num_rows, plan.num_tokens
        width = max(map(len, plan.block_tables))
        logits_rows = plan.logits_rows()
        fills = plan.from_prev_step
        longs = self.long_stager.host(input_ids=(num_tokens,), positions=(num_tokens,), slot_mapping=(num_tokens,),
                                      logits_rows=(len(logits_rows or ()),), fill_dst=(len(fills),),
                                      fill_src=(len(fills),))
        if self._flat_verify(plan):
            return self._flat_inputs(plan, longs, width, prev_sampled)
        ints = self.int_stager.host(query_start_loc=(num_rows + 1,), context_lens=(num_rows,),
                                    block_tables=(num_rows, width))
        longs["input_ids"][:] = plan.token_ids
        query_start, context_lens, tables = ints["query_start_loc"], ints["context_lens"], ints["block_tables"]
        query_start[:] = list(itertools.accumulate(plan.query_lens, initial=0))
        context_lens_cpu = [start + n for start, n in zip(plan.starts, plan.query_lens)]
        context_lens[:] = context_lens_cpu
        if all(len(t) == width for t in plan.block_tables):
            tables[:] = plan.block_tables
        else:  # padded with block 0 (never read: attention stops at the context length)
            tables[:] = [t + [0] * (width - len(t)) for t in plan.block_tables]
        positions, bs = longs["positions"], self.block_size
        if num_tokens == num_rows:  # one token a row (decode): no ranges
            positions[:] = plan.starts
            longs["slot_mapping"][:] = [t[p // bs] * bs + p % bs for t, p in zip(plan.block_tables, plan.starts)]
        else:
            row = np.repeat(np.arange(num_rows), plan.query_lens)
            np.subtract(np.arange(num_tokens), (query_start[:-1] - plan.starts)[row], out=positions)
            longs["slot_mapping"][:] = tables[row, positions // bs] * bs + positions % bs
        if logits_rows is not None:
            longs["logits_rows"][:] = logits_rows
        if fills:
            longs["fill_dst"][:] = [dst for dst, _ in fills]
            longs["fill_src"][:] = [src for _, src in fills]

        longs, ints = self.long_stager.upload(), self.int_stager.upload()
        meta = AttentionMetadata(
            positions=longs["positions"],
            slot_mapping=longs["slot_mapping"],
            query_start_loc=ints["query_start_loc"],
            context_lens=ints["context_lens"],
            block_tables=ints["block_tables"],
            max_query_len=max(plan.query_lens),
            max_context_len=max(context_lens_cpu),
            query_lens_cpu=plan.query_lens,
            context_lens_cpu=context_lens_cpu,
        )
        return StepInputs(self._input_ids(longs, fills, prev_sampled), meta,
                          longs["logits_rows"] if logits_rows is not None else None)

    def _flat_inputs(self, plan: StepPlan, longs: dict, width: int, prev_sampled) -> StepInputs:
        """prepare_inputs of a _flat_verify step: a decode row per token (every position returns logits)."""
        num_tokens, bs = plan.num_tokens, self.block_size
        ints = self.int_stager.host(query_start_loc=(num_tokens + 1,), context_lens=(num_tokens,),
                                    block_tables=(num_tokens, width))
        row = np.repeat(np.arange(plan.num_rows), plan.query_lens)
        first = np.repeat(np.cumsum(plan.query_lens) - plan.query_lens - plan.starts, plan.query_lens)
        positions = longs["positions"]
        np.subtract(np.arange(num_tokens), first, out=positions)
        longs["input_ids"][:] = plan.token_ids
        tables = ints["block_tables"]
        tables[:] = np.array([t + [0] * (width - len(t)) for t in plan.block_tables], dtype=np.int32)[row]
        longs["slot_mapping"][:] = tables[np.arange(num_tokens), positions // bs] * bs + positions % bs
        ints["query_start_loc"][:] = np.arange(num_tokens + 1)
        ints["context_lens"][:] = positions + 1
        context_lens_cpu = (positions + 1).tolist()
        fills = plan.from_prev_step
        if fills:
            longs["fill_dst"][:] = [dst for dst, _ in fills]
            longs["fill_src"][:] = [src for _, src in fills]
        longs, ints = self.long_stager.upload(), self.int_stager.upload()
        meta = AttentionMetadata(
            positions=longs["positions"], slot_mapping=longs["slot_mapping"], query_start_loc=ints["query_start_loc"],
            context_lens=ints["context_lens"], block_tables=ints["block_tables"], max_query_len=1,
            max_context_len=max(context_lens_cpu), query_lens_cpu=[1] * num_tokens, context_lens_cpu=context_lens_cpu,
        )
        return StepInputs(self._input_ids(longs, fills, prev_sampled), meta, None)

    @staticmethod
    def _input_ids(longs: dict, fills: list, prev_sampled) -> torch.Tensor:
        """The step's input ids on the device, with the tokens still there from the previous step copied in."""
        input_ids = longs["input_ids"]
        if fills:
            if prev_sampled is None:
                raise RuntimeError("the step plan reads tokens sampled by the previous step, but none were given")
            input_ids.index_copy_(0, longs["fill_dst"], prev_sampled.index_select(0, longs["fill_src"]))
        return input_ids

    @torch.inference_mode()
    def execute(self, plan: StepPlan, prev_sampled: torch.Tensor | None = None) -> torch.Tensor:
        """Run the step; returns float32 logits of the plan's logits rows (each row's last
        `num_logits` positions), in row order."""
        if self.step_hook is not None:
            self.step_hook(plan)
        inputs = self.prepare_inputs(plan, prev_sampled)
        rows = inputs.logits_rows
        if self.graphs is not None and self.graphs.can_run(inputs.meta.num_seqs, inputs.meta):
            logits = self.graphs.run(inputs.input_ids, inputs.meta)
            return logits if rows is None else logits[rows]
        hidden = self.model.forward(inputs.input_ids, inputs.meta, self.kv_caches)
        return self.model.compute_logits(hidden if rows is None else hidden[rows])
