"""The augmentation engine draws what running a policy's steps one by one draws, in fewer passes."""

import math
import random

import numpy as np
import pytest
import torch

from handlens.transforms.engine import (
    AugmentingCollate,
    Source,
    augment_float,
    augment_sources,
    pixel_batch,
    split_steps,
)
from handlens.transforms.patches import crop_resize
from handlens.transforms.policy import (
    AUGMENT_OPS,
    GEOMETRIC_DRAWS,
    blur_samples,
    parse_policy,
    symmetry_of,
    warp,
)


def one_by_one(batch: torch.Tensor, policy, seed: int) -> torch.Tensor:
    """The reference: every step by its own batch op, in order, on float pixels; one clamp at the end.
    It consumes the random stream as the engine does, so the same seed draws the same parameters."""
    rng = random.Random(seed)
    out = batch.float()
    for step in policy.image_steps:
        chosen = [i for i in range(out.shape[0]) if rng.random() < step.p]
        if chosen:
            out = AUGMENT_OPS.get(step.op)(out, rng, chosen, **step.params)
    return out.clamp_(0, 255)


def random_images(n: int = 48, size: int = 20, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def smooth_images(n: int = 16, size: int = 32) -> torch.Tensor:
    """Slowly varying pixels: resampling once or twice differs little on them."""
    ys, xs = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    phases = torch.linspace(0, 3, n).view(n, 1, 1, 1)
    waves = torch.stack([torch.sin(3 * xs + 2 * ys), torch.cos(2 * xs - 3 * ys), torch.sin(4 * ys)])
    return ((torch.sin(waves.unsqueeze(0) + phases) + 1) * 127.5).round().to(torch.uint8)


def test_turns_and_flips_are_exact_without_resampling():
    """The eight symmetries of the square, drawn by the engine and folded into the copy, equal what
    resampling each step's matrix gives, pixel for pixel."""
    policy = parse_policy({"steps": [{"op": "rotate", "p": 1.0, "degrees": "right_angles"}, {"op": "hflip", "p": 0.5},
                                     {"op": "vflip", "p": 0.5}]})
    batch = random_images()
    for seed in range(3):
        engine = augment_float(batch, policy, seed)
        assert torch.equal(engine, engine.round()), "a symmetry never interpolates"
        assert (engine - one_by_one(batch, policy, seed)).abs().max() < 0.01
    # and all eight are reached: a marked corner visits every corner, on both sides of the diagonal
    marked = torch.zeros(400, 3, 8, 8, dtype=torch.uint8)
    marked[:, :, 0, 1] = 255
    places = {tuple(torch.nonzero(image[0]).flatten().tolist()) for image in augment_float(marked, policy, 0)}
    assert places == {(0, 1), (1, 0), (0, 6), (6, 0), (1, 7), (7, 1), (6, 7), (7, 6)}


@pytest.mark.parametrize(("op", "params"), [("rotate", {"degrees": "right_angles"}), ("rotate", {"degrees": 180}),
                                          ("hflip", {}), ("vflip", {})])
def test_symmetry_detection_agrees_with_resampling(op, params):
    """Every matrix recognised as a symmetry gives, as a strided view, what resampling through it gives."""
    rng = random.Random(1)
    image = random_images(1, 12)[0]
    found = set()
    for _ in range(40):
        matrix = GEOMETRIC_DRAWS.get(op)(rng, 12, 12, **params)
        symmetry = symmetry_of(matrix, square=True)
        if symmetry is None:
            continue
        found.add(symmetry)
        resampled = warp(image[None].float(), torch.as_tensor(matrix[None, :2]))[0]
        exact = pixel_batch([Source(image.permute(1, 2, 0).numpy())], [symmetry])[0]
        assert (resampled - exact.float()).abs().max() < 0.01, (op, symmetry)
    expected = {"rotate": 4 if params.get("degrees") == "right_angles" else 0, "hflip": 1, "vflip": 1}[op]
    assert len(found) == expected  # all four turns (two of them transposes), each flip; any-angle: none
    assert op != "rotate" or expected == 0 or any(transpose for transpose, _, _ in found)


def test_only_pixels_can_be_augmented():
    with pytest.raises(TypeError, match="uint8 pixels"):
        augment_float(torch.rand(2, 3, 8, 8), parse_policy({"steps": [{"op": "hflip"}]}), 0)


def test_on_a_wide_image_a_half_turn_is_exact_and_a_quarter_turn_is_resampled():
    rng = random.Random(3)
    draws = [GEOMETRIC_DRAWS.get("rotate")(rng, 10, 20, degrees="right_angles") for _ in range(40)]
    quarter = [m for m in draws if abs(m[0, 1]) > 0]
    half = [m for m in draws if m[0, 0] == -1]
    assert quarter and half
    assert all(symmetry_of(m, square=False) is None for m in quarter)  # it would change the image's shape
    assert all(symmetry_of(m, square=False) == (False, True, True) for m in half)
    wide = torch.randint(0, 256, (4, 3, 10, 20), dtype=torch.uint8)
    out = augment_float(wide, parse_policy({"steps": [{"op": "rotate", "p": 1.0, "degrees": "right_angles"}]}), 0)
    assert out.shape == wide.shape


def test_geometric_steps_resample_once():
    """Rotation then translation then zoom: one resampling of the composed matrix, close to three."""
    policy = parse_policy({"steps": [{"op": "rotate", "p": 1.0, "degrees": 10}, {"op": "translate", "p": 1.0,
                                      "fraction": 0.05}, {"op": "resized_crop", "p": 1.0, "scale": [0.8, 1.0],
                                      "ratio": [1.0, 1.0]}]})
    assert split_steps(policy.image_steps)[1:] == ([], [])
    batch = smooth_images()
    engine, steps = augment_float(batch, policy, 5), one_by_one(batch, policy, 5)
    inner = (slice(None), slice(None), slice(4, -4), slice(4, -4))  # borders mirror differently
    assert (engine - steps)[inner].abs().mean() < 2.0
    assert (engine - batch.float())[inner].abs().mean() > 5.0  # it did move the pixels


def test_brightness_contrast_and_blur_fuse_to_the_same_result():
    policy = parse_policy({"steps": [{"op": "hflip", "p": 0.5}, {"op": "brightness", "p": 0.7, "amount": 0.3},
                                     {"op": "contrast", "p": 0.7, "amount": 0.3},
                                     {"op": "blur", "p": 0.5, "sigma": [0.3, 1.2]},
                                     {"op": "brightness", "p": 0.5, "amount": 0.2}]})
    geometric, middle, photometric = split_steps(policy.image_steps)
    assert [s.op for s in geometric] == ["hflip"] and middle == [] and len(photometric) == 4
    batch = random_images(32, 16, seed=2)
    for seed in range(3):
        assert (augment_float(batch, policy, seed) - one_by_one(batch, policy, seed)).abs().max() < 0.01


def test_steps_between_the_runs_run_one_by_one():
    """A geometric step after a colour step cannot join the leading run: it is applied where it stands."""
    policy = parse_policy({"steps": [{"op": "hflip", "p": 0.5}, {"op": "saturation", "p": 0.5},
                                     {"op": "rotate", "p": 0.5, "degrees": "right_angles"},
                                     {"op": "noise", "p": 0.5, "std": 4}, {"op": "contrast", "p": 0.5}]})
    _, middle, photometric = split_steps(policy.image_steps)
    assert [s.op for s in middle] == ["saturation", "rotate", "noise"] and [s.op for s in photometric] == ["contrast"]
    batch = random_images(24, 16, seed=3)
    assert (augment_float(batch, policy, 7) - one_by_one(batch, policy, 7)).abs().max() < 0.05


def test_turns_and_flips_after_a_colour_step_are_still_exact():
    policy = parse_policy({"steps": [{"op": "noise", "p": 0.0}, {"op": "hflip", "p": 0.5},
                                     {"op": "rotate", "p": 1.0, "degrees": "right_angles"}]})
    assert [s.op for s in split_steps(policy.image_steps)[1]] == ["noise", "hflip", "rotate"]
    batch = random_images(16, 10)
    out = augment_float(batch, policy, 4).to(torch.uint8)
    symmetries = [torch.rot90(image.flip(-1) if flip else image, k, (-2, -1)) for image in batch
                  for flip in (False, True) for k in range(4)]
    assert all(any(torch.equal(o, s) for s in symmetries[8 * i:8 * i + 8]) for i, o in enumerate(out))


def test_patches_are_cut_turned_and_flipped_in_one_copy():
    """Patch sources give what cutting the patches first and augmenting the batch gives."""
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (60 + 7 * i, 80, 3), dtype=np.uint8) for i in range(6)]
    boxes = [(3, 5, 40), (10, 0, 24), (0, 20, 60), (7, 7, 24), (1, 2, 50), (30, 40, 33)]
    sources = [Source(image, box, 24) for image, box in zip(images, boxes, strict=True)]
    cut = torch.stack([crop_resize(image, box, 24) for image, box in zip(images, boxes, strict=True)])
    assert torch.equal(pixel_batch(sources), cut)
    policy = parse_policy({"steps": [{"op": "rotate", "p": 1.0, "degrees": "right_angles"},
                                     {"op": "rotate", "p": 0.5, "degrees": 180}, {"op": "vflip", "p": 0.5}]})
    for seed in range(4):
        assert torch.equal(augment_sources(sources, policy, seed), augment_float(cut, policy, seed))


