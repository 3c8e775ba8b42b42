"""``create_app(settings)``: the FastAPI application (JSON API under ``/api/v1``, health, metrics)."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import Body, Depends, FastAPI, Query, Request
from fastapi import Path as PathParam
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from pydantic import BaseModel, ConfigDict, Field

from handlens.core.errors import ConflictError, HandlensError, InputError, NotFoundError
from handlens.core.workspace import Workspace
from handlens.serve.pool import ExplanationCache, Metrics, ModelPool, bundle_dir
from handlens.serve.settings import ServeSettings
from handlens.serve.uploads import UploadError, read_upload

API = "/api/v1"
MAX_ID = 2**53  # catalog ids: positive, and exact in JavaScript
LOOPBACK_CLIENTS = {"127.0.0.1", "::1", "localhost"}
#: request fields shared by predict and explain; JSON bodies or multipart forms carry them
IMAGE_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {"schema": {"type": "object", "properties": {
                "file": {"type": "string", "format": "binary"}, "method": {"type": "string"},
                "layer": {"type": "string"}, "target": {"type": "string"}, "output": {"type": "string"}},
                "required": ["file"]}},
            "application/json": {"schema": {"type": "object", "properties": {
                "image_id": {"type": "integer", "minimum": 1, "maximum": 2**53}, "method": {"type": "string"},
                "layer": {"type": "string"},
                "target": {"type": "string"}, "output": {"type": "string", "enum": ["png", "array", "both"]},
                "params": {"type": "object"}}, "required": ["image_id"]}},
        },
    }
}


class _BodyTooLarge(Exception):
    pass


class BodyLimit:
    """ASGI middleware: a request body beyond ``limit`` bytes gets 413, whether or not it declared its length
    (a chunked upload is counted as it arrives, never spooled to disk in full)."""

    def __init__(self, app: Any, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        received = 0
        started = False

        async def counted() -> Any:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    raise _BodyTooLarge()
            return message

        async def tracked_send(message: Any) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted, tracked_send)
        except BaseException as exc:  # Starlette's middleware may wrap it in an exception group
            too_large = isinstance(exc, _BodyTooLarge) or (
                isinstance(exc, BaseExceptionGroup) and exc.subgroup(_BodyTooLarge) is not None)
            if not too_large:
                raise
            if not started:
                response = JSONResponse({"detail": f"the request body exceeds the upload limit of {self.limit:,} "
                                                   "bytes"}, status_code=413)
                await response(scope, receive, send)


class ForbiddenError(HandlensError):
    """A mutating request without the service's API key."""


class RegionIn(BaseModel):
    model_config = ConfigDict(allow_inf_nan=False)

    label: str | None = Field(None, max_length=200)
    polygons: list[list[list[float]]] = Field(..., min_length=1, max_length=100,
                                              description="[[[x, y], ...], ...] in image pixels")


def _status(exc: HandlensError) -> int:
    if isinstance(exc, ForbiddenError):
        return 403
    if isinstance(exc, UploadError):
        return exc.status
    if isinstance(exc, NotFoundError):
        return 404
    if isinstance(exc, ConflictError):
        return 409
    return 422 if isinstance(exc, InputError) else 500


class State:
    def __init__(self, settings: ServeSettings) -> None:
        self.settings = settings
        self.workspace = Workspace.open(settings.workspace, settings.db_url)
        self.pool = ModelPool(self.workspace.runs_dir, settings.pool_memory_mb, settings.batch_size,
                              settings.max_wait_ms)
        self.cache = ExplanationCache(settings.explain_cache_items)
        self.metrics = Metrics()
        self._catalog: Any = None
        self._slots: asyncio.Semaphore | None = None
        from concurrent.futures import ThreadPoolExecutor

        # decoding uploads and loading models: a few threads (each thread's malloc arena costs memory)
        self.io_pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="handlens-io")

    def explain_slots(self) -> asyncio.Semaphore:
        """At most ``explain_concurrency`` explanations computed at once (others wait their turn)."""
        if self._slots is None:
            self._slots = asyncio.Semaphore(self.settings.explain_concurrency)
        return self._slots

    @property
    def catalog(self) -> Any:
        if self._catalog is None:
            from handlens.data.catalog import open_catalog

            self._catalog = open_catalog(self.workspace.db_url)
        return self._catalog


