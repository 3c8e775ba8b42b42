"""``detect train``: the detector bundle, its record, a cancelled run resumed without repeating an epoch, and the
errors a user meets first."""

from __future__ import annotations

import json
import shutil

import pytest
from pydantic import ValidationError

from handlens.core.errors import InputError
from handlens.detect.config import DetectTrainConfig
from handlens.detect.train import LAST_FILE, train_detector
from handlens.train.run import RunInterrupted
from tests.conftest import tiny_detector_config


@pytest.fixture
def sigma_copy(sigma_workspace, tmp_path):
    """A private copy of the shared sigma workspace, to train in."""
    from handlens.core.workspace import Workspace

    shutil.copytree(sigma_workspace["workspace"].root, tmp_path / "ws")
    for run in (tmp_path / "ws" / "runs").iterdir():
        shutil.rmtree(run)
    return Workspace.open(tmp_path / "ws")


def test_the_bundle_records_what_it_is_and_what_it_saw(sigma_workspace) -> None:
    manifest = json.loads((sigma_workspace["detector"] / "bundle.json").read_text())
    assert manifest["kind"] == "detector" and manifest["architecture"] == "fcos"
    assert manifest["classes"] == ["sigma-clast"] and manifest["labelset"] == "detection"
    train, val = manifest["split_membership"]["train"], manifest["split_membership"]["val"]
    assert train and val and not set(train) & set(val) and len(train) + len(val) == 3
    assert len(manifest["training_sha256"]) == len(train)
    assert {"map_50", "map", "f1", "precision", "recall"} <= set(manifest["metrics"]["val"])
    assert 0 < manifest["input"]["scale"] <= 1 and manifest["input"]["overlap"] >= 0.25


def test_a_cancelled_run_resumes_without_repeating_an_epoch(sigma_copy) -> None:
    """...and ends with the very weights an uninterrupted run has (tiles, order and optimiser state restored)."""
    from safetensors.torch import load_file

    whole = train_detector(tiny_detector_config(epochs=2), sigma_copy, progress=False)
    asked = []

    def stop_before_second() -> str | None:
        asked.append(1)
        return "cancelled by the user" if len(asked) == 2 else None

    with pytest.raises(RunInterrupted, match="--resume") as stopped:
        train_detector(tiny_detector_config(epochs=2), sigma_copy, progress=False, should_stop=stop_before_second)
    run_id = str(stopped.value).split()[2]
    run_dir = sigma_copy.runs_dir / run_id
    assert (run_dir / LAST_FILE).is_file() and not (run_dir / "bundle").exists()
    result = train_detector(None, sigma_copy, resume=run_id, progress=False)
    assert result.resumed and result.epochs == 2
    epochs = [json.loads(line)["epoch"] for line in (run_dir / "history.jsonl").read_text().splitlines()]
    assert epochs == [1, 2]
    resumed, uninterrupted = (load_file(str(r.bundle / "weights.safetensors")) for r in (result, whole))
    assert all(resumed[k].equal(uninterrupted[k]) for k in uninterrupted)
    with pytest.raises(Exception, match="already finished"):
        train_detector(None, sigma_copy, resume=run_id, progress=False)


def test_a_time_budget_stops_between_epochs(sigma_copy) -> None:
    result = train_detector(tiny_detector_config(epochs=50, max_minutes=0.001), sigma_copy, progress=False)
    assert result.epochs == 1 and "budget" in result.stopped


def test_config_typos_and_impossible_settings_are_refused() -> None:
    with pytest.raises(ValidationError, match="epoch"):
        DetectTrainConfig(dataset="d", epoch=3)
    with pytest.raises(ValidationError, match="multiple of 32"):
        DetectTrainConfig(dataset="d", fpn_channels=48)
    with pytest.raises(ValidationError, match="partial:N"):
        DetectTrainConfig(dataset="d", freeze="half")


def test_a_dataset_without_boxes_says_how_to_add_them(sigma_copy) -> None:
    with pytest.raises(InputError, match="boxes import"):
        train_detector(tiny_detector_config(dataset="sigma-crops-3", labelset=None), sigma_copy, progress=False)
    with pytest.raises(InputError, match="box labelsets are: detection, rotation"):
        train_detector(tiny_detector_config(labelset="detections"), sigma_copy, progress=False)
