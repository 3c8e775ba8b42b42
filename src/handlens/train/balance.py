"""Class balance for training: oversampling, a weighted sampler, or downsampling, from the run config.

- ``oversample``: repeat the images of smaller classes until each class has ``per_class`` images (default:
  as many as the largest); each repeat is augmented anew, so copies differ.
- ``sampler``: draw each epoch's samples with probability inversely proportional to class frequency
  (``torch.utils.data.WeightedRandomSampler``, with replacement, the epoch keeps its length).
- ``downsample``: keep at most ``per_class`` images of each class (a seeded random choice).

The choice is part of the run config, so it is saved with the run and its bundle.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from handlens.core.errors import InputError


def balanced_indices(targets: np.ndarray, mode: str, per_class: int | None = None, seed: int = 0) -> np.ndarray:
    """Indices into ``targets`` for one epoch's pool of training samples (``oversample``/``downsample``;
    other modes return every index once)."""
    rng = np.random.default_rng(seed)
    all_indices = np.arange(len(targets))
    if mode not in ("oversample", "downsample"):
        return all_indices
    classes, counts = np.unique(targets, return_counts=True)
    if mode == "downsample":
        if not per_class:
            raise InputError("data.balance=downsample needs data.per_class=N")
        kept = [rng.permutation(all_indices[targets == c])[:per_class] for c in classes]
        return np.sort(np.concatenate(kept))
    goal = per_class or int(counts.max())
    parts = []
    for c in classes:
        members = all_indices[targets == c]
        repeats, extra = divmod(goal, len(members)) if len(members) <= goal else (1, 0)
        parts.append(np.concatenate([np.tile(members, repeats), rng.choice(members, extra, replace=False)]))
    return np.sort(np.concatenate(parts))


def sampler_weights(targets: np.ndarray) -> np.ndarray:
    """Per-sample weights 1 / (class count): every class is drawn equally often in expectation."""
    _, inverse, counts = np.unique(targets, return_inverse=True, return_counts=True)
    return (1.0 / counts[inverse]).astype(np.float64)


def weighted_sampler(targets: np.ndarray, generator: Any = None) -> Any:
    import torch

    weights = torch.from_numpy(sampler_weights(targets))
    return torch.utils.data.WeightedRandomSampler(weights, num_samples=len(targets), replacement=True,
                                                  generator=generator)
