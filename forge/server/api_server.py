"""The OpenAI-compatible HTTP server: FastAPI routes, auth, Host and Content-Type checks, errors,
metrics, and `serve()` for the CLI.

    forge serve [--model M] [--host 127.0.0.1] [--port 8000] [--api-key K | $FORGE_API_KEY] [--max-waiting 256]

Connection-level limits (timeouts, connection cap, shutdown) live in uvicorn_server; docs/RELIABILITY.md
lists every limit and what a client sees when it triggers.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import logging
import os
import socket
import time
from collections.abc import Iterable
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from forge.config import EngineConfig
from forge.errors import InvalidRequestError
from forge.server.async_engine import AsyncEngine
from forge.server.chat import ChatSettings
from forge.server.limits import ServerConfigError, ServerLimits
from forge.server.listen import bind_socket
from forge.server.metrics import ServerMetrics
from forge.server.protocol import (
    MAX_BODY_BYTES,
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
    parse_json_object,
    validate,
)
from forge.server.serving import OpenAIServing
from forge.server.stats_log import StatsLogger
from forge.server.ui import mount_ui

logger = logging.getLogger("forge.server")

_ENDPOINTS = ("/v1/models", "/v1/completions", "/v1/chat/completions")
# An oversized body is still read (and dropped) up to this much, so the client gets its 413 instead
# of a reset connection; beyond it the connection is simply closed.
_MAX_DRAIN_BYTES = 64 * 1024 * 1024
# Names that always reach this machine: allowed as Host whenever the server listens on loopback.
LOCAL_HOST_NAMES = ("localhost", "127.0.0.1", "::1")
API_KEY_ENV = "FORGE_API_KEY"


def default_model_name(model_path: str | Path) -> str:
    """The name clients use for the model: a file's stem or a directory's name."""
    p = Path(model_path)
    return p.name if p.is_dir() else p.stem


def resolve_api_key(flag_value: str | None) -> str | None:
    """--api-key, else $FORGE_API_KEY (which `ps` does not show), else None (no auth). Empty is an error:
    it would enable auth that an empty bearer token passes."""
    key, source = (flag_value, "--api-key") if flag_value is not None else (os.environ.get(API_KEY_ENV), API_KEY_ENV)
    if key is not None and not key.strip():
        raise ServerConfigError(f"{source} is empty: give a non-empty key, or leave it out to serve without auth")
    return key


def allowed_host_names(bind_host: str, allowed_hosts: Iterable[str] = ()) -> frozenset[str] | None:
    """The names a request's Host header may carry, or None for any.

    Without --allowed-hosts: a server bound to all interfaces (0.0.0.0, ::) takes any Host; one bound to
    an address takes that address, and on loopback the localhost names too. That stops DNS rebinding: a
    web page cannot reach a local server under its own domain name. --allowed-hosts adds names
    ("*" = any, "*.example.com" = its subdomains)."""
    extra = {_normalize_host(h) for h in allowed_hosts if h.strip()}
    if "*" in extra:
        return None
    bind = _normalize_host(bind_host)
    wildcard = bind in ("", "0.0.0.0", "::")
    if wildcard and not extra:
        return None
    names = set(extra) | ({bind} if not wildcard else set())
    if wildcard or _is_loopback(bind):
        names |= set(LOCAL_HOST_NAMES)
    return frozenset(names)


def build_app(async_engine: AsyncEngine, served_model_name: str, api_key: str | None = None,
              max_waiting: int = ServerLimits.max_waiting, max_body_bytes: int = MAX_BODY_BYTES, ui: bool = True,
              bind_host: str = "127.0.0.1", allowed_hosts: Iterable[str] = (),
              log_stats_interval: float = 0, chat_settings: ChatSettings = ChatSettings()) -> FastAPI:
    if api_key is not None and not api_key.strip():
        raise ServerConfigError("the API key is empty: give a non-empty key, or None to serve without auth")
    _check_chat_template(async_engine.engine.tokenizer, chat_settings.chat_template)
    metrics = async_engine.metrics or ServerMetrics()
    async_engine.metrics = metrics
    metrics.bind(async_engine)
    serving = OpenAIServing(async_engine, served_model_name, max_waiting, chat_settings)
    logger.info("chat: tool calls (tool_choice auto) read as %s; reasoning parser: %s",
                serving.tool_parser or "nothing (no parser)", chat_settings.reasoning_parser or "none")
    model_names = {served_model_name, "default"}
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        async_engine.start()
        stats_task = asyncio.create_task(StatsLogger(async_engine, log_stats_interval).run()) \
            if log_stats_interval > 0 else None
        yield
        if stats_task is not None:
            stats_task.cancel()
        async_engine.shutdown()

    app = FastAPI(title="forge", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.async_engine = async_engine
    app.state.metrics = metrics
    app.state.serving = serving

    # -- errors: always OpenAI's shape -----------------------------------------------------------
    @app.exception_handler(APIError)
    async def api_error(_, e: APIError):
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(InvalidRequestError)
    async def invalid_request(_, e: InvalidRequestError):
        err = APIError.from_invalid_request(e)
        return JSONResponse(err.body(), status_code=err.status)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_, e: StarletteHTTPException):
        err = APIError(str(e.detail), status=e.status_code, code="not_found" if e.status_code == 404 else None)
        return JSONResponse(err.body(), status_code=e.status_code, headers=getattr(e, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def validation_error(_, e: RequestValidationError):
        return JSONResponse(APIError(f"invalid request: {e.errors()[0].get('msg')}").body(), status_code=400)

    @app.exception_handler(ClientDisconnect)
    async def client_gone(request: Request, _):
        client = request.client
        logger.info("client %s disconnected while sending its request body (499)",
                    f"{client.host}:{client.port}" if client else "?")
        return JSONResponse({"error": {"message": "client disconnected"}}, status_code=499)

    @app.exception_handler(Exception)
    async def internal_error(_, e: Exception):
        logger.exception("unhandled error")
        return JSONResponse(APIError(f"internal error: {type(e).__name__}", status=500, type="server_error").body(),
                            status_code=500)

    # -- auth ------------------------------------------------------------------------------------
    async def check_api_key(request: Request) -> None:
        if api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
            raise APIError("missing or incorrect API key: send `Authorization: Bearer <key>`", status=401,
                           code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    # -- routes ----------------------------------------------------------------------------------
    @app.get("/health")
    async def health():
        if serving.draining:
            return JSONResponse({"status": "shutting down"}, status_code=503)
        if not async_engine.is_alive:
            return JSONResponse({"status": "engine stopped"}, status_code=503)
        return {"status": "ok"}

    @app.get("/metrics")
    async def get_metrics():
        return Response(metrics.render(), media_type=metrics.content_type)

    @app.get("/version")
    async def version():
        from forge import __version__

        return {"version": __version__}

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(check_api_key)])

    def model_card(name: str) -> dict:
        return {"id": name, "object": "model", "created": created, "owned_by": "forge",
                "max_model_len": async_engine.engine.max_model_len}

    def check_model(name: str | None) -> None:
        if name is not None and name not in model_names:
            raise APIError(f"the model {name!r} does not exist; this server serves {served_model_name!r}",
                           status=404, param="model", code="model_not_found")

    @v1.get("/models")
    async def list_models():
        return {"object": "list", "data": [model_card(served_model_name)]}

    @v1.get("/models/{name:path}")
    async def get_model(name: str):
        check_model(name)
        return model_card(served_model_name)

    @v1.post("/completions")
    async def completions(request: Request):
        req = validate(CompletionRequest, await _read_json(request, max_body_bytes))
        check_model(req.model)
        return await serving.completions(req, request)

    @v1.post("/chat/completions")
    async def chat_completions(request: Request):
        req = validate(ChatCompletionRequest, await _read_json(request, max_body_bytes))
        check_model(req.model)
        return await serving.chat(req, request)

    # vLLM's token utilities, at the root as vLLM serves them (behind the API key like /v1)
    @app.post("/tokenize", dependencies=[Depends(check_api_key)])
    async def tokenize(request: Request):
        req = validate(TokenizeRequest, await _read_json(request, max_body_bytes))
        check_model(req.model)
        return await serving.tokenize(req)

    @app.post("/detokenize", dependencies=[Depends(check_api_key)])
    async def detokenize(request: Request):
        req = validate(DetokenizeRequest, await _read_json(request, max_body_bytes))
        check_model(req.model)
        return await serving.detokenize(req)

    app.include_router(v1)
    if ui:  # the chat page at / (forge/server/ui.py); --no-ui leaves / a 404
        mount_ui(app)
    hosts = allowed_host_names(bind_host, allowed_hosts)
    if hosts is not None:
        app.add_middleware(_CheckHost, allowed=hosts)
    app.add_middleware(_CountRequests, metrics=metrics)  # outermost: counts the Host rejections too
    return app


def _check_chat_template(tokenizer, chat_template: str | None) -> None:
    """A --chat-template that does not compile stops the server at start, not at each request."""
    if chat_template is None:
        return
    try:
        tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], chat_template=chat_template)
    except InvalidRequestError as e:
        if e.param == "chat_template":
            raise ServerConfigError(f"--chat-template: {e}") from None  # (other render errors are per request)


async def _read_json(request: Request, limit: int) -> dict:
    # A browser sends a cross-site text/plain or form POST without asking first (no CORS preflight);
    # requiring JSON makes it ask, and this server never says yes.
    media_type = request.headers.get("content-type", "").partition(";")[0].strip().lower()
    if media_type != "application/json":
        raise APIError(f"Content-Type must be application/json, got {media_type or 'none'!r}", status=415,
                       code="unsupported_media_type")
    length = request.headers.get("content-length", "")
    too_big = APIError(f"request body is larger than {limit} bytes", status=413, code="request_too_large")
    if length.isdigit() and int(length) > _MAX_DRAIN_BYTES:
        raise too_big
    body, size = bytearray(), 0
    async for chunk in request.stream():
        size += len(chunk)
        if size <= limit:
            body += chunk
        elif size > _MAX_DRAIN_BYTES:
            break
    if size > limit:
        raise too_big
    return parse_json_object(bytes(body))


def _normalize_host(host: str) -> str:
    """A Host header value or a bind address -> lower-case name without port, brackets or final dot."""
    host = host.strip().lower()
    if host.startswith("["):  # [v6]:port
        host = host[1:].partition("]")[0]
    elif host.count(":") == 1:  # name:port (a bare IPv6 address has several colons)
        host = host.partition(":")[0]
    return host.rstrip(".")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _host_allowed(host: str, allowed: frozenset[str]) -> bool:
    return host in allowed or any(a.startswith("*.") and host.endswith(a[1:]) for a in allowed)


class _CheckHost:
    """ASGI middleware: refuse requests whose Host header names another server (DNS rebinding)."""

    def __init__(self, app, allowed: frozenset[str]):
        self.app, self.allowed = app, allowed

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        raw = next((v for k, v in scope["headers"] if k == b"host"), None)
        host = None if raw is None else _normalize_host(raw.decode("latin-1"))
        if host is None or _host_allowed(host, self.allowed):  # (no Host at all cannot be a rebinding page)
            return await self.app(scope, receive, send)
        shown = raw.decode("latin-1")[:100]
        err = APIError(f"Host {shown!r} is not served here; allowed: {', '.join(sorted(self.allowed))} "
                       f"(add names with --allowed-hosts)", status=400, code="invalid_host")
        body = json.dumps(err.body()).encode()
        await send({"type": "http.response.start", "status": 400,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


class _CountRequests:
    """ASGI middleware: count /v1 requests by endpoint and final HTTP status (streams count at their start)."""

    def __init__(self, app, metrics: ServerMetrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not scope["path"].startswith("/v1/"):
            return await self.app(scope, receive, send)
        status = 500  # an exception that escapes everything is a 500

        async def send_and_note(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        finally:
            path = scope["path"].rstrip("/")
            endpoint = path if path in _ENDPOINTS else ("/v1/models" if path.startswith("/v1/models/") else "other")
            self.metrics.requests.labels(endpoint, str(status)).inc()


def serve(engine_config: EngineConfig, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          served_model_name: str | None = None, log_level: str = "info", limits: ServerLimits = ServerLimits(),
          allowed_hosts: Iterable[str] = (), ui: bool = True, log_stats_interval: float = 10.0,
          sock: socket.socket | None = None, chat_settings: ChatSettings = ChatSettings()) -> None:
    """Load the model and serve it until SIGTERM/SIGINT (what `forge serve` runs). `api_key` None
    falls back to $FORGE_API_KEY. log_stats_interval: seconds between throughput lines (0: none).
    sock: a listening socket on host:port (forge.server.listen.bind_socket), else one is opened here."""
    api_key = resolve_api_key(api_key)  # before the model loads: a bad key fails at once
    sock = sock or bind_socket(host, port)  # and so does a port in use
    from forge.engine.llm_engine import LLMEngine
    from forge.server.uvicorn_server import make_server, raise_open_file_limit

    logger.info("loading %s; http://%s:%d/ is open, requests wait until the model is loaded",
                engine_config.model or "the default model", host, sock.getsockname()[1])
    try:
        engine = LLMEngine(engine_config)
    except BaseException:
        sock.close()
        raise
    try:
        name = served_model_name or default_model_name(engine.model_path)
        app = build_app(AsyncEngine(engine), name, api_key=api_key, max_waiting=limits.max_waiting,
                        ui=ui, bind_host=host, allowed_hosts=allowed_hosts, log_stats_interval=log_stats_interval,
                        chat_settings=chat_settings)
        if not _is_loopback(_normalize_host(host)) and api_key is None:
            logger.warning("serving on %s without an API key: anyone who can reach this address can use the model",
                           host)
        raise_open_file_limit()
        server = make_server(app, limits, on_drain=app.state.serving.begin_shutdown,
                             on_abort=app.state.serving.abort_all, host=host, port=port, log_level=log_level)
        print(f"forge: serving {name!r} (context {engine.max_model_len} tokens) on http://{host}:{port}/v1", flush=True)
        server.run(sockets=[sock])
    finally:
        sock.close()
        engine.shutdown()  # tensor-parallel workers, if any
