"""See what the network sees: a sample of images beside their augmented versions, computed apart from drawing.

``augment_preview`` samples images, decodes them at the input size and augments them with a policy
exactly as a run with ``augment.policy=<name>`` would (the run config's defaults for ``basic``: random
resized crop down to 0.8 of the area and horizontal flips). A policy that trains on patches (its
recommended ``preprocess.patches.enabled``) shows the patches the network gets. Drawing the pairs is the
caller's (``AugmentPreview.panels`` feeds ``handlens.explain.render.grid``).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from handlens.core.errors import InputError
from handlens.transforms.policy import Policy

#: an augmented sample whose pixels vary less than this (std, 0..255) is nearly uniform: blank or black
UNIFORM_STD = 2.0


class PreviewSource(Protocol):
    """An image to preview: where it is, its SHA-256 (the decode cache's key) and its label (a panel title)."""

    @property
    def path(self) -> str: ...

    @property
    def sha256(self) -> str: ...

    @property
    def label(self) -> str: ...


@dataclass(frozen=True)
class AugmentPreview:
    """The sampled images (``picks``), their originals and augmented versions as (N, S, S, 3) uint8 arrays."""

    policy: str
    picks: list[PreviewSource]
    originals: np.ndarray
    augmented: np.ndarray

    @property
    def nearly_uniform(self) -> list[str]:
        """Paths whose augmented sample is nearly uniform (an all-black or blank patch?)."""
        return [p.path for p, a in zip(self.picks, self.augmented, strict=True) if float(a.std()) < UNIFORM_STD]

    def panels(self) -> tuple[list[np.ndarray], list[str]]:
        """Each original followed by its augmented version, with titles: the label, then label (policy)."""
        panels: list[np.ndarray] = []
        titles: list[str] = []
        for pick, before, after in zip(self.picks, self.originals, self.augmented, strict=True):
            panels += [before, np.ascontiguousarray(after)]
            titles += [pick.label, f"{pick.label} ({self.policy})"]
        return panels, titles


def preview_policy(name: str) -> Policy | None:
    """The policy a run with ``augment.policy=name`` augments with (None for ``none``); ``basic`` and ``auto``
    are the basic policy at the run config's defaults. An unknown name is an InputError listing the presets."""
    from handlens.transforms.augment import basic_policy
    from handlens.transforms.policy import load_policy

    if name == "none":
        return None
    if name in ("basic", "auto"):
        return basic_policy()
    return load_policy(name)


def augment_preview(sources: Sequence[PreviewSource], *, policy: str = "basic", n: int = 16, size: int = 224,
                    seed: int = 0, cache_dir: Path | None = None) -> AugmentPreview:
    """``n`` of ``sources`` (a seeded sample) decoded at ``size`` and augmented with ``policy``; the same seed
    gives the same picks and the same augmentations. ``cache_dir``: the workspace's decode cache."""
    import torch

    from handlens.transforms.augment import PolicyAugmenter
    from handlens.transforms.cache import decode_many
    from handlens.transforms.preprocess import Preprocess

    chosen = preview_policy(policy)  # before any decoding: an unknown policy fails fast
    if not sources:
        raise InputError("no images to preview: import some with `handlens import`")
    picks = random.Random(seed).sample(list(sources), min(n, len(sources)))
    originals = decode_many([p.path for p in picks], Preprocess(size=size), sha256s=[p.sha256 for p in picks],
                            cache_dir=cache_dir)
    recommended = (chosen.preprocess if chosen is not None else {}).get("patches", {})
    if recommended.get("enabled"):  # the policy trains on patches: show the patches the network gets
        batch = _patches(picks, recommended, size=size, seed=seed, cache_dir=cache_dir)
    else:
        batch = torch.from_numpy(originals).permute(0, 3, 1, 2).contiguous()
    if chosen is not None and chosen.image_steps:
        generator = torch.Generator().manual_seed(seed)
        batch = PolicyAugmenter(chosen.without_label_maps())(batch, generator=generator).round().to(torch.uint8)
    augmented = np.ascontiguousarray(batch.permute(0, 2, 3, 1).numpy())
    return AugmentPreview(policy=policy, picks=picks, originals=originals, augmented=augmented)


def _patches(picks: list[PreviewSource], recommended: dict[str, Any], *, size: int, seed: int,
             cache_dir: Path | None) -> Any:
    """One random patch per image, cut from its working image as patch training samples them, at ``size``."""
    import torch

    from handlens.transforms.cache import decode_working_many
    from handlens.transforms.patches import PatchSpec, crop_resize, sample_boxes

    spec = PatchSpec.from_dict({k: v for k, v in recommended.items() if k != "enabled"})
    working = decode_working_many([p.path for p in picks], spec.max_side, [], sha256s=[p.sha256 for p in picks],
                                  cache_dir=cache_dir)
    rng = random.Random(seed)
    return torch.stack([crop_resize(w, sample_boxes(w.shape[0], w.shape[1], spec, rng, count=1)[0], size)
                        for w in working])
