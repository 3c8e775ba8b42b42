"""Damaged bundles are refused with a clear error naming the bundle and the reason; a scan of a runs folder
lists every bundle, the damaged ones marked, so one damaged bundle never hides the others."""

import json

import numpy as np
import pytest

from handlens.core.errors import HandlensError, InputError
from handlens.models.bundle import (
    MANIFEST_FILE,
    WEIGHTS_FILE,
    DamagedBundleError,
    load_bundle,
    read_manifest,
    scan_bundles,
)


def _edit_manifest(path, change):
    data = json.loads((path / MANIFEST_FILE).read_text())
    change(data)
    (path / MANIFEST_FILE).write_text(json.dumps(data))


def _set(key, value):
    return lambda data: data.__setitem__(key, value)


def _set_preprocess(key, value):
    return lambda data: data["preprocess"].__setitem__(key, value)


def _drop(key):
    return lambda data: data.pop(key)


MANIFEST_DAMAGE = {
    "metrics as a string": (_set("metrics", "0.9"), "metrics: Input should be a valid dictionary"),
    "no classes": (_drop("classes"), "classes: Field required"),
    "classes empty": (_set("classes", []), "classes: List should have at least 2 items"),
    "classes repeated": (_set("classes", ["a", "a", "b"]), "class names must be unique; repeated: 'a'"),
    "classes not strings": (_set("classes", [1, 2, 3]), "classes.0: Input should be a valid string"),
    "no preprocess": (_drop("preprocess"), "preprocess: Field required"),
    "size 0": (_set_preprocess("size", 0), "preprocess.size: Input should be greater than 0"),
    "size as text": (_set_preprocess("size", "32"), "preprocess.size: Input should be a valid integer"),
    "std zero": (_set_preprocess("std", [0, 0, 0]), "preprocess.std.0: Input should be greater than 0"),
    "mean not finite": (_set_preprocess("mean", [float("nan"), 0, 0]), "preprocess.mean.0: Input should be a finite"),
    "two std values": (_set_preprocess("std", [0.2, 0.2]), "preprocess.std: List should have at least 3 items"),
    "unknown preprocess key": (_set_preprocess("gamma", 2.2), "preprocess.gamma: Extra inputs are not permitted"),
    "no backbone": (_drop("backbone"), "backbone: Field required"),
    "head as a string": (_set("head", "linear"), "head: Input should be a valid dictionary"),
    "split membership of names": (_set("split_membership", {"test": ["a"]}), "split_membership.test.0"),
}


@pytest.mark.parametrize("kind", list(MANIFEST_DAMAGE))
def test_a_damaged_manifest_is_refused_with_the_key_at_fault(tmp_path, write_bundle, kind):
    path = write_bundle(tmp_path / "bundle")
    change, reason = MANIFEST_DAMAGE[kind]
    _edit_manifest(path, change)
    with pytest.raises(DamagedBundleError) as caught:
        load_bundle(path)
    assert reason in caught.value.reason
    message = str(caught.value)
    assert str(path) in message and "is damaged" in message and "train the model again" in message
    assert isinstance(caught.value, InputError) and caught.value.exit_code == 2


@pytest.mark.parametrize(("text", "reason"), [
    ("[1, 2, 3]", "bundle.json holds a JSON list, not an object"),
    ('"a bundle"', "bundle.json holds a JSON str, not an object"),
    ('{"schema_version": 1, "classes": ', "bundle.json is not valid JSON"),
    ("", "bundle.json is empty"),
])
def test_a_manifest_that_is_not_a_json_object_is_refused(tmp_path, write_bundle, text, reason):
    path = write_bundle(tmp_path / "bundle")
    (path / MANIFEST_FILE).write_text(text)
    with pytest.raises(DamagedBundleError, match="is damaged") as caught:
        read_manifest(path)
    assert reason in caught.value.reason


def test_a_newer_schema_says_to_upgrade(tmp_path, write_bundle):
    path = write_bundle(tmp_path / "bundle")
    _edit_manifest(path, _set("schema_version", 2))
    with pytest.raises(DamagedBundleError, match="schema version 2; this handlens reads version 1; upgrade handlens"):
        load_bundle(path)


def test_unknown_top_level_keys_are_kept_for_forward_compatibility(tmp_path, write_bundle):
    path = write_bundle(tmp_path / "bundle", future_key={"anything": [1, 2]})
    bundle = load_bundle(path)
    assert bundle.manifest["future_key"] == {"anything": [1, 2]}
    assert bundle.classes == ["brick", "grass", "gravel"]


