"""Training tiles: boxes follow every crop, flip and turn exactly; scale, overlap and the split are decided once."""

from __future__ import annotations

import random

import numpy as np
import pytest

from handlens.core.errors import InputError
from handlens.data.boxes import BoxedImage
from handlens.detect.data import (
    TileDataset,
    WorkingImage,
    _origin,
    auto_scale,
    cut_tile,
    flip_tile,
    split_images,
    working_overlap,
)


def boxed(image_id: int, boxes: list[tuple[float, float, float, float]], group: str | None = None) -> BoxedImage:
    return BoxedImage(image_id=image_id, path=f"/x/{image_id}.png", sha256=str(image_id), width=400, height=300,
                      group=group, boxes=boxes, labels=["thing"] * len(boxes))


def painted(boxes: np.ndarray, size: tuple[int, int] = (120, 100)) -> WorkingImage:
    """A black image whose boxes are painted white: where a box goes, its pixels must go too."""
    pixels = np.zeros((size[1], size[0], 3), np.uint8)
    for x0, y0, x1, y1 in boxes.astype(int):
        pixels[y0:y1, x0:x1] = 255
    return WorkingImage(1, pixels, boxes.astype(np.float32), np.ones(len(boxes), np.int64))


def white_bounds(crop: np.ndarray) -> tuple[int, int, int, int]:
    ys, xs = np.nonzero(crop[..., 0])
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def test_cut_tile_shifts_keeps_mostly_inside_boxes_and_pads() -> None:
    image = painted(np.array([[10, 10, 30, 40], [50, 60, 90, 80], [100, 10, 118, 20]], np.float32))
    crop, boxes, labels = cut_tile(image, 40, 50, 64)  # holds box 2 whole; box 3 is outside; box 1 outside
    assert crop.shape == (64, 64, 3)
    assert boxes.tolist() == [[10, 10, 50, 30]]
    assert labels.tolist() == [1]
    assert crop[50:, :].max() == 0  # rows past the image (100 - 50 = 50) are padding
    # a box with less than half its area inside is dropped, more than half is kept clipped
    image = painted(np.array([[0, 0, 40, 20]], np.float32))
    assert len(cut_tile(image, 25, 0, 64)[1]) == 0  # 15 of 40 px inside
    kept = cut_tile(image, 15, 0, 64)[1]  # 25 of 40 inside
    assert kept.tolist() == [[0, 0, 25, 20]]


@pytest.mark.parametrize("seed", range(8))
def test_flips_and_turns_move_boxes_with_the_pixels(seed: int) -> None:
    image = painted(np.array([[5, 12, 21, 40]], np.float32), size=(64, 64))
    crop, boxes, _ = cut_tile(image, 0, 0, 64)
    flipped, moved = flip_tile(crop, boxes, random.Random(seed))
    assert white_bounds(flipped) == tuple(int(v) for v in moved[0])


def test_origin_puts_the_box_inside_the_tile() -> None:
    rng = random.Random(0)
    for _ in range(50):
        x = _origin(rng, 500, 128, lo=300.0, hi=380.0)
        assert 0 <= x <= 500 - 128 and x <= 300 and x + 128 >= 380
    assert _origin(rng, 100, 128, lo=10, hi=20) == 0  # a tile wider than the image starts at 0
    x = _origin(rng, 1000, 128, lo=100, hi=400)  # a box wider than the tile: the tile is centred on it
    assert x == (250 - 64)


def test_auto_scale_and_overlap() -> None:
    images = [boxed(1, [(0, 0, 128, 64), (0, 0, 100, 128)]), boxed(2, [(10, 10, 138, 50)])]
    assert auto_scale(images, 64) == 0.5  # median longer side 128 -> 64
    assert auto_scale(images, 512) == 1.0  # never upsampled
    overlap = working_overlap(images, scale=0.5, tile=128, least=0.25)
    assert overlap * 128 >= 128 * 0.5  # the largest box (128 px -> 64 working px) fits in the overlap
    with pytest.raises(InputError, match="no boxes"):
        auto_scale([boxed(3, [])], 64)


def test_split_keeps_groups_together_and_needs_two_units() -> None:
    images = [boxed(i, [(0, 0, 5, 5)], group=f"sample{i // 2}") for i in range(10)]
    split = split_images(images, val_share=0.2, seed=0)
    val_groups = {img.group for img in split["val"]}
    assert not val_groups & {img.group for img in split["train"]}
    assert len(split["val"]) + len(split["train"]) == 10
    with pytest.raises(InputError, match="at least 2 images"):
        split_images([boxed(1, [(0, 0, 5, 5)])], val_share=0.2, seed=0)


def test_tiles_are_drawn_from_seed_epoch_and_index() -> None:
    image = painted(np.array([[30, 30, 50, 50], [150, 100, 170, 130]], np.float32), size=(200, 160))
    data = TileDataset([image], tile=64, per_image=4, flips=True, seed=3)
    def draws() -> list[tuple[list[list[float]], float]]:
        return [(data[i][1]["boxes"].tolist(), float(data[i][0].mean())) for i in range(4)]

    first = draws()
    assert first == draws()
    pixels, _ = data[0]
    assert pixels.shape == (3, 64, 64) and pixels.dtype.is_floating_point and float(pixels.max()) <= 1.0
    data.epoch = 1
    assert draws() != first
