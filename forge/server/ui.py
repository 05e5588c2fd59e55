"""The chat page at `/`: static HTML/CSS/JS shipped in forge/server/static, no build step, no network.

The page talks only to this server (`/v1/models`, `/v1/chat/completions` as SSE, `/metrics` is not
needed); its Content-Security-Policy forbids every other origin, so model output that slipped past the
sanitizer still could not load or send anything elsewhere.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

STATIC_DIR = Path(__file__).resolve().parent / "static"

# 'self' only: scripts, styles and fetches stay on this server; no inline script may run.
CONTENT_SECURITY_POLICY = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                           "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'none'; "
                           "frame-ancestors 'none'")
_PAGE_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",  # a new forge version's page is picked up on the next load
}


def mount_ui(app: FastAPI) -> None:
    """Serve the chat page at `/` and its assets under `/ui/`."""
    if not (STATIC_DIR / "index.html").is_file():
        raise FileNotFoundError(f"the chat page is missing from the installed package ({STATIC_DIR}); "
                                "reinstall forge or serve with --no-ui")

    @app.get("/", include_in_schema=False)
    async def chat_page():
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html; charset=utf-8", headers=_PAGE_HEADERS)

    app.mount("/ui", StaticFiles(directory=STATIC_DIR), name="ui")
