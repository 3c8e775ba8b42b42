"""Regions of interest: which pixels of an image are specimen and which are background.

A ROI mask keeps patch sampling on the specimen (a thin section's glass margin, an X-ray's black
border, a slide's empty field) and restricts explanation metrics to it. It comes from the catalog's
expert regions (``source: annotations``, imported with ``handlens annotate import``) or from a
threshold rule (``source: threshold``, Otsu or a fixed grey level, optionally inverted, optionally
cleaned with a morphological opening/closing).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np

from handlens.core.errors import InputError

RoiSource = Literal["none", "annotations", "threshold"]


@dataclass(frozen=True)
class RoiRule:
    source: RoiSource = "none"
    method: Literal["otsu", "fixed"] = "otsu"
    value: float = 128.0
    invert: bool = False
    clean_radius: int = 0  # a closing then an opening with a disk of this radius (0: none)

    def __post_init__(self) -> None:
        if self.source not in ("none", "annotations", "threshold"):
            raise InputError(f"roi.source={self.source!r}: choose none, annotations or threshold")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> RoiRule:
        return cls(**{k: v for k, v in (data or {}).items() if k in cls.__dataclass_fields__})


def threshold_roi(image: np.ndarray, rule: RoiRule) -> np.ndarray:
    """Boolean (H, W) foreground mask of an (H, W, 3) uint8 image by the rule's threshold."""
    from handlens.transforms.morphology import threshold_mask

    mask = threshold_mask(image, rule.method, rule.value, rule.invert)
    if rule.clean_radius:
        from skimage import morphology

        footprint = morphology.disk(rule.clean_radius)
        mask = morphology.opening(morphology.closing(mask, footprint), footprint)
    return mask


def resize_mask(mask: np.ndarray, height: int, width: int) -> np.ndarray:
    """A boolean mask resized (nearest) to height x width."""
    if mask.shape == (height, width):
        return mask
    from PIL import Image

    return np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize((width, height), Image.NEAREST)) > 127


def mask_for_input(mask: np.ndarray, size: int, resize: str) -> np.ndarray:
    """An image-resolution mask mapped onto the model input exactly as ``preprocess_image`` maps the image
    (the same crop, stretch or padding; nearest-neighbour so it stays a mask)."""
    from handlens.transforms.preprocess import Preprocess, preprocess_image

    as_image = np.repeat((mask.astype(np.uint8) * 255)[..., None], 3, axis=2)
    return preprocess_image(as_image, Preprocess(size=size, resize=resize, interpolation="nearest"))[..., 0] > 127
