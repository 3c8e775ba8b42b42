"""Patches from large images: random boxes for training, a fixed grid for validation and prediction.

A thin section of 3000x2000 pixels resized whole to 224x224 loses the grain texture the classes
differ by; patch training cuts 224-pixel views at (near) native resolution instead. Boxes are squares
``(top, left, side)`` in the pixels of the *working image* (the decoded image, its longer side capped
at ``max_side``); they never leave the image, and with a region-of-interest mask a box must hold at
least ``min_roi`` of foreground (mostly-background boxes are re-drawn). A patch-trained model predicts
an image by averaging the class probabilities of its grid patches.
"""

from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from handlens.core.errors import InputError

Box = tuple[int, int, int]  # top, left, side


@dataclass(frozen=True)
class PatchSpec:
    """``size``: patch side in working-image pixels before ``scale`` (a random factor per patch, for
    zoom); ``per_image``: patches per image per epoch; ``min_roi``: least foreground share of a box;
    ``max_side``: the working image's longer side (0 keeps full resolution); ``grid_max``: most grid
    patches per image at validation and prediction (evenly thinned beyond that)."""

    size: int = 224
    scale: tuple[float, float] = (0.75, 1.25)
    per_image: int = 4
    min_roi: float = 0.5
    max_side: int = 1024
    grid_max: int = 16
    tries: int = 20

    def __post_init__(self) -> None:
        if self.size < 8:
            raise InputError(f"patches.size={self.size}: a patch needs at least 8 pixels a side")
        lo, hi = self.scale
        if not 0 < lo <= hi:
            raise InputError(f"patches.scale={list(self.scale)}: write [low, high] with 0 < low <= high")
        if not 0 <= self.min_roi <= 1:
            raise InputError(f"patches.min_roi={self.min_roi}: a share between 0 and 1")
        if self.per_image < 1 or self.grid_max < 1:
            raise InputError("patches.per_image and patches.grid_max must be at least 1")

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["scale"] = list(self.scale)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PatchSpec:
        values = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        if "scale" in values:
            values["scale"] = tuple(values["scale"])
        return cls(**values)


class RoiIntegral:
    """Foreground share of any box in O(1), from the integral image of a boolean mask."""

    #: foreground pixels are remembered on a grid of this step, to draw patch centres from
    CENTRE_STEP = 4

    def __init__(self, mask: np.ndarray) -> None:
        padded = np.zeros((mask.shape[0] + 1, mask.shape[1] + 1), dtype=np.int64)
        padded[1:, 1:] = np.cumsum(np.cumsum(mask.astype(np.int64), 0), 1)
        self.table = padded
        step = self.CENTRE_STEP
        ys, xs = np.nonzero(mask[::step, ::step])
        self.centres = np.stack([ys * step, xs * step], axis=1).astype(np.int32)

    def random_centre(self, rng: random.Random) -> tuple[int, int] | None:
        if not len(self.centres):
            return None
        y, x = self.centres[rng.randrange(len(self.centres))]
        return int(y), int(x)

    def share(self, box: Box) -> float:
        top, left, side = box
        t = self.table
        total = t[top + side, left + side] - t[top, left + side] - t[top + side, left] + t[top, left]
        return float(total) / float(side * side)


def _side(spec: PatchSpec, h: int, w: int, rng: random.Random | None) -> int:
    factor = rng.uniform(*spec.scale) if rng is not None else 1.0
    return max(1, min(h, w, round(spec.size * factor)))


def sample_boxes(h: int, w: int, spec: PatchSpec, rng: random.Random, *, roi: RoiIntegral | None = None,
                 count: int | None = None) -> list[Box]:
    """``count`` (default ``spec.per_image``) random boxes inside an h x w image, ROI-aware.

    With a ROI each box is centred on a random foreground pixel and re-drawn up to ``spec.tries``
    times until its foreground share reaches ``min_roi``; if the image never offers one (a thin or
    nearly empty mask), the best box seen is used.
    """
    boxes = []
    for _ in range(count if count is not None else spec.per_image):
        best: tuple[float, Box] | None = None
        for _ in range(spec.tries if roi is not None else 1):
            side = _side(spec, h, w, rng)
            centre = roi.random_centre(rng) if roi is not None else None
            if centre is None:
                box = (rng.randint(0, h - side), rng.randint(0, w - side), side)
            else:  # centred on a foreground pixel, shifted to stay inside the image
                box = (min(max(0, centre[0] - side // 2), h - side), min(max(0, centre[1] - side // 2), w - side),
                       side)
            share = roi.share(box) if roi is not None else 1.0
            if best is None or share > best[0]:
                best = (share, box)
            if share >= spec.min_roi:
                break
        assert best is not None
        boxes.append(best[1])
    return boxes


def grid_boxes(h: int, w: int, spec: PatchSpec, roi: RoiIntegral | None = None) -> list[Box]:
    """A deterministic grid of ``spec.size`` boxes covering the image (overlapping where the size does not
    divide it), foreground boxes only when a ROI is given, at most ``spec.grid_max`` (evenly thinned)."""
    side = _side(spec, h, w, None)
    rows, cols = math.ceil(h / side), math.ceil(w / side)
    tops = np.linspace(0, h - side, rows).round().astype(int) if rows > 1 else np.array([(h - side) // 2])
    lefts = np.linspace(0, w - side, cols).round().astype(int) if cols > 1 else np.array([(w - side) // 2])
    boxes = [(int(t), int(left), side) for t in tops for left in lefts]
    if roi is not None:
        shares = [roi.share(b) for b in boxes]
        kept = [b for b, s in zip(boxes, shares, strict=True) if s >= spec.min_roi]
        boxes = kept or [boxes[int(np.argmax(shares))]]
    if len(boxes) > spec.grid_max:
        picks = np.linspace(0, len(boxes) - 1, spec.grid_max).round().astype(int)
        boxes = [boxes[i] for i in picks]
    return boxes


def crop_resize(image: np.ndarray, box: Box, out_size: int) -> Any:
    """The box of an (H, W, 3) uint8 image as a (3, out_size, out_size) uint8 tensor (antialiased)."""
    import torch
    from torchvision.transforms.v2 import functional as F

    top, left, side = box
    crop = torch.from_numpy(np.ascontiguousarray(image[top:top + side, left:left + side])).permute(2, 0, 1)
    if side == out_size:
        return crop.contiguous()
    return F.resize(crop, [out_size, out_size], antialias=True)


def mean_by_image(probs: Any, image_index: Any, n_images: int) -> Any:
    """Average patch probabilities (P, C) per image -> (n_images, C): the image-level prediction."""
    import torch

    sums = torch.zeros((n_images, probs.shape[1]), dtype=probs.dtype).index_add_(0, image_index, probs)
    counts = torch.zeros(n_images, dtype=probs.dtype).index_add_(0, image_index, torch.ones_like(image_index,
                                                                                            dtype=probs.dtype))
    return sums / counts.clamp_min(1).unsqueeze(1)
