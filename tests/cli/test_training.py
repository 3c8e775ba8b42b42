"""CLI contract for training and inference (cli/training.py): last stdout line is the bundle, clear errors, JSON."""

import json
import shutil
from pathlib import Path

from typer.testing import CliRunner

from handlens.cli.app import app

runner = CliRunner()
TINY = ["--backbone", "tiny_cnn", "--weights", "none", "--freeze", "full", "--epochs", "2", "--tracking", "none",
        "train.batch_size=8"]


def cli(ws, *args):
    return runner.invoke(app, ["--workspace", str(ws.root), *args])


def test_train_prints_the_bundle_path_last_then_evaluate_and_predict(trained_workspace, tmp_path):
    result = cli(trained_workspace, "train", "--dataset", "colours", *TINY)
    assert result.exit_code == 0, result.output
    lines = result.stdout.strip().splitlines()
    bundle = lines[-1]
    assert bundle.endswith("/bundle") and (trained_workspace.root / "runs").as_posix() in bundle
    assert any(line.startswith("run:") for line in lines)

    report = json.loads(cli(trained_workspace, "evaluate", bundle, "--split", "test", "--json").stdout)
    assert report["n"] == 12 and set(report["per_class"]) == {"blue", "green", "red"}
    assert len(report["confusion"]) == 3 and report["confusion_png"].endswith(".png")
    assert isinstance(report["top_losses"], list)
    human = cli(trained_workspace, "evaluate", bundle.split("/")[-2]).stdout  # a run id works too
    assert "macro-F1" in human and "Per class" in human

    image = next((tmp_path / "colours" / "red").iterdir())
    notes = tmp_path / "notes.png"
    notes.write_text("not an image")
    out = json.loads(cli(trained_workspace, "predict", bundle, str(image), str(notes), "--top-k", "2",
                         "--json").stdout)
    predictions = out["predictions"]
    assert len(predictions) == 1 and len(predictions[0]["top"]) == 2
    assert abs(sum(predictions[0]["probabilities"].values()) - 1) < 1e-4
    assert out["skipped"][0]["path"] == str(notes) and "not_an_image" in out["skipped"][0]["reason"]
    only_bad = cli(trained_workspace, "predict", bundle, str(notes))
    assert only_bad.exit_code == 2 and "no readable image" in only_bad.output


def test_train_json_is_one_document(trained_workspace):
    result = cli(trained_workspace, "train", "--dataset", "colours", *TINY, "--json", "--name", "colour baseline")
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    assert document["epochs"] == 2 and document["bundle"].endswith("bundle")
    manifest = json.loads((Path(document["bundle"]) / "bundle.json").read_text())
    assert manifest["config"]["tracking"]["name"] == "colour baseline"  # the viewer and the API show it


def test_evaluate_images_folder_with_an_unknown_class_names_it(trained_workspace, tmp_path):
    bundle = cli(trained_workspace, "train", "--dataset", "colours", *TINY).stdout.strip().splitlines()[-1]
    folder = tmp_path / "outside"
    shutil.copytree(tmp_path / "colours" / "red", folder / "red")
    shutil.copytree(tmp_path / "colours" / "blue", folder / "purple")
    result = cli(trained_workspace, "evaluate", bundle, "--images", str(folder))
    assert result.exit_code == 2
    assert "purple" in result.output and "not classes of this model" in result.output
    shutil.rmtree(folder / "purple")
    ok = json.loads(cli(trained_workspace, "evaluate", bundle, "--images", str(folder), "--json").stdout)
    assert ok["n"] == 16 and ok["source"] == str(folder.resolve())
    flat = tmp_path / "flat"
    flat.mkdir()
    shutil.copy(next((folder / "red").iterdir()), flat / "a.png")
    unlabelled = cli(trained_workspace, "evaluate", bundle, "--images", str(flat))
    assert unlabelled.exit_code == 2 and "not in class folders" in unlabelled.output


def test_training_errors_are_clear(trained_workspace):
    bad_backbone = cli(trained_workspace, "train", "--dataset", "colours", "--backbone", "alexnet")
    assert bad_backbone.exit_code == 2 and "choose one of" in bad_backbone.output
    no_dataset = cli(trained_workspace, "train", "--dataset", "nope", *TINY)
    assert no_dataset.exit_code == 3 and "no dataset named 'nope'" in no_dataset.output
    offline = cli(trained_workspace, "train", "--dataset", "colours", "--backbone", "resnet18", "--weights", "packaged")
    assert offline.exit_code == 2 and "no packaged weights ship for resnet18" in offline.output
    missing_run = cli(trained_workspace, "train", "--resume", "no-such-run")
    assert missing_run.exit_code == 3
    bad_override = cli(trained_workspace, "train", "--dataset", "colours", "train.lr=banana")
    assert bad_override.exit_code == 2 and "train.lr" in bad_override.output
    no_bundle = cli(trained_workspace, "predict", "nothing-here", "x.png")
    assert no_bundle.exit_code == 3


def test_lr_find_suggests_a_learning_rate(trained_workspace):
    result = cli(trained_workspace, "lr-find", "--dataset", "colours", "--backbone", "tiny_cnn", "--weights", "none",
                 "--freeze", "full", "--steps", "20", "train.batch_size=4", "--json")
    assert result.exit_code == 0, result.output
    curve = json.loads(result.stdout)
    assert len(curve["lr"]) == len(curve["loss"]) >= 10
    assert curve["lr"] == sorted(curve["lr"])
    assert curve["suggestion"] is None or curve["lr"][0] <= curve["suggestion"] <= curve["lr"][-1]