def create_app(settings: ServeSettings | None = None) -> FastAPI:
    """The service for one workspace; see ``ServeSettings`` for limits and batching."""
    settings = settings or ServeSettings()
    state = State(settings)
    app = FastAPI(title="handlens", version="1", description="Models, predictions and explanations of a "
                  "handlens workspace. Read-only endpoints are open; uploads are checked by size, content "
                  "and pixel count.")
    app.state.handlens = state
    if settings.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["GET", "POST"])

    @app.middleware("http")
    async def measure(request: Request, call_next: Any) -> Any:
        started = time.perf_counter()
        try:
            response = await asyncio.wait_for(call_next(request), settings.request_timeout_s)
        except TimeoutError:
            response = JSONResponse({"detail": f"the request took longer than {settings.request_timeout_s:g} s"},
                                    status_code=504)
        route = request.scope.get("route")
        name = getattr(route, "path", "unmatched")
        state.metrics.observe("http", f"{request.method} {name}", time.perf_counter() - started,
                              response.status_code)
        return response

    app.add_middleware(BodyLimit, limit=settings.max_upload_bytes + 64 * 1024)  # outermost: counts every byte

    from fastapi.exceptions import RequestValidationError

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        """422 naming each bad field; the offending input is not echoed (it may not even be valid JSON: NaN)."""
        problems = [{"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")}
                    for e in exc.errors()]
        return JSONResponse({"detail": problems}, status_code=422)

    @app.exception_handler(HandlensError)
    async def handlens_error(request: Request, exc: HandlensError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=_status(exc))

    from fastapi.responses import FileResponse
    from fastapi.staticfiles import StaticFiles

    ui_dir = Path(__file__).resolve().parent.parent / "ui"
    app.mount("/ui", StaticFiles(directory=ui_dir), name="ui")

    @app.get("/", include_in_schema=False)
    def viewer() -> FileResponse:
        return FileResponse(ui_dir / "index.html")

    @app.get("/livez", tags=["health"])
    def livez() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", tags=["health"])
    def readyz() -> JSONResponse:
        from sqlalchemy import text

        try:
            with state.catalog.session() as session:
                session.execute(text("SELECT 1"))
        except Exception as exc:  # the catalog is unreachable: not ready
            return JSONResponse({"status": "unavailable", "detail": type(exc).__name__}, status_code=503)
        return JSONResponse({"status": "ok", "models": len(state.pool.manifests()), "loaded": state.pool.loaded})

    @app.get("/metrics", tags=["health"], response_class=PlainTextResponse)
    def metrics() -> str:
        return state.metrics.render({"handlens_queue_depth": state.pool.queue_depth(),
                                     "handlens_models_loaded": len(state.pool.loaded),
                                     "handlens_explain_cache_hits_total": state.cache.hits,
                                     "handlens_explain_cache_misses_total": state.cache.misses})

    # ------------------------------------------------------------------ catalog

    @app.get(f"{API}/datasets", tags=["catalog"])
    def datasets() -> list[dict[str, Any]]:
        from handlens.data.queries import dataset_summaries

        with state.catalog.session() as session:
            return dataset_summaries(session)

    @app.get(f"{API}/datasets/{{name}}/labelsets", tags=["catalog"])
    def labelsets(name: str) -> list[dict[str, Any]]:
        from sqlalchemy import func, select

        from handlens.data.catalog import Label, Labelset
        from handlens.data.queries import find_dataset

        with state.catalog.session() as session:
            dataset = find_dataset(session, name)
            rows = session.execute(select(Labelset.name, Label.label, func.count())
                                   .join(Label, Label.labelset_id == Labelset.id)
                                   .where(Labelset.dataset_id == dataset.id)
                                   .group_by(Labelset.name, Label.label)).all()
        out: dict[str, dict[str, int]] = {}
        for labelset, label, count in rows:
            out.setdefault(labelset, {})[label] = int(count)
        return [{"name": n, "classes": sorted(c), "counts": c} for n, c in sorted(out.items())]

    @app.get(f"{API}/images", tags=["catalog"])
    def images(dataset: str, labelset: str | None = None, label: str | None = None, split: str | None = None,
               subset: str | None = Query(None, pattern="^(train|val|test)$"),
               limit: int = Query(100, ge=1, le=1000), offset: int = Query(0, ge=0, le=MAX_ID)) -> dict[str, Any]:
        return _list_images(state, dataset, labelset, label, split, subset, limit, offset)

    @app.get(f"{API}/images/{{image_id}}", tags=["catalog"])
    def image(image_id: int = PathParam(ge=1, le=MAX_ID)) -> dict[str, Any]:
        return _image_detail(state, image_id)

    @app.get(f"{API}/images/{{image_id}}/thumbnail", tags=["catalog"],
             responses={200: {"content": {"image/jpeg": {}}}})
    def thumbnail(image_id: int = PathParam(ge=1, le=MAX_ID), size: int = Query(256, ge=16, le=1024)) -> Response:
        from PIL import Image

        from handlens.transforms.preprocess import load_rgb

        picture = load_rgb(_image_path(state, image_id))
        picture.thumbnail((size, size), Image.BICUBIC)
        buffer = io.BytesIO()
        picture.save(buffer, "JPEG", quality=85)
        return Response(buffer.getvalue(), media_type="image/jpeg", headers={"Cache-Control": "max-age=3600"})

    @app.get(f"{API}/images/{{image_id}}/file", tags=["catalog"], responses={200: {"content": {"image/*": {}}}})
    def image_file(image_id: int = PathParam(ge=1, le=MAX_ID)) -> Response:
        from fastapi.responses import FileResponse

        return FileResponse(_image_path(state, image_id))

    def require_key(request: Request) -> None:
        """Mutating endpoints: with an API key set, its header is required; off loopback, a key must be set."""
        import hmac

        settings = state.settings
        if settings.api_key:
            given = request.headers.get("x-api-key", "")
            if not hmac.compare_digest(given.encode(), settings.api_key.encode()):
                raise ForbiddenError("this endpoint changes the workspace: send the service's key in X-API-Key")
        elif not settings.loopback or (request.client is not None and request.client.host not in LOOPBACK_CLIENTS):
            raise ForbiddenError(f"the service listens on {settings.host} without an API key: endpoints that "
                                 "change the workspace are disabled for clients off loopback; restart it with "
                                 "--api-key")

    @app.post(f"{API}/images/{{image_id}}/regions", tags=["catalog"], status_code=201,
              dependencies=[Depends(require_key)])
    def add_region(image_id: int = PathParam(ge=1, le=MAX_ID), region: RegionIn = Body(...)) -> dict[str, Any]:
        """Add an expert region (polygons in the image's pixel coordinates) to a catalog image."""
        from handlens.data.annotations import check_polygons
        from handlens.data.catalog import Annotation, Image

        try:
            check_polygons(region.polygons)
        except (ValueError, TypeError) as exc:
            raise InputError(f"polygons: {exc}") from None
        with state.catalog.session() as session:
            if session.get(Image, image_id) is None:
                raise NotFoundError(f"no image {image_id} in the catalog")
            row = Annotation(image_id=image_id, kind="polygon", polygons=region.polygons, label=region.label,
                             source="api")
            session.add(row)
            session.flush()
            return {"id": row.id, "image_id": image_id, "kind": "polygon", "label": region.label}

    # ------------------------------------------------------------------ models

    @app.get(f"{API}/models", tags=["models"])
    def models() -> list[dict[str, Any]]:
        return [_model_summary(model_id, manifest) for model_id, manifest in state.pool.manifests()]

    @app.get(f"{API}/models/{{model_id}}", tags=["models"])
    def model(model_id: str) -> dict[str, Any]:
        manifest = state.pool.manifest(model_id)
        return {**_model_summary(model_id, manifest), "metrics": manifest.get("metrics", {}),
                "split_membership": manifest.get("split_membership", {}), "preprocess": manifest.get("preprocess"),
                "config": manifest.get("config", {})}

    @app.get(f"{API}/models/{{model_id}}/evaluations", tags=["models"])
    def evaluations(model_id: str) -> list[dict[str, Any]]:
        """The model's final metrics per subset (from training) and every `handlens evaluate` report."""
        run_dir = bundle_dir(state.workspace.runs_dir, model_id).parent
        metrics = state.pool.manifest(model_id).get("metrics", {})
        out = [{"source": f"training: {subset}", **values} for subset, values in metrics.items()
               if isinstance(values, dict)]
        for report in sorted(run_dir.glob("eval_report_*.json")):
            try:
                data = json.loads(report.read_text())
            except (OSError, ValueError):
                continue
            out.append({k: v for k, v in data.items() if k not in ("bundle", "confusion_png")})
        return out

    @app.get(f"{API}/explainers", tags=["models"])
    def explainers() -> list[dict[str, Any]]:
        from handlens.explain.registry import EXPLAINERS

        return [{"name": n, "description": s.description, "uses_layer": s.uses_layer, "signed": s.signed,
                 "expensive": s.expensive} for n, s in ((n, EXPLAINERS.get(n)) for n in EXPLAINERS.names())]

    @app.post(f"{API}/models/{{model_id}}/predict", tags=["models"], openapi_extra=IMAGE_BODY)
    async def predict(model_id: str, request: Request, top_k: int = Query(3, ge=1, le=100)) -> dict[str, Any]:
        fields, picture, sha = await _request_image(state, request)
        loaded = await asyncio.get_running_loop().run_in_executor(state.io_pool, state.pool.get, model_id)
        assert loaded.batcher is not None
        probs = await loaded.batcher.submit(picture)
        classes = loaded.bundle.classes
        order = np.argsort(-probs)[: min(top_k, len(classes))]
        return {"model": model_id, "image_sha256": sha, "image_id": fields.get("image_id"),
                "label": classes[int(order[0])], "confidence": float(probs[order[0]]),
                "top": [{"class": classes[int(i)], "probability": float(probs[i])} for i in order],
                "probabilities": {c: float(p) for c, p in zip(classes, probs, strict=True)}}

    @app.post(f"{API}/models/{{model_id}}/explain", tags=["models"], openapi_extra=IMAGE_BODY)
    async def explain(model_id: str, request: Request) -> dict[str, Any]:
        fields, picture, sha = await _request_image(state, request)
        loaded = await asyncio.get_running_loop().run_in_executor(state.io_pool, state.pool.get, model_id)
        method = str(fields.get("method") or "gradcam")
        params = _budgeted_params(settings, method, fields.get("params") or {}, loaded.bundle.preprocess.size)
        layer = fields.get("layer") or None
        target = fields.get("target") or "pred"
        output = str(fields.get("output") or "png")
        if output not in ("png", "array", "both"):
            raise InputError("output: choose png, array or both")
        key = ExplanationCache.key(loaded.sha256, sha, method, layer, target, params)
        result = state.cache.get(key)
        cached = result is not None
        started = time.perf_counter()
        if result is None:
            loop = asyncio.get_running_loop()
            async with state.explain_slots():  # a burst of slow explanations cannot take every worker thread
                result = state.cache.get(key)  # an identical request may have finished while this one waited
                if result is None:
                    result = await loop.run_in_executor(None, _explain, loaded, picture, method, layer, target,
                                                        params, settings.max_explain_tiles)
                    state.cache.put(key, result)
                else:
                    cached = True
        state.metrics.observe("explain", method, time.perf_counter() - started)
        body = {k: v for k, v in result.items() if k not in ("map", "overlay_png")}
        if output in ("png", "both"):
            body["overlay_png"] = result["overlay_png"]
        if output in ("array", "both"):
            body["map"] = np.round(result["map"].astype(np.float32), 5).tolist()
        return {**body, "model": model_id, "image_sha256": sha, "image_id": fields.get("image_id"), "cached": cached}

    return app


