"""Training tiles for a detector: random tiles of the working image (most near a box), flipped and turned.

The working image is the image resized by the detector's ``scale`` (so the boxes' median longer side is about
``target_box`` pixels: the pyramid's stride-8 to stride-128 levels then cover small and large objects alike).
Working images are kept in memory, one decode per image per run.
"""

from __future__ import annotations

import random
import statistics
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from handlens.core.errors import InputError

#: share of the training tiles placed so that a random box lies inside them (the rest fall anywhere)
NEAR_BOX = 0.8
#: a box cut by a tile edge is kept when at least this share of its area is inside the tile
KEEP_VISIBLE = 0.5


@dataclass
class WorkingImage:
    """An image at the working scale, its boxes (working pixels) and their class indices (1..K)."""

    image_id: int
    pixels: np.ndarray  # (h, w, 3) uint8
    boxes: np.ndarray  # (n, 4) float32 x0 y0 x1 y1
    labels: np.ndarray  # (n,) int64, 1-based (0 is the background)


def auto_scale(images: list[Any], target_box: int) -> float:
    """The working scale that brings the boxes' median longer side to ``target_box`` pixels (at most 1:
    never upsample by default)."""
    sides = [max(x1 - x0, y1 - y0) for img in images for x0, y0, x1, y1 in img.boxes]
    if not sides:
        raise InputError("no boxes to train a detector on: import boxes with `handlens boxes import`")
    return round(min(1.0, target_box / statistics.median(sides)), 4)


def working_overlap(images: list[Any], *, scale: float, tile: int, least: float) -> float:
    """Tile overlap (a share of the tile) wide enough to hold the largest box whole: then a box cut by an inner
    tile edge is seen whole by the neighbour, and sliced inference drops the cut copy (``infer``)."""
    largest = max((max(x1 - x0, y1 - y0) for img in images for x0, y0, x1, y1 in img.boxes), default=0.0)
    return round(min(0.75, max(least, 1.1 * largest * scale / tile)), 4)


def resize_by(picture: np.ndarray, scale: float) -> np.ndarray:
    """``picture`` resized by ``scale`` (antialiased), at least 1 pixel a side."""
    from PIL import Image

    if scale == 1.0:
        return picture
    h, w = picture.shape[:2]
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return np.asarray(Image.fromarray(picture).resize(size, Image.BILINEAR, reducing_gap=3.0))


def load_working(images: list[Any], classes: list[str], scale: float) -> list[WorkingImage]:
    """Decode each boxed image (``data.boxes.BoxedImage``) at the working scale."""
    from handlens.transforms.preprocess import load_rgb

    index = {name: i + 1 for i, name in enumerate(classes)}
    out = []
    for img in images:
        pixels = resize_by(np.asarray(load_rgb(img.path)), scale)
        boxes = np.asarray(img.boxes, dtype=np.float32).reshape(-1, 4) * scale
        labels = np.asarray([index[name] for name in img.labels], dtype=np.int64)
        out.append(WorkingImage(img.image_id, pixels, boxes, labels))
    return out


def _origin(rng: random.Random, length: int, tile: int, *, lo: float, hi: float) -> int:
    """A tile start along one axis holding [lo, hi] when it fits, else centred on it; inside the image."""
    if length <= tile:
        return 0
    if hi - lo <= tile:
        first, last = max(0, int(np.ceil(hi)) - tile), min(length - tile, int(lo))
        if first <= last:
            return rng.randint(first, last)
    return int(min(max(0, (lo + hi) / 2 - tile / 2), length - tile))


