"""train(cfg) end to end on tiny synthetic data: bundles, feature cache, NaN guard, resume, tracking."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from handlens.data.catalog import Run, open_catalog
from handlens.models.bundle import load_bundle
from handlens.models.classifier import Classifier
from handlens.train.module import NonFiniteLossError
from handlens.train.run import train
from tests.conftest import tiny_config


def run_statuses(ws) -> list[str]:
    catalog = open_catalog(ws.db_url)
    with catalog.session() as session:
        statuses = [r.status for r in session.query(Run)]
    catalog.close()
    return statuses


def test_train_writes_a_bundle_config_history_and_a_run_record(trained_workspace):
    result = train(tiny_config(), trained_workspace)
    assert result.epochs == 2 and len(result.history) == 2
    # an epoch's training time stops where its validation starts
    assert all(0 < h["train_seconds"] < h["epoch_seconds"] for h in result.history)
    assert {"val", "test"} <= set(result.metrics)
    assert (result.run_dir / "config.yaml").is_file() and (result.run_dir / "checkpoints" / "last.ckpt").is_file()
    assert (result.run_dir / "confusion_test.png").is_file()
    bundle = load_bundle(result.bundle)
    assert bundle.classes == ["blue", "green", "red"]
    manifest = bundle.manifest
    assert manifest["dataset"] == "colours" and manifest["split"] == "split1"
    assert sorted(manifest["split_membership"]) == ["test", "train", "val"]
    assert len(manifest["split_membership"]["train"]) == 24
    catalog = open_catalog(trained_workspace.db_url)
    with catalog.session() as session:
        row = session.get(Run, result.run_id)
        assert row.status == "finished" and row.bundle_path == str(result.bundle)
    catalog.close()


def test_frozen_backbone_features_are_computed_once(trained_workspace, monkeypatch):
    calls = {"n": 0}
    original = Classifier.features

    def counting(self, x):
        calls["n"] += 1
        return original(self, x)

    monkeypatch.setattr(Classifier, "features", counting)
    first = train(tiny_config("model.freeze=frozen", "train.epochs=5"), trained_workspace)
    # batches of FEATURE_BATCH per subset (24 train, 12 val, 12 test images), once, not 5 epochs x batches
    from handlens.train.features import FEATURE_BATCH

    assert calls["n"] == sum(-(-n // FEATURE_BATCH) for n in (24, 12, 12))
    assert first.timings["features"] > 0
    calls["n"] = 0
    again = train(tiny_config("model.freeze=frozen", "train.epochs=3"), trained_workspace)
    assert calls["n"] == 0  # features came from the cache
    assert again.metrics["test"]["n"] == 12
    # the bundle is the full model; its backbone is untouched by training (same seed, same weights)
    one, two = load_bundle(first.bundle).module, load_bundle(again.bundle).module
    for (name, a), b in zip(one.backbone.state_dict().items(), two.backbone.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_frozen_bundle_predicts_like_the_cached_head(trained_workspace):
    result = train(tiny_config("model.freeze=frozen", "train.epochs=8", "train.lr=0.05"), trained_workspace)
    bundle = load_bundle(result.bundle)
    from handlens.train.evaluate import evaluate

    report = evaluate(result.bundle, trained_workspace, subset="test")
    assert report["accuracy"] == pytest.approx(result.metrics["test"]["accuracy"])
    assert bundle.module.pool == "avg"


def test_texture_pooling_trains_and_round_trips(trained_workspace):
    result = train(tiny_config("model.pool=texture", "model.freeze=frozen"), trained_workspace)
    bundle = load_bundle(result.bundle)
    assert bundle.module.pool == "texture"
    assert bundle.module.head[0].in_features == 2 * (32 + 16)  # mean+std of the last two stages


def test_nan_loss_stops_with_a_clear_message(trained_workspace, monkeypatch):
    import handlens.train.module as module

    class Exploding(torch.nn.Module):
        def forward(self, logits, target):
            return torch.nn.functional.cross_entropy(logits, target) * float("nan")

    monkeypatch.setattr(module, "build_loss", lambda *a, **k: Exploding())
    with pytest.raises(NonFiniteLossError, match=r"became nan at epoch 1.*lower the learning rate"):
        train(tiny_config(), trained_workspace)
    assert run_statuses(trained_workspace) == ["failed"]


def test_overfit_batches_sanity_run(trained_workspace):
    result = train(tiny_config("train.overfit_batches=1", "train.epochs=40", "train.lr=0.02",
                               "augment.policy=none", "train.schedule=none"), trained_workspace)
    assert result.history[-1]["train"]["accuracy"] == 1.0
    assert result.verdict.startswith("learns: train loss fell from") and result.to_dict()["verdict"] == result.verdict
    assert train(tiny_config("train.epochs=1"), trained_workspace).verdict == ""  # only a sanity run is judged so


def test_a_model_that_cannot_learn_says_so(trained_workspace):
    frozen_out = train(tiny_config("train.overfit_batches=1", "train.epochs=3", "train.lr=1e-9",
                                   "augment.policy=none", "train.schedule=none"), trained_workspace)
    assert frozen_out.verdict.startswith("does not learn")


SLOW_CLI = """
import sys, time
import handlens.train.module as module
step = module.ClassifierModule.training_step
def slow(self, batch, batch_idx):
    time.sleep(0.15)
    return step(self, batch, batch_idx)