# ---------------------------------------------------------------------- helpers


def _model_summary(model_id: str, manifest: dict[str, Any]) -> dict[str, Any]:
    metrics = manifest.get("metrics", {})
    return {"id": model_id, "backbone": manifest.get("backbone"), "freeze": manifest.get("freeze"),
            "frozen": str(manifest.get("freeze", "")).startswith("frozen"), "dataset": manifest.get("dataset"),
            "labelset": manifest.get("labelset"), "split": manifest.get("split"), "classes": manifest.get("classes"),
            "layers": [manifest.get("default_layer"), *[n for n in manifest.get("layers", {})
                                                        if n != manifest.get("default_layer")]],
            "patch_trained": bool((manifest.get("preprocess") or {}).get("patches")),
            "metrics": {s: {k: metrics[s].get(k) for k in ("accuracy", "macro_f1", "roc_auc", "n")}
                        for s in ("val", "test") if isinstance(metrics.get(s), dict)}}


def _image_path(state: State, image_id: int) -> str:
    """The file of a catalog image: only paths the catalog holds are ever opened."""
    from handlens.data.catalog import Image

    with state.catalog.session() as session:
        row = session.get(Image, image_id)
        if row is None:
            raise NotFoundError(f"no image {image_id} in the catalog")
        path = row.path
    if not Path(path).is_file():
        raise NotFoundError(f"image {image_id}'s file {Path(path).name} is no longer on disk")
    return path


