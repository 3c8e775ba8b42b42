"""Torch datasets of patches cut from cached working images (see ``transforms.patches``)."""

from __future__ import annotations

import random
from collections.abc import Sequence

import numpy as np
import torch

from handlens.transforms.engine import Source
from handlens.transforms.patches import PatchSpec, RoiIntegral, crop_resize, grid_boxes, sample_boxes


class RandomPatchDataset(torch.utils.data.Dataset):
    """``spec.per_image`` random patches of each image in ``order`` per epoch, as (patch source, target).

    A patch is a :class:`~handlens.transforms.engine.Source` (the image and the box to cut): the loader's
    collate function (``engine.AugmentingCollate``) cuts and resizes it, turned and flipped by the
    policy's draws on the way, in the same copy.

    ``order`` lists image indices (repeats allowed: oversampling); item ``i`` is a fresh random patch of
    image ``order[i % len(order)]``, so a shuffled batch mixes images. Draws come from one seeded
    generator: the same seed and sample order give the same patches.
    """

    def __init__(self, images: Sequence[np.ndarray], targets: np.ndarray, spec: PatchSpec, out_size: int, *,
                 rois: Sequence[np.ndarray | None] | None = None, order: np.ndarray | None = None,
                 seed: int = 0) -> None:
        self.images, self.spec, self.out_size = images, spec, out_size
        self.order = np.arange(len(images)) if order is None else np.asarray(order)
        self.targets = torch.from_numpy(np.asarray(targets))
        self.rois = [RoiIntegral(r) if r is not None else None for r in rois] if rois is not None else None
        self.seed = seed
        self.rng = random.Random(seed)
        self._rng_owner: int | None = None

    def __len__(self) -> int:
        return len(self.order) * self.spec.per_image

    def _generator(self) -> random.Random:
        """The draws of this process: each loader worker reseeds from its own seed (else all workers,
        forked with one generator state, would cut the same boxes)."""
        info = torch.utils.data.get_worker_info()
        if info is not None and self._rng_owner != info.id:
            self.rng, self._rng_owner = random.Random(info.seed ^ self.seed), info.id
        return self.rng

    def __getitem__(self, index: int) -> tuple[Source, torch.Tensor]:
        image_index = int(self.order[index % len(self.order)])
        image = self.images[image_index]
        roi = self.rois[image_index] if self.rois is not None else None
        box = sample_boxes(image.shape[0], image.shape[1], self.spec, self._generator(), roi=roi, count=1)[0]
        return Source(image, box, self.out_size), self.targets[image_index]


class GridPatchDataset(torch.utils.data.Dataset):
    """Every grid patch of every image (deterministic), as (uint8 patch, target, image index)."""

    def __init__(self, images: Sequence[np.ndarray], targets: np.ndarray, spec: PatchSpec, out_size: int, *,
                 rois: Sequence[np.ndarray | None] | None = None) -> None:
        self.images, self.out_size = images, out_size
        self.targets = torch.from_numpy(np.asarray(targets))
        self.items: list[tuple[int, tuple[int, int, int]]] = []
        for index, image in enumerate(images):
            roi = rois[index] if rois is not None else None
            integral = RoiIntegral(roi) if roi is not None else None
            self.items += [(index, box) for box in grid_boxes(image.shape[0], image.shape[1], spec, integral)]
        self.n_images = len(images)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        image_index, box = self.items[index]
        return (crop_resize(self.images[image_index], box, self.out_size), self.targets[image_index],
                torch.tensor(image_index))
