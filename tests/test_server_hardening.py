"""Server hardening (issue 11): admission under bursts, slow clients, the connection cap, Host and
Content-Type checks, API keys, disconnects during upload, stop-string caps and min_tokens, on a live
server (127.0.0.1) running a tiny random-weight model."""

import asyncio
import json
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest

from forge.config import EngineConfig
from forge.engine.llm_engine import LLMEngine
from forge.server.api_server import allowed_host_names, build_app, resolve_api_key
from forge.server.async_engine import AsyncEngine
from forge.server.limits import ServerConfigError, ServerLimits
from forge.server.protocol import (
    MAX_STOP_STRING_BYTES,
    MAX_STOP_STRINGS,
    MAX_STOP_TOKEN_IDS,
    MAX_STOP_TOTAL_BYTES,
    APIError,
    ChatCompletionRequest,
    validate,
)
from tests.test_server_harness import LiveServer

CONTEXT = 256
CMPL, CHAT = "/v1/completions", "/v1/chat/completions"
# Small deadlines so the slow-client tests take a second, not the defaults' 10-30 s.
FAST = ServerLimits(timeout_request_header=0.5, timeout_request_body=0.5, timeout_keep_alive=0.5, shutdown_timeout=2)


def tiny_engine(model_dir, **kwargs) -> LLMEngine:
    return LLMEngine(EngineConfig(model=str(model_dir), max_model_len=CONTEXT, num_kv_blocks=256, **kwargs))


def completion(prompt="Hello there", **kw) -> dict:
    return {"model": "default", "prompt": prompt, "max_tokens": 4, **kw}


def chat(content="Hi", **kw) -> dict:
    return {"model": "default", "messages": [{"role": "user", "content": content}], "max_tokens": 4, **kw}


@pytest.fixture(scope="module")
def server(tiny_model_dir):
    with LiveServer(tiny_engine(tiny_model_dir), limits=FAST) as srv:
        yield srv


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=30) as client:
        yield client


