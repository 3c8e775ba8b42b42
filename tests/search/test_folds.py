"""CV folds: stratified, grouped, repeated; K checked against the smallest class and its groups."""

from __future__ import annotations

import numpy as np
import pytest

from handlens.core.errors import InputError
from handlens.search.folds import cv_folds


def test_folds_partition_the_pool_and_stratify() -> None:
    ids = list(range(100, 160))
    targets = np.array([0] * 30 + [1] * 20 + [2] * 10)
    folds = cv_folds(ids, targets, k=5, repeats=2, seed=3)
    assert len(folds) == 10
    for repeat in (0, 1):
        mine = [f for f in folds if f.repeat == repeat]
        vals = [i for f in mine for i in f.val_ids]
        assert sorted(vals) == ids  # every pool image validates exactly once per repeat
        for f in mine:
            assert not set(f.train_ids) & set(f.val_ids)
            assert set(f.train_ids) | set(f.val_ids) == set(ids)
            val_targets = targets[[ids.index(i) for i in f.val_ids]]
            assert np.bincount(val_targets).tolist() == [6, 4, 2]
    assert folds[0].val_ids != folds[5].val_ids  # a repeat reshuffles


def test_grouped_folds_keep_groups_together() -> None:
    ids = list(range(40))
    targets = np.array([i % 2 for i in ids])
    groups = [f"c{t}g{i // 8}" for i, t in zip(ids, targets, strict=True)]
    folds = cv_folds(ids, targets, k=3, groups=groups)
    for f in folds:
        train_groups = {groups[i] for i in f.train_ids}
        val_groups = {groups[i] for i in f.val_ids}
        assert not train_groups & val_groups


def test_k_larger_than_smallest_class_or_its_groups_is_refused() -> None:
    targets = np.array([0] * 10 + [1] * 3)
    with pytest.raises(InputError, match=r"class 'rare' has only 3 images.*--cv 3"):
        cv_folds(list(range(13)), targets, k=4, classes=["common", "rare"])
    groups = [f"a{i % 5}" for i in range(10)] + ["b0", "b0", "b1"]
    with pytest.raises(InputError, match=r"class 'rare' has only 2 groups.*--cv 2"):
        cv_folds(list(range(13)), targets, k=3, classes=["common", "rare"], groups=groups)
