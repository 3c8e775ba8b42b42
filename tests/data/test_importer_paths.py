"""Where imported files really are: symlinks out of the tree and non-UTF-8 names are skipped with a reason."""

import os
from pathlib import Path

import pytest
from sqlalchemy import select

from handlens.data.catalog import Image as ImageRow
from handlens.data.imaging import Reason, inside_tree
from handlens.data.importer import import_path, scan_folder
from tests.conftest import write_image


def _tree_with_escaping_link(tmp_path: Path) -> tuple[Path, Path]:
    """``tree/a`` holds two images and a symlink to a file outside the tree; ``tree/b`` one image."""
    secret = write_image(tmp_path / "private" / "secret.png", 99)
    root = tmp_path / "tree"
    write_image(root / "a" / "one.png", 1)
    write_image(root / "a" / "two.png", 2)
    write_image(root / "b" / "three.png", 3)
    (root / "a" / "link.png").symlink_to(secret)
    return root, secret


def test_inside_tree_resolves_symlinks(tmp_path):
    root, _ = _tree_with_escaping_link(tmp_path)
    assert inside_tree(root / "a" / "one.png", root)
    assert not inside_tree(root / "a" / "link.png", root)  # the link lies inside, its target does not
    assert not inside_tree(root / ".." / "private" / "secret.png", root)
    (root / "b" / "alias.png").symlink_to(root / "a" / "one.png")
    assert inside_tree(root / "b" / "alias.png", root)
    (root / "loop.png").symlink_to(root / "loop.png")
    assert not inside_tree(root / "loop.png", root)  # a loop resolves nowhere
    assert not inside_tree("a\0b.png", root)


def test_folder_import_refuses_a_symlink_out_of_the_tree(tmp_path, catalog):
    root, secret = _tree_with_escaping_link(tmp_path)
    report = import_path(catalog, root, "ds", workers=1)
    assert report.added == 3
    [skipped] = report.skipped
    assert (Path(skipped.path).name, skipped.reason) == ("link.png", Reason.OUTSIDE_TREE)
    assert str(secret.resolve()) in skipped.detail and "--allow-outside" in skipped.detail
    with catalog.session() as session:
        paths = set(session.scalars(select(ImageRow.path)))
    assert not any("link" in p or "secret" in p for p in paths)
    assert report.root == str(root.resolve())


def test_folder_and_manifest_agree_on_the_same_symlink(tmp_path, catalog):
    root, _ = _tree_with_escaping_link(tmp_path)
    manifest = root / "m.csv"
    manifest.write_text("path,label\na/one.png,a\na/link.png,a\n")
    by_manifest = import_path(catalog, manifest, "m", workers=1)
    by_folder = import_path(catalog, root, "f", workers=1)
    assert [s.reason for s in by_manifest.skipped] == [s.reason for s in by_folder.skipped] == [Reason.OUTSIDE_TREE]


def test_allow_outside_accepts_the_symlink_in_both_modes(tmp_path, catalog):
    root, _ = _tree_with_escaping_link(tmp_path)
    report = import_path(catalog, root, "ds", workers=1, allow_outside=True)
    assert report.added == 4 and not report.skipped
    assert report.root is None  # no folder bounds this dataset's files


def test_a_symlink_inside_the_tree_is_imported(tmp_path):
    root = tmp_path / "tree"
    write_image(root / "a" / "one.png", 1)
    (root / "b").mkdir()
    (root / "b" / "alias.png").symlink_to(root / "a" / "one.png")
    entries, skipped, _ = scan_folder(root)
    assert sorted(Path(e.path).name for e in entries) == ["alias.png", "one.png"] and not skipped


@pytest.mark.skipif(os.name != "posix", reason="file names of arbitrary bytes are a POSIX thing")
def test_a_non_utf8_file_name_is_skipped_and_the_rest_import(tmp_path, catalog):
    root = tmp_path / "tree"
    write_image(root / "a" / "fine.png", 1)
    write_image(root / "b" / "also.png", 2)
    bad = os.fsdecode(bytes(root / "a") + b"/caf\xe9.png")  # Latin-1 'café': not UTF-8
    write_image(Path(bad), 3)
    report = import_path(catalog, root, "ds", workers=1)
    assert report.added == 2
    [skipped] = report.skipped
    assert skipped.reason == Reason.BAD_NAME
    assert skipped.path.endswith("caf\\xe9.png")  # shown escaped, storable as text
    assert "UTF-8" in skipped.detail and "rename" in skipped.detail


def test_dataset_roots_bound_the_files_the_service_may_serve(tmp_path, catalog):
    from handlens.data.catalog import Dataset
    from handlens.data.importer import dataset_roots

    root, _ = _tree_with_escaping_link(tmp_path)
    import_path(catalog, root, "bounded", workers=1)
    import_path(catalog, root, "open", workers=1, allow_outside=True)
    with catalog.session() as session:
        ids = dict(session.execute(select(Dataset.name, Dataset.id)).all())
        assert dataset_roots(session, ids["bounded"]) == [root.resolve()]
        assert dataset_roots(session, ids["open"]) is None
