"""One image explained as the model sees images: the one place that decides whole image or patches.

A model trained on whole images sees the image resized to its input: its map is computed there and placed
back on the image (undoing the resize and crop or letterbox). A model trained on patches sees patches at
its training scale: it is explained tile by tile over its working image and the tile maps stitched
(:mod:`handlens.explain.tiles`). Callers (the service, the CLI) get one typed answer either way.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from handlens.core.errors import InputError


@dataclass
class ImageExplanation:
    heatmap: np.ndarray  # (H, W) float32 over the image as given
    model_map: np.ndarray  # the raw map: on the model input (whole images), or the stitched map (patches)
    probabilities: np.ndarray  # (classes,)
    target: int  # the class explained
    signed: bool
    layer: str | None
    seconds: float
    seen_as: str  # "whole image" or "patches"
    shortcuts: Any = None  # explain.shortcuts.ShortcutShares: where the map's energy sits


def check_request(bundle: Any, *, layer: str | None, target: Any) -> None:
    """A layer and target this bundle has, or an InputError naming what it has."""
    if layer is not None and layer not in bundle.layer_names:
        raise InputError(f"layer {layer!r}: this model's layers are {', '.join(bundle.layer_names)}")
    if target != "pred" and target not in bundle.classes:
        raise InputError(f"target {target!r}: use pred or one of {', '.join(bundle.classes)}")


def explain_image(bundle: Any, picture: np.ndarray, *, method: str, layer: str | None = None, target: Any = "pred",
                  params: Any = None, max_tiles: int | None = None, roi: np.ndarray | None = None) -> ImageExplanation:
    """Explain one (H, W, 3) uint8 image with ``bundle`` (an ``ExplainableBundle``) as it sees images; the
    caller holds whatever lock the bundle needs. ``max_tiles`` bounds a patch-trained model's work. ``roi``
    (a boolean mask over the image: the specimen or the expert regions; by default the model's own threshold
    rule, :func:`own_roi`) is where the answer's shortcut shares count energy as on the specimen
    (:mod:`handlens.explain.shortcuts`)."""
    from handlens.explain.shortcuts import energy_shares, model_input_shares
    from handlens.transforms.roi import mask_for_input, resize_mask

    check_request(bundle, layer=layer, target=target)
    height, width = picture.shape[:2]
    if roi is None:
        roi = own_roi(bundle, picture)
    if bundle.patch_trained:
        from handlens.explain.tiles import tiled_explain

        tiled = tiled_explain(bundle, picture, method=method, layer=layer, target=target, max_tiles=max_tiles,
                              with_probability_map=False, params=params)  # C full-size planes nobody reads
        heat = np.asarray(tiled.heatmap)
        on_map = None if roi is None else resize_mask(np.asarray(roi, dtype=bool), *heat.shape[:2])
        return ImageExplanation(heat, heat, np.asarray(tiled.probabilities), int(tiled.target),
                                bool(tiled.signed), tiled.layer, float(sum(tiled.timings.values())), "patches",
                                energy_shares(heat, roi=on_map))
    result = bundle.explain([picture], method=method, layer=layer, target=target, params=params)
    heat = result.map_for(0)
    probabilities = np.asarray(result.probabilities[0])
    target_index = int(result.targets[0]) if result.targets else int(np.argmax(probabilities))
    preprocess = bundle.preprocess
    on_input = None if roi is None else mask_for_input(resize_mask(np.asarray(roi, dtype=bool), height, width),
                                                      preprocess.size, preprocess.resize)
    return ImageExplanation(heat_on_image(heat, height, width, preprocess), heat,
                            probabilities, target_index, bool(result.signed), result.layer,
                            float(result.timings.get("total", 0.0)), "whole image",
                            model_input_shares(heat, width=width, height=height, preprocess=preprocess, roi=on_input))


def own_roi(bundle: Any, picture: np.ndarray) -> np.ndarray | None:
    """The specimen mask by the model's own threshold rule (the ROI it was trained with, e.g. an X-ray's black
    border left out), or None for a model without one: where expert regions are absent, the shortcut shares
    still count energy off the specimen as the model's user defined it."""
    from PIL import Image

    from handlens.transforms.roi import RoiRule, resize_mask, threshold_roi

    rule = RoiRule.from_dict((bundle.preprocess.patches or {}).get("roi"))
    if rule.source != "threshold":
        return None
    # at the working scale, as training thresholds (a cleaning radius means the same pixels there), then back
    height, width = picture.shape[:2]
    scale = min(1.0, bundle.preprocess.working_side / max(height, width)) if bundle.preprocess.working_side else 1.0
    small = picture if scale >= 1.0 else np.asarray(Image.fromarray(picture).resize(
        (max(1, round(width * scale)), max(1, round(height * scale))), Image.BILINEAR))
    return resize_mask(threshold_roi(small, rule), height, width)