def _image_detail(state: State, image_id: int) -> dict[str, Any]:
    from sqlalchemy import select

    from handlens.data.catalog import Annotation, Image, Label, Labelset, Split, SplitAssignment

    with state.catalog.session() as session:
        row = session.get(Image, image_id)
        if row is None:
            raise NotFoundError(f"no image {image_id} in the catalog")
        labels = {name: label for name, label in session.execute(
            select(Labelset.name, Label.label).join(Labelset, Label.labelset_id == Labelset.id)
            .where(Label.image_id == image_id))}
        splits = [{"split": name, "fold": fold, "subset": subset} for name, fold, subset in session.execute(
            select(Split.name, SplitAssignment.fold, SplitAssignment.subset)
            .join(Split, SplitAssignment.split_id == Split.id).where(SplitAssignment.image_id == image_id)
            .order_by(Split.id, SplitAssignment.fold))]
        regions = [{"kind": a.kind, "label": a.label, "polygons": a.polygons, "has_mask": bool(a.mask_path)}
                   for a in session.scalars(select(Annotation).where(Annotation.image_id == image_id))]
        return {"id": row.id, "name": Path(row.path).name, "dataset_id": row.dataset_id, "width": row.width,
                "height": row.height, "format": row.format, "sha256": row.sha256, "group": row.group,
                "labels": labels, "splits": splits, "regions": regions}


