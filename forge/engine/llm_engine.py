"""The engine loop: add requests, step (schedule -> run -> sample -> postprocess), emit outputs."""

import dataclasses
import itertools
import logging
import threading
import time
import weakref
from dataclasses import dataclass, field

import torch

from forge.config import EngineConfig
from forge.engine.block_manager import BlockManager
from forge.engine.failures import FailureIsolation, PerRequestSampler
from forge.engine.logit_bias import apply_logit_bias, check_logit_bias
from forge.engine.model_runner import ModelRunner
from forge.engine.sampler import PendingSample, SampleResult, Sampler
from forge.engine.scheduler import Scheduler
from forge.errors import InvalidRequestError, PromptTooLongError, RequestFailure
from forge.loader import load_model
from forge.quant import keeps_gguf_quantized
from forge.outputs import CompletionOutput, Logprob, RequestMetrics, RequestOutput, VocabLogprobs
from forge.sampling_params import SamplingParams
from forge.sequence import PLACEHOLDER, Sequence
from forge.tokenizer import IncrementalDetokenizer

logger = logging.getLogger("forge")


@dataclass
class InFlight:
    """A step whose sampled tokens are known on the device but not read back yet (async scheduling)."""

    seqs: list[Sequence]  # the sampled rows, in order; each holds a PLACEHOLDER for its token
    pending: PendingSample
    row_of: dict[int, int]  # seq_id -> row in pending.token_ids (the next step's inputs read them)


