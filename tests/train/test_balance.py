"""Balancing: oversampling, downsampling and a weighted sampler even out the classes."""

import numpy as np
import pytest
import torch

from handlens.core.errors import InputError
from handlens.train.balance import balanced_indices, sampler_weights, weighted_sampler

TARGETS = np.array([0] * 30 + [1] * 10 + [2] * 3)


def counts(indices: np.ndarray) -> list[int]:
    return np.bincount(TARGETS[indices], minlength=3).tolist()


def test_oversample_brings_every_class_to_the_largest():
    indices = balanced_indices(TARGETS, "oversample", seed=1)
    assert counts(indices) == [30, 30, 30]
    assert set(indices[TARGETS[indices] == 2]) == {40, 41, 42}  # only real images, repeated


def test_oversample_to_a_target_and_downsample_to_n_per_class():
    assert counts(balanced_indices(TARGETS, "oversample", per_class=12)) == [30, 12, 12]
    down = balanced_indices(TARGETS, "downsample", per_class=5, seed=0)
    assert counts(down) == [5, 5, 3] and len(set(down)) == len(down)
    assert not np.array_equal(down, balanced_indices(TARGETS, "downsample", per_class=5, seed=1))
    with pytest.raises(InputError, match="per_class"):
        balanced_indices(TARGETS, "downsample")


def test_the_weighted_sampler_draws_classes_evenly():
    weights = sampler_weights(TARGETS)
    assert weights[0] == pytest.approx(1 / 30) and weights[-1] == pytest.approx(1 / 3)
    sampler = weighted_sampler(np.tile(TARGETS, 100), torch.Generator().manual_seed(0))
    drawn = np.bincount(np.tile(TARGETS, 100)[list(sampler)], minlength=3) / len(sampler)
    assert np.allclose(drawn, 1 / 3, atol=0.03)