def _list_images(state: State, dataset: str, labelset: str | None, label: str | None, split: str | None,
                 subset: str | None, limit: int, offset: int) -> dict[str, Any]:
    from sqlalchemy import func, select

    from handlens.data.catalog import Image, Label, Split, SplitAssignment
    from handlens.data.queries import find_dataset, find_labelset, latest_split

    with state.catalog.session() as session:
        ds = find_dataset(session, dataset)
        ls = find_labelset(session, ds, labelset)
        chosen = None
        if split or subset:
            chosen = (session.scalars(select(Split).where(Split.dataset_id == ds.id, Split.name == split)).first()
                      if split else latest_split(session, ds, ls))
            if chosen is None:
                raise NotFoundError(f"dataset {dataset!r} has no split {split or '(none yet)'!r}")
        query = (select(Image.id, Image.path, Image.width, Image.height, Label.label)
                 .join(Label, Label.image_id == Image.id).where(Label.labelset_id == ls.id))
        if label:
            query = query.where(Label.label == label)
        if chosen is not None:
            query = query.join(SplitAssignment, SplitAssignment.image_id == Image.id).where(
                SplitAssignment.split_id == chosen.id, SplitAssignment.fold == 0)
            if subset:
                query = query.where(SplitAssignment.subset == subset)
            query = query.add_columns(SplitAssignment.subset)
        total = session.scalar(select(func.count()).select_from(query.subquery()))
        rows = session.execute(query.order_by(Image.id).limit(limit).offset(offset)).all()
        items = [{"id": r[0], "name": Path(r[1]).name, "width": r[2], "height": r[3], "label": r[4],
                  "subset": r[5] if len(r) > 5 else None} for r in rows]
    return {"dataset": dataset, "labelset": ls.name, "split": chosen.name if chosen is not None else None,
            "total": int(total or 0), "offset": offset, "items": items}


