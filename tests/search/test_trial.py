"""Scoring one trial on the study's folds (handlens.search.trial)."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch

from handlens.search.folds import Fold
from handlens.search.trial import TrialScore, score_logistic
from handlens.train.config import load_config
from handlens.train.fold_heads import FoldData


@pytest.fixture
def blob_folds():
    """Three noisy Gaussian classes, 4 folds: features a logistic head separates only in part."""
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(3), 40)
    x = torch.from_numpy((rng.normal(size=(120, 8)) + y[:, None] * 0.6).astype(np.float32))
    fold_of = rng.permutation(np.arange(120) % 4)
    data = [FoldData(np.flatnonzero(fold_of != k), np.flatnonzero(fold_of == k)) for k in range(4)]
    folds = [Fold(0, k, tuple(d.train_rows.tolist()), tuple(d.val_rows.tolist())) for k, d in enumerate(data)]
    return x, y, data, folds


def _score(blob_folds, **kwargs):
    x, y, data, folds = blob_folds
    cfg = load_config(overrides=["model.head=logistic"])
    return score_logistic(cfg, folds, data, rows=x, plain=x, pool_targets=y, classes=["a", "b", "c"],
                          metric="macro_f1", score=TrialScore(), **kwargs)


def test_logistic_folds_fitted_at_once_score_as_one_by_one(blob_folds):
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        alone = _score(blob_folds)
        torch.set_num_threads(2)
        reported = []
        together = _score(blob_folds, after_fold=lambda step, mean: reported.append(step))
    finally:
        torch.set_num_threads(before)
    assert [f.score for f in together.folds] == [f.score for f in alone.folds]
    assert together.refit_set == alone.refit_set
    assert reported == [0, 1, 2, 3]  # in fold order


def test_a_logistic_trial_pruned_after_its_first_fold_fits_no_fold_not_begun(blob_folds, monkeypatch):
    import handlens.train.fold_heads as fold_heads

    x, _, data, _ = blob_folds
    fitted, real = [], fold_heads.logistic_c_path

    def slow_after_the_first(*args, **kwargs):
        first = torch.equal(args[2], x[data[0].val_rows])  # the first fold's held-out rows
        fitted.append(first)
        if first:  # the first fold is back (and prunes) once the second runs beside it, and while it runs
            deadline = time.time() + 10
            while len(fitted) < 2 and time.time() < deadline:
                time.sleep(0.001)
        else:  # the others end only after the trial was pruned
            pruned.wait(timeout=10)
            time.sleep(0.2)
        return real(*args, **kwargs)

    monkeypatch.setattr(fold_heads, "logistic_c_path", slow_after_the_first)

    pruned = threading.Event()

    def prune(step, mean):
        pruned.set()
        raise RuntimeError("pruned")

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        with pytest.raises(RuntimeError, match="pruned"):
            _score(blob_folds, after_fold=prune)
    finally:
        torch.set_num_threads(before)
    # the first, the one beside it, and the one the first's thread took next; the fourth never began
    assert len(fitted) == 3
