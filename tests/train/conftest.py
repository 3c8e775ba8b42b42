"""Fixtures of the train tests."""

import numpy as np
import pytest
import torch


@pytest.fixture
def blobs():
    """``blobs(n_per_class, features, seed, spread)`` -> (features (N, F) float32, int64 labels): one Gaussian
    blob per class, a head can separate them."""

    def make(n_per_class=(30, 30, 30), features=8, seed=0, spread=1.5):
        rng = np.random.default_rng(seed)
        centres = rng.normal(0, 2.0, (len(n_per_class), features))
        x = np.concatenate([centres[c] + rng.normal(0, spread, (n, features)) for c, n in enumerate(n_per_class)])
        y = np.concatenate([np.full(n, c) for c, n in enumerate(n_per_class)]).astype(np.int64)
        return torch.tensor(x, dtype=torch.float32), y

    return make


@pytest.fixture
def stages_trained(monkeypatch):
    """The folds each stacked fit of fit_fold_heads trains, in order (``_StackedFit.run`` watched)."""
    from handlens.train import fold_heads

    trained = []
    real = fold_heads._StackedFit.run

    def spy(self, **kwargs):
        trained.append(list(self.only))
        return real(self, **kwargs)

    monkeypatch.setattr(fold_heads._StackedFit, "run", spy)
    return trained
