from pathlib import Path

import pytest

from handlens.core.errors import InputError
from handlens.core.workspace import Workspace, resolve_inside


def test_workspace_is_created_with_its_folders(tmp_path: Path):
    ws = Workspace.open(tmp_path / "ws")
    for sub in ("runs", "cache"):
        assert (ws.root / sub).is_dir()
    assert ws.db_url == f"sqlite:///{ws.root / 'handlens.db'}"


def test_workspace_defaults_to_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("HANDLENS_WORKSPACE", str(tmp_path / "from-env"))
    monkeypatch.setenv("HANDLENS_DB_URL", "sqlite:///elsewhere.db")
    ws = Workspace.open()
    assert ws.root == (tmp_path / "from-env").resolve()
    assert ws.db_url == "sqlite:///elsewhere.db"


def test_workspace_that_is_a_file_is_refused(tmp_path: Path):
    target = tmp_path / "file"
    target.write_text("x")
    with pytest.raises(InputError, match="not a directory"):
        Workspace.open(target)


def test_paths_cannot_escape_the_workspace(tmp_path: Path):
    ws = Workspace.open(tmp_path / "ws")
    assert ws.inside("runs/a") == ws.root / "runs" / "a"
    with pytest.raises(InputError, match="outside"):
        ws.inside("../../etc/passwd")
    with pytest.raises(InputError, match="outside"):
        resolve_inside(ws.root, "/etc/passwd")


def test_symlink_out_of_the_workspace_counts_as_outside(tmp_path: Path):
    ws = Workspace.open(tmp_path / "ws")
    (ws.root / "link").symlink_to(tmp_path)
    with pytest.raises(InputError, match="outside"):
        ws.inside("link/secret")
