"""A real `forge serve` process (tiny random-weight model). Graceful shutdown: SIGTERM stops
accepting, lets running requests finish for --shutdown-timeout seconds, then ends the rest with a
final error event and [DONE], and exits 0; a second signal ends them at once. And running out of
file descriptors does not flood the log."""

import json
import os
import resource
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest

KEY = "sk-from-env"
AUTH = {"Authorization": f"Bearer {KEY}"}
LONG = 2000  # tokens: far longer than any drain below, even on a slow machine


class ServeProcess:
    def __init__(self, model_dir, log_path, shutdown_timeout: float, max_open_files: int | None = None):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        env = dict(os.environ, FORGE_API_KEY=KEY)  # the key from the environment, not the command line
        argv = [sys.executable, "-m", "forge", "serve", "--model", str(model_dir), "--port", str(self.port),
                "--max-model-len", "2048", "--shutdown-timeout", str(shutdown_timeout)]
        self.log = open(log_path, "w")

        def limit_open_files():  # soft and hard: the server cannot raise it back
            resource.setrlimit(resource.RLIMIT_NOFILE, (max_open_files, max_open_files))

        self.proc = subprocess.Popen(argv, env=env, stdout=self.log, stderr=subprocess.STDOUT,
                                     preexec_fn=limit_open_files if max_open_files else None)
        deadline = time.monotonic() + 120
        while True:
            assert self.proc.poll() is None, self.output()
            assert time.monotonic() < deadline, "forge serve did not start"
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)

    def output(self) -> str:
        self.log.flush()
        return open(self.log_path).read()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


@pytest.fixture
def serve_process(tiny_model_dir, tmp_path):
    started = []

    def start(shutdown_timeout: float, **kw) -> ServeProcess:
        started.append(ServeProcess(tiny_model_dir, tmp_path / "serve.log", shutdown_timeout, **kw))
        return started[-1]

    yield start
    for p in started:
        p.stop()


class Stream(threading.Thread):
    """A streamed completion read in the background: its `data:` events, and a flag once a few arrived."""

    def __init__(self, url: str, max_tokens: int):
        super().__init__(daemon=True)
        self.url, self.max_tokens = url, max_tokens
        self.events: list[str] = []
        self.flowing = threading.Event()

    def run(self):
        body = {"model": "default", "prompt": "Once upon a time", "max_tokens": self.max_tokens, "ignore_eos": True,
                "stream": True}
        with httpx.stream("POST", self.url + "/v1/completions", json=body, headers=AUTH, timeout=120) as r:
            for line in r.iter_lines():
                if line.startswith("data: "):
                    self.events.append(line[6:])
                    if len(self.events) >= 3:
                        self.flowing.set()

    def ended_with_shutdown_error(self) -> bool:
        return (len(self.events) >= 2 and self.events[-1] == "[DONE]"
                and json.loads(self.events[-2]).get("error", {}).get("code") == "server_shutting_down")


def test_sigterm_lets_short_requests_finish_and_aborts_long_ones(serve_process):
    drain = 3.0
    srv = serve_process(shutdown_timeout=drain)
    assert httpx.get(srv.url + "/v1/models", timeout=10).status_code == 401  # FORGE_API_KEY is in force
    long_streams = [Stream(srv.url, LONG) for _ in range(2)]
    for s in long_streams:
        s.start()
    result = {}

    def long_plain():
        body = {"model": "default", "prompt": "Hi", "max_tokens": LONG, "ignore_eos": True}
        result["plain"] = httpx.post(srv.url + "/v1/completions", json=body, headers=AUTH, timeout=120)

    plain = threading.Thread(target=long_plain, daemon=True)
    plain.start()
    for s in long_streams:
        assert s.flowing.wait(60)
    short = Stream(srv.url, 20)
    short.start()
    assert short.flowing.wait(60)

    signalled = time.monotonic()
    srv.proc.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    with pytest.raises(httpx.ConnectError):  # no longer accepting
        httpx.get(srv.url + "/health", timeout=2)
    srv.proc.wait(timeout=60)
    elapsed = time.monotonic() - signalled
    for t in long_streams + [short, plain]:
        t.join(timeout=10)

    assert srv.proc.returncode == 0, srv.output()
    assert drain <= elapsed < drain + 8, elapsed
    assert short.events[-1] == "[DONE]" and not short.ended_with_shutdown_error()  # finished within the drain
    assert json.loads(short.events[-2])["choices"][0]["finish_reason"] == "length"
    assert all(s.ended_with_shutdown_error() for s in long_streams), [s.events[-2:] for s in long_streams]
    assert result["plain"].status_code == 503
    assert result["plain"].json()["error"]["code"] == "server_shutting_down"
    assert "Traceback" not in srv.output()


def test_second_signal_aborts_at_once_with_final_events(serve_process):
    srv = serve_process(shutdown_timeout=60)
    streams = [Stream(srv.url, LONG) for _ in range(2)]
    for s in streams:
        s.start()
    for s in streams:
        assert s.flowing.wait(60)
    signalled = time.monotonic()
    srv.proc.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    srv.proc.send_signal(signal.SIGINT)
    srv.proc.wait(timeout=60)
    elapsed = time.monotonic() - signalled
    for s in streams:
        s.join(timeout=10)
    assert srv.proc.returncode == 0, srv.output()
    assert elapsed < 8, elapsed  # not the 60 s drain
    assert all(s.ended_with_shutdown_error() for s in streams), [s.events[-2:] for s in streams]
    assert "Traceback" not in srv.output()


def test_running_out_of_file_descriptors_does_not_flood_the_log(serve_process):
    fds = 128
    srv = serve_process(shutdown_timeout=5, max_open_files=fds)
    held = []
    try:
        for _ in range(fds + 100):  # more than the server can accept: the rest wait in its listen queue
            held.append(socket.create_connection(("127.0.0.1", srv.port), timeout=5))
        time.sleep(2)  # asyncio retries the failed accepts every second
        srv.proc.send_signal(signal.SIGTERM)  # (closing the listener with retries pending used to flood too)
        srv.proc.wait(timeout=30)
    finally:
        for sock in held:
            sock.close()
    log = srv.output()
    assert srv.proc.returncode == 0, log[-3000:]
    assert 1 <= log.count("socket.accept() out of system resource") <= 2
    assert log.count("Traceback") == 0 and len(log.splitlines()) < 40, log[-3000:]