def requests_counted(srv: LiveServer, endpoint: str, status: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(srv.url + "/metrics", timeout=10).text
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "forge:http_requests_total" and s.labels == {"endpoint": endpoint, "status": status}:
                return s.value
    return 0.0


def read_until_closed(sock: socket.socket, limit: float) -> tuple[bytes, float]:
    """Everything the server sends until it closes the connection, and how long that took
    (socket.timeout if it is still open after `limit` seconds)."""
    start = time.monotonic()
    sock.settimeout(limit)
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data, time.monotonic() - start


# -- --max-waiting under a burst -----------------------------------------------------------------------

@pytest.fixture
def paused_engine(tiny_model_dir):
    """An engine whose steps wait for `resume` to be set: nothing admitted can start generating."""
    engine = tiny_engine(tiny_model_dir)
    resume = threading.Event()
    real_step = engine.step

    def step():
        resume.wait(timeout=60)
        return real_step()

    engine.step = step
    yield engine, resume
    resume.set()


def test_burst_beyond_max_waiting_gets_exactly_the_excess_as_503_at_once(paused_engine):
    engine, resume = paused_engine
    limit, burst = 4, 24

    async def main(url):
        limits = httpx.Limits(max_connections=burst)
        async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:
            # Half completions, half chat: both paths admit the same way.
            tasks = [asyncio.ensure_future(client.post(CMPL, json=completion(f"Burst {i}")) if i % 2 else
                                           client.post(CHAT, json=chat(f"Burst {i}"))) for i in range(burst)]
            start = time.monotonic()
            refused = []
            for next_done in asyncio.as_completed(tasks, timeout=10):
                r = await next_done
                assert r.status_code == 503, r.text  # nothing else can finish while the engine is paused
                assert r.json()["error"]["code"] == "server_busy" and int(r.headers["Retry-After"]) >= 1
                refused.append(time.monotonic() - start)
                if len(refused) == burst - limit:
                    break
            await asyncio.sleep(0.3)  # (had more been refused, they would be done by now)
            pending = [t for t in tasks if not t.done()]
            resume.set()
            admitted = await asyncio.gather(*pending)
            return refused, pending, admitted

    with LiveServer(engine, max_waiting=limit) as srv:
        refused, pending, admitted = asyncio.run(main(srv.url))
        assert len(refused) == burst - limit and max(refused) < 5.0
        assert len(pending) == limit and [r.status_code for r in admitted] == [200] * limit
        # Every place was given back: the next burst of `limit` is admitted whole.
        srv.wait_for_metric("forge:num_requests_waiting", 0.0)

        async def again():
            async with httpx.AsyncClient(base_url=srv.url, timeout=60) as client:
                return await asyncio.gather(*(client.post(CMPL, json=completion()) for _ in range(limit)))

        assert [r.status_code for r in asyncio.run(again())] == [200] * limit


def test_admission_places_come_back_after_errors(tiny_model_dir):
    with LiveServer(tiny_engine(tiny_model_dir), max_waiting=2) as srv, \
            httpx.Client(base_url=srv.url, timeout=30) as client:
        failing = [  # each is admitted first and fails later: in the engine, or in the checks after tokenizing
            (CMPL, completion([7] * 300)),  # prompt longer than the context
            (CMPL, completion([7] * 200, max_tokens=100)),  # prompt + max_tokens beyond it
            (CHAT, chat(max_tokens=None, min_tokens=CONTEXT - 5)),  # min_tokens beyond what the prompt leaves
        ]
        for _ in range(3):
            for path, body in failing:
                assert client.post(path, json=body).status_code == 400
        serving = srv.app.state.serving
        assert serving._unsubmitted == 0 and srv.async_engine.num_waiting_requests == 0

        async def pair():
            async with httpx.AsyncClient(base_url=srv.url, timeout=60) as c:
                return await asyncio.gather(*(c.post(CMPL, json=completion()) for _ in range(2)))

        assert [r.status_code for r in asyncio.run(pair())] == [200, 200]


# -- slow clients and connection limits --------------------------------------------------------------------

def test_connection_that_sends_nothing_is_closed(server):
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        data, seconds = read_until_closed(sock, limit=5)
    assert data == b"" and seconds < 2.5  # nothing was asked, so nothing is answered


def test_half_a_request_head_gets_408_and_is_closed(server):
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Ty")
        data, seconds = read_until_closed(sock, limit=5)
    assert data.startswith(b"HTTP/1.1 408 ") and seconds < 2.5
    assert json.loads(data.partition(b"\r\n\r\n")[2])["error"]["code"] == "request_timeout"


def test_half_a_body_gets_408_and_is_closed(server):
    before = requests_counted(server, CMPL, "500")
    body = json.dumps(completion()).encode()
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n" % len(body) + body[: len(body) // 2])
        data, seconds = read_until_closed(sock, limit=5)
    assert data.startswith(b"HTTP/1.1 408 ") and seconds < 2.5
    assert requests_counted(server, CMPL, "500") == before


def test_body_sent_after_an_early_answer_then_idle_is_closed(server):
    # The 415 goes out before the body is read; the rest of the body arrives later, then nothing.
    body = json.dumps(completion()).encode()
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: text/plain\r\n"
                     b"Content-Length: %d\r\n\r\n" % len(body) + body[:10])
        sock.settimeout(5)
        answer = b""
        while not answer.endswith(b"}}"):
            answer += sock.recv(65536)
        assert answer.startswith(b"HTTP/1.1 415 ")
        time.sleep(0.2)
        sock.sendall(body[10:])
        data, seconds = read_until_closed(sock, limit=5)
    assert data == b"" and seconds < 2.5


def test_idle_keep_alive_connection_is_closed(server):
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        data, seconds = read_until_closed(sock, limit=5)
    assert data.startswith(b"HTTP/1.1 200 ") and seconds < 2.5


def test_a_slow_but_steady_request_is_served(server):
    body = json.dumps(completion()).encode()
    head = (b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body))
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        for part in (head[:20], head[20:], body[:10], body[10:]):  # each part well inside its deadline
            sock.sendall(part)
            time.sleep(0.15)
        data, _ = read_until_closed(sock, limit=10)
    assert data.startswith(b"HTTP/1.1 200 ")


