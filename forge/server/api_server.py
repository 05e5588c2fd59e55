"""The OpenAI-compatible HTTP server: FastAPI routes, auth, errors, metrics, and `serve()` for the CLI.

    forge serve [--model M] [--host 127.0.0.1] [--port 8000] [--api-key K] [--max-waiting 256]
"""

from __future__ import annotations

import hmac
import logging
import time
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from forge.config import EngineConfig
from forge.errors import InvalidRequestError
from forge.server.async_engine import AsyncEngine
from forge.server.metrics import ServerMetrics
from forge.server.protocol import (
    MAX_BODY_BYTES,
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    parse_json_object,
    validate,
)
from forge.server.serving import OpenAIServing
from forge.server.ui import mount_ui

logger = logging.getLogger("forge.server")

_ENDPOINTS = ("/v1/models", "/v1/completions", "/v1/chat/completions")
# An oversized body is still read (and dropped) up to this much, so the client gets its 413 instead
# of a reset connection; beyond it the connection is simply closed.
_MAX_DRAIN_BYTES = 64 * 1024 * 1024


def default_model_name(model_path: str | Path) -> str:
    """The name clients use for the model: a file's stem or a directory's name."""
    p = Path(model_path)
    return p.name if p.is_dir() else p.stem


def build_app(async_engine: AsyncEngine, served_model_name: str, api_key: str | None = None,
              max_waiting: int = 256, max_body_bytes: int = MAX_BODY_BYTES, ui: bool = True) -> FastAPI:
    metrics = async_engine.metrics or ServerMetrics()
    async_engine.metrics = metrics
    metrics.bind(async_engine)
    serving = OpenAIServing(async_engine, served_model_name, max_waiting)
    model_names = {served_model_name, "default"}
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        async_engine.start()
        yield
        async_engine.shutdown()

    app = FastAPI(title="forge", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.async_engine = async_engine
    app.state.metrics = metrics

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
        if not async_engine.is_alive:
            return JSONResponse({"status": "engine stopped"}, status_code=503)
        return {"status": "ok"}

    @app.get("/metrics")
    async def get_metrics():
        return Response(metrics.render(), media_type=metrics.content_type)

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

    app.include_router(v1)
    if ui:  # the chat page at / (forge/server/ui.py); --no-ui leaves / a 404
        mount_ui(app)
    app.add_middleware(_CountRequests, metrics=metrics)
    return app


async def _read_json(request: Request, limit: int) -> dict:
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
          max_waiting: int = 256, served_model_name: str | None = None, log_level: str = "info",
          ui: bool = True) -> None:
    """Load the model and serve it until interrupted (what `forge serve` runs)."""
    import uvicorn

    from forge.engine.llm_engine import LLMEngine

    engine = LLMEngine(engine_config)
    name = served_model_name or default_model_name(engine.model_path)
    app = build_app(AsyncEngine(engine), name, api_key=api_key, max_waiting=max_waiting, ui=ui)
    if host not in ("127.0.0.1", "localhost", "::1") and api_key is None:
        logger.warning("serving on %s without --api-key: anyone who can reach this address can use the model", host)
    print(f"forge: serving {name!r} (context {engine.max_model_len} tokens) on http://{host}:{port}/v1", flush=True)
    try:
        uvicorn.run(app, host=host, port=port, log_level=log_level)
    finally:
        engine.shutdown()  # tensor-parallel workers, if any