def test_a_batch_of_mixed_sizes_is_refused():
    with pytest.raises(ValueError, match="one size"):
        pixel_batch([Source(np.zeros((8, 8, 3), np.uint8)), Source(np.zeros((9, 9, 3), np.uint8))])


def test_blur_matches_torchvision_per_sample():
    from torchvision.transforms.v2 import functional as F

    batch = random_images(6, 24).float()
    sigmas = [0.3, 1.4, 0.8]
    blurred = blur_samples(batch.clone(), [0, 2, 5], sigmas)
    for i, sigma in zip([0, 2, 5], sigmas, strict=True):
        kernel = 2 * math.ceil(3 * sigma) + 1
        assert (blurred[i] - F.gaussian_blur(batch[i], [kernel, kernel], [sigma, sigma])).abs().max() < 1e-3
    assert torch.equal(blurred[1], batch[1]) and torch.equal(blurred[3], batch[3])  # the others untouched


def test_the_collate_cuts_patches_without_an_augmenter():
    image = np.random.default_rng(1).integers(0, 256, (50, 70, 3), dtype=np.uint8)
    samples = [(Source(image, (5, 9, 30), 16), torch.tensor(2)), (Source(image, (0, 0, 16), 16), torch.tensor(0))]
    images, targets = AugmentingCollate(None)(samples)
    assert images.dtype == torch.uint8 and images.shape == (2, 3, 16, 16) and targets.tolist() == [2, 0]
    assert torch.equal(images[0], crop_resize(image, (5, 9, 30), 16))
