"""The model pool's listing: every bundle of the runs folder, damaged ones marked with the reason (one damaged
bundle never hides the others), and a damaged model's manifest refused with a clear error."""

import json

import numpy as np
import pytest
import torch

from handlens.core.errors import NotFoundError
from handlens.models.backbones import BACKBONES
from handlens.models.bundle import DamagedBundleError, save_bundle
from handlens.models.classifier import create_classifier
from handlens.serve.pool import ModelPool


def _save(runs, run_id):
    torch.manual_seed(0)
    manifest = {"backbone": "tiny_cnn", "classes": ["blue", "green", "red"], "run_id": run_id, "freeze": "full",
                "head": {"type": "linear"}, "preprocess": BACKBONES.get("tiny_cnn").preprocess().to_dict(),
                "metrics": {"test": {"accuracy": 1.0}}}
    return save_bundle(runs / run_id / "bundle", create_classifier("tiny_cnn", 3).eval(), manifest)


def _pool(tmp_path):
    runs = tmp_path / "runs"
    _save(runs, "run-good")
    (_save(runs, "run-list") / "bundle.json").write_text("[1, 2]")
    metrics = _save(runs, "run-metrics") / "bundle.json"
    metrics.write_text(json.dumps({**json.loads(metrics.read_text()), "metrics": "0.93"}))
    (_save(runs, "run-noweights") / "weights.safetensors").unlink()
    return ModelPool(runs, memory_mb=100, batch_size=4, max_wait_ms=1)


def test_manifests_list_damaged_bundles_beside_the_good_one(tmp_path):
    entries = _pool(tmp_path).manifests()
    assert [(e.model_id, e.damaged is None) for e in entries] == [
        ("run-good", True), ("run-list", False), ("run-metrics", False), ("run-noweights", False)]
    good = entries[0].manifest
    assert good.classes == ["blue", "green", "red"] and good.metrics == {"test": {"accuracy": 1.0}}
    assert good.model_dump(mode="json")["run_id"] == "run-good"  # what a route summarises, extra keys included
    reasons = {e.model_id: e.damaged for e in entries[1:]}
    assert "JSON list" in reasons["run-list"] and "metrics" in reasons["run-metrics"]
    assert "weights.safetensors is missing" in reasons["run-noweights"]
    assert all("/" not in reason for reason in reasons.values())  # reasons name no server paths


def test_a_damaged_model_manifest_is_a_clear_error_and_the_good_one_serves(tmp_path):
    pool = _pool(tmp_path)
    for model_id in ("run-list", "run-metrics", "run-noweights"):
        with pytest.raises(DamagedBundleError, match=f"^model {model_id} is damaged: "):  # named by its id
            pool.manifest(model_id)
        with pytest.raises(DamagedBundleError):
            pool.get(model_id)
    assert pool.manifest("run-good")["classes"] == ["blue", "green", "red"]
    loaded = pool.get("run-good")
    assert loaded.predict([np.zeros((32, 32, 3), dtype=np.uint8)]).shape == (1, 3)
    with pytest.raises(NotFoundError):
        pool.manifest("run-missing")
