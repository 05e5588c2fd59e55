"""uvicorn, hardened: the read timeouts it lacks, a connection cap, a bounded graceful shutdown, and
no log flood when the process runs out of file descriptors.

uvicorn closes idle keep-alive connections and can cap connections (`timeout_keep_alive`,
`limit_concurrency`), but a client that sends half a request head, or half a body, and then nothing
keeps its connection (and file descriptor) forever. `TimedH11Protocol` adds those two deadlines.
`ForgeServer` replaces uvicorn's shutdown: stop accepting, let running requests finish for
`shutdown_timeout` seconds (a second signal cuts that short), then abort the rest so that streams
still end with an error event and `data: [DONE]`, and exit 0.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from forge.server.limits import ServerLimits

logger = logging.getLogger("forge.server")

# After the drain, aborted requests get this long to send their final events before their tasks are cancelled.
FINAL_EVENTS_GRACE_S = 5.0
# Out of file descriptors, asyncio (before CPython gh-151615) logs a traceback for every failed accept(),
# thousands a second, and schedules as many retries, which fail again with a traceback each if the
# server closes meanwhile. These log lines are let through once per few seconds.
FLOODING_ASYNCIO_LINES = ("socket.accept() out of system resource",
                          "Exception in callback BaseSelectorEventLoop._start_serving")


class RateLimitFilter(logging.Filter):
    """Lets one record whose message starts with `prefix` through per `interval` seconds, shortened
    to one line without its traceback and followed by how many were dropped since the last one."""

    def __init__(self, prefix: str, interval: float = 5.0):
        super().__init__()
        self.prefix, self.interval = prefix, interval
        self.next_allowed = 0.0
        self.suppressed = 0

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if not message.startswith(self.prefix):
            return True
        now = time.monotonic()
        if now < self.next_allowed:
            self.suppressed += 1
            return False
        self.next_allowed = now + self.interval
        line = message.splitlines()[0]
        if record.exc_info and record.exc_info[1] is not None:
            line += f": {record.exc_info[1]}"
        if self.suppressed:
            line += f" ({self.suppressed} more like it in the last {self.interval:g} s)"
        record.msg, record.args, record.exc_info, record.exc_text = line, None, None, None
        self.suppressed = 0
        return True


def install_log_rate_limits() -> None:
    """Once per process: asyncio's accept failures (out of descriptors) and our timeout lines."""
    limited = [("asyncio", line) for line in FLOODING_ASYNCIO_LINES] + [("forge.server", "closed a connection")]
    for name, prefix in limited:
        target = logging.getLogger(name)
        if not any(isinstance(f, RateLimitFilter) and f.prefix == prefix for f in target.filters):
            target.addFilter(RateLimitFilter(prefix))


def raise_open_file_limit() -> None:
    """Raise the soft limit on open descriptors to the hard one (as vLLM does): each connection takes one."""
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        target = 65536 if hard == resource.RLIM_INFINITY else min(hard, 65536)
        if soft != resource.RLIM_INFINITY and soft < target:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ImportError, ValueError, OSError):  # not Unix, or not allowed: keep the limit we have
        pass


def _timeout_response(message: str) -> bytes:
    body = json.dumps({"error": {"message": message, "type": "invalid_request_error", "param": None,
                                 "code": "request_timeout"}}).encode()
    head = (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\nconnection: close\r\n"
            b"content-length: " + str(len(body)).encode() + b"\r\n\r\n")
    return head + body


class TimedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol plus two deadlines: a request head must arrive whole within
    `header_timeout` seconds (from the connection opening, or from the first byte of a later request
    on a kept-alive connection), and its body within `body_timeout` seconds after the head. Past a
    deadline the client gets a 408 (if anything can still be said) and the connection is closed."""

    header_timeout: float = ServerLimits.timeout_request_header
    body_timeout: float = ServerLimits.timeout_request_body

    def connection_made(self, transport) -> None:
        self._read_timer: asyncio.TimerHandle | None = None
        self._reading: str | None = None  # "head" | "body" | None: what the running deadline is for
        self._head_started = False  # some bytes of the current head arrived
        super().connection_made(transport)
        self._start_deadline("head")

    def data_received(self, data: bytes) -> None:
        if self._reading is None and self.conn.their_state is h11.IDLE:
            self._start_deadline("head")  # the first bytes of the next request on a kept-alive connection
        self._head_started = self._head_started or self._reading == "head"
        super().data_received(data)
        self._follow_request_state()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._follow_request_state()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_deadline()
        super().connection_lost(exc)

    def _follow_request_state(self) -> None:
        state = self.conn.their_state
        if state is h11.SEND_BODY:
            if self._reading != "body":
                self._start_deadline("body")
        elif state is h11.IDLE and self._reading == "head":
            pass  # a head is on its way
        elif state is h11.IDLE and self.timeout_keep_alive_task is None:
            # Idle with no keep-alive timer: uvicorn starts it when a response ends and stops it at the
            # next bytes, such as the rest of a body the app answered without reading. Bound it here.
            self._start_deadline("head")
            self._head_started = False
        else:  # the request is in, a response is being sent, or the connection is done
            self._stop_deadline()
            self._head_started = False

    def _start_deadline(self, reading: str) -> None:
        self._stop_deadline()
        self._reading = reading
        seconds = self.header_timeout if reading == "head" else self.body_timeout
        self._read_timer = self.loop.call_later(seconds, self._on_deadline, reading, seconds)

    def _stop_deadline(self) -> None:
        if self._read_timer is not None:
            self._read_timer.cancel()
        self._read_timer, self._reading = None, None

    def _on_deadline(self, reading: str, seconds: float) -> None:
        self._read_timer, self._reading = None, None
        if self.transport.is_closing():
            return
        what = "request head" if reading == "head" else "request body"
        client = "%s:%d" % self.client if self.client else "a client"
        cycle = self.cycle if reading == "body" else None
        if reading == "head" and not self._head_started:
            logger.info("closed a connection from %s: no request within %g s", client, seconds)
        else:
            logger.info("closed a connection from %s: its %s was not complete after %g s (408)", client, what, seconds)
            if cycle is None or not cycle.response_started:
                self.transport.write(_timeout_response(f"the {what} was not complete within {seconds:g} s"))
        if cycle is not None and not cycle.response_complete:
            # The app may be waiting for the rest of the body: it now reads a disconnect, and what it
            # sends is dropped (the 408 above is the response).
            cycle.disconnected = True
            cycle.message_event.set()
        self.transport.close()


class ForgeServer(uvicorn.Server):
    """uvicorn.Server with forge's shutdown. `on_drain()` is called when shutdown starts (new requests
    are refused from then on); `on_abort()` when the drain time is up, to end the running requests
    with an error; it returns how many it aborted."""

    def __init__(self, config: uvicorn.Config, shutdown_timeout: float, on_drain: Callable[[], None],
                 on_abort: Callable[[], int]):
        super().__init__(config)
        self.shutdown_timeout = shutdown_timeout
        self.on_drain, self.on_abort = on_drain, on_abort
        self.abort_now = False  # a second signal: stop waiting for running requests

    def handle_exit(self, sig, frame) -> None:
        # A signal handler: only set flags (shutdown() polls them and does the logging).
        if self.should_exit:
            self.abort_now = True
        else:
            super().handle_exit(sig, frame)

    async def shutdown(self, sockets=None) -> None:
        logger.warning("shutting down: refusing new requests; running ones may finish for %g s "
                       "(send the signal again to abort them now)", self.shutdown_timeout)
        for server in self.servers:  # stop accepting connections
            server.close()
        for sock in sockets or []:
            sock.close()
        self.on_drain()
        for connection in list(self.server_state.connections):
            connection.shutdown()  # idle ones close now, busy ones after their response
        loop = asyncio.get_running_loop()
        tasks = self.server_state.tasks
        deadline = loop.time() + self.shutdown_timeout
        while tasks and not self.abort_now and loop.time() < deadline:
            await asyncio.sleep(0.05)
        if tasks:
            aborted = self.on_abort()
            logger.warning("aborted %d running request(s)%s", aborted,
                           " on a second signal" if self.abort_now else f" after {self.shutdown_timeout:g} s")
            deadline = loop.time() + FINAL_EVENTS_GRACE_S
            while tasks and loop.time() < deadline:
                await asyncio.sleep(0.05)
            for task in list(tasks):
                task.cancel(msg="forge is shutting down")
        for server in self.servers:
            try:  # (Python >= 3.12 waits here for every connection to close)
                await asyncio.wait_for(server.wait_closed(), timeout=1.0)
            except asyncio.TimeoutError:
                pass
        await self.lifespan.shutdown()
        # uvicorn re-raises the signal it caught once serve() returns, which would end the process
        # with that signal's status; a finished shutdown is a clean exit.
        self._captured_signals.clear()


def make_server(app, limits: ServerLimits, on_drain: Callable[[], None], on_abort: Callable[[], int],
                host: str = "127.0.0.1", port: int = 8000, log_level: str = "info") -> ForgeServer:
    protocol = type("TimedH11Protocol", (TimedH11Protocol,), {
        "header_timeout": limits.timeout_request_header, "body_timeout": limits.timeout_request_body})
    config = uvicorn.Config(
        app, host=host, port=port, log_level=log_level, http=protocol,
        timeout_keep_alive=limits.timeout_keep_alive,
        # uvicorn answers 503 once `connections >= limit`, the new connection included: +1 lets exactly
        # max_connections connections (or running requests) in.
        limit_concurrency=limits.max_connections + 1,
    )
    install_log_rate_limits()
    return ForgeServer(config, limits.shutdown_timeout, on_drain, on_abort)