async def _request_image(state: State, request: Request) -> tuple[dict[str, Any], np.ndarray, str]:
    """(fields, RGB array, sha256) from a multipart upload (``file``) or JSON with a catalog ``image_id``."""
    settings = state.settings
    content_type = request.headers.get("content-type", "")
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > settings.max_upload_bytes + 64 * 1024:
        raise UploadError(413, f"the request of {int(declared):,} bytes exceeds the upload limit of "
                               f"{settings.max_upload_bytes:,} bytes")
    if content_type.startswith("multipart/form-data"):
        form = await request.form(max_files=1, max_fields=20)
        upload = form.get("file")
        if upload is None or isinstance(upload, str):
            raise InputError("send the image as a multipart field named 'file'")
        data = await upload.read(settings.max_upload_bytes + 1)
        fields = {k: v for k, v in form.items() if k != "file" and isinstance(v, str)}
        image = await asyncio.get_running_loop().run_in_executor(
            state.io_pool, read_upload, data, settings.max_upload_bytes, settings.max_pixels)
        return fields, image.array, image.sha256
    try:
        body = await request.json()
    except ValueError:
        raise InputError("send multipart/form-data with a 'file', or JSON like {\"image_id\": 12}") from None
    image_id = body.get("image_id") if isinstance(body, dict) else None
    if not isinstance(image_id, int) or isinstance(image_id, bool) or not 1 <= image_id <= MAX_ID:
        raise InputError("JSON requests need an integer image_id of a catalog image, e.g. {\"image_id\": 12}")
    from handlens.transforms.preprocess import load_rgb

    path = _image_path(state, body["image_id"])
    loop = asyncio.get_running_loop()
    array = await loop.run_in_executor(state.io_pool, lambda: np.asarray(load_rgb(path)))
    with state.catalog.session() as session:
        from handlens.data.catalog import Image

        sha = session.get(Image, body["image_id"]).sha256
    return body, np.ascontiguousarray(array), sha


