"""Detection: the boxes a detector bundle finds on one image, each labelled by a classifier bundle and explained
with any registered method when asked (``handlens.detect.pipeline``), cached like explanations.

The image is decoded at its own resolution (under the service's pixel cap): the detector resizes it by its
bundle's working scale, and the boxes come back in the image's pixels. The work is bounded as explanations'
is: the detector's tile count by ``max_explain_tiles`` (refused from the image's header, before decoding), each
box's explanation by the forward/backward budgets, the boxes explained per image by ``max_explain_tiles`` too
(the highest-scoring first; the others are labelled, not explained), and the requests at once by the
explanation slots.
"""

from __future__ import annotations

import asyncio
import base64
import enum
import io
import time
from dataclasses import dataclass
from typing import Annotated, Any

import numpy as np
from fastapi import APIRouter, Depends, Query

from handlens.core.errors import InputError
from handlens.explain.registry import EXPLAINERS
from handlens.serve.cache import ExplanationCache
from handlens.serve.deps import RawImageDep, StateDep, catalog_image, decode_catalog_image
from handlens.serve.pool import LoadedDetector, LoadedModel, WrongKindError
from handlens.serve.schemas import DETECT_BODY, ERRORS, DetectedBox, Detection
from handlens.serve.state import State

router = APIRouter(prefix="/api/v1", tags=["models"], responses=ERRORS)

#: the explanation methods, as the query parameter's enum (the registry is the one source of names)
ExplainMethod = enum.StrEnum("ExplainMethod", {name: name for name in EXPLAINERS.names()})
#: the longer side of each box's map PNG, in pixels: enough to see where in the box, small per box
MAP_SIDE = 96
#: the longer side of the overlay PNG (as explanations' overlays)
OVERLAY_SIDE = 1024


async def loaded_detector(model_id: str, state: StateDep) -> LoadedDetector:
    """The detector ``model_id``, loaded (off the event loop) and kept in the pool; 404 or 422 (not a detector)."""
    return await asyncio.get_running_loop().run_in_executor(state.io_pool, state.pool.get_detector, model_id)


LoadedDetectorDep = Annotated[LoadedDetector, Depends(loaded_detector)]


@dataclass
class DetectImage:
    """The image a detect request sends, decoded at its own resolution."""

    array: np.ndarray
    sha256: str
    image_id: int | None


def detect_tiles(detector: Any, width: int, height: int, *, single_pass: bool) -> int:
    """The tiles ``detector`` takes on a ``width`` x ``height`` image (as ``detect.infer.sliced_detect`` cuts
    them), known from the header before any pixel is decoded."""
    from handlens.explain.tiles import tile_origins

    if single_pass:
        return 1
    w, h = (max(1, round(side * detector.scale)) if detector.scale != 1.0 else side for side in (width, height))
    return len(tile_origins(w, detector.tile, detector.overlap)) * len(tile_origins(h, detector.tile,
                                                                                     detector.overlap))


def check_tiles(state: State, detector: Any, width: int, height: int, *, single_pass: bool) -> None:
    tiles = detect_tiles(detector, width, height, single_pass=single_pass)
    limit = state.settings.max_explain_tiles
    if tiles > limit:
        raise InputError(f"detecting on this {width}x{height} image takes {tiles} tiles; this service's limit is "
                         f"{limit}: crop or downscale it, or ask for single_pass=true (one tile, coarser)")


async def read_image(state: State, raw: Any, detector: Any, *, single_pass: bool) -> DetectImage:
    """The request's image at full resolution (an upload or a catalog image, checked as predict/explain check
    theirs), refused before decoding when ``detector`` would take more tiles than the service allows."""
    if raw.fields:
        raise InputError(f"detect takes its options as query parameters (?classifier=&method=&margin=&score="
                         f"&single_pass=&overlay=), not in the body: move {', '.join(sorted(raw.fields))} there")
    if raw.data is None:
        assert raw.image_id is not None
        image = catalog_image(state, raw.image_id)
        check_tiles(state, detector, image.width, image.height, single_pass=single_pass)
        return DetectImage(await decode_catalog_image(state, image, 0), image.sha256, raw.image_id)
    import hashlib

    from handlens.serve.images import decode_bounded
    from handlens.serve.uploads import open_upload

    settings, data = state.settings, raw.data
    opened, header = open_upload(data, max_bytes=settings.max_upload_bytes, max_pixels=settings.max_pixels)
    try:
        check_tiles(state, detector, header.width, header.height, single_pass=single_pass)
    except InputError:
        opened.close()
        raise
    async with state.pixels.hold(header.pixels):  # the header said how many pixels: wait for them, then decode
        array = await asyncio.get_running_loop().run_in_executor(
            state.io_pool, lambda: decode_bounded(opened, header, max_side=0))
    return DetectImage(array, hashlib.sha256(data).hexdigest(), None)


