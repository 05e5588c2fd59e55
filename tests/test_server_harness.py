"""A live forge server on 127.0.0.1 for the server tests (uvicorn in a background thread), plus checks
of the harness itself and of the server's defaults."""

import inspect
import socket
import threading
import time

import httpx
import pytest

from forge.config import EngineConfig
from forge.engine.llm_engine import LLMEngine
from forge.server.api_server import build_app, default_model_name, serve
from forge.server.async_engine import AsyncEngine
from forge.server.limits import ServerLimits
from forge.server.uvicorn_server import make_server


class LiveServer:
    """`with LiveServer(engine, ...) as srv:` serves `engine` at srv.url until the block ends."""

    def __init__(self, engine: LLMEngine, api_key: str | None = None, max_waiting: int = 256,
                 limits: ServerLimits | None = None, **app_options):
        self.engine = engine
        self.async_engine = AsyncEngine(engine)
        self.model = default_model_name(engine.model_path)
        self.api_key = api_key
        limits = limits or ServerLimits(max_waiting=max_waiting, shutdown_timeout=5)
        self.app = build_app(self.async_engine, self.model, api_key=api_key, max_waiting=limits.max_waiting,
                             **app_options)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))  # loopback only; the OS picks a free port
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        serving = self.app.state.serving
        self.server = make_server(self.app, limits, on_drain=serving.begin_shutdown, on_abort=serving.abort_all,
                                  log_level="warning")
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> "LiveServer":
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "server did not start"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=15)
        self.sock.close()
        self.async_engine.shutdown()

    @property
    def headers(self) -> dict:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def openai_client(self):
        """An `openai.OpenAI` client for this server (the openai package is a test extra; callers that
        use this skip without it)."""
        import openai

        return openai.OpenAI(base_url=self.url + "/v1", api_key=self.api_key or "unused", timeout=120, max_retries=0)

    def metric(self, name: str) -> float:
        """One unlabelled sample from /metrics, read with prometheus-client's parser."""
        from prometheus_client.parser import text_string_to_metric_families

        text = httpx.get(self.url + "/metrics", timeout=10).text
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == name and not sample.labels:
                    return sample.value
        raise KeyError(name)

    def wait_for_metric(self, name: str, value: float, timeout: float = 20.0) -> float:
        deadline = time.monotonic() + timeout
        while True:
            got = self.metric(name)
            if got == value or time.monotonic() > deadline:
                return got
            time.sleep(0.05)


@pytest.fixture(scope="module")
def tiny_engine(tiny_model_dir):
    return LLMEngine(EngineConfig(model=str(tiny_model_dir), max_model_len=256, num_kv_blocks=256))


def test_serve_binds_loopback_by_default():
    sig = inspect.signature(serve)
    assert sig.parameters["host"].default == "127.0.0.1"
    assert sig.parameters["api_key"].default is None


def test_harness_starts_and_stops(tiny_engine):
    with LiveServer(tiny_engine) as srv:
        assert httpx.get(srv.url + "/health", timeout=10).json() == {"status": "ok"}
        models = httpx.get(srv.url + "/v1/models", timeout=10).json()
        assert [m["id"] for m in models["data"]] == [srv.model]
    assert not srv.async_engine.is_alive
    with pytest.raises(httpx.TransportError):
        httpx.get(srv.url + "/health", timeout=2)
