"""``create_app(settings)``: assembles the service (middleware, error handlers, routers); routes live in
``serve/routers``, their dependencies in ``deps.py``, their response models in ``schemas.py``."""

from __future__ import annotations

import asyncio
import os
import re
import tempfile
import time
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse

from handlens.core.errors import HandlensError
from handlens.serve.settings import ServeSettings
from handlens.serve.state import State

SETTINGS_ENV = "HANDLENS_SERVE_SETTINGS"
MAX_PROBLEMS = 20
UI_DIR = Path(__file__).resolve().parent.parent / "ui"
_ABSOLUTE_PATH = re.compile(r"(?<![\w.:/])/(?:[^\s'\"/:,;)]+/)*[^\s'\":,;)]+")


def create_app(settings: ServeSettings | None = None) -> FastAPI:
    """The service for one workspace; see ``ServeSettings`` for limits, batching and the names it answers to."""
    from fastapi.staticfiles import StaticFiles

    from handlens.serve.routers import browse, catalog, detect, explain, health, jobs, models, runs
    from handlens.serve.security import BodyLimit, HostGuard, SecurityHeaders

    settings = settings or ServeSettings()
    state = State(settings)
    app = FastAPI(title="handlens", version="1", docs_url=None, redoc_url=None,
                  description="Models, predictions and explanations of a handlens workspace. Read-only endpoints "
                  "are open; uploads are checked by size, content and pixel count; mutations need the service's "
                  "own origin (and its key off loopback).")
    app.state.handlens = state
    if settings.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["GET", "POST"])
    app.middleware("http")(_measured(state))
    app.add_middleware(BodyLimit, limit=settings.max_upload_bytes + 64 * 1024, json_limit=settings.max_json_bytes)
    app.add_middleware(HostGuard, allowed_hosts=settings.allowed_hosts, cors_origins=settings.cors_origins)
    app.add_middleware(SecurityHeaders)  # outermost: every answer, refusals included, carries the headers
    app.add_exception_handler(HandlensError, _handlens_error(state))
    app.add_exception_handler(RequestValidationError, _invalid_request)
    from sqlalchemy.exc import OperationalError

    app.add_exception_handler(OperationalError, _catalog_error)
    for router in (health.router, catalog.router, models.router, browse.router, runs.router, explain.router,
                   detect.router, jobs.router):
        app.include_router(router)
    app.mount(health.DOCS_ASSETS, StaticFiles(directory=health.docs_assets()), name="docs-assets")
    app.mount("/ui", StaticFiles(directory=UI_DIR), name="ui")
    app.add_api_route("/", _viewer, include_in_schema=False)
    app.router.add_event_handler("shutdown", state.close)
    return app


def _viewer() -> FileResponse:
    return FileResponse(UI_DIR / "index.html")


def _measured(state: State) -> Any:
    """Middleware: the request's latency and status in the metrics; 504 past the request time limit."""
    limit = state.settings.request_timeout_s

    async def measure(request: Request, call_next: Any) -> Any:
        started = time.perf_counter()
        try:
            response = await asyncio.wait_for(call_next(request), limit)
        except TimeoutError:
            response = JSONResponse({"detail": f"the request took longer than {limit:g} s"}, status_code=504)
        route = request.scope.get("route")
        state.metrics.observe("http", f"{request.method} {getattr(route, 'path', 'unmatched')}",
                              time.perf_counter() - started, response.status_code)
        return response

    return measure


def public_message(text: str, roots: list[Path]) -> str:
    """An error message without the server's absolute paths: a path on this machine (or under the workspace,
    home or temp folders) is cut to its file name."""
    prefixes = [str(r) for r in roots if str(r) not in ("", "/")]

    def cut(match: re.Match[str]) -> str:
        path = match.group(0)
        if any(path.startswith(p) for p in prefixes) or os.path.exists(path):
            return Path(path).name or "(folder)"
        return path

    return _ABSOLUTE_PATH.sub(cut, text)


def _handlens_error(state: State) -> Any:
    roots = [state.workspace.root, Path.home(), Path(tempfile.gettempdir())]

    async def handle(request: Request, exc: Exception) -> JSONResponse:
        status = int(getattr(exc, "http_status", 500))
        return JSONResponse({"detail": public_message(str(exc), roots)}, status_code=status,
                            headers={"Retry-After": "2"} if status == 503 else None)

    return handle


async def _invalid_request(request: Request, exc: Exception) -> JSONResponse:
    """422 naming each bad field; the offending input is not echoed (it may not even be valid JSON: NaN)."""
    errors = list(exc.errors()) if isinstance(exc, RequestValidationError) else []
    problems = [{"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")}
                for e in errors[:MAX_PROBLEMS]]  # an answer never much larger than a bad request
    if len(errors) > MAX_PROBLEMS:
        problems.append({"loc": [], "msg": f"and {len(errors) - MAX_PROBLEMS} more problems", "type": "more"})
    return JSONResponse({"detail": problems}, status_code=422)


async def _catalog_error(request: Request, exc: Exception) -> JSONResponse:
    """The catalog database busy (another handlens command is writing) or unreachable: 503, retry."""
    text = str(exc).lower()
    what = ("the catalog is busy: another handlens command is writing to it; retry in a moment"
            if "locked" in text or "busy" in text else "the catalog database is unreachable; retry in a moment")
    return JSONResponse({"detail": what}, status_code=503, headers={"Retry-After": "2"})


def app_from_env() -> FastAPI:
    """Factory for uvicorn workers: settings arrive as JSON in ``$HANDLENS_SERVE_SETTINGS``."""
    return create_app(ServeSettings.model_validate_json(os.environ.get(SETTINGS_ENV, "{}")))