def _classifier(state: State, model_id: str) -> LoadedModel:
    try:
        return state.pool.get(model_id)
    except WrongKindError:
        raise InputError(f"?classifier={model_id} is a detector: give the id of a classifier bundle (GET "
                         "/api/v1/models lists each model's kind) to label each box") from None


@router.post("/models/{model_id}/detect", openapi_extra=DETECT_BODY)
async def detect(model_id: str, raw: RawImageDep, detector: LoadedDetectorDep, state: StateDep, *,
                 classifier: Annotated[str | None, Query(min_length=1, max_length=128, description="a "
                                                         "classifier's id: labels each box (its crop with the "
                                                         "margin)")] = None,
                 method: Annotated[ExplainMethod | None, Query(description="explains the classifier's label "
                                                               "in each box (needs classifier)")] = None,
                 margin: Annotated[float, Query(ge=0, le=2, description="context around each box the classifier "
                                                "sees, as a share of the box's width and height")] = 0.15,
                 score: Annotated[float | None, Query(ge=0, le=1, description="the score a box needs (default: "
                                                      "the detector's calibrated threshold)")] = None,
                 single_pass: Annotated[bool, Query(description="the whole image as one tile: fast, blind to "
                                                    "small objects")] = False,
                 overlay: Annotated[bool, Query(description="also return the image with the boxes, labels "
                                                "and maps drawn in, as overlay_png")] = False) -> Detection:
    """Find the boxes on one image; with ``classifier``, label each box, and with ``method``, explain each
    label on its box's crop (each box's map normalised on its own, as ``handlens detect run`` does)."""
    if method is not None and classifier is None:
        raise InputError("method explains the classifier's label for each box: give ?classifier=MODEL_ID too (a "
                         "detector alone has no class map to explain)")
    loop = asyncio.get_running_loop()
    labeller = await loop.run_in_executor(state.io_pool, _classifier, state, classifier) if classifier else None
    params = None
    if method is not None and labeller is not None:
        from handlens.serve.explaining import budgeted_params

        params = budgeted_params(state.settings, method.value, {}, labeller.bundle.preprocess.size)
    image = await read_image(state, raw, detector.detector, single_pass=single_pass)  # every option checked first
    threshold = detector.detector.score_threshold if score is None else score
    key = ExplanationCache.key("detect", detector.sha256, labeller.sha256 if labeller else None, image.sha256,
                               method.value if method else None, params.model_dump() if params else None, margin,
                               threshold, single_pass, overlay, state.settings.max_explain_tiles)
    body = state.cache.get(key)
    cached = body is not None
    started = time.perf_counter()
    if body is None:
        def work() -> tuple[dict[str, Any], bool]:
            found = state.cache.peek(key)  # an identical request may have finished while this one waited
            if found is not None:
                return found, True
            done = compute_detection(state, detector, image.array, labeller=labeller,
                                     method=method.value if method else None, params=params, margin=margin,
                                     score=threshold, single_pass=single_pass, overlay=overlay)
            state.cache.put(key, done)
            return done, False

        body, cached = await state.run_explanation(work)
    state.metrics.observe("detect", method.value if method else ("classify" if labeller else "boxes"),
                          time.perf_counter() - started)
    return Detection(**body, model=model_id, classifier=classifier, method=method.value if method else None,
                     image_sha256=image.sha256, image_id=image.image_id, cached=cached)


