"""Import: bad files are reported and skipped, the rest go in; re-import adds nothing."""

import shutil
from pathlib import Path

import pytest
from PIL import Image
from sqlalchemy import func, select

from handlens.core.errors import InputError
from handlens.data.catalog import Image as ImageRow
from handlens.data.catalog import ImportRecord, Label, Labelset
from handlens.data.imaging import Reason
from handlens.data.importer import import_path, read_manifest, scan_folder
from tests.conftest import write_image


def _bad_tree(root: Path) -> Path:
    """Two good classes plus one of every bad file, spread over the class folders."""
    for i in range(6):
        write_image(root / "limestone" / f"l{i}.png", 100 + i)
        write_image(root / "dolomite" / f"d{i}.jpg", 200 + i, fmt="JPEG")
    good = write_image(root / "dolomite" / "big.jpg", 300, (256, 256), fmt="JPEG")
    (root / "dolomite" / "truncated.jpg").write_bytes(good.read_bytes()[:1500])
    (root / "limestone" / "notes.png").write_text("not an image")
    (root / "limestone" / "empty.tif").touch()
    Image.new("RGB", (32, 32)).save(root / "limestone" / "icon.png", format="ICO")
    write_image(root / "limestone" / "tiny.png", 400, (6, 6))
    Image.new("1", (20000, 20000)).save(root / "dolomite" / "bomb.png")
    (root / "limestone" / "readme.txt").write_text("ignored: not an image extension")
    (root / "limestone" / ".DS_Store").write_bytes(b"\x00\x01")
    write_image(root / "loose.png", 500)  # no class folder
    return root


def test_bad_files_are_reported_with_reasons_and_the_rest_import(tmp_path: Path, catalog):
    root = _bad_tree(tmp_path / "thin")
    report = import_path(catalog, root, "thin", workers=2)
    assert report.added == 13
    reasons = {Path(s.path).name: s.reason for s in report.skipped}
    assert reasons == {
        "truncated.jpg": Reason.TRUNCATED,
        "notes.png": Reason.NOT_AN_IMAGE,
        "empty.tif": Reason.EMPTY,
        "icon.png": Reason.UNSUPPORTED,
        "tiny.png": Reason.TOO_SMALL,
        "bomb.png": Reason.TOO_MANY_PIXELS,
        "loose.png": Reason.UNLABELLED,
    }
    assert all(s.detail for s in report.skipped)
    assert report.ignored_files == 2
    assert report.class_counts == {"default": {"dolomite": 7, "limestone": 6}}
    # the full report, skipped files included, is kept in the catalog
    with catalog.session() as session:
        record = session.scalars(select(ImportRecord)).one()
        assert len(record.report["skipped"]) == 7
        assert record.report["skipped_by_reason"][Reason.TRUNCATED] == 1


def test_image_facts_are_stored(make_tree, catalog):
    root = make_tree({"a": 2}, size=(64, 32))
    import_path(catalog, root, "ds")
    with catalog.session() as session:
        row = session.scalars(select(ImageRow)).first()
        assert (row.width, row.height, row.mode, row.format) == (64, 32, "RGB", "PNG")
        assert Path(row.path).is_absolute() and len(row.sha256) == 64 and row.bytes > 0


def test_reimport_adds_nothing_and_says_so(make_tree, catalog):
    root = make_tree({"a": 3, "b": 3})
    first = import_path(catalog, root, "ds")
    assert first.added == 6 and not first.nothing_new
    again = import_path(catalog, root, "ds")
    assert (again.added, again.unchanged, again.nothing_new) == (0, 6, True)
    with catalog.session() as session:
        assert session.scalar(select(func.count(ImageRow.id))) == 6
        assert session.scalar(select(func.count(Label.id))) == 6


def test_reimport_picks_up_a_changed_file(make_tree, catalog):
    root = make_tree({"a": 2})
    import_path(catalog, root, "ds")
    target = root / "a" / "img_000.png"
    write_image(target, 999, (60, 60))
    report = import_path(catalog, root, "ds")
    assert (report.added, report.updated, report.unchanged) == (0, 1, 1)
    with catalog.session() as session:
        row = session.scalars(select(ImageRow).where(ImageRow.path == str(target.resolve()))).one()
        assert (row.width, row.height) == (60, 60)


def test_duplicates_and_label_conflicts_are_reported(make_tree, catalog):
    root = make_tree({"a": 3, "b": 3})
    shutil.copy(root / "a" / "img_000.png", root / "a" / "copy.png")  # same label: duplicate only
    shutil.copy(root / "a" / "img_001.png", root / "b" / "clash.png")  # different label: conflict
    report = import_path(catalog, root, "ds")
    assert report.added == 8
    assert len(report.duplicates) == 2
    assert len(report.label_conflicts) == 1
    conflict = report.label_conflicts[0]
    assert conflict["labelset"] == "default"
    assert sorted(conflict["labels"].values()) == ["a", "b"]


