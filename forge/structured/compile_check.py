"""The time limit on grammar compilation: a new spec is first compiled in a helper process, which is
killed when it runs past the limit.

xgrammar cannot stop a compile once it has started, and a few bytes can keep it busy for hours: the
regex `a?` repeated 160 times (320 bytes) takes 10 s, 1,000 times well over five minutes (xgrammar
0.2.9, measured on the CPU host). A thread would burn a core until the compile ended, whatever the
client had been told; a process can be killed. So the server's StructuredBackend sends each spec it
has not compiled yet here first, and compiles it itself (in a worker thread: xgrammar compiles
without holding the GIL) only once it is known to finish in time. That costs a new spec its compile
twice (typically tens of milliseconds) and a cached one nothing; shipping the compiled grammar back
instead would cost more (`serialize_json` of a 17 MiB grammar takes three times its compile).

Each helper is a `python -m forge.structured.compile_check` process holding its own GrammarCompiler,
reading one JSON line per spec on stdin and answering one per spec on stdout: ("ok", bytes),
("invalid", message) or ("error", message). One helper per compile worker thread, started on first
use; a helper that ran past the limit is killed and a new one started for the next spec.
"""

from __future__ import annotations

import json
import os
import queue
import select
import subprocess
import sys
import threading
import time
from pathlib import Path

from forge.errors import InvalidRequestError

_START_TIMEOUT_S = 300.0  # a helper imports torch and xgrammar: seconds on a busy 2-core host


class CheckerUnavailable(RuntimeError):
    """No helper process could be started (the backend then compiles without the time limit)."""


class _Helper:
    def __init__(self, tokenizer_info_json: str, compile_threads: int):
        env = dict(os.environ)
        root = str(Path(__file__).resolve().parents[2])  # the directory holding the forge package
        env["PYTHONPATH"] = root + os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else root
        try:
            self.process = subprocess.Popen([sys.executable, "-m", "forge.structured.compile_check",
                                             str(compile_threads)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                            env=env, text=True, encoding="utf-8")
            self.process.stdin.write(tokenizer_info_json + "\n")
            self.process.stdin.flush()
        except OSError as e:
            raise CheckerUnavailable(f"the grammar compile helper did not start: {e}") from None
        if self.receive(_START_TIMEOUT_S) is None:
            self.kill()
            raise CheckerUnavailable(f"the grammar compile helper did not start within {_START_TIMEOUT_S:g} s")

    def send(self, kind: str, text: str) -> None:
        self.process.stdin.write(json.dumps([kind, text]) + "\n")
        self.process.stdin.flush()

    def receive(self, timeout: float) -> list | None:
        """The helper's next answer, or None if it gave none within `timeout` (or exited)."""
        ready, _, _ = select.select([self.process.stdout], [], [], timeout)
        line = self.process.stdout.readline() if ready else ""
        return json.loads(line) if line else None

    def kill(self) -> None:
        self.process.kill()
        self.process.wait(5)
        for pipe in (self.process.stdin, self.process.stdout):
            try:
                pipe.close()
            except OSError:
                pass


class CompileChecker:
    """Compiles specs in helper processes under a time limit. Thread-safe; at most `workers` checks run
    at once (callers wait for a free helper)."""

    def __init__(self, tokenizer_info, timeout_s: float, workers: int, compile_threads: int):
        self.timeout_s = timeout_s
        self._tokenizer_info = tokenizer_info
        self._info_json: str | None = None
        self._compile_threads = compile_threads
        self._lock = threading.Lock()
        # Last in, first out: a started helper is reused before another one is started (None: not started).
        self._slots: queue.LifoQueue[_Helper | None] = queue.LifoQueue()
        for _ in range(workers):
            self._slots.put(None)
        self._helpers: set[_Helper] = set()
        self._closed = False

    def check(self, kind: str, text: str, what: str) -> int:
        """Compile (kind, text) in a helper; returns the compiled grammar's size in bytes. Raises
        InvalidRequestError when the spec is invalid or did not compile within the time limit."""
        helper = self._slots.get()
        try:
            if helper is None:
                helper = self._start()
            try:
                helper.send(kind, text)
                answer = helper.receive(self.timeout_s)
            except OSError:  # the helper had died
                answer = None
            if answer is None:
                crashed = helper.process.poll() is not None  # it exited on this spec (out of memory, a crash)
                self._discard(helper)
                helper = None
                detail = "crashed the grammar compiler" if crashed else \
                    f"took longer than {self.timeout_s:g} s (the limit)"
                raise InvalidRequestError(f"compiling the {what} {detail}; use a smaller or simpler one",
                                          param="response_format")
        finally:
            self._slots.put(helper)
        status, payload = answer
        if status == "invalid":
            raise InvalidRequestError(payload, param="response_format")
        if status == "error":
            raise RuntimeError(f"grammar compile helper: {payload}")
        return payload

    def _start(self) -> _Helper:
        with self._lock:
            if self._closed:
                raise CheckerUnavailable("the grammar compile checker is shut down")
            if self._info_json is None:
                self._info_json = self._tokenizer_info.serialize_json()
        helper = _Helper(self._info_json, self._compile_threads)
        with self._lock:
            self._helpers.add(helper)
        return helper

    def _discard(self, helper: _Helper) -> None:
        helper.kill()
        with self._lock:
            self._helpers.discard(helper)

    def shutdown(self) -> None:
        with self._lock:
            self._closed = True
            helpers, self._helpers = list(self._helpers), set()
        for helper in helpers:
            helper.kill()


def _serve(compile_threads: int) -> None:
    """The helper process: compile each spec it is sent, answer how it went."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C in the server's terminal is the server's to handle
    threading.Thread(target=_exit_with_parent, args=(os.getppid(),), daemon=True).start()
    import xgrammar as xgr

    from forge.structured.backend import compile_spec

    info = xgr.TokenizerInfo.deserialize_json(sys.stdin.readline())
    compiler = xgr.GrammarCompiler(info, max_threads=compile_threads, cache_enabled=False)
    reply = sys.stdout
    sys.stdout = sys.stderr  # anything else printed must not corrupt the answers
    _answer(reply, "ready", None)
    for line in sys.stdin:
        kind, text = json.loads(line)
        try:
            _answer(reply, "ok", compile_spec(compiler, kind, text).memory_size_bytes)
        except InvalidRequestError as e:
            _answer(reply, "invalid", str(e))
        except Exception as e:
            _answer(reply, "error", f"{type(e).__name__}: {e}")


def _exit_with_parent(parent: int) -> None:
    """A helper busy compiling never reads its closed stdin: leave when the server is gone."""
    while os.getppid() == parent:
        time.sleep(1.0)
    os._exit(0)


def _answer(out, status: str, payload) -> None:
    out.write(json.dumps([status, payload]) + "\n")
    out.flush()


if __name__ == "__main__":
    _serve(int(sys.argv[1]))
