"""verify_catalog_file: what the service checks before it serves a catalog image's file."""

import hashlib
import os
from pathlib import Path

import pytest

from handlens.core.errors import ConflictError, NotFoundError
from handlens.data.imaging import (
    CatalogFileChangedError,
    CatalogFileMissingError,
    Reason,
    verify_catalog_file,
)
from tests.conftest import write_image


def _recorded(path: Path) -> dict:
    """What an import records of a file."""
    stat = path.stat()
    return {"sha256": hashlib.sha256(path.read_bytes()).hexdigest(), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def test_an_unchanged_file_inside_its_tree_passes_and_its_real_path_is_returned(tmp_path):
    root = tmp_path / "tree"
    image = write_image(root / "a" / "x.png", 1)
    (root / "b").mkdir()
    link = root / "b" / "alias.png"
    link.symlink_to(image)
    assert verify_catalog_file(image, **_recorded(image), root=root) == image.resolve()
    assert verify_catalog_file(link, **_recorded(image), root=[tmp_path / "other", root]) == image.resolve()
    assert verify_catalog_file(image, sha256=_recorded(image)["sha256"]) == image.resolve()  # hash only


def test_a_symlink_swapped_to_point_outside_the_tree_is_refused(tmp_path):
    root = tmp_path / "tree"
    image = write_image(root / "a" / "x.png", 1)
    link = root / "a" / "link.png"
    link.symlink_to(image)
    recorded = _recorded(image)
    outside = tmp_path / "private.txt"
    outside.write_bytes(image.read_bytes())  # even the same bytes: it is not in the tree
    link.unlink()
    link.symlink_to(outside)
    with pytest.raises(CatalogFileChangedError, match="outside its dataset's folder") as caught:
        verify_catalog_file(link, **recorded, root=root)
    assert caught.value.reason == Reason.OUTSIDE_TREE and isinstance(caught.value, ConflictError)


def test_a_changed_file_is_refused_whether_size_or_only_content_differ(tmp_path):
    image = write_image(tmp_path / "x.png", 1)
    recorded = _recorded(image)
    write_image(image, 2, (60, 60))
    with pytest.raises(CatalogFileChangedError, match="changed since it was imported") as caught:
        verify_catalog_file(image, **recorded)
    assert caught.value.reason == Reason.CHANGED
    same_size = bytearray(image.read_bytes())
    recorded = _recorded(image)
    same_size[-20] ^= 0xFF
    image.write_bytes(bytes(same_size))
    os.utime(image, ns=(recorded["mtime_ns"] + 10**9, recorded["mtime_ns"] + 10**9))
    with pytest.raises(CatalogFileChangedError, match="SHA-256 differs"):
        verify_catalog_file(image, **recorded)


def test_a_missing_file_is_not_found(tmp_path):
    with pytest.raises(CatalogFileMissingError, match="no longer on disk") as caught:
        verify_catalog_file(tmp_path / "gone.png", sha256="0" * 64, size=10)
    assert isinstance(caught.value, NotFoundError) and caught.value.reason == Reason.MISSING
