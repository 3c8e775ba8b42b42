"""Cross-validation folds over a split's train+val pool: stratified, grouped when the split is, repeated.

Test images are never in the pool, so no fold can see them. Grouped folds keep every image of one
group (a rock sample, a patient) in one fold: scikit-learn's ``StratifiedGroupKFold``; plain folds are
``StratifiedKFold``; each repeat reshuffles with its own seed.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np

from handlens.core.errors import InputError


@dataclass(frozen=True)
class Fold:
    repeat: int
    index: int
    train_ids: tuple[int, ...]
    val_ids: tuple[int, ...]

    @property
    def name(self) -> str:
        return f"r{self.repeat}f{self.index}"


def check_cv(k: int, targets: np.ndarray, classes: list[str], groups: list[str | None] | None = None) -> None:
    """Refuse a K that the smallest class (or its group count) cannot fill, naming the class."""
    if k < 2:
        raise InputError(f"--cv {k}: cross-validation needs at least 2 folds")
    counts = Counter(int(t) for t in targets)
    for index, name in enumerate(classes):
        if index not in counts:
            continue
        if counts[index] < k:
            raise InputError(f"--cv {k}: class {name!r} has only {counts[index]} images in the train+val pool, "
                             f"fewer than {k} folds; use --cv {max(2, counts[index])} or fewer")
        if groups is not None:  # an image without a group is a group of its own (as cv_folds treats it)
            n_groups = len({g if g is not None else f"__image{i}"
                            for i, (g, t) in enumerate(zip(groups, targets, strict=True)) if int(t) == index})
            if n_groups < k:
                raise InputError(f"--cv {k}: class {name!r} has only {n_groups} groups in the train+val pool "
                                 f"(the split keeps groups together), fewer than {k} folds; use "
                                 f"--cv {max(2, n_groups)} or fewer")


def cv_folds(ids: list[int], targets: np.ndarray, *, k: int, repeats: int = 1, seed: int = 0,
             groups: list[str | None] | None = None, classes: list[str] | None = None) -> list[Fold]:
    """K stratified folds per repeat over ``ids`` (grouped when ``groups`` is given)."""
    from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

    targets = np.asarray(targets)
    if len(ids) != len(targets):
        raise ValueError("ids and targets differ in length")
    check_cv(k, targets, classes or [str(c) for c in range(int(targets.max()) + 1)], groups)
    if repeats < 1:
        raise InputError(f"--repeats {repeats}: give 1 or more")
    ids_array = np.asarray(ids)
    folds: list[Fold] = []
    for repeat in range(repeats):
        if groups is not None:
            labels = [g if g is not None else f"__image{i}" for g, i in zip(groups, ids, strict=True)]
            splitter = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed + repeat)
            parts = splitter.split(ids_array, targets, groups=labels)
        else:
            parts = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed + repeat).split(ids_array, targets)
        for index, (train, val) in enumerate(parts):
            folds.append(Fold(repeat, index, tuple(int(i) for i in ids_array[train]),
                              tuple(int(i) for i in ids_array[val])))
    return folds