def test_connections_beyond_the_cap_get_503(tiny_model_dir):
    limits = ServerLimits(max_connections=2, timeout_request_header=30)
    with LiveServer(tiny_engine(tiny_model_dir), limits=limits) as srv:
        idle = [socket.create_connection(("127.0.0.1", srv.port)) for _ in range(2)]
        time.sleep(0.2)  # let the server register them
        try:
            assert httpx.get(srv.url + "/health", timeout=10).status_code == 503
        finally:
            for sock in idle:
                sock.close()
        deadline = time.monotonic() + 5
        while httpx.get(srv.url + "/health", timeout=10).status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.05)


# -- Host and Content-Type ------------------------------------------------------------------------------

@pytest.mark.parametrize("host, status", [
    ("127.0.0.1", 200), ("localhost", 200), ("LOCALHOST.", 200), ("[::1]", 200),
    ("evil.example", 400), ("127.0.0.1.nip.io", 400), ("attacker.localhost.evil", 400),
])
def test_host_header_is_checked_on_loopback(server, host, status):
    for path in ("/health", "/v1/models"):
        r = httpx.get(server.url + path, headers={"Host": f"{host}:{server.port}"}, timeout=10)
        assert r.status_code == status, (path, r.text)
        if status == 400:
            assert r.json()["error"]["code"] == "invalid_host"


def test_http_1_0_without_host_is_served(server):
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(b"GET /health HTTP/1.0\r\n\r\n")
        data, _ = read_until_closed(sock, limit=5)
    assert data.startswith(b"HTTP/1.1 200 ")


def test_allowed_hosts_add_names(tiny_model_dir):
    with LiveServer(tiny_engine(tiny_model_dir), allowed_hosts=["api.example.com", "*.corp.example"]) as srv:
        for host, status in (("api.example.com", 200), ("a.corp.example", 200), ("localhost", 200),
                             ("corp.example", 400), ("other.example.com", 400)):
            assert httpx.get(srv.url + "/health", headers={"Host": host}, timeout=10).status_code == status, host


def test_allowed_host_names_follow_the_bound_address():
    assert allowed_host_names("0.0.0.0") is None and allowed_host_names("::") is None
    assert allowed_host_names("127.0.0.1", ["*"]) is None
    assert allowed_host_names("127.0.0.1") == {"127.0.0.1", "localhost", "::1"}
    assert allowed_host_names("10.1.2.3") == {"10.1.2.3"}
    assert allowed_host_names("10.1.2.3", ["Box.Lan"]) == {"10.1.2.3", "box.lan"}
    assert allowed_host_names("0.0.0.0", ["box.lan"]) == {"box.lan", "localhost", "127.0.0.1", "::1"}


@pytest.mark.parametrize("content_type, status", [
    ("application/json", 200), ("Application/JSON; charset=utf-8", 200),
    ("text/plain", 415), ("application/x-www-form-urlencoded", 415), ("multipart/form-data; boundary=x", 415),
    (None, 415),
])
def test_post_bodies_must_be_json(server, content_type, status):
    headers = {} if content_type is None else {"Content-Type": content_type}
    r = httpx.post(server.url + CMPL, content=json.dumps(completion()), headers=headers, timeout=30)
    assert r.status_code == status, r.text
    if status == 415:
        assert r.json()["error"]["code"] == "unsupported_media_type"


# -- API key ---------------------------------------------------------------------------------------------

def test_empty_api_key_is_refused(tiny_model_dir, monkeypatch):
    with pytest.raises(ServerConfigError, match="--api-key is empty"):
        resolve_api_key("")
    with pytest.raises(ServerConfigError, match="empty"):
        build_app(AsyncEngine(tiny_engine(tiny_model_dir)), "m", api_key="")
    monkeypatch.setenv("FORGE_API_KEY", "from-env")
    assert resolve_api_key(None) == "from-env" and resolve_api_key("flag") == "flag"
    monkeypatch.setenv("FORGE_API_KEY", " ")
    with pytest.raises(ServerConfigError, match="FORGE_API_KEY is empty"):
        resolve_api_key(None)
    monkeypatch.delenv("FORGE_API_KEY")
    assert resolve_api_key(None) is None


