"""Batch augmentation on uint8 tensors (torchvision ``transforms.v2`` functional ops).

Each sample in a batch draws its own random parameters; the ops run on uint8 so nothing is
converted to float until normalisation, just before the model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class BasicPolicy:
    """Random resized crop (area share ``crop_scale``..1, aspect 3/4..4/3) and flips."""

    hflip: bool = True
    vflip: bool = False
    crop_scale: float = 0.8

    @classmethod
    def from_config(cls, config: Any) -> BasicPolicy | None:
        if config.policy == "none":
            return None
        return cls(hflip=config.hflip, vflip=config.vflip, crop_scale=config.crop_scale)


def augment_batch(batch: Any, policy: BasicPolicy | None, generator: Any = None) -> Any:
    """(N, 3, H, W) uint8 -> same shape, augmented per sample."""
    import torch
    from torchvision.transforms.v2 import functional as F

    if policy is None:
        return batch
    n, _, h, w = batch.shape
    out = torch.empty_like(batch)
    rand = torch.rand((n, 6), generator=generator)
    for i in range(n):
        img = batch[i]
        if policy.crop_scale < 1.0:
            area = h * w * (policy.crop_scale + (1 - policy.crop_scale) * float(rand[i, 0]))
            ratio = math.exp(math.log(3 / 4) + (math.log(4 / 3) - math.log(3 / 4)) * float(rand[i, 1]))
            cw = min(w, max(1, round(math.sqrt(area * ratio))))
            ch = min(h, max(1, round(math.sqrt(area / ratio))))
            top = int((h - ch) * float(rand[i, 2]))
            left = int((w - cw) * float(rand[i, 3]))
            img = F.resized_crop(img, top, left, ch, cw, [h, w], antialias=True)
        if policy.hflip and rand[i, 4] < 0.5:
            img = F.horizontal_flip(img)
        if policy.vflip and rand[i, 5] < 0.5:
            img = F.vertical_flip(img)
        out[i] = img
    return out


def build_augmenter(config: Any) -> Any:
    """The augmentation a run config asks for, as ``batch -> batch`` (None for ``policy: none``).

    ``basic`` is a random resized crop and flips (``augment.hflip/vflip/crop_scale``); any other name
    is a preset (``thin-section``, ``xray``...) or a policy YAML file (see ``transforms.policy``).
    """
    if config.policy == "none":
        return None
    if config.policy == "basic":
        basic = BasicPolicy.from_config(config)

        def run_basic(batch: Any, generator: Any = None) -> Any:
            return augment_batch(batch, basic, generator)

        return run_basic
    from handlens.transforms.policy import apply_policy, load_policy

    policy = load_policy(config.policy)

    def run_policy(batch: Any, generator: Any = None) -> Any:
        seed = int(torch_randint(generator)) if generator is not None else None
        return apply_policy(batch, policy, seed)

    return run_policy


def torch_randint(generator: Any) -> Any:
    import torch

    return torch.randint(2**31, (1,), generator=generator)