def cut_tile(image: WorkingImage, x: int, y: int, tile: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The ``tile`` square at (x, y), zero-padded past the image, with the boxes that are mostly inside it."""
    crop = np.zeros((tile, tile, 3), dtype=np.uint8)
    part = image.pixels[y:y + tile, x:x + tile]
    crop[:part.shape[0], :part.shape[1]] = part
    if not len(image.boxes):
        return crop, np.zeros((0, 4), np.float32), np.zeros(0, np.int64)
    shifted = image.boxes - np.array([x, y, x, y], dtype=np.float32)
    clipped = np.clip(shifted, 0, [part.shape[1], part.shape[0]] * 2)
    area = (shifted[:, 2] - shifted[:, 0]) * (shifted[:, 3] - shifted[:, 1])
    seen = (clipped[:, 2] - clipped[:, 0]).clip(0) * (clipped[:, 3] - clipped[:, 1]).clip(0)
    keep = (seen >= KEEP_VISIBLE * area) & (clipped[:, 2] - clipped[:, 0] >= 1) & (clipped[:, 3] - clipped[:, 1] >= 1)
    return crop, clipped[keep], image.labels[keep]


def flip_tile(crop: np.ndarray, boxes: np.ndarray, rng: random.Random) -> tuple[np.ndarray, np.ndarray]:
    """A random one of the square's 8 symmetries (flips and quarter turns), boxes moved with it."""
    tile = crop.shape[0]
    boxes = boxes.copy()
    if rng.random() < 0.5:  # mirror left-right
        crop = crop[:, ::-1]
        boxes[:, [0, 2]] = tile - boxes[:, [2, 0]]
    if rng.random() < 0.5:  # mirror top-bottom
        crop = crop[::-1]
        boxes[:, [1, 3]] = tile - boxes[:, [3, 1]]
    if rng.random() < 0.5:  # transpose (with the flips: any quarter turn)
        crop = crop.transpose(1, 0, 2)
        boxes = boxes[:, [1, 0, 3, 2]]
    return np.ascontiguousarray(crop), boxes


class TileDataset(torch.utils.data.Dataset):
    """``tiles_per_image`` random tiles per image per epoch; item ``i`` is drawn from ``(seed, epoch, i)``, so an
    epoch is the same however it is split among loader workers, and a resumed run draws what it would have."""

    def __init__(self, images: list[WorkingImage], *, tile: int, per_image: int, flips: bool, seed: int) -> None:
        self.images, self.tile, self.per_image, self.flips, self.seed = images, tile, per_image, flips, seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.images) * self.per_image

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        rng = random.Random(hash((self.seed, self.epoch, index)))
        image = self.images[index // self.per_image]
        h, w = image.pixels.shape[:2]
        if len(image.boxes) and rng.random() < NEAR_BOX:
            x0, y0, x1, y1 = image.boxes[rng.randrange(len(image.boxes))]
            x, y = _origin(rng, w, self.tile, lo=x0, hi=x1), _origin(rng, h, self.tile, lo=y0, hi=y1)
        else:
            x, y = rng.randint(0, max(0, w - self.tile)), rng.randint(0, max(0, h - self.tile))
        crop, boxes, labels = cut_tile(image, x, y, self.tile)
        if self.flips:
            crop, boxes = flip_tile(crop, boxes, rng)
        pixels = torch.from_numpy(crop).permute(2, 0, 1).float().div_(255)
        return pixels, {"boxes": torch.from_numpy(boxes).float().reshape(-1, 4), "labels": torch.from_numpy(labels)}


def collate(samples: list[Any]) -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]:
    return [s[0] for s in samples], [s[1] for s in samples]


def split_images(images: list[Any], *, val_share: float, seed: int) -> dict[str, list[Any]]:
    """Train and val images, whole groups to one side when the images have groups (a sample's images together)."""
    units: dict[str, list[Any]] = {}
    for img in images:
        units.setdefault(img.group or f"image:{img.image_id}", []).append(img)
    keys = sorted(units)
    random.Random(seed).shuffle(keys)
    n_val = max(1, round(len(keys) * val_share)) if len(keys) > 1 else 0
    if n_val == 0:
        raise InputError(f"a detector needs at least 2 images (or groups) to keep one for validation; "
                         f"the dataset has {len(images)}")
    val = [img for key in keys[:n_val] for img in units[key]]
    train = [img for key in keys[n_val:] for img in units[key]]
    return {"train": train, "val": val}