def unseen_on_image(height: int, width: int, preprocess: Any) -> np.ndarray | None:
    """The (height, width) mask of the image's pixels outside the model's input (a centre crop cuts them), or
    None when the model sees all of it."""
    from handlens.transforms.preprocess import input_placement

    placement = input_placement(width, height, preprocess)
    (rw, rh), (ox, oy) = placement.resized, placement.offset
    if ox >= 0 and oy >= 0:
        return None
    size = preprocess.size
    sx, sy = width / rw, height / rh
    seen = np.zeros((height, width), dtype=bool)
    top, left = round(-oy * sy) if oy < 0 else 0, round(-ox * sx) if ox < 0 else 0
    seen[top:top + round(min(size, rh) * sy), left:left + round(min(size, rw) * sx)] = True
    return ~seen


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


@dataclass
class ImageTrust:
    """Deletion and insertion AUCs of one image's map beside a random map's, and the words for them."""

    verdict: str  # faithful, not better than random, worse than random (explain.verdicts)
    deletion_auc: float
    random_deletion_auc: float
    insertion_auc: float
    random_insertion_auc: float
    steps: int
    target: int
    layer: str | None
    seconds: float

    def sentence(self) -> str:
        """e.g. ``faithful · deletion 0.21 vs random 0.42``: what the viewer's badge reads."""
        return f"{self.verdict} · deletion {self.deletion_auc:.2f} vs random {self.random_deletion_auc:.2f}"


def trust_image(bundle: Any, picture: np.ndarray, *, method: str, layer: str | None = None, target: Any = "pred",
                params: Any = None, steps: int = 20, baseline: str = "blur",
                explained: tuple[np.ndarray, int, str | None] | None = None) -> ImageTrust:
    """Is this image's map better than a random one? Its deletion and insertion curves on the model input
    (Petsiuk et al., RISE, BMVC 2018) beside a random map's, judged per image (``image_verdict``). A model
    trained on patches is measured by ``handlens trust`` on its grid patches, not here. ``explained`` (the
    map on the model input, the class index and the layer: an explanation already computed for this image,
    e.g. the viewer's overlay) is measured as it is instead of explaining again."""
    import time

    from handlens.explain.metrics import deletion_insertion
    from handlens.explain.verdicts import image_verdict

    if bundle.patch_trained:
        raise InputError("a patch-trained model's maps are measured on its grid patches: use `handlens trust "
                         "BUNDLE IMAGE`, which cuts them as the model sees them")
    started = time.perf_counter()
    if explained is None:
        done = explain_image(bundle, picture, method=method, layer=layer, target=target, params=params)
        explained = (done.model_map, done.target, done.layer)
    model_map, target_index, used_layer = explained
    inputs = bundle.transform_many([picture])
    measured = deletion_insertion(bundle.module, inputs, np.asarray(model_map, dtype=np.float32)[None],
                                  [target_index], baseline=baseline, steps=steps)
    row = measured["images"][0]
    return ImageTrust(verdict=image_verdict(row), deletion_auc=row["deletion_auc"],
                      random_deletion_auc=row["random_deletion_auc"], insertion_auc=row["insertion_auc"],
                      random_insertion_auc=row["random_insertion_auc"], steps=steps, target=target_index,
                      layer=used_layer, seconds=time.perf_counter() - started)
