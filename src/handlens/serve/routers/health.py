"""Health, metrics and the API documentation (Swagger UI and ReDoc from the installed fastapi-offline package:
they work offline)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse

from handlens.serve.deps import StateDep
from handlens.serve.schemas import Ready, Status

router = APIRouter(tags=["health"])
DOCS_ASSETS = "/docs-assets"
#: Swagger UI's page has one inline script that starts it: allowed on this page only
DOCS_CSP = ("default-src 'self'; script-src 'self' 'unsafe-inline'; style-src 'self' 'unsafe-inline'; "
            "img-src 'self' data:; connect-src 'self'; frame-ancestors 'none'")


@router.get("/livez")
def livez() -> Status:
    return Status(status="ok")


@router.get("/readyz", response_model=Ready, responses={503: {"model": Status}})
def readyz(state: StateDep) -> Any:
    from sqlalchemy import text

    try:
        with state.catalog.session() as session:
            session.execute(text("SELECT 1"))
    except Exception as exc:  # the catalog is unreachable: not ready
        from handlens.serve.app import public_message

        # what an operator needs (the catalog's redacted URL and why), without the server's paths
        reason = public_message(str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__,
                                [state.workspace.root])
        return JSONResponse({"status": "unavailable", "detail": reason}, status_code=503)
    usable = sum(entry.damaged is None for entry in state.pool.manifests())
    return Ready(status="ok", models=usable, loaded=state.pool.loaded)


@router.get("/metrics", response_class=PlainTextResponse)
def metrics(state: StateDep) -> str:
    """Prometheus text format: request counts and latencies, queue depth, models loaded, explanation cache."""
    return state.metrics.render(
        gauges={"handlens_queue_depth": state.pool.queue_depth(), "handlens_models_loaded": len(state.pool.loaded)},
        counters={"handlens_explain_cache_hits_total": state.cache.hits,
                  "handlens_explain_cache_misses_total": state.cache.misses})


@router.get("/docs", include_in_schema=False)
def docs() -> HTMLResponse:
    from fastapi.openapi.docs import get_swagger_ui_html

    page = get_swagger_ui_html(openapi_url="/openapi.json", title="handlens API",
                               swagger_js_url=f"{DOCS_ASSETS}/swagger-ui-bundle.js",
                               swagger_css_url=f"{DOCS_ASSETS}/swagger-ui.css",
                               swagger_favicon_url=f"{DOCS_ASSETS}/favicon.png")
    page.headers["Content-Security-Policy"] = DOCS_CSP
    return page


#: ReDoc renders in a web worker made from a blob and inlines its styles; it fetches nothing else
REDOC_CSP = ("default-src 'self'; script-src 'self' 'unsafe-inline'; style-src 'self' 'unsafe-inline'; "
             "img-src 'self' data:; worker-src 'self' blob:; connect-src 'self'; font-src 'self' data:; "
             "frame-ancestors 'none'")


@router.get("/redoc", include_in_schema=False)
def redoc() -> HTMLResponse:
    """ReDoc from the fastapi-offline package's copy (no CDN, no Google fonts; its footer's "Redocly" logo points
    at their CDN, which this page's CSP blocks: nothing leaves the machine)."""
    from fastapi.openapi.docs import get_redoc_html

    page = get_redoc_html(openapi_url="/openapi.json", title="handlens API",
                          redoc_js_url=f"{DOCS_ASSETS}/redoc.standalone.js",
                          redoc_favicon_url=f"{DOCS_ASSETS}/favicon.png", with_google_fonts=False)
    page.headers["Content-Security-Policy"] = REDOC_CSP
    return page


def docs_assets() -> str:
    """The folder of the installed Swagger UI (OpenAPI 3.1, as FastAPI writes) and ReDoc scripts."""
    from importlib.resources import files

    return str(files("fastapi_offline") / "static")