module.ClassifierModule.training_step = slow
from handlens.cli.main import app
app(sys.argv[1:])
"""


def test_a_killed_run_resumes_from_its_last_checkpoint(trained_workspace):
    """SIGKILL mid-run, then `handlens train --resume RUN` ends with the same number of epochs."""
    ws = str(trained_workspace.root)
    args = ["--workspace", ws, "train", "--dataset", "colours", "--backbone", "tiny_cnn", "--weights", "none",
            "--freeze", "full", "--epochs", "6", "--tracking", "none", "train.batch_size=8"]
    proc = subprocess.Popen([sys.executable, "-c", SLOW_CLI, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    runs = trained_workspace.runs_dir
    deadline = time.time() + 120
    history: list = []
    while time.time() < deadline:
        partial = list(runs.glob("*/history.partial.json"))
        if partial:
            try:
                history = json.loads(partial[0].read_text())
            except json.JSONDecodeError:
                history = []
            if len(history) >= 2 and (partial[0].parent / "checkpoints" / "last.ckpt").exists():
                break
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL and 2 <= len(history) < 6
    run_id = partial[0].parent.name
    last = torch.load(runs / run_id / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    killed_at_epoch = last["epoch"] + 1  # epochs completed in the checkpoint
    assert [h["epoch"] for h in last["handlens_history"]] == list(range(1, killed_at_epoch + 1))
    resumed = subprocess.run([sys.executable, "-m", "handlens.cli.main", "--workspace", ws, "train",
                              "--resume", run_id, "--json"], capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    out = json.loads(resumed.stdout)
    assert out["resumed"] and out["epochs"] == 6 and out["run_id"] == run_id
    epochs_run_again = [line for line in resumed.stderr.splitlines() if line.startswith("epoch ")]
    assert epochs_run_again and not epochs_run_again[0].startswith("epoch 1/")  # it did not start over
    first_again = int(epochs_run_again[0].split()[1].split("/")[0])
    assert first_again == killed_at_epoch + 1  # from the last finished epoch, not the best one
    full = json.loads((runs / run_id / "history.json").read_text())
    assert [h["epoch"] for h in full] == [1, 2, 3, 4, 5, 6] and Path(out["bundle"]).is_dir()
    again = subprocess.run([sys.executable, "-m", "handlens.cli.main", "--workspace", ws, "train", "--resume",
                            run_id], capture_output=True, text=True, timeout=120)
    assert again.returncode == 4 and "already finished" in again.stderr


def test_mlflow_tracking_records_params_metrics_and_artifacts(trained_workspace):
    result = train(tiny_config("tracking.backend=mlflow", "tracking.experiment=tests"), trained_workspace)
    assert result.tracking_uri.startswith("sqlite:///") and (trained_workspace.runs_dir / "mlflow.db").is_file()
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=result.tracking_uri)
    run = client.search_runs([client.get_experiment_by_name("tests").experiment_id])[0]
    assert run.info.status == "FINISHED" and run.data.params["model.backbone"] == "tiny_cnn"
    history = client.get_metric_history(run.info.run_id, "val_macro_f1")
    assert sorted(m.step for m in history) == [1, 2]
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"bundle", "confusion_test.png"} <= artifacts
    assert str(trained_workspace.runs_dir.resolve()) in run.info.artifact_uri
    # the run's duration counts feature extraction and decoding, which come before the tracker opens
    timings = run.data.metrics
    assert timings["seconds_total"] >= timings["seconds_decode"] > 0
    assert (run.info.end_time - run.info.start_time) / 1000 >= timings["seconds_total"] - 0.5
    # evaluate adds its metrics to the same run
    from handlens.track import log_evaluation

    assert log_evaluation(trained_workspace.runs_dir, result.bundle, {"accuracy": 0.75, "macro_f1": 0.7},
                          subset="test") == run.info.run_id
    assert client.get_run(run.info.run_id).data.metrics["eval_test_macro_f1"] == 0.7


def test_tensorboard_tracking_writes_event_files(trained_workspace):
    result = train(tiny_config("tracking.backend=tensorboard"), trained_workspace)
    assert list(Path(result.tracking_uri).rglob("events.out.tfevents.*"))


def test_a_run_that_cannot_start_leaves_nothing_behind(trained_workspace):
    from handlens.core.errors import NotFoundError

    with pytest.raises(NotFoundError, match="no dataset named 'missing'"):
        train(tiny_config("data.dataset=missing"), trained_workspace)
    assert list(trained_workspace.runs_dir.iterdir()) == []


def test_ctrl_c_marks_the_run_interrupted_and_says_how_to_resume(trained_workspace, monkeypatch):
    import lightning.pytorch as pl

    from handlens.train.run import RunInterrupted

    def interrupted_fit(self, *args, **kwargs):
        raise SystemExit(1)  # what Lightning does after its graceful Ctrl-C shutdown

    monkeypatch.setattr(pl.Trainer, "fit", interrupted_fit)
    with pytest.raises(RunInterrupted, match=r"handlens train --resume \S+"):
        train(tiny_config(), trained_workspace)
    assert run_statuses(trained_workspace) == ["interrupted"]


def test_same_seed_same_training(trained_workspace):
    one = train(tiny_config("train.seed=3"), trained_workspace)
    two = train(tiny_config("train.seed=3"), trained_workspace)
    assert [h["train_loss"] for h in one.history] == [h["train_loss"] for h in two.history]
    assert one.metrics["test"]["confusion"] == two.metrics["test"]["confusion"]


@pytest.mark.parametrize("options", [
    ("train.optimizer=sgd", "train.schedule=step", "train.step_size=1", "train.warmup_epochs=1"),
    ("train.schedule=plateau", "train.class_weights=[1, 2, 1]"),
    ("train.loss=focal", "train.label_smoothing=0.1", "train.class_weights=none", "train.schedule=none"),
    ("model.freeze=partial:1", "model.head=mlp", "model.dropout=0.2", "train.body_lr_mult=0.1",
     "model.freeze_norm=true"),
])
def test_optimisers_schedules_and_losses_train(trained_workspace, options):
    result = train(tiny_config(*options, "train.epochs=3"), trained_workspace)
    assert result.epochs == 3 and all(np.isfinite(h["train_loss"]) for h in result.history)
    lrs = [h["lr"] for h in result.history]
    if "train.schedule=step" in options:
        assert lrs[-1] < lrs[0]


def test_wrong_number_of_class_weights_is_refused(trained_workspace):
    from handlens.core.errors import InputError

    with pytest.raises(InputError, match="3 classes"):
        train(tiny_config("train.class_weights=[1, 2]"), trained_workspace)


def test_the_saved_config_pins_the_split_so_resume_never_switches(trained_workspace):
    """A newer split made after the run started must not leak into it."""
    from handlens.data.splits import make_split
    from handlens.train.config import load_config

    result = train(tiny_config(), trained_workspace)
    saved = load_config(result.run_dir / "config.yaml")
    assert saved.data.split == "split1" and saved.data.labelset == "default" and saved.preprocess.size == 32
    catalog = open_catalog(trained_workspace.db_url)
    make_split(catalog, "colours", ratios="0.5,0.5", seed=9)
    catalog.close()
    assert load_config(result.run_dir / "config.yaml").data.split == "split1"
    assert not (result.run_dir / "history.partial.json").exists()


def test_last_checkpoint_is_the_latest_epoch_even_when_it_is_not_the_best(trained_workspace):
    result = train(tiny_config("train.epochs=4", "train.lr=0.5"), trained_workspace)  # noisy: best != last
    last = torch.load(result.run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert last["epoch"] == 3  # 0-based: the fourth epoch


def test_the_run_id_is_said_when_the_run_starts(trained_workspace, capsys):
    """Before any epoch: after a kill, the user knows which run to --resume."""
    result = train(tiny_config("train.epochs=1"), trained_workspace)
    err = capsys.readouterr().err
    said = f"run {result.run_id} started: if it stops, `handlens train --resume {result.run_id}` continues it"
    assert said in err and err.index(said) < err.index("epoch 1/1")
