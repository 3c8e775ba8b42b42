"""Explanations: a map of where the model looks for one image, cached by (model, image, method, parameters)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import numpy as np
from fastapi import APIRouter

from handlens.serve.cache import ExplanationCache
from handlens.serve.deps import LoadedModelDep, RequestImageDep, StateDep
from handlens.serve.schemas import ERRORS, IMAGE_BODY, TRUST_BODY, Explanation, TrustAnswer

router = APIRouter(prefix="/api/v1", tags=["models"], responses=ERRORS)


@router.post("/models/{model_id}/explain", openapi_extra=IMAGE_BODY, response_model_exclude_unset=True)
async def explain(model_id: str, image: RequestImageDep, model: LoadedModelDep, state: StateDep) -> Explanation:
    from handlens.serve.explaining import budgeted_params, compute_explanation, expert_roi, region_ids

    fields = image.fields
    method = str(fields.get("method") or "gradcam")
    params = budgeted_params(state.settings, method, fields.get("params") or {}, model.bundle.preprocess.size)
    layer = fields.get("layer") or None
    target = str(fields.get("target") or "pred")
    output = str(fields.get("output") or "png")  # png, array or both: checked by deps.ImageFields
    regions = await asyncio.get_running_loop().run_in_executor(state.io_pool, region_ids, state, image.image_id)
    key = ExplanationCache.key(model.sha256, image.sha256, method, layer, target, params.model_dump(), regions)
    result = state.cache.get(key)
    cached = result is not None
    started = time.perf_counter()
    if result is None:
        copy = await asyncio.get_running_loop().run_in_executor(state.io_pool, model.explainer)  # not predict's

        def work() -> tuple[dict[str, Any], bool]:
            found = state.cache.peek(key)  # an identical request may have finished while this one waited
            if found is not None:
                return found, True
            roi = expert_roi(state, image.image_id) if regions else None
            done = compute_explanation(copy, image.array, method=method, layer=layer, target=target, params=params,
                                       max_tiles=state.settings.max_explain_tiles, roi=roi)
            state.cache.put(key, done)
            return done, False

        result, cached = await state.run_explanation(work)
    state.metrics.observe("explain", method, time.perf_counter() - started)
    body = {k: v for k, v in result.items() if k not in ("map", "overlay_png")}
    if output in ("png", "both"):
        body["overlay_png"] = result["overlay_png"]
    if output in ("array", "both"):
        body["map"] = np.round(result["map"].astype(np.float32), 5).tolist()
    return Explanation(**body, model=model_id, image_sha256=image.sha256, image_id=image.image_id, cached=cached)


@router.post("/models/{model_id}/trust", openapi_extra=TRUST_BODY)
async def trust(model_id: str, image: RequestImageDep, model: LoadedModelDep, state: StateDep) -> TrustAnswer:
    """Is this image's map better than a random one? Deletion and insertion AUCs beside a random map's, and the
    verdict in words (faithful / not better than random / worse than random), cached like explanations."""
    from handlens.explain.image import trust_image
    from handlens.serve.explaining import budgeted_params, region_ids, release_memory

    fields = image.fields
    method = str(fields.get("method") or "gradcam")
    params = budgeted_params(state.settings, method, fields.get("params") or {}, model.bundle.preprocess.size)
    layer = fields.get("layer") or None
    target = str(fields.get("target") or "pred")
    steps = int(fields.get("steps", 20))  # bounded by deps.ImageFields
    key = ExplanationCache.key("trust", model.sha256, image.sha256, method, layer, target, params.model_dump(), steps)
    measured = state.cache.get(key)
    cached = measured is not None
    if measured is None:
        loop = asyncio.get_running_loop()
        copy = await loop.run_in_executor(state.io_pool, model.explainer)
        # the viewer asks for the overlay first: its map, cached, is the one measured (no second explanation)
        regions = await loop.run_in_executor(state.io_pool, region_ids, state, image.image_id)
        shown = state.cache.peek(ExplanationCache.key(model.sha256, image.sha256, method, layer, target,
                                                      params.model_dump(), regions))
        explained = None
        if shown is not None and not model.bundle.patch_trained:
            explained = (np.asarray(shown["map"], dtype=np.float32), model.bundle.classes.index(shown["target"]),
                         shown["layer"])

        def work() -> Any:
            try:
                with copy.lock:
                    done = trust_image(copy.bundle, image.array, method=method, layer=layer, target=target,
                                       params=params, steps=steps, explained=explained)
            finally:
                release_memory()
            state.cache.put(key, done)
            return done

        measured = await state.run_explanation(work)
    return TrustAnswer(model=model_id, image_sha256=image.sha256, image_id=image.image_id, method=method,
                       layer=measured.layer, target=model.bundle.classes[measured.target], verdict=measured.verdict,
                       sentence=measured.sentence(), deletion_auc=measured.deletion_auc,
                       random_deletion_auc=measured.random_deletion_auc, insertion_auc=measured.insertion_auc,
                       random_insertion_auc=measured.random_insertion_auc, steps=measured.steps,
                       seconds=round(measured.seconds, 4), cached=cached)
