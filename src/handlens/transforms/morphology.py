"""Morphology as preprocessing steps, and threshold masks (for steps and for regions of interest).

Steps are plain mappings, as in a run config or a YAML file::

    preprocess:
      morphology:
        - {op: threshold, method: otsu}      # or value: 128; invert: true keeps the dark side
        - {op: opening, radius: 2}           # erosion, dilation, opening, closing with a disk

They run in order on the decoded uint8 image. ``threshold`` turns it into a black/white image (the
same mask on all three channels); the morphological operators then act on that binary image, or on
each channel of a grey/colour image (grey-level morphology). The operators are scikit-image's
(``skimage.morphology``) with a disk footprint of the given radius: nothing is hand-written.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from handlens.core.errors import InputError

MORPHOLOGY_OPS = ("threshold", "erosion", "dilation", "opening", "closing")


def check_steps(steps: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Validate morphology steps; errors name the step and say what to write."""
    out = []
    for index, raw in enumerate(steps or [], start=1):
        if not isinstance(raw, dict) or raw.get("op") not in MORPHOLOGY_OPS:
            raise InputError(f"morphology step {index}: write {{op: NAME, ...}} with NAME one of "
                             f"{', '.join(MORPHOLOGY_OPS)}; got {raw!r}")
        step = dict(raw)
        if step["op"] == "threshold":
            allowed = {"op", "method", "value", "invert"}
            method = step.setdefault("method", "otsu" if "value" not in step else "fixed")
            if method not in ("otsu", "fixed"):
                raise InputError(f"morphology step {index}: method {method!r}; choose otsu or fixed "
                                 "(with value: 0..255)")
            if method == "fixed" and not 0 <= float(step.get("value", -1)) <= 255:
                raise InputError(f"morphology step {index}: a fixed threshold needs value: 0..255")
        else:
            allowed = {"op", "radius"}
            radius = step.setdefault("radius", 1)
            if not isinstance(radius, int) or not 1 <= radius <= 64:
                raise InputError(f"morphology step {index}: radius must be a whole number of pixels, 1..64")
        unknown = set(step) - allowed
        if unknown:
            raise InputError(f"morphology step {index} ({step['op']}): unknown key(s) {', '.join(sorted(unknown))}; "
                             f"valid: {', '.join(sorted(allowed - {'op'}))}")
        out.append(step)
    return out


def to_gray(image: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 -> (H, W) uint8 luminance (ITU-R 601, as Pillow's ``convert('L')``)."""
    if image.ndim == 2:
        return image
    gray = image[..., 0] * 0.299 + image[..., 1] * 0.587 + image[..., 2] * 0.114
    return gray.round().astype(np.uint8)


def threshold_mask(image: np.ndarray, method: str = "otsu", value: float | None = None,
                   invert: bool = False) -> np.ndarray:
    """Boolean mask of the pixels brighter than the threshold (darker with ``invert``).

    Otsu's threshold (Otsu, "A Threshold Selection Method from Gray-Level Histograms", IEEE SMC 1979)
    via ``skimage.filters.threshold_otsu``; a flat image has no threshold and gives an all-True mask.
    """
    gray = to_gray(image)
    if method == "otsu":
        from skimage.filters import threshold_otsu

        if int(gray.min()) == int(gray.max()):
            return np.ones(gray.shape, dtype=bool)
        level = float(threshold_otsu(gray))
    else:
        level = float(value if value is not None else 128)
    mask = gray > level
    return ~mask if invert else mask


def apply_morphology(image: np.ndarray, steps: list[dict[str, Any]]) -> np.ndarray:
    """Run ``steps`` on an (H, W, 3) uint8 image; returns a new (H, W, 3) uint8 image."""
    from skimage import morphology

    out = image
    binary = False
    for step in check_steps(steps):
        op = step["op"]
        if op == "threshold":
            mask = threshold_mask(out, step["method"], step.get("value"), bool(step.get("invert", False)))
            out = np.repeat((mask.astype(np.uint8) * 255)[..., None], 3, axis=2)
            binary = True
            continue
        footprint = morphology.disk(step["radius"])
        function = getattr(morphology, op)  # on a bool image these are the binary operators
        if binary:
            result = function(out[..., 0] > 0, footprint)
            out = np.repeat((result.astype(np.uint8) * 255)[..., None], 3, axis=2)
        else:
            out = np.stack([function(out[..., c], footprint) for c in range(out.shape[2])], axis=2).astype(np.uint8)
    return np.ascontiguousarray(out)