def test_parallel_and_single_worker_agree(make_tree, tmp_path, catalog):
    from handlens.data.catalog import open_catalog

    root = make_tree({"a": 10, "b": 10})
    (root / "a" / "bad.png").write_text("nope")
    single = import_path(catalog, root, "ds", workers=1)
    other = open_catalog(f"sqlite:///{tmp_path / 'other.db'}")
    parallel = import_path(other, root, "ds", workers=2)
    other.close()
    assert (single.added, len(single.skipped)) == (parallel.added, len(parallel.skipped)) == (20, 1)


def test_missing_path_and_empty_tree_are_clear_errors(tmp_path, catalog):
    with pytest.raises(InputError, match="does not exist"):
        import_path(catalog, tmp_path / "nowhere", "ds")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no images found"):
        import_path(catalog, tmp_path / "empty", "ds")


def test_folder_scan_uses_first_level_folder_as_class(tmp_path):
    write_image(tmp_path / "root" / "class0" / "deep" / "nested" / "x.png", 1)
    entries, skipped, ignored = scan_folder(tmp_path / "root", "scheme")
    assert [e.labels for e in entries] == [{"scheme": "class0"}]
    assert skipped == [] and ignored == 0


# --------------------------------------------------------------------------- CSV manifests


def _manifest(path: Path, rows: list[str]) -> Path:
    path.write_text("\n".join(rows) + "\n")
    return path


def test_csv_with_several_labelsets_and_groups(tmp_path, catalog):
    root = tmp_path / "sections"
    for i in range(4):
        write_image(root / "img" / f"s{i}.png", i + 1)
    manifest = _manifest(root / "labels.csv", [
        "path,label,labelset,group",
        "img/s0.png,grainstone,dunham,core-A",
        "img/s0.png,class1,lucia,core-A",
        "img/s1.png,packstone,dunham,core-A",
        "img/s1.png,class2,lucia,core-A",
        "img/s2.png,grainstone,dunham,core-B",
        "img/s3.png,mudstone,dunham,core-B",
    ])
    report = import_path(catalog, manifest, "sections", labelset="dunham")
    assert report.added == 4 and not report.skipped
    assert report.class_counts == {
        "dunham": {"grainstone": 2, "mudstone": 1, "packstone": 1},
        "lucia": {"class1": 1, "class2": 1},
    }
    with catalog.session() as session:
        groups = dict(session.execute(select(ImageRow.path, ImageRow.group)).all())
        assert groups[str((root / "img" / "s3.png").resolve())] == "core-B"
        assert session.scalar(select(func.count(Labelset.id))) == 2


def test_csv_default_labelset_and_explicit_root(tmp_path, catalog):
    root = tmp_path / "data"
    write_image(root / "x.png", 1)
    manifest = _manifest(tmp_path / "elsewhere.csv", ["path,label", "x.png,rock"])
    report = import_path(catalog, root, "ds", labelset="expert1", csv_file=manifest)
    assert report.class_counts == {"expert1": {"rock": 1}}


def test_csv_row_outside_the_tree_is_refused_unless_allowed(tmp_path, catalog):
    outside = write_image(tmp_path / "secret" / "outside.png", 9)
    root = tmp_path / "tree"
    write_image(root / "inside.png", 10)
    manifest = _manifest(root / "m.csv", ["path,label", "inside.png,a", "../secret/outside.png,b",
                                          f"{outside},b"])
    report = import_path(catalog, manifest, "ds")
    assert report.added == 1
    assert [s.reason for s in report.skipped] == [Reason.OUTSIDE_TREE] * 2  # relative and absolute row
    assert "--allow-outside" in report.skipped[0].detail
    allowed = import_path(catalog, manifest, "ds", allow_outside=True)
    assert allowed.added == 1 and not allowed.skipped  # both rows name one file


def test_csv_problems(tmp_path, catalog):
    root = tmp_path / "t"
    write_image(root / "a.png", 1)
    with pytest.raises(InputError, match="lacks column"):
        import_path(catalog, _manifest(root / "bad.csv", ["file,class", "a.png,x"]), "ds")
    manifest = _manifest(root / "m.csv", ["path,label", "a.png,", "missing.png,x", "a.png,x", "a.png,y"])
    report = import_path(catalog, manifest, "ds")
    assert report.added == 1
    reasons = sorted(s.reason for s in report.skipped)
    assert reasons == sorted([Reason.BAD_ROW, Reason.BAD_ROW, Reason.MISSING])


def test_read_manifest_merges_rows_of_one_path(tmp_path):
    manifest = _manifest(tmp_path / "m.csv", ["path,label,labelset", "a.png,x,s1", "a.png,y,s2"])
    entries, skipped = read_manifest(manifest, tmp_path)
    assert len(entries) == 1 and entries[0].labels == {"s1": "x", "s2": "y"} and not skipped


def test_an_import_that_imports_nothing_leaves_no_empty_dataset(tmp_path, catalog):
    from handlens.data.queries import dataset_summaries

    flat = tmp_path / "flat"
    write_image(flat / "a.png", 1)
    (flat / "broken.jpg").write_bytes(b"nope")
    with pytest.raises(InputError, match=r"nothing imported .*unlabelled"):
        import_path(catalog, flat, "flat")
    with catalog.session() as session:
        assert dataset_summaries(session) == []
