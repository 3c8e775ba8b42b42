"""Explanations the service computes: the method's parameters within the service's budgets, the map over
the image (tile by tile for a patch-trained model), the overlay PNG. Computing only: no routing here."""

from __future__ import annotations

import base64
import io
from typing import Any

import numpy as np

from handlens.core.errors import InputError
from handlens.serve.settings import ServeSettings


def budgeted_params(settings: ServeSettings, method: str, params: Any, input_size: int = 224) -> Any:
    """The method's parameters validated by its own model (a typo or an unknown method is a 422) and refused
    (422, naming the limit) when one image's explanation would take more forward or backward passes than
    this service allows. The budget comes from each method's declared cost: no method is named here."""
    from handlens.explain.registry import ExplainBudget, check_budget

    budget = ExplainBudget(forward_passes=settings.max_forward_passes, backward_passes=settings.max_backward_passes)
    return check_budget(method, params, input_size=input_size, budget=budget)


def compute_explanation(copy: Any, picture: np.ndarray, *, method: str, layer: str | None, target: str,
                        params: Any, max_tiles: int) -> dict[str, Any]:
    """Compute one explanation under the model's lock; returns the overlay PNG (base64) and the raw map.

    A patch-trained model is explained as it sees images: tile by tile at its patch scale, the tile maps
    stitched over the image (``explain.tiles``); its raw map is that stitched map, not one model input.
    """
    from PIL import Image

    from handlens.explain.render import overlay

    bundle = copy.bundle
    if layer is not None and layer not in bundle.layer_names:
        raise InputError(f"layer {layer!r}: this model's layers are {', '.join(bundle.layer_names)}")
    if target not in ("pred",) and target not in bundle.classes:
        raise InputError(f"target {target!r}: use pred or one of {', '.join(bundle.classes)}")
    if bundle.patch_trained:
        from handlens.explain.tiles import tiled_explain

        with copy.lock:
            tiled = tiled_explain(bundle, picture, method=method, layer=layer, target=target, max_tiles=max_tiles,
                                  with_probability_map=False, params=params)  # C full-size planes nobody reads
        heat = full = tiled.heatmap  # already over the whole image
        probabilities, target_index, signed, layer_name = tiled.probabilities, tiled.target, tiled.signed, tiled.layer
        seconds = sum(tiled.timings.values())
    else:
        with copy.lock:
            result = bundle.explain([picture], method=method, layer=layer, target=target, params=params)
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
