"""Explanations the service computes: the method's parameters within the service's budgets, the map over
the image (tile by tile for a patch-trained model), the overlay PNG. Computing only: no routing here."""

from __future__ import annotations

import base64
import io
from typing import Any

import numpy as np

from handlens.serve.settings import ServeSettings


def budgeted_params(settings: ServeSettings, method: str, params: Any, input_size: int = 224) -> Any:
    """The method's parameters validated by its own model (a typo or an unknown method is a 422) and refused
    (422, naming the limit) when one image's explanation would take more forward or backward passes than
    this service allows. The budget comes from each method's declared cost: no method is named here."""
    from handlens.explain.registry import ExplainBudget, check_budget

    budget = ExplainBudget(forward_passes=settings.max_forward_passes, backward_passes=settings.max_backward_passes)
    return check_budget(method, params, input_size=input_size, budget=budget)


def compute_explanation(copy: Any, picture: np.ndarray, *, method: str, layer: str | None, target: str,
                        params: Any, max_tiles: int, roi: np.ndarray | None = None) -> dict[str, Any]:
    """Explain one image under the model copy's lock (:func:`~handlens.explain.image.explain_image` decides
    whole image or patches), then draw the overlay (at most 1024 px long): the overlay PNG (base64) and the
    raw map, as float16. ``roi``: the image's expert regions, where the shortcut shares count the specimen."""
    from PIL import Image

    from handlens.explain.image import explain_image
    from handlens.explain.render import overlay

    bundle = copy.bundle
    try:
        with copy.lock:
            explained = explain_image(bundle, picture, method=method, layer=layer, target=target, params=params,
                                      max_tiles=max_tiles, roi=roi)
    finally:
        release_memory()
    shown, shown_heat = picture, explained.heatmap
    longest = max(picture.shape[:2])
    if longest > 1024:  # the overlay is for looking at: at most 1024 px on its long side
        scale = 1024 / longest
        size = (max(1, round(picture.shape[1] * scale)), max(1, round(picture.shape[0] * scale)))
        shown = np.asarray(Image.fromarray(picture).resize(size, Image.BILINEAR))
        shown_heat = np.asarray(Image.fromarray(explained.heatmap.astype(np.float32), mode="F").resize(
            size, Image.BILINEAR))
    # a stitched map is over the image: kept at the overlay's size; a model-input map is returned as computed
    raw = shown_heat if explained.seen_as == "patches" else explained.model_map
    unseen = None
    if explained.seen_as == "whole image":
        from handlens.explain.image import unseen_on_image

        unseen = unseen_on_image(shown.shape[0], shown.shape[1], bundle.preprocess)
    buffer = io.BytesIO()
    # compress_level 1: a fifth of the default 6's encoding time (21 vs 109 ms, 501x380 overlay), 1.15x the bytes
    drawn = overlay(shown, shown_heat, 0.5, signed=explained.signed, unseen=unseen)
    Image.fromarray(drawn).save(buffer, "PNG", compress_level=1)
    return {"method": method, "layer": explained.layer, "target": bundle.classes[explained.target],
            "signed": explained.signed, "shortcuts": explained.shortcuts.to_dict(),
            "probabilities": {c: float(p) for c, p in zip(bundle.classes, explained.probabilities, strict=True)},
            "overlay_png": base64.b64encode(buffer.getvalue()).decode(), "map": raw.astype(np.float16),
            "map_shape": list(raw.shape), "seconds": round(explained.seconds, 4)}


def release_memory() -> None:
    """Give the heap an explanation freed back to the system (glibc keeps freed arenas: 16 concurrent
    explanations once left the service 2 GB larger for good). A no-op where there is no ``malloc_trim``."""
    import contextlib
    import ctypes
    import ctypes.util

    with contextlib.suppress(OSError, AttributeError, TypeError):
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim(0)


def region_ids(state: Any, image_id: int | None) -> tuple[int, ...]:
    """The ids of a catalog image's expert regions (none for an upload): part of the explanation cache key, so
    a region added later is a new answer. A query only: a cached answer draws no mask."""
    if image_id is None:
        return ()
    from sqlalchemy import select

    from handlens.data.catalog import Annotation

    with state.catalog.session() as session:
        return tuple(sorted(session.scalars(select(Annotation.id).where(Annotation.image_id == image_id))))


def expert_roi(state: Any, image_id: int | None) -> np.ndarray | None:
    """A catalog image's expert regions as one mask over the image (None: an upload, or no region), drawn
    when an explanation is computed."""
    if image_id is None:
        return None
    from handlens.data.annotations import annotated_images_by_id, region_mask
    from handlens.data.catalog import Image

    with state.catalog.session() as session:
        found = annotated_images_by_id(session, [image_id]).get(image_id)
        row = session.get(Image, image_id)
        return region_mask(found, int(row.width), int(row.height)) if found and row is not None else None
