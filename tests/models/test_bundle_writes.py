"""Bundle writes on a full disk and after a killed write: a clear error, the previous bundle kept, and the temp
folders of killed writes swept at the next start (never those of a write still running)."""

import errno
import os
import subprocess
import sys
import time

import pytest

from handlens.models.bundle import (
    MANIFEST_FILE,
    STALE_TEMP_SECONDS,
    DiskFullError,
    _host_tag,
    load_bundle,
    scan_bundles,
    sweep_stale_temp,
)

SLOW_WRITER = """
import sys, time
import safetensors.torch as st
real = st.save_file
def slow(state, path, *args, **kwargs):
    real(state, path, *args, **kwargs)
    print("weights written", flush=True)
    time.sleep(120)
st.save_file = slow
from handlens.models.backbones import BACKBONES
from handlens.models.bundle import save_bundle
from handlens.models.classifier import create_classifier
save_bundle(sys.argv[1], create_classifier("tiny_cnn", 3), {"backbone": "tiny_cnn", "classes": ["a", "b", "c"],
            "preprocess": BACKBONES.get("tiny_cnn").preprocess().to_dict()})
"""


def _temps(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".bundle."))


def _dead_pid():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _age(folder, seconds):
    then = time.time() - seconds
    for item in [folder, *folder.iterdir()]:
        os.utime(item, (then, then))


def test_a_killed_write_leaves_a_temp_folder_that_the_next_save_sweeps(tmp_path, write_bundle):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    writer = subprocess.Popen([sys.executable, "-c", SLOW_WRITER, str(run_dir / "bundle")], stdout=subprocess.PIPE,
                              text=True)
    try:
        assert writer.stdout.readline().strip() == "weights written"
        left = _temps(run_dir)
        assert len(left) == 1 and left[0].startswith(f".bundle.tmp-{writer.pid}-")
        write_bundle(tmp_path / "elsewhere")  # another folder's save does not touch it
        sweep_stale_temp(run_dir / "bundle")
        assert _temps(run_dir) == left  # its writer is alive: a write in progress is never swept
    finally:
        writer.kill()
        writer.wait()
    assert _temps(run_dir) == left  # killed mid-write: the temp folder stays behind...
    write_bundle(run_dir / "bundle")
    assert _temps(run_dir) == []  # ...until the next save in that run folder
    assert load_bundle(run_dir / "bundle").classes == ["brick", "grass", "gravel"]


def test_temp_folders_another_host_or_an_older_handlens_wrote_are_swept_only_when_old(tmp_path, write_bundle):
    other_host = tmp_path / f".bundle.tmp-{os.getpid()}-someotherhost-abc"
    legacy = tmp_path / ".bundle.k2j4h5g6"
    dead_here = tmp_path / f".bundle.tmp-{_dead_pid()}-{_host_tag()}-def"
    for folder in (other_host, legacy, dead_here):
        folder.mkdir()
        (folder / "weights.safetensors").write_bytes(b"partial")
    write_bundle(tmp_path / "bundle")
    assert _temps(tmp_path) == sorted([other_host.name, legacy.name])  # young, writer unknown: kept
    _age(other_host, STALE_TEMP_SECONDS + 60)
    _age(legacy, STALE_TEMP_SECONDS + 60)
    write_bundle(tmp_path / "bundle")
    assert _temps(tmp_path) == []


def test_a_write_killed_between_its_two_renames_gets_its_previous_bundle_back(tmp_path, write_bundle):
    runs = tmp_path / "runs"
    write_bundle(runs / "run-a" / "bundle")
    os.replace(runs / "run-a" / "bundle", runs / "run-a" / f".bundle.old-{_dead_pid()}-{_host_tag()}-x")
    entries = scan_bundles(runs)
    assert [(e.model_id, e.damaged) for e in entries] == [("run-a", None)]
    assert (runs / "run-a" / "bundle" / MANIFEST_FILE).is_file() and _temps(runs / "run-a") == []


def test_a_full_disk_while_writing_the_weights_is_one_clear_error_and_keeps_the_old_bundle(
        tmp_path, write_bundle, monkeypatch):
    import safetensors.torch

    path = write_bundle(tmp_path / "bundle", metrics={"version": "old"})

    def full(state, filename, *args, **kwargs):
        with open(filename, "wb") as handle:
            handle.write(b"\0" * 64)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    with pytest.raises(DiskFullError, match=f"the disk is full: writing the model bundle under {tmp_path}.*Free "
                                            "some space"):
        write_bundle(path, metrics={"version": "new"})
    assert load_bundle(path).manifest["metrics"] == {"version": "old"}
    assert _temps(tmp_path) == []


def test_safetensors_own_out_of_space_error_is_a_disk_full_error(tmp_path, write_bundle, monkeypatch):
    import safetensors.torch

    def full(*args, **kwargs):
        raise RuntimeError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: '
                           '"No space left on device" })')

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    with pytest.raises(DiskFullError):
        write_bundle(tmp_path / "bundle")
    assert list(tmp_path.iterdir()) == []
