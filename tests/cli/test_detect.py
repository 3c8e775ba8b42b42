"""``handlens detect train`` and ``detect run`` as a user types them; kinds refused where the other is needed."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from typer.testing import CliRunner

from handlens.cli.main import app

runner = CliRunner()


def invoke(ws: Path, *args: str):
    return runner.invoke(app, ["--workspace", str(ws), *args])


def test_detect_train_prints_the_bundle_last(sigma_workspace, tmp_path) -> None:
    ws = tmp_path / "ws"
    shutil.copytree(sigma_workspace["workspace"].root, ws)
    result = invoke(ws, "detect", "train", "--dataset", "sigma-clasts-3", "--labelset", "detection", "--backbone",
                    "tiny_cnn", "--weights", "none", "--freeze", "full", "--epochs", "1", "--tile", "128")
    assert result.exit_code == 0, result.output
    last = result.output.strip().splitlines()[-1]
    assert Path(last, "bundle.json").is_file()
    assert json.loads(Path(last, "bundle.json").read_text())["kind"] == "detector"
    assert "val mAP@0.5" in result.output


def test_detect_train_refuses_a_bad_freeze_and_no_dataset(tmp_path) -> None:
    assert invoke(tmp_path, "detect", "train").exit_code != 0
    result = invoke(tmp_path, "detect", "train", "--dataset", "d", "--freeze", "half")
    assert result.exit_code != 0 and "partial:N" in result.output


def test_detect_run_json_and_files(sigma_workspace, sigma_classifier, tmp_path) -> None:
    ws = sigma_workspace["workspace"].root
    image = sigma_workspace["demo"].report.out / sigma_workspace["demo"].report.images[0]
    out = tmp_path / "out"
    result = invoke(ws, "detect", "run", sigma_workspace["detector_run"], str(image), "--classifier",
                    str(sigma_classifier), "--score", "0", "--out", str(out), "--json")
    assert result.exit_code == 0, result.output
    document = json.loads(result.output)
    assert document["method"] == "gradcam" and document["images"][0]["size"] == [480, 400]
    assert (out / "result.json").is_file() and (out / "sigma_000.overlay.png").is_file()
    text = invoke(ws, "detect", "run", sigma_workspace["detector_run"], str(image))
    assert text.exit_code == 0 and "image(s), score >=" in text.output


def test_each_kind_is_refused_where_the_other_goes(sigma_workspace, sigma_classifier) -> None:
    ws = sigma_workspace["workspace"].root
    image = str(sigma_workspace["demo"].report.out / sigma_workspace["demo"].report.images[0])
    predicted = invoke(ws, "predict", sigma_workspace["detector_run"], image)
    assert predicted.exit_code != 0 and "detector bundle" in predicted.output
    detected = invoke(ws, "detect", "run", str(sigma_classifier), image)
    assert detected.exit_code != 0 and "not a detector" in detected.output
    as_classifier = invoke(ws, "detect", "run", sigma_workspace["detector_run"], image, "--classifier",
                           sigma_workspace["detector_run"])
    assert as_classifier.exit_code != 0 and "detector bundle" in as_classifier.output
    no_classifier = invoke(ws, "detect", "run", sigma_workspace["detector_run"], image, "--method", "gradcam")
    assert no_classifier.exit_code != 0 and "--classifier" in no_classifier.output