def test_forge_serve_with_an_empty_key_exits_with_one_line(tiny_model_dir):
    argv = [sys.executable, "-m", "forge", "serve", "--model", str(tiny_model_dir), "--api-key", ""]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and proc.stderr.strip().count("\n") == 0, proc.stderr
    assert "error: --api-key is empty" in proc.stderr


def test_wrong_or_empty_bearer_gets_401(tiny_model_dir):
    with LiveServer(tiny_engine(tiny_model_dir), api_key="sk-test") as srv:
        for auth in ("Bearer", "", "bearer", "Bearer sk-tes", "Bearer sk-test2", "Basic sk-test"):  # (h11 strips "Bearer ")
            r = httpx.post(srv.url + CMPL, json=completion(), headers={"Authorization": auth}, timeout=30)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key", auth
        r = httpx.post(srv.url + CMPL, json=completion(), headers={"Authorization": "Bearer sk-test"}, timeout=30)
        assert r.status_code == 200


# -- a client that leaves while uploading ----------------------------------------------------------------------

def test_disconnect_during_upload_is_a_499_not_a_500(server):
    before_500, before_499 = requests_counted(server, CMPL, "500"), requests_counted(server, CMPL, "499")
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 1000\r\n\r\n" + b'{"prompt": "' + b"a" * 100)
        time.sleep(0.1)
    deadline = time.monotonic() + 5
    while requests_counted(server, CMPL, "499") == before_499:
        assert time.monotonic() < deadline, "the disconnect was not counted as 499"
        time.sleep(0.05)
    assert requests_counted(server, CMPL, "500") == before_500


# -- stop strings and min_tokens -----------------------------------------------------------------------------

@pytest.mark.parametrize("body, param", [
    (completion(stop=[f"s{i}" for i in range(MAX_STOP_STRINGS + 1)]), "stop"),
    (completion(stop=["x" * (MAX_STOP_STRING_BYTES + 1)]), "stop"),
    (completion(stop=["é" * (MAX_STOP_STRING_BYTES // 2 + 1)]), "stop"),  # bytes, not characters
    (completion(stop=["y" * MAX_STOP_STRING_BYTES] * (MAX_STOP_TOTAL_BYTES // MAX_STOP_STRING_BYTES + 1)), "stop"),
    (chat(stop=[f"s{i}" for i in range(380_000)]), "stop"),
    (completion(stop_token_ids=[5] * (MAX_STOP_TOKEN_IDS + 1)), "stop_token_ids"),
    (completion(max_tokens=None, min_tokens=2**63), "min_tokens"),
    (completion(max_tokens=None, min_tokens=CONTEXT + 1), "min_tokens"),
    (chat(max_tokens=None, min_tokens=CONTEXT - 3), "min_tokens"),  # fits the context, not what the prompt leaves
    (chat(min_tokens=2**63), "min_tokens"),
])
def test_stop_string_caps_and_min_tokens(http, body, param):
    path = CHAT if "messages" in body else CMPL
    r = http.post(path, json=body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


def test_stop_strings_up_to_the_caps_are_served(http):
    stops = ["z" * (MAX_STOP_TOTAL_BYTES // MAX_STOP_STRINGS)] * MAX_STOP_STRINGS
    assert http.post(CMPL, json=completion(stop=stops)).status_code == 200
    r = http.post(CHAT, json=chat(max_tokens=None, min_tokens=3, temperature=0))
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 3


def test_min_tokens_beyond_the_context_is_refused_in_the_protocol():
    req = validate(ChatCompletionRequest, chat(max_tokens=None, min_tokens=CONTEXT + 1))
    with pytest.raises(APIError) as e:
        req.sampling_params(req.max_new_tokens, req.num_logprobs, max_model_len=CONTEXT)
    assert e.value.param == "min_tokens" and e.value.code == "context_length_exceeded"