@dataclass
class Request:
    """A user request: one prompt, `n` sequences sampled from it."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    seqs: list[Sequence] = field(default_factory=list)
    arrival_time: float = field(default_factory=time.monotonic)

    @property
    def finished(self) -> bool:
        return all(s.is_finished for s in self.seqs)


class LLMEngine:
    def __init__(self, config: EngineConfig):
        self.config = config
        if config.device.startswith("cuda") and not torch.cuda.is_available():
            raise InvalidRequestError("--device cuda was asked for but torch sees no CUDA GPU", param="device")
        tp_size = config.tensor_parallel_size
        # Rank 0's slice only: each tensor is cut as it is read (the workers do the same for theirs).
        loaded = load_model(config.model, config.load_format, shard=(0, tp_size) if tp_size > 1 else None,
                            keep_quantized=keeps_gguf_quantized(config.quantization, config.device, tp_size > 1))
        self.model_config = loaded.config
        self.tokenizer = loaded.tokenizer
        self.model_path = loaded.path
        context = loaded.config.max_position_embeddings
        if config.max_model_len is not None and config.max_model_len > context:  # vLLM refuses too
            raise InvalidRequestError(f"max_model_len {config.max_model_len} is greater than the model's context "
                                      f"of {context} tokens", param="max_model_len")
        self.max_model_len = config.max_model_len or min(8192, context)
        self.tp = None  # tensor parallelism: this process is rank 0, workers follow its steps (forge.distributed)
        if config.tensor_parallel_size > 1:
            from forge.distributed.worker import TensorParallelExecutor

            self.tp = TensorParallelExecutor(config, self.max_model_len, loaded.config)
            weakref.finalize(self, self.tp.shutdown)  # workers exit with the engine (or at interpreter exit)
        try:
            self.runner = ModelRunner(loaded.config, loaded.weights, config, self.max_model_len,
                                      tp=self.tp.group if self.tp is not None else None,
                                      weights_sharded=loaded.shard is not None)
        except BaseException:
            self.shutdown()
            raise
        if self.tp is not None:
            self.runner.step_hook = self.tp.broadcast_step
        del loaded
        num_blocks = self.runner.num_kv_blocks
        # A single sequence must always fit, or preemption could never make room for it: an asked-for
        # length that does not fit is an error (as in vLLM), the default one is capped.
        if config.max_model_len is not None and config.max_model_len > num_blocks * config.block_size:
            if self.tp is not None:
                self.tp.shutdown()
            raise InvalidRequestError(
                f"max_model_len {config.max_model_len} does not fit the KV cache of {num_blocks} blocks x "
                f"{config.block_size} = {num_blocks * config.block_size} tokens; raise num_kv_blocks (or the memory "
                f"for the cache) or lower max_model_len", param="max_model_len")
        self.max_model_len = min(self.max_model_len, num_blocks * config.block_size)
        self.context_limit = _context_limit(config, context, self.max_model_len, num_blocks)
        self.block_manager = BlockManager(num_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(self.block_manager, config.max_num_seqs, config.max_num_batched_tokens)
        # PerRequestSampler: a failing batch names the request(s) whose rows fail (forge.engine.failures).
        self.sampler = PerRequestSampler(Sampler(config.device))
        self.isolation = FailureIsolation(self)  # a failing step fails only its culprits (forge.engine.failures)
        self._structured_backend = None  # forge.structured.StructuredBackend, built on first use
        self._structured_lock = threading.Lock()
        self.async_scheduling = config.async_scheduling
        if self.async_scheduling is None:
            self.async_scheduling = config.device.startswith("cuda") and self.tp is None
        if self.async_scheduling and self.tp is not None:
            raise InvalidRequestError("async scheduling does not support tensor parallelism yet", param="async_scheduling")
        self.in_flight: InFlight | None = None
        self.eos_token_ids = set(self.tokenizer.stop_token_ids)
        self.requests: dict[str, Request] = {}
        self._ids = itertools.count()
        self.stats = {"prompt_tokens": 0, "generation_tokens": 0, "steps": 0}

    def shutdown(self) -> None:
        """Stop the tensor-parallel workers and the structured-output thread, if any (idempotent;
        the workers also stop when the engine is collected)."""
        if self._structured_backend is not None:
            self._structured_backend.shutdown()
        if self.tp is not None:
            self.tp.shutdown()

    # -- requests --------------------------------------------------------------------------
    def tokenize_prompt(self, prompt: str | dict | list[int]) -> tuple[str | None, list[int]]:
        """A prompt is text, a list of token ids, or a dict with "prompt" (text) or "prompt_token_ids"."""
        from forge.validation import check_token_ids

        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                text = prompt.get("prompt")
                if text is not None and not isinstance(text, str):
                    raise InvalidRequestError(f"prompt must be a string, got {type(text).__name__}", param="prompt")
                return text, check_token_ids(prompt["prompt_token_ids"])
            if "prompt" not in prompt:
                raise InvalidRequestError(f"a prompt dict needs 'prompt' (text) or 'prompt_token_ids', got keys "
                                          f"{sorted(map(str, prompt))[:5]}", param="prompt")
            prompt = prompt["prompt"]
            if not isinstance(prompt, str):
                raise InvalidRequestError(f"prompt must be a string, got {type(prompt).__name__}", param="prompt")
        if isinstance(prompt, str):
            if not prompt:
                raise InvalidRequestError("prompt is empty", param="prompt")
            return prompt, self.tokenizer.encode(prompt, add_special_tokens=True)
        if isinstance(prompt, (list, tuple)) or hasattr(prompt, "tolist"):
            return None, check_token_ids(prompt)
        raise InvalidRequestError(f"prompt must be a string, a list of token ids or a dict with 'prompt' or "
                                  f"'prompt_token_ids', got {type(prompt).__name__}", param="prompt")

    def add_request(
        self, prompt: str | dict | list[int], params: SamplingParams | None = None, request_id: str | None = None,
        grammar=None,
    ) -> str:
        """Queue a request; returns its id. `grammar`: params.structured_outputs already compiled (the
        server compiles it off the engine thread, StructuredBackend.compile_in_background); without it
        the spec is compiled here."""
        params = SamplingParams() if params is None else params
        if not isinstance(params, SamplingParams):
            raise InvalidRequestError(f"sampling params must be a SamplingParams, got {type(params).__name__}",
                                      param="sampling_params")
        if request_id is not None and not isinstance(request_id, str):
            raise InvalidRequestError(f"request id must be a string, got {type(request_id).__name__}",
                                      param="request_id")
        text, ids = self.tokenize_prompt(prompt)
        self.validate_prompt(ids, params)
        check_logit_bias(params, self.model_config.vocab_size)
        params = self._resolve_logprobs(params)
        request_id = request_id if request_id is not None else str(next(self._ids))
        if request_id in self.requests:
            raise InvalidRequestError(f"request id {request_id!r} is already in use", param="request_id")
        req = Request(request_id, text, ids, params)
        for i in range(params.n):
            detok = IncrementalDetokenizer(self.tokenizer, ids, skip_special_tokens=params.skip_special_tokens)
            seq = Sequence(request_id, ids, params, index=i, detokenizer=detok, seed=params.seed)
            if params.structured_outputs is not None:
                matcher = self.make_structured_matcher(params.structured_outputs, grammar)
                if params.structured_outputs.reasoning_end:  # free until the reasoning ends
                    from forge.structured.reasoning_gate import ReasoningGate

                    seq.reasoning_gate = ReasoningGate(matcher, params.structured_outputs.reasoning_end)
                else:
                    seq.structured = matcher
            req.seqs.append(seq)
        for seq in req.seqs:
            self.scheduler.add(seq)
        self.requests[request_id] = req
        self.stats["prompt_tokens"] += len(ids)
        return request_id

    def validate_prompt(self, ids: list[int], params: SamplingParams) -> None:
        if not ids:
            raise InvalidRequestError("prompt is empty", param="prompt")
        vocab = self.model_config.vocab_size
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise InvalidRequestError(f"prompt token id {bad[0]} is outside the vocabulary [0, {vocab})", param="prompt")
        if len(ids) >= self.max_model_len:
            raise PromptTooLongError(
                f"prompt has {len(ids)} tokens but {self.context_limit}", param="prompt"
            )
        if params.max_tokens is not None and len(ids) + params.max_tokens > self.max_model_len:
            raise PromptTooLongError(
                f"prompt ({len(ids)} tokens) + max_tokens ({params.max_tokens}) = {len(ids) + params.max_tokens} "
                f"exceeds the context: {self.context_limit}",
                param="max_tokens",
            )
        if len(ids) + params.min_tokens > self.max_model_len:  # (only reachable with max_tokens=None)
            raise PromptTooLongError(
                f"prompt ({len(ids)} tokens) + min_tokens ({params.min_tokens}) = {len(ids) + params.min_tokens} "
                f"exceeds the context: {self.context_limit}", param="min_tokens")

    def _resolve_logprobs(self, params: SamplingParams) -> SamplingParams:
        """Check logprobs / prompt_logprobs against max_logprobs, as vLLM does; -1 (the whole vocabulary)
        and anything beyond it become the vocabulary size, which the sampler takes as a plain count."""
        vocab, limit = self.model_config.vocab_size, self.config.max_logprobs
        resolved = {}
        for name in ("logprobs", "prompt_logprobs"):
            n = getattr(params, name)
            if n is None:
                continue
            wanted = vocab if n == -1 else min(n, vocab)
            if limit != -1 and wanted > limit:
                asked = f"{name}=-1 (the whole vocabulary, {vocab} tokens)" if n == -1 else f"{name}={n}"
                raise InvalidRequestError(f"{asked} is more than max_logprobs={limit}; raise it with "
                                          f"LLM(max_logprobs=...) or --max-logprobs (-1 allows the whole vocabulary)",
                                          param=name)
            if wanted != n:
                resolved[name] = wanted
        return dataclasses.replace(params, **resolved) if resolved else params

    def make_structured_matcher(self, spec, compiled=None):
        return self.structured_backend.matcher(spec, compiled)

    @property
    def structured_backend(self):
        """The forge.structured.StructuredBackend of this engine's vocabulary, built on first use
        (~0.1 s; from whichever thread asks first: the server's handlers or the engine thread)."""
        if self._structured_backend is None:
            with self._structured_lock:
                if self._structured_backend is None:
                    from forge.structured import StructuredBackend

                    stops = set(self.tokenizer.stop_token_ids) | self.eos_token_ids
                    self._structured_backend = StructuredBackend(self.tokenizer, self.model_config.vocab_size, stops,
                                                                 device=self.config.device)
        return self._structured_backend


    def abort_request(self, request_id: str) -> None:
        """Cancel a request at any point; its KV blocks are freed at once."""
        req = self.requests.pop(request_id, None)
        if req is None:
            return
        for seq in req.seqs:
            if not seq.is_finished:
                seq.finish_reason = "abort"
                self.scheduler.finish(seq)

    def fail_request(self, request_id: str, cause: BaseException) -> RequestOutput | None:
        """End a request because of `cause` (forge.engine.failures); its output, finished, with `error` set."""
        req = self.requests.pop(request_id, None)
        if req is None:
            return None
        for seq in req.seqs:
            if not seq.is_finished:
                seq.finish_reason = "error"
                self.scheduler.finish(seq)
        out = self._make_output(req)
        out.error = cause
        return out

    def recover_after_failed_step(self) -> list[RequestOutput]:
        """After step() raised halfway (tokens appended to some sequences, counts advanced): make
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
        return [self._make_output(req) for req in done]

    def has_unfinished_requests(self) -> bool:
        if self.scheduler.has_unfinished() or self.isolation.has_held():
            return True
        # async scheduling: tokens still in flight for sequences that have not finished (aborted ones do not count)
        return self.in_flight is not None and any(s.num_inflight and not s.is_finished for s in self.in_flight.seqs)

    @property
    def num_unfinished_requests(self) -> int:
        return len(self.requests)

    # -- the step --------------------------------------------------------------------------
    def step(self, emit: str = "all") -> list[RequestOutput]:
        """Run one engine step. Returns outputs of the requests that got a token this step
        (emit="all", for streaming) or only of those that finished (emit="finished": skips building
        per-step output objects, which costs O(output length) per request per step).

        A step that raises fails only the request(s) that caused it, found by name or by bisection
        (forge.engine.failures); they come back finished, with `error` set, and the others go on."""
        return self.isolation.step(self._step, emit)

    def _step(self, emit: str) -> list[RequestOutput]:
        if self.async_scheduling and not self.isolation.isolating:
            return self._step_async(emit)
        sched = self.scheduler.schedule()
        if not sched:
            return []
        seqs = [item.seq for item in sched.scheduled if item.samples]
        masks = self._structured_masks(seqs)  # grammar masks: filled while the forward pass runs
        logits = self.runner.execute(sched.plan)
        if any(item.wants_prompt_logprobs for item in sched.scheduled):
            logits = self._take_prompt_logprobs(sched, logits)
        logits = apply_logit_bias(logits, seqs)
        if masks is not None:
            logits = masks.apply(logits)
        results = self.sampler.sample_async(logits, seqs).results() if seqs else []
        self.scheduler.postprocess(sched)
        self.stats["steps"] += 1
        touched: dict[str, Request] = {}
        now = time.monotonic()
        for seq, result in zip(seqs, results):
            self._append_token(seq, result, now)
            touched[seq.request_id] = self.requests[seq.request_id]
        return self._outputs(touched, emit)

    def _outputs(self, touched: dict[str, "Request"], emit: str) -> list[RequestOutput]:
        """The step's outputs (every touched request, or the finished ones); finished requests are
        forgotten."""
        outputs = [self._make_output(req) for req in touched.values() if emit == "all" or req.finished]
        for req in touched.values():
            if req.finished:
                del self.requests[req.request_id]
        return outputs

    def _step_async(self, emit: str) -> list[RequestOutput]:
        """One step with async scheduling: launch step t+1, then read step t's tokens back while
        the GPU computes, then queue step t+1's sampling and return step t's outputs.

        Step t+1 is scheduled before step t's tokens are known: a sequence holds a PLACEHOLDER for
        its in-flight token (the scheduler counts it; the model runner copies the real id into the
        inputs on the device). A sequence that turns out finished at step t (EOS, stop string,
        grammar end) still ran in step t+1; that row is dropped.
        """
        prev = self.in_flight
        sched = self.scheduler.schedule()
        seqs = [item.seq for item in sched.scheduled if item.samples]
        logits = None
        if sched:
            prev_sampled = prev.pending.token_ids if prev is not None else None
            logits = self.runner.execute(sched.plan, prev_sampled=prev_sampled)
        touched = self._resolve(prev) if prev is not None else {}
        self.in_flight = None
        if sched:
            if any(item.wants_prompt_logprobs for item in sched.scheduled):
                logits = self._take_prompt_logprobs(sched, logits)
            self.scheduler.postprocess(sched)  # after _resolve: full blocks hash the real tokens
            self.stats["steps"] += 1
            if seqs:
                masks = self._structured_masks(seqs)  # needs step t's tokens, accepted in _resolve
                logits = apply_logit_bias(logits, seqs)
                if masks is not None:
                    logits = masks.apply(logits)
                pending = self.sampler.sample_async(logits, seqs)
                live = [s for s in seqs if not s.is_finished]
                for seq in live:
                    seq.token_ids.append(PLACEHOLDER)
                    seq.num_inflight = 1
                    p = seq.params
                    seq.awaiting_final = (p.max_tokens is not None and seq.num_output_tokens + 1 >= p.max_tokens) \
                        or seq.num_tokens >= self.max_model_len
                if live:
                    self.in_flight = InFlight(seqs, pending, {s.seq_id: i for i, s in enumerate(seqs)})
        return self._outputs(touched, emit)

    def _resolve(self, prev: InFlight) -> dict[str, Request]:
        """Read back an in-flight step's tokens, put them in place of the placeholders and run the
        usual per-token checks; returns the requests that got a token."""
        results = prev.pending.results()
        touched: dict[str, Request] = {}
        now = time.monotonic()
        for seq, result in zip(prev.seqs, results):
            if not seq.num_inflight:  # finished (or aborted) before this token was sampled
                continue
            seq.drop_inflight()
            if seq.is_finished:  # aborted while in flight
                continue
            self._append_token(seq, result, now)
            touched[seq.request_id] = self.requests[seq.request_id]
        return touched

    def _take_prompt_logprobs(self, sched, logits: torch.Tensor) -> torch.Tensor:
        """Record prompt logprobs from the chunk rows that carry them; return only the sampling rows."""
        keep, row = [], 0
        for item in sched.scheduled:
            seq = item.seq
            if not item.wants_prompt_logprobs:
                if item.samples:
                    keep.append(row)
                    row += 1
                continue
            start, n = seq.num_computed_tokens, item.num_new_tokens
            # The row of position p predicts token p + 1. Record prompt tokens not recorded yet
            # (a sequence preempted mid-prefill recomputes positions it already recorded).
            first = len(seq.prompt_logprobs)  # index of the next prompt token to record
            end = min(start + n, seq.num_prompt_tokens - 1)  # positions [first - 1, end) predict [first, end + 1)
            if end >= first:
                rows = logits[row + first - 1 - start : row + end - start]
                targets = seq.token_ids[first : end + 1]
                seq.prompt_logprobs.extend(
                    self._logprob_entries(torch.log_softmax(rows, -1), targets, seq.params.prompt_logprobs)
                )
            if item.samples:
                keep.append(row + n - 1)
            row += n
        return logits[keep]

    def _logprob_entries(self, logprobs: torch.Tensor, targets: list[int], top_n: int) -> list[dict[int, Logprob]]:
        """One {token id: Logprob} per row: the target token (with its exact rank) and the top_n."""
        if top_n >= logprobs.shape[-1]:  # the whole vocabulary: each Logprob is made when it is read
            ranked = torch.sort(logprobs, dim=-1, descending=True)
            return [VocabLogprobs(list(zip(ids, lps)), self._decode_token)
                    for ids, lps in zip(ranked.indices.tolist(), ranked.values.tolist())]
        target_lp = logprobs.gather(1, torch.tensor(targets, device=logprobs.device)[:, None]).squeeze(1)
        ranks = (logprobs > target_lp[:, None]).sum(-1) + 1
        top = torch.topk(logprobs, top_n, dim=-1) if top_n else None
        entries = []
        for i, tid in enumerate(targets):
            entry = {tid: Logprob(float(target_lp[i]), int(ranks[i]), self.tokenizer.decode([tid], skip_special_tokens=False))}
            if top is not None:
                for rank, (t, lp) in enumerate(zip(top.indices[i].tolist(), top.values[i].tolist()), start=1):
                    entry.setdefault(t, Logprob(lp, rank, self.tokenizer.decode([t], skip_special_tokens=False)))
            entries.append(entry)
        return entries

    def _structured_masks(self, seqs: list[Sequence]):
        if self._structured_backend is None:  # no request ever asked for structured outputs
            return None
        from forge.structured import begin_masks

        return begin_masks(seqs)

    def _append_token(self, seq: Sequence, result: SampleResult, now: float) -> None:
        """Add a sampled token and run the sequence's checks (stop conditions, its grammar, logprob
        text); anything failing in them fails this request alone (a RequestFailure naming it)."""
        try:
            self._add_token(seq, result, now)
        except Exception as exc:
            raise RequestFailure({seq.request_id: exc}) from exc

    def _add_token(self, seq: Sequence, result: SampleResult, now: float) -> None:
        token = result.token_id
        p = seq.params
        seq.token_ids.append(token)
        self.stats["generation_tokens"] += 1
        if seq.first_token_time is None:
            seq.first_token_time = now
        seq.last_token_time = now
        if result.logprob is not None:
            seq.cumulative_logprob += result.logprob
            if p.logprobs >= self.model_config.vocab_size:  # the whole vocabulary: each Logprob is made when read
                seq.output_logprobs.append(VocabLogprobs(result.top_logprobs, self._decode_token))
            else:
                entry = {token: Logprob(result.logprob, 0, self._decode_token(token))}
                for rank, (tid, lp) in enumerate(result.top_logprobs or [], start=1):
                    if tid == token:
                        entry[token].rank = rank
                    else:
                        entry[tid] = Logprob(lp, rank, self._decode_token(tid))
                if entry[token].rank == 0:
                    entry[token].rank = -1  # not among the top-n; exact rank not computed
                seq.output_logprobs.append(entry)
        if seq.structured is not None:
            seq.structured.push(token)  # the grammar advances during the next step's forward pass
        elif seq.reasoning_gate is not None and seq.reasoning_gate.opens(seq.sync_text()):
            seq.structured, seq.reasoning_gate = seq.reasoning_gate.matcher, None  # constrains the next token
        enough = seq.num_output_tokens >= p.min_tokens
        if enough and token in p.stop_token_ids:
            return self._finish(seq, "stop", token)
        if enough and not p.ignore_eos and token in self.eos_token_ids:
            return self._finish(seq, "stop", token)
        if seq.structured is not None and seq.structured.is_terminated():
            return self._finish(seq, "stop", None)
        if p.stop:  # stop strings need the text now; otherwise it is decoded when read
            old_len = len(seq.detokenizer.text)
            text = seq.sync_text()
            if enough:
                start = max(0, old_len - max(len(s) for s in p.stop) + 1)
                for stop in p.stop:
                    idx = text.find(stop, start)
                    if idx != -1:
                        seq.stop_text_cut = idx + len(stop) if p.include_stop_str_in_output else idx
                        return self._finish(seq, "stop", stop)
        if p.max_tokens is not None and seq.num_output_tokens >= p.max_tokens:
            return self._finish(seq, "length", None)
        if seq.num_tokens >= self.max_model_len:
            return self._finish(seq, "length", None)

    def _decode_token(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id], skip_special_tokens=False)

    def _finish(self, seq: Sequence, reason: str, stop_reason) -> None:
        seq.finish_reason = reason
        seq.stop_reason = stop_reason
        self.scheduler.finish(seq)

    def _make_output(self, req: Request) -> RequestOutput:
        outs = []
        for seq in req.seqs:
            outs.append(
                CompletionOutput(
                    index=seq.index,
                    text=seq.output_text,
                    token_ids=list(seq.output_token_ids),
                    cumulative_logprob=seq.cumulative_logprob if seq.params.logprobs is not None else None,
                    logprobs=list(seq.output_logprobs) if seq.params.logprobs is not None else None,
                    finish_reason=seq.finish_reason,
                    stop_reason=seq.stop_reason,
                )
            )
        metrics = _request_metrics(req)
        return RequestOutput(
            request_id=req.request_id,
            prompt=req.prompt,
            prompt_token_ids=req.prompt_token_ids,
            outputs=outs,
            finished=req.finished,
            num_cached_tokens=req.seqs[0].num_cached_tokens,
            prompt_logprobs=req.seqs[0].prompt_logprobs,
            metrics=metrics,
        )

    # -- introspection -----------------------------------------------------------------------
    @property
    def kv_cache_usage(self) -> float:
        return self.block_manager.usage

    @property
    def prefix_cache_hit_rate(self) -> float:
        return self.block_manager.prefix_hit_rate

    def num_running(self) -> int:
        return len(self.scheduler.running)

    def num_waiting(self) -> int:
        return len(self.scheduler.waiting) + len(self.isolation.held)  # held: out of a failure's trial steps



# The engine times with time.monotonic(); metrics report seconds since the epoch, as vLLM's do.
_EPOCH_OFFSET = time.time() - time.monotonic()


def _request_metrics(req: Request) -> RequestMetrics:
    def epoch(times: list[float | None], pick) -> float | None:
        known = [t for t in times if t is not None]
        return pick(known) + _EPOCH_OFFSET if known else None

    last_token = epoch([s.last_token_time for s in req.seqs], max)
    return RequestMetrics(
        arrival_time=req.arrival_time + _EPOCH_OFFSET,
        first_scheduled_time=epoch([s.first_scheduled_time for s in req.seqs], min),
        first_token_time=epoch([s.first_token_time for s in req.seqs], min),
        last_token_time=last_token,
        finished_time=last_token if req.finished else None,
    )


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