def compute_detection(state: State, detector: LoadedDetector, picture: np.ndarray, *, labeller: LoadedModel | None,
                      method: str | None, params: Any, margin: float, score: float, single_pass: bool,
                      overlay: bool) -> dict[str, Any]:
    """Detect (under the detector's lock), then label every box and explain the first ``max_explain_tiles``
    (under the classifier copy's lock); the answer's fields that do not name the request."""
    from handlens.detect.pipeline import detect_image
    from handlens.serve.explaining import release_memory

    started = time.perf_counter()
    limit = state.settings.max_explain_tiles
    with detector.lock:
        result = detect_image(detector.detector, picture, margin=margin, score_threshold=score,
                              single_pass=single_pass, max_tiles=limit, name="upload")
    try:
        if labeller is not None:
            label_boxes(labeller, picture, result, method=method, params=params, limit=limit)
    finally:
        release_memory()
    boxes = [DetectedBox(**box.to_dict(), explained=box.explained,
                         map_png=box_map_png(result.heatmap, box.crop, result.signed) if box.explained else None)
             for box in result.boxes]
    return {"size": list(result.size), "tiles": result.tiles, "score_threshold": score, "margin": margin,
            "signed": result.signed, "count": len(boxes), "explained": sum(b.explained for b in boxes),
            "boxes": boxes, "seconds": round(time.perf_counter() - started, 4),
            "overlay_png": overlay_png(picture, result) if overlay else None}


def label_boxes(labeller: LoadedModel, picture: np.ndarray, result: Any, *, method: str | None, params: Any,
                limit: int) -> None:
    """Label ``result``'s boxes with the classifier; with ``method``, explain the first ``limit`` (the boxes
    come sorted by score) on the explanation copy, the rest only labelled; the map goes into ``result``."""
    from handlens.detect.pipeline import classify_boxes

    if method is None:
        with labeller.lock:  # what predictions run on (the ONNX predictor where onnxruntime serves them)
            classify_boxes(labeller.predicts, picture, result.boxes, method=None)
        return
    copy = labeller.explainer()
    explained, rest = result.boxes[:limit], result.boxes[limit:]
    with copy.lock:
        result.heatmap, result.signed = classify_boxes(copy.bundle, picture, explained, method=method,
                                                       params=params)
        if rest:
            classify_boxes(copy.bundle, picture, rest, method=None)


def box_map_png(heatmap: np.ndarray | None, crop: Any, signed: bool) -> str | None:
    """Base64 RGBA PNG of the map inside ``crop``, at most ``MAP_SIDE`` long: the colour ramp (opaque) for an
    unsigned map, green for and red against (as strong as the evidence) for a signed one."""
    from PIL import Image

    from handlens.explain.render import colormap, normalise

    if heatmap is None:
        return None
    x0, y0, x1, y1 = crop
    local = np.asarray(heatmap[y0:y1, x0:x1], dtype=np.float32)
    if not local.size:
        return None
    height, width = local.shape
    scale = min(1.0, MAP_SIDE / max(height, width))
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    if size != (width, height):
        local = np.asarray(Image.fromarray(local, mode="F").resize(size, Image.BILINEAR))
    values = normalise(local, signed)
    rgba = np.zeros((*values.shape, 4), np.uint8)
    if signed:
        rgba[..., 1] = 255 * (values > 0)
        rgba[..., 0] = 255 * (values < 0)
        rgba[..., 3] = (np.abs(values) * 255).round().astype(np.uint8)
    else:
        rgba[..., :3] = colormap(values)
        rgba[..., 3] = 255
    return _png(rgba)


def overlay_png(picture: np.ndarray, result: Any) -> str:
    """Base64 PNG of ``detect.render.draw_result`` (boxes, labels, maps), at most ``OVERLAY_SIDE`` long."""
    from PIL import Image

    from handlens.detect.render import draw_result

    drawn = Image.fromarray(draw_result(picture, result))
    longest = max(drawn.size)
    if longest > OVERLAY_SIDE:
        scale = OVERLAY_SIDE / longest
        drawn = drawn.resize((max(1, round(drawn.width * scale)), max(1, round(drawn.height * scale))),
                             Image.BILINEAR)
    return _png(np.asarray(drawn))


def _png(array: np.ndarray) -> str:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, "PNG", compress_level=1)  # as explanations' overlays: fast to encode
    return base64.b64encode(buffer.getvalue()).decode()
