"""Evaluating a frozen-backbone bundle reads the features training stored: only the head runs."""

from __future__ import annotations

import numpy as np

from handlens.models.classifier import Classifier
from handlens.train.evaluate import evaluate
from handlens.train.run import train
from tests.conftest import tiny_config


def test_frozen_evaluate_reuses_stored_features_and_matches_plain_inference(trained_workspace, monkeypatch):
    result = train(tiny_config("model.freeze=frozen", "model.head=linear"), trained_workspace)
    calls = []
    original = Classifier.features
    monkeypatch.setattr(Classifier, "features", lambda self, x: calls.append(len(x)) or original(self, x))
    report = evaluate(result.bundle, trained_workspace, subset="test")
    assert calls == []  # no backbone pass: the test features came from the store
    assert report["macro_f1"] == result.metrics["test"]["macro_f1"]
    # the same figures as running the whole model on the images
    from handlens.train import evaluate as module

    monkeypatch.setattr(module, "_frozen_probs", lambda *args, **kwargs: None)
    plain = evaluate(result.bundle, trained_workspace, subset="test")
    assert sum(calls) == report["n"]  # plain inference runs the backbone on every test image
    assert plain["macro_f1"] == report["macro_f1"]
    assert np.allclose(np.array(plain["confusion"]), np.array(report["confusion"]))
