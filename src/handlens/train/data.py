"""From a catalog split to arrays: which images, which labels, decoded once and cached."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from sqlalchemy import select

from handlens.core.errors import InputError, NotFoundError
from handlens.data.catalog import Catalog, Image, Label, Split
from handlens.data.queries import find_dataset, find_labelset, latest_split
from handlens.data.splits import split_members


@dataclass
class Subset:
    ids: list[int]
    paths: list[str]
    sha256s: list[str]
    targets: np.ndarray  # int64 class indices

    def __len__(self) -> int:
        return len(self.ids)


@dataclass
class SplitData:
    dataset: str
    labelset: str
    split: str
    fold: int
    classes: list[str]
    subsets: dict[str, Subset]
    class_weights: dict[str, float]

    def membership(self) -> dict[str, list[int]]:
        return {name: subset.ids for name, subset in self.subsets.items()}


def load_split_data(catalog: Catalog, dataset_name: str, labelset_name: str | None = None, *,
                    split_name: str | None = None, fold: int = 0) -> SplitData:
    """Images and targets of each subset of a stored split (the newest one unless named)."""
    with catalog.session() as session:
        dataset = find_dataset(session, dataset_name)
        labelset = find_labelset(session, dataset, labelset_name) if labelset_name else None
        if split_name:
            split = session.scalars(
                select(Split).where(Split.dataset_id == dataset.id, Split.name == split_name)).first()
            if split is None:
                raise NotFoundError(f"dataset {dataset_name!r} has no split {split_name!r}; see `handlens datasets`")
        else:
            split = latest_split(session, dataset, labelset)
            if split is None:
                raise NotFoundError(f"dataset {dataset_name!r} has no split yet; run `handlens split {dataset_name}`")
        labelset = split.labelset
        if fold not in {int(f) for f in split.class_weights}:
            raise InputError(f"split {split.name!r} has folds {sorted(split.class_weights)}; "
                             f"data.fold={fold} is not one of them")
        members = split_members(session, split.id, fold)
        rows = session.execute(
            select(Image.id, Image.path, Image.sha256, Label.label)
            .join(Label, Label.image_id == Image.id)
            .where(Label.labelset_id == labelset.id)
        ).all()
        by_id = {row[0]: row for row in rows}
        classes = sorted({row[3] for row in rows})
        index = {c: i for i, c in enumerate(classes)}
        subsets = {}
        for name, ids in members.items():
            kept = [i for i in ids if i in by_id]
            subsets[name] = Subset(ids=kept, paths=[by_id[i][1] for i in kept], sha256s=[by_id[i][2] for i in kept],
                                   targets=np.array([index[by_id[i][3]] for i in kept], dtype=np.int64))
        return SplitData(dataset=dataset.name, labelset=labelset.name, split=split.name, fold=fold,
                         classes=classes, subsets=subsets, class_weights=split.class_weights[str(fold)])


def as_tensor_images(array: np.ndarray) -> Any:
    """(N, H, W, 3) uint8 array -> (N, 3, H, W) contiguous uint8 tensor."""
    import torch

    return torch.from_numpy(np.ascontiguousarray(array.transpose(0, 3, 1, 2)))
