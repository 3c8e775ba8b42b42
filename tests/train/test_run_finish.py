"""The end of a run: a locked catalog, a failing tracker or a full disk after (or while) the bundle is written
never turns a finished run into a failed one or a traceback; the catalog row is reconciled from the run's
files by the next command."""

import errno
import sqlite3

import pytest
from sqlalchemy.exc import OperationalError

import handlens.train.run as run
from handlens.core.errors import ConflictError
from handlens.data.catalog import Run, open_catalog
from handlens.models.bundle import DiskFullError, load_bundle
from handlens.train.module import NonFiniteLossError
from handlens.train.run import reconcile_runs, train
from tests.conftest import tiny_config

FROZEN = ("model.freeze=frozen", "train.epochs=3")  # a head on cached features: the quickest whole run


def _locked(*args, **kwargs):
    raise OperationalError("UPDATE runs SET status=?", {}, sqlite3.OperationalError("database is locked"))


def _row(ws, run_id):
    catalog = open_catalog(ws.db_url)
    with catalog.session() as session:
        row = session.get(Run, run_id)
        found = (row.status, row.bundle_path, row.metrics)
    catalog.close()
    return found


@pytest.fixture
def quick_retries(monkeypatch):
    monkeypatch.setattr(run, "CATALOG_RETRY_DELAYS", (0.0, 0.0, 0.0))


def test_a_catalog_locked_once_at_the_end_is_retried(trained_workspace, monkeypatch, quick_retries):
    real, calls = run._write_run_end, []

    def locked_once(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            _locked()
        return real(*args, **kwargs)

    monkeypatch.setattr(run, "_write_run_end", locked_once)
    result = train(tiny_config(*FROZEN), trained_workspace)
    status, bundle_path, metrics = _row(trained_workspace, result.run_id)
    assert len(calls) == 2 and status == "finished" and bundle_path == str(result.bundle)
    assert metrics["test"]["n"] == 12


def test_a_catalog_locked_for_good_leaves_a_finished_run_that_resume_reconciles(
        trained_workspace, monkeypatch, quick_retries, capsys):
    monkeypatch.setattr(run, "_write_run_end", _locked)
    result = train(tiny_config(*FROZEN), trained_workspace)  # no exception: the run finished
    err = capsys.readouterr().err
    assert f"warning: run {result.run_id} finished (its bundle is {result.bundle}), but the catalog could not " \
           "record it: database is locked" in err
    assert load_bundle(result.bundle).classes == ["blue", "green", "red"]
    assert _row(trained_workspace, result.run_id)[0] == "running"
    monkeypatch.undo()  # the lock is gone
    with pytest.raises(ConflictError, match="already finished"):
        train(tiny_config(), trained_workspace, resume=result.run_id)
    status, bundle_path, metrics = _row(trained_workspace, result.run_id)
    assert status == "finished" and bundle_path == str(result.bundle)
    assert metrics["test"]["n"] == 12 and metrics["best_epoch"] == result.best_epoch


def test_the_next_run_reconciles_a_run_whose_catalog_row_was_lost(trained_workspace, monkeypatch, quick_retries):
    monkeypatch.setattr(run, "_write_run_end", _locked)
    lost = train(tiny_config(*FROZEN), trained_workspace)
    monkeypatch.undo()
    train(tiny_config(*FROZEN), trained_workspace)
    assert _row(trained_workspace, lost.run_id)[:2] == ("finished", str(lost.bundle))


def test_reconcile_leaves_unfinished_runs_alone(trained_workspace, monkeypatch):
    monkeypatch.setattr(run, "_fit_on_features", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("boom")))
    with pytest.raises(RuntimeError, match="boom"):
        train(tiny_config(*FROZEN), trained_workspace)
    run_id = next(trained_workspace.runs_dir.iterdir()).name
    catalog = open_catalog(trained_workspace.db_url)
    assert reconcile_runs(catalog, trained_workspace.runs_dir) == []
    catalog.close()
    assert _row(trained_workspace, run_id)[0] == "failed"


def test_a_failing_tracker_after_the_bundle_does_not_fail_the_run(trained_workspace, monkeypatch, capsys):
    from handlens.track import NoTracker

    monkeypatch.setattr(NoTracker, "log_artifact", _locked)
    result = train(tiny_config(*FROZEN), trained_workspace)
    assert _row(trained_workspace, result.run_id)[0] == "finished"
    assert "logging its bundle and confusion matrices to the none tracker failed: database is locked" in \
        capsys.readouterr().err


def test_a_locked_catalog_never_hides_the_error_that_failed_the_run(trained_workspace, monkeypatch, quick_retries,
                                                                   capsys):
    import torch

    import handlens.train.module as module

    class Exploding(torch.nn.Module):
        def forward(self, logits, target):
            return torch.nn.functional.cross_entropy(logits, target) * float("nan")

    monkeypatch.setattr(module, "build_loss", lambda *a, **k: Exploding())
    monkeypatch.setattr(run, "_write_run_end", _locked)
    with pytest.raises(NonFiniteLossError):
        train(tiny_config("train.epochs=1"), trained_workspace)
    assert "could not record run" in capsys.readouterr().err


def test_a_full_disk_while_writing_the_bundle_fails_the_run_clearly_and_resume_finishes_it(
        trained_workspace, monkeypatch):
    import safetensors.torch

    real = safetensors.torch.save_file

    def full(tensors, filename, *args, **kwargs):
        if filename.endswith("weights.safetensors"):  # the bundle's weights; the feature cache still fits
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(tensors, filename, *args, **kwargs)

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    with pytest.raises(DiskFullError, match=r"writing run \S+'s checkpoints, metrics and bundle.*train --resume"):
        train(tiny_config(*FROZEN), trained_workspace)
    run_dir = next(trained_workspace.runs_dir.iterdir())
    assert _row(trained_workspace, run_dir.name)[0] == "failed"
    assert not (run_dir / "bundle").exists() and not list(run_dir.glob(".bundle.*"))
    monkeypatch.undo()
    resumed = train(tiny_config(), trained_workspace, resume=run_dir.name)
    assert resumed.bundle.is_dir() and _row(trained_workspace, run_dir.name)[0] == "finished"


def test_a_full_disk_in_the_feature_cache_is_one_clear_error(trained_workspace, monkeypatch):
    import handlens.train.features as features

    def full(*args, **kwargs):
        raise RuntimeError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space '
                           'left on device" })')

    monkeypatch.setattr(features, "_write_store", full)
    with pytest.raises(DiskFullError, match="the disk is full: writing the image and feature caches"):
        train(tiny_config(*FROZEN), trained_workspace)
    assert list(trained_workspace.runs_dir.iterdir()) == []


def test_a_catalog_locked_at_the_start_is_a_clear_busy_error(trained_workspace, monkeypatch, quick_retries):
    from handlens.core.errors import BusyError

    monkeypatch.setattr(run, "_write_run_start", _locked)
    with pytest.raises(BusyError, match=r"the catalog cannot record run .*database is locked.*try again"):
        train(tiny_config(*FROZEN), trained_workspace)
    assert list(trained_workspace.runs_dir.iterdir()) == []  # nothing was trained: no run left behind