def _budgeted_params(settings: ServeSettings, method: str, params: Any, input_size: int = 224) -> dict[str, Any]:
    """The method's parameters, refused with 422 (naming the limit) beyond the service's budgets."""
    from handlens.explain.registry import EXPLAINERS

    if method not in EXPLAINERS:
        raise InputError(f"unknown method {method!r}; methods: {', '.join(EXPLAINERS.names())}")
    if not isinstance(params, dict):
        raise InputError("params must be an object, e.g. {\"steps\": 32}")
    allowed = {"steps", "samples", "window", "stride", "max_channels", "baseline", "noise"}
    unknown = set(params) - allowed
    if unknown:
        raise InputError(f"unknown parameter(s) {', '.join(sorted(unknown))}; allowed: {', '.join(sorted(allowed))}")
    out = dict(params)
    for key in ("steps", "samples", "window", "stride", "max_channels"):
        if key in out and (not isinstance(out[key], int) or isinstance(out[key], bool) or out[key] < 1):
            raise InputError(f"{key} must be a positive whole number")
    if "noise" in out and (isinstance(out["noise"], bool) or not isinstance(out["noise"], (int, float))
                           or not 0 < out["noise"] <= 1):
        raise InputError("noise must be a number in (0, 1], the share of the input range")
    if "baseline" in out and out["baseline"] not in ("black", "blur", "noise"):
        raise InputError("baseline: choose black, blur or noise")
    steps = out.get("steps", 50) if method == "integrated_gradients" else out.get("samples", 20)
    if method in ("integrated_gradients", "gradient_shap", "smoothgrad") and steps > settings.max_ig_steps:
        raise InputError(f"{method} with {steps} steps/samples exceeds this service's limit of "
                         f"{settings.max_ig_steps}; ask for fewer")
    if method == "occlusion":
        window = out.get("window", max(4, input_size // 8))
        stride = out.get("stride", max(2, window // 2))
        if window > input_size or stride > window:
            raise InputError(f"occlusion needs window <= the input size ({input_size}) and stride <= window")
        windows = (max(1, (input_size - window) // stride + 1)) ** 2
        if windows > settings.max_occlusion_windows:
            raise InputError(f"occlusion with window {window} and stride {stride} needs about {windows} "
                             f"forward passes; this service's limit is {settings.max_occlusion_windows}")
    if method == "scorecam":
        channels = out.setdefault("max_channels", settings.max_scorecam_channels)
        if channels > settings.max_scorecam_channels:
            raise InputError(f"scorecam with {channels} channels exceeds this service's limit of "
                             f"{settings.max_scorecam_channels}")
    return out


def _explain(loaded: Any, picture: np.ndarray, method: str, layer: str | None, target: str,
             params: dict[str, Any], max_tiles: int) -> dict[str, Any]:
    """Compute one explanation under the model's lock; returns the overlay PNG (base64) and the raw map.

    A patch-trained model is explained as it sees images: tile by tile at its patch scale, the tile maps
    stitched over the image (``explain.tiles``); its raw map is that stitched map, not one model input.
    """
    from PIL import Image

    from handlens.explain.render import overlay

    bundle = loaded.bundle
    if layer is not None and layer not in bundle.layer_names:
        raise InputError(f"layer {layer!r}: this model's layers are {', '.join(bundle.layer_names)}")
    if target not in ("pred",) and target not in bundle.classes:
        raise InputError(f"target {target!r}: use pred or one of {', '.join(bundle.classes)}")
    if bundle.patch_trained:
        from handlens.explain.tiles import tiled_explain

        with loaded.lock:
            tiled = tiled_explain(bundle, picture, method=method, layer=layer, target=target, max_tiles=max_tiles,
                                  with_probability_map=False, **params)  # C full-size planes nobody reads
        heat = full = tiled.heatmap  # already over the whole image
        probabilities, target_index, signed, layer_name = tiled.probabilities, tiled.target, tiled.signed, tiled.layer
        seconds = sum(tiled.timings.values())
    else:
        with loaded.lock:
            result = bundle.explain([picture], method=method, layer=layer, target=target, **params)
        heat = result.map_for(0)
        full = heat_on_image(heat, picture.shape[0], picture.shape[1], bundle.preprocess)
        probabilities, signed, layer_name = result.probabilities[0], result.signed, result.layer
        target_index = result.targets[0] if result.targets else int(np.argmax(probabilities))
        seconds = float(result.timings.get("total", 0.0))
    shown, shown_heat = picture, full
    longest = max(picture.shape[:2])
    if longest > 1024:  # the overlay is for looking at: at most 1024 px on its long side
        scale = 1024 / longest
        size = (max(1, round(picture.shape[1] * scale)), max(1, round(picture.shape[0] * scale)))
        shown = np.asarray(Image.fromarray(picture).resize(size, Image.BILINEAR))
        shown_heat = np.asarray(Image.fromarray(full.astype(np.float32), mode="F").resize(size, Image.BILINEAR))
    if bundle.patch_trained:
        heat = shown_heat  # its raw map is the stitched one: kept at the overlay's size (at most 1024 px)
    buffer = io.BytesIO()
    Image.fromarray(overlay(shown, shown_heat, 0.5, signed=signed)).save(buffer, "PNG")
    return {"method": method, "layer": layer_name, "target": bundle.classes[target_index],
            "signed": signed, "probabilities": {c: float(p) for c, p in zip(bundle.classes, probabilities,
                                                                            strict=True)},
            "overlay_png": base64.b64encode(buffer.getvalue()).decode(), "map": heat.astype(np.float16),
            "map_shape": list(heat.shape), "seconds": round(seconds, 4)}


def heat_on_image(heat: np.ndarray, height: int, width: int, preprocess: Any) -> np.ndarray:
    """A map on the model input placed back on the original image, undoing ``preprocess.resize``
    (``input_placement``): outside a centre crop the map is 0, letterbox padding is dropped."""
    from PIL import Image

    from handlens.transforms.preprocess import input_placement

    placement = input_placement(width, height, preprocess)
    (rw, rh), (ox, oy) = placement.resized, placement.offset
    size = heat.shape[0]
    x0, y0, x1, y1 = max(0, ox), max(0, oy), min(size, ox + rw), min(size, oy + rh)  # the image's part of the input
    sx, sy = width / rw, height / rh  # resized-image pixels -> original pixels
    left, top = round((x0 - ox) * sx), round((y0 - oy) * sy)
    w, h = max(1, round((x1 - ox) * sx) - left), max(1, round((y1 - oy) * sy) - top)
    part = np.asarray(Image.fromarray(heat[y0:y1, x0:x1].astype(np.float32), mode="F").resize((w, h),
                                                                                          Image.BILINEAR))
    out = np.zeros((height, width), dtype=np.float32)
    out[top:top + h, left:left + w] = part[:height - top, :width - left]
    return out


SETTINGS_ENV = "HANDLENS_SERVE_SETTINGS"


def app_from_env() -> FastAPI:
    """Factory for uvicorn workers: settings arrive as JSON in ``$HANDLENS_SERVE_SETTINGS``."""
    import os

    return create_app(ServeSettings.model_validate_json(os.environ.get(SETTINGS_ENV, "{}")))
