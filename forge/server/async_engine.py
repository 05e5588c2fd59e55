"""An asyncio front for LLMEngine: the engine steps in its own thread, HTTP handlers await outputs.

The step loop and the event loop never wait on each other:
  * handlers hand work to the engine thread through a thread-safe command deque, processed between
    steps (so LLMEngine is only ever touched from one thread);
  * after each step the engine thread posts every request's newest output to the owning event loop
    with one `call_soon_threadsafe` per loop, and goes straight on to the next step.
Outputs are cumulative (each RequestOutput holds the whole text so far), so a request's stream keeps
only the newest one: a slow client costs one object of memory, never a growing queue.

A request's grammar (structured outputs) is compiled before the request reaches the engine thread, in
the structured backend's compile workers, so a large or slow grammar never stalls the other streams.
A step that fails fails only the request(s) that caused it (forge.engine.failures): their streams
raise InvalidRequestError when their own input was at fault, else EngineRequestError.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
import traceback
from dataclasses import dataclass

from forge.engine.llm_engine import LLMEngine
from forge.errors import InvalidRequestError
from forge.outputs import RequestOutput
from forge.sampling_params import SamplingParams

logger = logging.getLogger("forge.server")


class EngineRequestError(RuntimeError):
    """The engine failed this request (an exception in a step it took part in, or a dead engine)."""


@dataclass
class EngineSnapshot:
    """Counters the engine thread refreshes every loop, for /metrics and back-pressure (reads are lock-free)."""

    num_running: int = 0
    num_waiting: int = 0  # sequences in the scheduler's waiting queue
    kv_cache_usage: float = 0.0
    prefix_cache_hit_rate: float = 0.0
    # cumulative since the engine started (forge.server.metrics.ENGINE_COUNTERS)
    prompt_tokens: int = 0
    generation_tokens: int = 0
    prefix_cache_queries: int = 0  # tokens
    prefix_cache_hits: int = 0
    num_preemptions: int = 0
    # speculative decoding (forge.spec_decode.decoder.SpecStats): verify rows with drafts, draft tokens,
    # accepted ones, and accepted ones by draft position
    spec_decode_num_drafts: int = 0
    spec_decode_num_draft_tokens: int = 0
    spec_decode_num_accepted_tokens: int = 0
    spec_decode_accepted_per_pos: tuple[int, ...] = ()


class RequestStream:
    """The receiving end of one engine request: `async for output in stream` yields the newest
    cumulative RequestOutput, ends after the finished one, and raises if the engine failed it."""

    def __init__(self, request_id: str, loop: asyncio.AbstractEventLoop):
        self.request_id = request_id
        self.loop = loop
        self.accepted: asyncio.Future = loop.create_future()  # None, or the add_request exception
        self.finished = False
        self._latest: RequestOutput | None = None
        self._error: BaseException | None = None
        self._ready = asyncio.Event()
        # Owned by the engine thread: timing for the TTFT / inter-token histograms.
        self.submit_time = time.monotonic()
        self.tokens_seen: dict[int, int] = {}
        self.last_token_time: dict[int, float] = {}
        self.started = False  # has produced a token (so it no longer counts as waiting)

    # -- called on the event loop thread (via call_soon_threadsafe) -------------------------------
    def _put(self, item: RequestOutput | BaseException) -> None:
        if isinstance(item, BaseException):
            if not self.accepted.done():
                self.accepted.set_result(item)
            self._error = item
        else:
            self._latest = item
        self._ready.set()

    def __aiter__(self):
        return self

    async def __anext__(self) -> RequestOutput:
        if self.finished:
            raise StopAsyncIteration
        while self._latest is None and self._error is None:
            await self._ready.wait()
            self._ready.clear()
        if self._latest is not None:
            out, self._latest = self._latest, None
            self.finished = out.finished
            return out
        self.finished = True
        raise self._error


class AsyncEngine:
    def __init__(self, engine: LLMEngine, metrics=None):
        self.engine = engine
        self.metrics = metrics  # a forge.server.metrics.ServerMetrics, or None
        self.snapshot = EngineSnapshot()
        self._commands: collections.deque = collections.deque()  # deque appends/pops are thread-safe
        self._wakeup = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._streams: dict[str, RequestStream] = {}  # engine thread only
        # Requests submitted that have not produced a token yet: the server's waiting queue. Counted
        # from the handlers' side so a client that saw its request accepted also sees it counted.
        self._waiting_lock = threading.Lock()
        self._num_waiting_requests = 0

    # -- lifecycle -----------------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="forge-engine", daemon=True)
        self._thread.start()

    def shutdown(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._wakeup.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    @property
    def is_alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def num_waiting_requests(self) -> int:
        return self._num_waiting_requests

    # -- the handlers' side ----------------------------------------------------------------------
    async def generate(self, prompt: str | dict | list[int], params: SamplingParams, request_id: str) -> RequestStream:
        """Submit a request and wait until the engine has accepted it (between two steps).

        Raises the engine's validation error (InvalidRequestError, ...) if it refused the request.
        A grammar is compiled first, off the engine thread (InvalidRequestError if it is too large,
        invalid, matches no text or runs past the compile time limit).
        """
        if not self.is_alive:
            raise EngineRequestError("the engine is not running")
        grammar = None
        if params.structured_outputs is not None:
            grammar = await self._compile(params.structured_outputs)
        stream = RequestStream(request_id, asyncio.get_running_loop())
        self._change_waiting(+1)
        self._commands.append(("add", stream, prompt, params, grammar))
        self._wakeup.set()
        try:
            error = await asyncio.shield(stream.accepted)
        except asyncio.CancelledError:
            self.abort(request_id)  # the client left before the engine even saw the request
            raise
        if error is not None:
            raise error
        return stream

    async def _compile(self, spec):
        if self.engine.has_structured_backend:
            backend = self.engine.structured_backend
        else:  # built once (~0.1 s): not on the event loop
            backend = await asyncio.to_thread(lambda: self.engine.structured_backend)
        return await asyncio.wrap_future(backend.compile_in_background(spec))

    def abort(self, request_id: str) -> None:
        """Cancel a request (client gone); its KV blocks are freed before the next step."""
        self._commands.append(("abort", request_id))
        self._wakeup.set()

    def _change_waiting(self, delta: int) -> None:
        with self._waiting_lock:
            self._num_waiting_requests += delta

    # -- the engine thread -------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            self._loop()
        except BaseException:  # a bug in this loop: say so loudly, and don't leave clients hanging
            logger.critical("engine thread died:\n%s", traceback.format_exc())
        finally:
            error = EngineRequestError("the engine stopped")
            leftover = [(s, error) for s in self._streams.values()]
            leftover += [(cmd[1], error) for cmd in self._commands if cmd[0] == "add"]
            self._streams.clear()
            self._commands.clear()
            for stream, _ in leftover:
                self._mark_started(stream)
                try:  # leave the engine clean in case it is started again
                    self.engine.abort_request(stream.request_id)
                except Exception:
                    pass
            self._deliver(leftover)

    def _loop(self) -> None:
        engine = self.engine
        while not self._stop.is_set():
            deliveries: list[tuple[RequestStream, RequestOutput | BaseException]] = []
            self._process_commands(deliveries)
            if engine.has_unfinished_requests():
                # A failing step fails only its culprits (their outputs carry `error`); an exception
                # out of step() would be a bug in that isolation, which _run reports.
                outputs = engine.step()
                now = time.monotonic()
                for out in outputs:
                    stream = self._streams.get(out.request_id)
                    if stream is None:
                        continue
                    if out.error is not None:
                        del self._streams[out.request_id]
                        self._mark_started(stream)
                        self._count_finished("error", len(out.outputs))
                        deliveries.append((stream, _client_error(out.error)))
                        continue
                    self._observe_timing(stream, out, now)
                    if out.finished:
                        del self._streams[out.request_id]
                    deliveries.append((stream, out))
            self._refresh_snapshot()
            self._deliver(deliveries)
            if not engine.has_unfinished_requests() and not self._commands:
                self._wakeup.wait(timeout=0.5)  # idle: sleep until a command arrives
                self._wakeup.clear()

    def _process_commands(self, deliveries: list) -> None:
        while self._commands:
            cmd = self._commands.popleft()
            if cmd[0] == "add":
                _, stream, prompt, params, grammar = cmd
                try:
                    self.engine.add_request(prompt, params, request_id=stream.request_id, grammar=grammar)
                except Exception as exc:  # validation errors travel back to the handler that submitted it
                    if not isinstance(exc, ValueError):
                        logger.error("add_request failed:\n%s", traceback.format_exc())
                    self._mark_started(stream)
                    deliveries.append((stream, exc))
                    continue
                self._streams[stream.request_id] = stream
                deliveries.append((stream, None))  # accepted
            else:
                request_id = cmd[1]
                request = self.engine.requests.get(request_id)
                self.engine.abort_request(request_id)
                stream = self._streams.pop(request_id, None)
                if stream is not None and request is not None:
                    self._count_finished("abort", len(request.seqs))
                if stream is not None:  # wake anyone still reading it
                    self._mark_started(stream)
                    deliveries.append((stream, EngineRequestError("the request was aborted")))

    def _deliver(self, deliveries: list) -> None:
        """Hand outputs to their event loops: one call_soon_threadsafe per loop per step."""
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for stream, item in deliveries:
            by_loop.setdefault(stream.loop, []).append((stream, item))
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_deliver_on_loop, items)
            except RuntimeError:  # that event loop is closed: nobody will read these requests
                for stream, _ in items:
                    self.engine.abort_request(stream.request_id)
                    self._streams.pop(stream.request_id, None)
                    self._mark_started(stream)

    def _mark_started(self, stream: RequestStream) -> None:
        if not stream.started:
            stream.started = True
            self._change_waiting(-1)

    def _observe_timing(self, stream: RequestStream, out: RequestOutput, now: float) -> None:
        if out.finished:
            self._mark_started(stream)
        metrics = self.metrics
        for completion in out.outputs:
            n = len(completion.token_ids)
            seen = stream.tokens_seen.get(completion.index, 0)
            if n <= seen:
                continue
            if not stream.started:
                self._mark_started(stream)
            if metrics is not None:
                if seen == 0:
                    if completion.index == 0:
                        metrics.time_to_first_token.observe(now - stream.submit_time)
                else:  # one observation per token, as vLLM (tokens that arrive together share the gap)
                    gap = (now - stream.last_token_time[completion.index]) / (n - seen)
                    for _ in range(n - seen):
                        metrics.inter_token_latency.observe(gap)
            stream.tokens_seen[completion.index] = n
            stream.last_token_time[completion.index] = now
        if out.finished and metrics is not None:
            metrics.e2e_request_latency.observe(now - stream.submit_time)
            if out.metrics is not None and out.metrics.time_in_queue is not None:
                metrics.request_queue_time.observe(out.metrics.time_in_queue)
            for completion in out.outputs:
                self._count_finished(completion.finish_reason or "abort")

    def _count_finished(self, reason: str, count: int = 1) -> None:
        if self.metrics is not None and count:
            self.metrics.finished(reason, count)

    def _refresh_snapshot(self) -> None:
        e = self.engine
        self.snapshot = EngineSnapshot(
            e.num_running(), e.num_waiting(), e.kv_cache_usage, e.prefix_cache_hit_rate,
            prompt_tokens=e.stats["prompt_tokens"], generation_tokens=e.stats["generation_tokens"],
            prefix_cache_queries=e.block_manager.prefix_queries, prefix_cache_hits=e.block_manager.prefix_hits,
            num_preemptions=e.scheduler.num_preemptions)
        spec = e.spec_stats
        if spec is not None:
            s = self.snapshot
            s.spec_decode_num_drafts, s.spec_decode_num_draft_tokens = spec.num_drafts, spec.num_draft_tokens
            s.spec_decode_num_accepted_tokens = spec.num_accepted_tokens
            s.spec_decode_accepted_per_pos = tuple(spec.accepted_per_pos)


def _client_error(cause: BaseException) -> BaseException:
    """What a failed request's reader sees: the request's own InvalidRequestError (a client error), or
    a one-line internal error that names no internals (the server log has the traceback)."""
    if isinstance(cause, InvalidRequestError):
        return cause
    return EngineRequestError(f"the engine failed while generating this request ({type(cause).__name__}); "
                              f"the server log has the details")


def _deliver_on_loop(items: list) -> None:
    for stream, item in items:
        if item is None:
            stream.accepted.set_result(None)
        else:
            stream._put(item)
