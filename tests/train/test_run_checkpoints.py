"""Checkpoints on a full disk: written atomically with the previous one kept, one clear error for a full disk,
and a resume that falls back to the previous checkpoint when the last one is unreadable."""

import errno
import json

import pytest
import torch

from handlens.core.errors import InputError
from handlens.data.catalog import Run, open_catalog
from handlens.models.bundle import DiskFullError
from handlens.train.module import AtomicCheckpointIO
from handlens.train.run import resume_checkpoint, train
from tests.conftest import tiny_config


def _status(ws, run_id):
    catalog = open_catalog(ws.db_url)
    with catalog.session() as session:
        status = session.get(Run, run_id).status
    catalog.close()
    return status


class FullDisk:
    """``open`` for ``handlens.train.checkpoint_files``: the ``fail_at``-th write of a file named ``.<name>...``
    writes half of its data, then fails as a full disk does."""

    def __init__(self, name, fail_at):
        self.name, self.fail_at, self.calls = name, fail_at, 0

    def __call__(self, path, mode="r", *args, **kwargs):
        handle = open(path, mode, *args, **kwargs)  # noqa: SIM115
        if not str(path).rsplit("/", 1)[-1].startswith(f".{self.name}."):
            return handle
        self.calls += 1
        if self.calls < self.fail_at:
            return handle
        real_write = handle.write

        def write(data):
            real_write(bytes(data)[:len(data) // 2])
            raise OSError(errno.ENOSPC, "No space left on device")

        handle.write = write
        return handle


def test_a_full_disk_mid_write_keeps_the_checkpoint_it_would_replace(tmp_path, monkeypatch):
    import handlens.train.checkpoint_files as module

    io = AtomicCheckpointIO()
    last = tmp_path / "last.ckpt"
    io.save_checkpoint({"epoch": 1, "state_dict": {"w": torch.ones(3)}}, last)
    monkeypatch.setattr(module, "open", FullDisk("last.ckpt", 1), raising=False)
    with pytest.raises(OSError, match="No space left"):
        io.save_checkpoint({"epoch": 2, "state_dict": {"w": torch.zeros(3)}}, last)
    assert torch.load(last, weights_only=True)["epoch"] == 1  # whole, not truncated
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]  # no temp file left


def test_each_new_last_checkpoint_keeps_the_previous_one(tmp_path):
    io = AtomicCheckpointIO()
    for epoch in range(3):
        io.save_checkpoint({"epoch": epoch}, tmp_path / "last.ckpt")
        io.save_checkpoint({"epoch": epoch}, tmp_path / "best.ckpt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.ckpt", "last.ckpt", "last.prev.ckpt"]
    assert torch.load(tmp_path / "last.ckpt", weights_only=True)["epoch"] == 2
    assert torch.load(tmp_path / "last.prev.ckpt", weights_only=True)["epoch"] == 1


def test_a_full_disk_during_training_is_one_clear_error_and_the_run_resumes(trained_workspace, monkeypatch):
    import handlens.train.checkpoint_files as module

    monkeypatch.setattr(module, "open", FullDisk("last.ckpt", 2), raising=False)  # epoch 2's checkpoint
    with pytest.raises(DiskFullError, match=r"the disk is full: writing run (\S+)'s checkpoints.*handlens train "
                                            r"--resume") as caught:
        train(tiny_config("train.epochs=3"), trained_workspace)
    run_dir = next(trained_workspace.runs_dir.iterdir())
    assert run_dir.name in str(caught.value)
    checkpoints = run_dir / "checkpoints"
    assert torch.load(checkpoints / "last.ckpt", weights_only=True)["epoch"] == 0  # epoch 1's, whole
    assert not list(checkpoints.glob(".*"))
    assert _status(trained_workspace, run_dir.name) == "failed"
    monkeypatch.undo()  # space freed
    resumed = train(tiny_config(), trained_workspace, resume=run_dir.name)
    assert resumed.epochs == 3 and [h["epoch"] for h in resumed.history] == [1, 2, 3]
    assert _status(trained_workspace, run_dir.name) == "finished"
    assert json.loads((run_dir / "history.json").read_text())[-1]["epoch"] == 3


def _stopped_after_two_epochs(ws):
    """A Lightning run stopped in its third epoch: checkpoints of epochs 1 (previous) and 2 (last)."""

    def stop(record):
        if record["epoch"] == 3:
            raise RuntimeError("stopped")

    with pytest.raises(RuntimeError, match="stopped"):
        train(tiny_config("train.epochs=4"), ws, epoch_hook=stop)
    return next(ws.runs_dir.iterdir())


def test_resume_falls_back_to_the_previous_checkpoint_when_the_last_is_truncated(trained_workspace, capsys):
    run_dir = _stopped_after_two_epochs(trained_workspace)
    last = run_dir / "checkpoints" / "last.ckpt"
    assert torch.load(last.with_name("last.prev.ckpt"), weights_only=True)["epoch"] == 0
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])  # what a full disk left before this fix
    capsys.readouterr()
    resumed = train(tiny_config(), trained_workspace, resume=run_dir.name)
    err = capsys.readouterr().err
    assert "warning: run" in err and "checkpoints/last.ckpt cannot be read: it is truncated" in err
    assert "resuming from last.prev.ckpt" in err
    epochs_trained = [line.split()[1] for line in err.splitlines() if line.startswith("epoch ")]
    assert epochs_trained[0] == "2/4"  # from the previous checkpoint (epoch 1), not from scratch
    assert resumed.epochs == 4 and [h["epoch"] for h in resumed.history] == [1, 2, 3, 4]
    assert _status(trained_workspace, run_dir.name) == "finished"


def test_resume_refuses_clearly_when_no_checkpoint_can_be_read(tmp_path):
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    (folder / "last.ckpt").write_bytes(b"PK\x03\x04 truncated")
    (folder / "last.prev.ckpt").write_bytes(b"")
    with pytest.raises(InputError, match=r"run r1 cannot be resumed: checkpoints/last.ckpt cannot be read: it is "
                                         r"truncated.*last.prev.ckpt cannot be read: it is empty.*Delete"):
        resume_checkpoint(tmp_path, "r1")


def test_resume_without_checkpoints_starts_over_and_sweeps_killed_writes(tmp_path):
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    (folder / ".last.ckpt.abc.tmp").write_bytes(b"half")
    assert resume_checkpoint(tmp_path, "r1") is None
    assert list(folder.iterdir()) == []
