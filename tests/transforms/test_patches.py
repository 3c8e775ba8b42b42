"""Patch sampling never leaves the image, honours the ROI and is deterministic where it must be."""

import random

import numpy as np
import pytest
import torch

from handlens.core.errors import InputError
from handlens.transforms.patches import PatchSpec, RoiIntegral, crop_resize, grid_boxes, mean_by_image, sample_boxes
from handlens.transforms.roi import RoiRule, mask_for_input, threshold_roi


@pytest.mark.parametrize("h,w", [(300, 500), (64, 64), (50, 400), (1000, 120)])
def test_random_patches_never_leave_the_image(h, w):
    spec = PatchSpec(size=96, scale=(0.5, 2.0), per_image=200)
    rng = random.Random(h * w)
    for top, left, side in sample_boxes(h, w, spec, rng):
        assert 1 <= side <= min(h, w) and top >= 0 and top + side <= h and left >= 0 and left + side <= w
    for top, left, side in grid_boxes(h, w, spec):
        assert top >= 0 and top + side <= h and left >= 0 and left + side <= w


def test_random_patches_honour_the_roi():
    mask = np.zeros((300, 600), dtype=bool)
    mask[:, :200] = True  # the specimen is the left third; the rest is empty slide
    spec = PatchSpec(size=64, scale=(1.0, 1.0), per_image=300, min_roi=0.9)
    roi = RoiIntegral(mask)
    boxes = sample_boxes(300, 600, spec, random.Random(0), roi=roi)
    assert all(roi.share(b) >= 0.9 for b in boxes)
    without = sample_boxes(300, 600, spec, random.Random(0))
    assert np.mean([roi.share(b) >= 0.9 for b in without]) < 0.5  # without a ROI most boxes are background


def test_roi_share_is_exact():
    mask = np.zeros((10, 10), dtype=bool)
    mask[:5, :5] = True
    roi = RoiIntegral(mask)
    assert roi.share((0, 0, 5)) == 1.0 and roi.share((0, 0, 10)) == 0.25 and roi.share((5, 5, 5)) == 0.0


def test_grid_is_deterministic_covers_the_image_and_keeps_foreground_only():
    spec = PatchSpec(size=100, grid_max=100)
    boxes = grid_boxes(250, 420, spec)
    assert boxes == grid_boxes(250, 420, spec) and len(boxes) == 3 * 5
    covered = np.zeros((250, 420), dtype=bool)
    for top, left, side in boxes:
        covered[top:top + side, left:left + side] = True
    assert covered.all()
    mask = np.zeros((250, 420), dtype=bool)
    mask[:, :150] = True
    kept = grid_boxes(250, 420, PatchSpec(size=100, grid_max=100, min_roi=0.5), RoiIntegral(mask))
    assert 0 < len(kept) < len(boxes) and all(left < 150 for _, left, _ in kept)
    assert len(grid_boxes(2000, 3000, PatchSpec(size=100, grid_max=7))) == 7


def test_an_empty_roi_still_gives_a_patch():
    empty = RoiIntegral(np.zeros((100, 100), dtype=bool))
    spec = PatchSpec(size=32, min_roi=0.5, per_image=3)
    assert len(sample_boxes(100, 100, spec, random.Random(1), roi=empty)) == 3
    assert len(grid_boxes(100, 100, spec, empty)) == 1


def test_crop_resize_gives_model_sized_uint8():
    image = np.random.default_rng(0).integers(0, 255, (300, 400, 3), dtype=np.uint8)
    patch = crop_resize(image, (10, 20, 150), 64)
    assert patch.shape == (3, 64, 64) and patch.dtype == torch.uint8
    same = crop_resize(image, (10, 20, 64), 64)
    assert torch.equal(same, torch.from_numpy(image[10:74, 20:84]).permute(2, 0, 1))


def test_image_level_prediction_is_the_mean_of_its_patches():
    probs = torch.tensor([[0.9, 0.1], [0.5, 0.5], [0.2, 0.8]])
    out = mean_by_image(probs, torch.tensor([0, 0, 1]), 2)
    assert torch.allclose(out, torch.tensor([[0.7, 0.3], [0.2, 0.8]]))


def test_patch_spec_validates():
    with pytest.raises(InputError, match="scale"):
        PatchSpec(scale=(1.5, 0.5))
    with pytest.raises(InputError, match="min_roi"):
        PatchSpec(min_roi=2.0)
    assert PatchSpec.from_dict(PatchSpec(size=64).to_dict()) == PatchSpec(size=64)


def test_threshold_roi_and_mapping_onto_the_input():
    image = np.zeros((100, 200, 3), dtype=np.uint8)
    image[:, 50:150] = 220  # a bright specimen in the middle
    mask = threshold_roi(image, RoiRule(source="threshold"))
    assert mask[:, 50:150].all() and not mask[:, :50].any()
    assert threshold_roi(image, RoiRule(source="threshold", invert=True))[:, :50].all()
    on_input = mask_for_input(mask, 50, "shorter-crop")  # 100x200 -> 50x100, centre crop 50x50
    assert on_input.shape == (50, 50) and on_input.all()
    assert mask_for_input(mask, 50, "stretch")[:, :10].sum() == 0