def test_a_class_list_that_does_not_match_the_weights_is_refused(tmp_path, write_bundle):
    path = write_bundle(tmp_path / "bundle")
    _edit_manifest(path, _set("classes", ["brick", "grass", "gravel", "sand"]))
    with pytest.raises(DamagedBundleError, match=r"its weights give 3 class outputs but bundle.json lists 4 "
                                                 r"classes \(brick, grass, gravel, sand\)"):
        load_bundle(path)


def test_weights_of_another_architecture_are_refused(tmp_path, write_bundle):
    path = write_bundle(tmp_path / "bundle")
    _edit_manifest(path, _set("head", {"type": "mlp", "hidden": 16, "dropout": 0.0}))
    with pytest.raises(DamagedBundleError, match=r"its weights do not fit the model bundle\.json describes"):
        load_bundle(path)


def test_an_unknown_backbone_is_refused_clearly(tmp_path, write_bundle):
    path = write_bundle(tmp_path / "bundle")
    _edit_manifest(path, _set("backbone", "no_such_net"))
    with pytest.raises(DamagedBundleError, match="its model cannot be built: unknown backbone 'no_such_net'"):
        load_bundle(path)


@pytest.mark.parametrize(("damage", "reason"), [
    ("missing", "its weights file weights.safetensors is missing"),
    ("empty", "its weights file weights.safetensors is empty (0 bytes)"),
    ("truncated", "weights.safetensors cannot be read as safetensors"),
])
def test_missing_empty_or_truncated_weights_are_refused(tmp_path, write_bundle, damage, reason):
    path = write_bundle(tmp_path / "bundle")
    weights = path / WEIGHTS_FILE
    if damage == "missing":
        weights.unlink()
    elif damage == "empty":
        weights.write_bytes(b"")
    else:
        weights.write_bytes(weights.read_bytes()[:100])
        _edit_manifest(path, _drop("weights_sha256"))  # no checksum to catch it first
    with pytest.raises(DamagedBundleError) as caught:
        load_bundle(path)
    assert reason in caught.value.reason


def test_scanning_a_runs_folder_lists_every_bundle_and_marks_the_damaged(tmp_path, write_bundle):
    runs = tmp_path / "runs"
    good = write_bundle(runs / "run-a" / "bundle")
    write_bundle(runs / "run-b" / "bundle")
    (runs / "run-b" / "bundle" / MANIFEST_FILE).write_text("[]")
    write_bundle(runs / "run-c" / "bundle")
    _edit_manifest(runs / "run-c" / "bundle", _set("metrics", "high"))
    write_bundle(runs / "run-d" / "bundle")
    (runs / "run-d" / "bundle" / WEIGHTS_FILE).unlink()
    write_bundle(runs / "run-e" / "bundle")
    _edit_manifest(runs / "run-e" / "bundle", _set_preprocess("std", [0, 0, 0]))
    (runs / "run-f").mkdir()  # a run still training: no bundle yet, not a model
    (runs / "mlflow.db").write_text("")

    entries = scan_bundles(runs)
    assert [e.model_id for e in entries] == ["run-a", "run-b", "run-c", "run-d", "run-e"]
    by_id = {e.model_id: e for e in entries}
    assert by_id["run-a"].damaged is None and by_id["run-a"].manifest.classes == ["brick", "grass", "gravel"]
    assert by_id["run-a"].path == good
    assert "holds a JSON list" in by_id["run-b"].damaged
    assert "metrics" in by_id["run-c"].damaged
    assert "weights.safetensors is missing" in by_id["run-d"].damaged
    assert "preprocess.std" in by_id["run-e"].damaged
    assert all(by_id[i].manifest is None for i in ("run-b", "run-c", "run-d", "run-e"))
    assert load_bundle(good).predict_proba([np.zeros((40, 40, 3), dtype=np.uint8)]).shape == (1, 3)


def test_scanning_a_missing_runs_folder_lists_nothing(tmp_path):
    assert scan_bundles(tmp_path / "nowhere") == []


def test_damaged_bundle_errors_are_handlens_errors(tmp_path):
    error = DamagedBundleError(tmp_path, "its weights file weights.safetensors is missing")
    assert isinstance(error, HandlensError) and error.bundle == tmp_path


def test_the_preprocess_manifest_knows_every_preprocess_setting():
    """It refuses unknown preprocess keys: each setting Preprocess saves must be one it accepts."""
    from dataclasses import fields

    from handlens.models.bundle import PreprocessManifest
    from handlens.transforms.preprocess import Preprocess

    assert set(PreprocessManifest.model_fields) == {f.name for f in fields(Preprocess)}

