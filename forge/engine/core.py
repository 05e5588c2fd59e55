"""The engine core: the one step loop, and the parts it drives.

One step (`EngineCore._step`):

    schedule  -> SchedulerOutput (+ its StepPlan)
    execute   -> logits of the plan's logits rows          (ModelRunner; TP workers run the same plan)
    masks     -> grammar masks, filled while the forward pass runs, applied to the logits
    sample    -> token ids on the device                    (Sampler: the same draws on every device)
    update    -> each token joins its sequence, stop checks (OutputProcessor), outputs

With speculative decoding (forge.spec_decode) a proposer first sets each running sequence's draft
tokens; the scheduler plans 1 + k tokens for it, the forward pass returns k + 1 logits rows, the
sampler draws a token at each (with the noise plain decoding would use there) and `_read` appends
them while they equal the drafts. Speculation runs synchronously (no async scheduling).

With async scheduling (a scheduler mode, forge.engine.scheduler) the same path reads a step's
tokens one step late: step t+1 is launched before step t's tokens are read back (its inputs take
them on the device), so the host's update of step t overlaps the device's step t+1.
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from dataclasses import dataclass

from forge.config import EngineConfig
from forge.engine.block_manager import BlockManager
from forge.engine.failures import FailureIsolation, PerRequestSampler
from forge.engine.logit_bias import apply_logit_bias
from forge.engine.model_runner import ModelRunner
from forge.engine.output_processor import OutputProcessor, Stop
from forge.engine.sampler import PendingSample, Sampler, SampleResult
from forge.engine.scheduler import Scheduler
from forge.errors import InvalidRequestError, RequestFailure
from forge.loader import LoadedModel
from forge.outputs import RequestOutput
from forge.sequence import Request, Sequence
from forge.spec_decode.decoder import SpeculativeDecoder
from forge.spec_decode.proposers import make_proposer

logger = logging.getLogger("forge")


@dataclass
class InFlight:
    """A step whose sampled tokens are on the device and not read back yet (async scheduling)."""

    seqs: list[Sequence]  # the sampled sequences, in order
    pending: PendingSample
    drafts: list[list[int]] | None = None  # a verify step: each sequence's drafts (its rows: 1 + len)


class EngineCore:
    """Owns the scheduler, the model runner (and tensor-parallel workers), the sampler, the
    structured-output backend and the live requests; runs the steps."""

    def __init__(self, config: EngineConfig, loaded: LoadedModel):
        self.config = config
        self.model_config = loaded.config
        context = loaded.config.max_position_embeddings
        if config.max_model_len is not None and config.max_model_len > context:  # vLLM refuses too
            raise InvalidRequestError(f"max_model_len {config.max_model_len} is greater than the model's context "
                                      f"of {context} tokens", param="max_model_len")
        max_model_len = config.max_model_len or min(8192, context)
        self._structured = None  # forge.structured.StructuredBackend, built on first use
        self.tp = None  # tensor parallelism: this process is rank 0, workers follow its steps (forge.distributed)
        if config.tensor_parallel_size > 1:
            from forge.distributed.worker import TensorParallelExecutor

            self.tp = TensorParallelExecutor(config, max_model_len, loaded.config)
            weakref.finalize(self, self.tp.shutdown)  # workers exit with the engine (or at interpreter exit)
        self.spec = None  # forge.spec_decode.SpeculativeDecoder
        try:
            # (a draft model first: on a GPU the target's KV cache takes the memory left after it)
            proposer = make_proposer(config, loaded, max_model_len)
            self.runner = ModelRunner(loaded.config, loaded.weights, config, max_model_len,
                                      tp=self.tp.group if self.tp is not None else None,
                                      weights_sharded=loaded.shard is not None)
            if self.tp is not None:
                self.runner.step_hook = self.tp.broadcast_step
            self.max_model_len = self._fit_context(max_model_len)
            self.async_scheduling = self._async_scheduling()
            if config.speculative_config is not None:
                self.spec = SpeculativeDecoder(config.speculative_config, proposer, self.max_model_len,
                                               frozenset(loaded.tokenizer.stop_token_ids),
                                               measure_steps=not config.device.startswith("cuda"))
        except BaseException:
            self.shutdown()
            raise
        self.context_limit = _context_limit(config, context, self.max_model_len, self.runner.num_kv_blocks)
        self.block_manager = BlockManager(self.runner.num_kv_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(self.block_manager, config.max_num_seqs, config.max_num_batched_tokens,
                                   self.max_model_len, self.async_scheduling)
        # PerRequestSampler: a failing batch names the request(s) whose rows fail (forge.engine.failures).
        self.sampler = PerRequestSampler(Sampler(config.device))
        self.eos_token_ids = frozenset(loaded.tokenizer.stop_token_ids)
        self.output_processor = OutputProcessor(loaded.tokenizer, loaded.config.vocab_size, self.max_model_len,
                                                self.eos_token_ids)
        self.isolation = FailureIsolation(self)  # a failing step fails only its culprits (forge.engine.failures)
        # The structured backend's inputs, explicit; it is built on first use (forge.structured).
        self._structured_inputs = (loaded.tokenizer, loaded.config.vocab_size, self.eos_token_ids, config.device)
        self._structured_lock = threading.Lock()
        self.requests: dict[str, Request] = {}
        self.in_flight: InFlight | None = None
        self.stats = {"prompt_tokens": 0, "generation_tokens": 0, "steps": 0}

    def _fit_context(self, max_model_len: int) -> int:
        """A single sequence must always fit, or preemption could never make room for it: an asked-for
        length that does not fit the KV cache is an error (as in vLLM), the default one is capped."""
        num_blocks, block_size = self.runner.num_kv_blocks, self.config.block_size
        if self.config.max_model_len is not None and self.config.max_model_len > num_blocks * block_size:
            raise InvalidRequestError(
                f"max_model_len {self.config.max_model_len} does not fit the KV cache of {num_blocks} blocks x "
                f"{block_size} = {num_blocks * block_size} tokens; raise num_kv_blocks (or the memory "
                f"for the cache) or lower max_model_len", param="max_model_len")
        return min(max_model_len, num_blocks * block_size)

    def _async_scheduling(self) -> bool:
        wanted = self.config.async_scheduling
        if self.config.speculative_config is not None:
            if wanted:
                raise InvalidRequestError("async scheduling does not support speculative decoding: its steps run "
                                          "synchronously (leave async_scheduling unset)", param="async_scheduling")
            return False
        if wanted is None:  # on by default where the host's work can overlap a device
            return self.config.device.startswith("cuda") and self.tp is None
        if wanted and self.tp is not None:
            raise InvalidRequestError("async scheduling does not support tensor parallelism yet",
                                      param="async_scheduling")
        return wanted

    def shutdown(self) -> None:
        """Stop the tensor-parallel workers and the structured-output threads, if any (idempotent)."""
        if self._structured is not None:
            self._structured.shutdown()
        if self.tp is not None:
            self.tp.shutdown()

    # -- structured outputs ------------------------------------------------------------------------
    @property
    def structured_backend(self):
        """The forge.structured.StructuredBackend of this engine's vocabulary, built on first use
        (~0.1 s; from whichever thread asks first: the server's handlers or the engine thread)."""
        if self._structured is None:
            with self._structured_lock:
                if self._structured is None:
                    from forge.structured import StructuredBackend

                    tokenizer, vocab_size, stop_token_ids, device = self._structured_inputs
                    self._structured = StructuredBackend(tokenizer, vocab_size, stop_token_ids, device=device)
        return self._structured

    @property
    def has_structured_backend(self) -> bool:
        """Whether the backend is built (asking for it builds it)."""
        return self._structured is not None

    def make_matcher(self, spec, compiled=None):
        return self.structured_backend.matcher(spec, compiled)

    def _begin_masks(self, seqs: list[Sequence], drafts: list[list[int]] | None = None):
        """The step's grammar masks (None: no sampled row is constrained); filled on the backend's
        thread from now until they are applied. drafts: a verify step's (a row per position)."""
        if self._structured is None or not seqs:  # no request ever asked for structured outputs
            return None
        if drafts is not None:
            return self._structured.begin_verify_step(seqs, drafts)
        return self._structured.begin_step(seqs)

    # -- requests ------------------------------------------------------------------------------------
    def add_request(self, req: Request) -> None:
        for seq in req.seqs:
            self.scheduler.add(seq)
        self.requests[req.request_id] = req
        self.stats["prompt_tokens"] += len(req.prompt_token_ids)

    def abort_request(self, request_id: str) -> None:
        """Cancel a request at any point; its KV blocks are freed at once."""
        req = self.requests.pop(request_id, None)
        if req is not None:
            self._end_request(req, "abort")

    def fail_request(self, request_id: str, cause: BaseException) -> RequestOutput | None:
        """End a request because of `cause` (forge.engine.failures); its output, finished, with `error` set."""
        req = self.requests.pop(request_id, None)
        if req is None:
            return None
        self._end_request(req, "error")
        out = self.output_processor.make_output(req)
        out.error = cause
        return out

    def _end_request(self, req: Request, reason: str) -> None:
        for seq in req.seqs:
            if not seq.is_finished:
                seq.finish_reason = reason
                self.scheduler.finish(seq)

    def recover_after_failed_step(self) -> list[RequestOutput]:
        """After a step raised halfway (tokens appended to some sequences, counts advanced): make
        every running sequence recompute from its tokens, as after a KV-cache preemption, and
        return the outputs of requests that the broken step finished but never reported."""
        if self.in_flight is not None:  # its tokens are lost: those sequences sample them again
            for seq in self.in_flight.seqs:
                seq.drop_inflight()
            self.in_flight = None
        for seq in reversed(list(self.scheduler.running)):  # reversed: appendleft keeps their order
            self.scheduler.preempt(seq)
        done = [req for req in self.requests.values() if req.finished]
        for req in done:
            del self.requests[req.request_id]
        return [self.output_processor.make_output(req) for req in done]

    def has_unfinished_requests(self) -> bool:
        if self.scheduler.has_unfinished() or self.isolation.has_held():
            return True
        # async scheduling: tokens still in flight for sequences that have not finished (aborted ones do not count)
        return self.in_flight is not None and any(s.num_inflight and not s.is_finished for s in self.in_flight.seqs)

    # -- the step --------------------------------------------------------------------------------------
    def step(self, emit: str = "all") -> list[RequestOutput]:
        """One step, with failures isolated (forge.engine.failures): a step that raises fails only
        the request(s) that caused it."""
        return self.isolation.step(self._step, emit)

    def _step(self, emit: str) -> list[RequestOutput]:
        prev = self.in_flight  # async scheduling: the last step's tokens, still on the device
        started = time.perf_counter()
        if self.spec is not None:
            if self._structured is not None:  # a failed step's mask fill may still hold the matchers
                self._structured.finish_in_flight()  # that proposing reads (valid_prefix_len)
            self.spec.propose(self.scheduler.running)  # each running sequence's drafts, often none
        sched = self.scheduler.schedule()
        sampling = [item for item in sched.scheduled if item.samples]
        seqs = [item.seq for item in sampling]
        drafts = [item.drafts for item in sampling] if any(item.num_drafts for item in sampling) else None
        # Grammars that hold every token so far get their masks filled while the forward pass runs.
        masks = self._begin_masks(seqs, drafts) if prev is None else None
        logits = self.runner.execute(sched.plan, prev.pending.token_ids if prev else None) if sched else None
        touched = self._read(prev) if prev is not None else {}  # step t-1, read while step t computes
        self.in_flight = None
        if sched:
            if any(item.wants_prompt_logprobs for item in sched.scheduled):
                logits = self.output_processor.take_prompt_logprobs(sched.scheduled, logits)
            self.scheduler.postprocess(sched)  # (after _read: full blocks hash real tokens)
            self.stats["steps"] += 1
        if seqs:
            if prev is not None:
                masks = self._begin_masks(seqs)  # the grammars needed step t-1's tokens
            rows, offsets = (seqs, None) if drafts is None else verify_rows(seqs, drafts)
            logits = apply_logit_bias(logits, rows)
            if masks is not None:
                logits = masks.apply(logits)
            sampled = InFlight(seqs, self.sampler.sample_async(logits, rows, offsets), drafts)
            overlap = self.async_scheduling and not self.isolation.isolating  # (failure trials run in order)
            if overlap and self.scheduler.add_placeholders(seqs):
                self.in_flight = sampled  # read at the next step, after it is launched
            elif not overlap:
                touched.update(self._read(sampled))
        if self.spec is not None and sched and len(sampling) == len(sched.scheduled) and \
                all(item.num_new_tokens - item.num_drafts == 1 for item in sampling):  # decode and verify rows only
            self.spec.observe_step(sched.num_tokens, time.perf_counter() - started)  # (whole step: proposal to tokens)
        return self._outputs(touched, emit)

    def _read(self, step: InFlight) -> dict[str, Request]:
        """Read a step's sampled tokens back and add them to their sequences; returns the requests
        that got a token."""
        results = step.pending.results()
        touched: dict[str, Request] = {}
        now = time.monotonic()
        if step.drafts is None:
            for seq, result in zip(step.seqs, results):
                if self.scheduler.drop_placeholder(seq):
                    self._append_token(seq, result, now)
                    touched[seq.request_id] = self.requests[seq.request_id]
            return touched
        row = 0
        for seq, drafts in zip(step.seqs, step.drafts):
            group = results[row : row + 1 + len(drafts)]
            row += len(group)
            if self.scheduler.drop_placeholder(seq):
                self._append_verified(seq, group, drafts, now)
                touched[seq.request_id] = self.requests[seq.request_id]
        return touched

    def _append_verified(self, seq: Sequence, results: list[SampleResult], drafts: list[int], now: float) -> None:
        """A verify step's tokens for `seq`: the drawn token at each position joins it while the
        draft there equals it; the first that differs (or the one after every draft) is the last.
        A stop ends the run wherever it falls."""
        accepted = 0
        for result, draft in zip(results, [*drafts, None]):
            self._append_token(seq, result, now)
            matched = result.token_id == draft
            accepted += matched
            if seq.is_finished or not matched:
                break
        if drafts:
            self.spec.record(seq, len(drafts), accepted)
        self.scheduler.accept_drafts(seq, accepted)

    def _append_token(self, seq: Sequence, result: SampleResult, now: float) -> None:
        """Add a sampled token and run the sequence's checks (stop conditions, its grammar, logprob
        text); anything failing in them fails this request alone (a RequestFailure naming it)."""
        try:
            stop = self.output_processor.add_token(seq, result, now)
        except Exception as exc:
            raise RequestFailure({seq.request_id: exc}) from exc
        self.stats["generation_tokens"] += 1
        if stop is not None:
            self._finish(seq, stop)

    def _finish(self, seq: Sequence, stop: Stop) -> None:
        seq.finish_reason, seq.stop_reason, seq.stop_text_cut = stop
        self.scheduler.finish(seq)

    def _outputs(self, touched: dict[str, Request], emit: str) -> list[RequestOutput]:
        """The step's outputs (every touched request, or the finished ones); finished requests are
        forgotten."""
        outputs = [self.output_processor.make_output(req) for req in touched.values() if emit == "all" or req.finished]
        for req in touched.values():
            if req.finished:
                del self.requests[req.request_id]
        return outputs


def verify_rows(seqs: list[Sequence], drafts: list[list[int]]) -> tuple[list[Sequence], list[int]]:
    """A verify step's sampled rows: each sequence once per position (its last token, then each
    draft), with the offset of the token drawn there past the sequence's last one."""
    rows, offsets = [], []
    for seq, d in zip(seqs, drafts):
        rows += [seq] * (1 + len(d))
        offsets += range(1 + len(d))
    return rows, offsets


def _context_limit(config: EngineConfig, model_context: int, max_model_len: int, num_kv_blocks: int) -> str:
    """What sets max_model_len, for messages: a request that does not fit is told which setting to change."""
    if max_model_len == num_kv_blocks * config.block_size and max_model_len < (config.max_model_len or model_context):
        return (f"the KV cache holds {max_model_len} tokens ({num_kv_blocks} block{'s' * (num_kv_blocks > 1)} of "
                f"{config.block_size}; raise num_kv_blocks or the memory for the cache)")
    if config.max_model_len is not None:
        return f"max_model_len is {max_model_len} tokens"
    if max_model_len < model_context:
        return f"the context is {max_model_len} tokens (forge's default cap; the model's is {model_context}: raise max_model_len)"
    return f"the model's context is {max_model_len} tokens"
