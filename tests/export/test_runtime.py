"""OnnxPredictor: the bundle's predictions on onnxruntime (same numbers, same contracts), the model cache keyed by
the weights hash outside the bundle, and a session made for a small CPU."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

import handlens.export.onnx as onnx_export
from handlens.export.runtime import OnnxPredictor, available_cores, cache_key, default_cache_dir
from handlens.models.bundle import load_bundle
from handlens.transforms.preprocess import preprocess_image
from tests.conftest import colour_tree, write_image
from tests.export.test_onnx import PATCHES, save_tiny

AUGMENT = {"augment": {"policy": "basic", "hflip": True, "vflip": True}}  # 4 test-time views


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> list[str]:
    root = tmp_path_factory.mktemp("images")
    colour_tree(root, per_class=2, size=40)
    write_image(root / "odd" / "big.png", 9, (150, 110))
    return sorted(str(p) for p in root.rglob("*.png"))


@pytest.fixture(scope="module")
def workspace_bundle(tmp_path_factory) -> Path:
    """A bundle where a workspace keeps it: <ws>/runs/<run>/bundle, beside <ws>/cache."""
    ws = tmp_path_factory.mktemp("ws")
    (ws / "cache").mkdir()
    return save_tiny(ws / "runs" / "run-1" / "bundle", config=AUGMENT)


@pytest.fixture(scope="module")
def predictor(workspace_bundle) -> OnnxPredictor:
    return OnnxPredictor(load_bundle(workspace_bundle), threads=2)


def test_predictions_equal_the_torch_path(predictor, files):
    bundle = predictor.bundle
    arrays = np.stack([preprocess_image(f, bundle.preprocess) for f in files])
    assert np.abs(predictor.predict_arrays(arrays, batch_size=3) - bundle.predict_arrays(arrays)).max() < 1e-6
    assert np.abs(predictor.predict_arrays(arrays, tta=True) - bundle.predict_arrays(arrays, tta=True)).max() < 1e-6
    assert np.abs(predictor.predict_proba(files) - bundle.predict_proba(files)).max() < 1e-6
    assert predictor.predict_arrays(arrays[:0]).shape == (0, 3)
    ours, theirs = predictor.predict(files, top_k=2), bundle.predict(files, top_k=2)
    assert [p.top[0][0] for p in ours] == [p.top[0][0] for p in theirs] and len(ours[0].top) == 2
    assert ours[0].probabilities == pytest.approx(theirs[0].probabilities, abs=1e-5)
    assert predictor.patch_trained is False and predictor.classes == bundle.classes


def test_the_model_is_cached_in_the_workspace_by_weights_hash_never_in_the_bundle(workspace_bundle, predictor,
                                                                                   monkeypatch):
    before = sorted(p.name for p in workspace_bundle.iterdir())
    cached = workspace_bundle.parents[2] / "cache" / "onnx" / cache_key(predictor.bundle, opset=predictor.opset)
    assert predictor.model_path == cached and cached.is_file() and predictor.source == "exported"
    assert cached.name.startswith(predictor.bundle.manifest["weights_sha256"][:24])

    def no_export(*_args, **_kwargs):
        raise AssertionError("exported again")

    monkeypatch.setattr(onnx_export, "to_onnx", no_export)
    again = OnnxPredictor(load_bundle(workspace_bundle))
    assert again.source == "cache" and again.model_path == cached
    assert sorted(p.name for p in workspace_bundle.iterdir()) == before


def test_other_weights_get_another_file_and_a_bundle_outside_a_workspace_uses_the_user_cache(tmp_path, monkeypatch,
                                                                                             workspace_bundle):
    other = load_bundle(save_tiny(tmp_path / "loose" / "bundle", seed=1))
    assert cache_key(other, opset=18) != cache_key(load_bundle(workspace_bundle), opset=18)
    assert cache_key(other, opset=18) != cache_key(other, opset=19)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir(other.path) == tmp_path / "xdg" / "handlens" / "onnx"
    assert default_cache_dir(workspace_bundle) == workspace_bundle.parents[2] / "cache" / "onnx"


def test_an_unwritable_cache_exports_in_memory_and_a_damaged_file_is_exported_again(tmp_path, files):
    bundle = load_bundle(save_tiny(tmp_path / "b" / "bundle", seed=2))
    blocked = tmp_path / "a-file"
    blocked.write_text("not a folder")
    in_memory = OnnxPredictor(bundle, cache_dir=blocked / "onnx")
    assert in_memory.source == "memory" and in_memory.model_path is None
    assert np.abs(in_memory.predict_proba(files) - bundle.predict_proba(files)).max() < 1e-6
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / cache_key(bundle, opset=18)).write_bytes(b"half a model")
    repaired = OnnxPredictor(bundle, cache_dir=cache)
    assert repaired.source == "exported" and (cache / cache_key(bundle, opset=18)).stat().st_size > 1000
    assert np.abs(repaired.predict_proba(files) - bundle.predict_proba(files)).max() < 1e-6


def test_a_patch_trained_model_predicts_from_its_grid_patches(tmp_path, files):
    bundle = load_bundle(save_tiny(tmp_path / "bundle", preprocess={"patches": PATCHES}))
    predictor = OnnxPredictor(bundle, cache_dir=tmp_path / "cache")
    assert predictor.patch_trained
    assert np.abs(predictor.predict_proba(files) - bundle.predict_proba(files)).max() < 1e-6
    from handlens.transforms.preprocess import decode_working

    working = [decode_working(f, bundle.preprocess.working_side) for f in files]
    assert np.abs(predictor.predict_working(working, batch_size=5) - bundle.predict_working(working)).max() < 1e-6


def test_the_session_suits_a_small_cpu(predictor):
    options = predictor.session.get_session_options()
    assert options.intra_op_num_threads == 2 and options.inter_op_num_threads == 1
    assert options.execution_mode == ort.ExecutionMode.ORT_SEQUENTIAL
    assert options.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert predictor.session.get_providers() == ["CPUExecutionProvider"]
    assert predictor.session.get_inputs()[0].shape[0] == "batch"  # micro-batches of any size
    assert [o.name for o in predictor.session.get_outputs()] == ["logits"]
    assert available_cores() >= 1
