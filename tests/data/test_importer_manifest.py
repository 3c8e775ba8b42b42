"""Hostile manifests: every bad row is a skipped row with its line number, every unreadable file one clear error."""

import codecs
from pathlib import Path

import pytest

from handlens.core.errors import InputError
from handlens.data.imaging import Reason
from handlens.data.importer import import_path, read_manifest
from handlens.data.queries import dataset_summaries
from tests.conftest import write_image


def _images(root: Path, n: int = 3) -> Path:
    for i in range(n):
        write_image(root / f"s{i}.png", i + 1)
    return root


def _nothing_written(catalog) -> bool:
    with catalog.session() as session:
        return dataset_summaries(session) == []


def test_a_row_with_more_fields_than_the_header_is_skipped(tmp_path, catalog):
    root = _images(tmp_path / "t")
    manifest = root / "m.csv"
    manifest.write_text("path,label\ns0.png,a\ns1.png,b,surplus\ns2.png,c\n")
    report = import_path(catalog, manifest, "ds")
    assert report.added == 2
    [skipped] = report.skipped
    assert skipped.reason == Reason.BAD_ROW and skipped.path.endswith("m.csv:3")
    assert "row 3 has 3 fields but the header has 2" in skipped.detail


def test_a_field_over_the_csv_limit_is_a_skipped_row(tmp_path, catalog):
    root = _images(tmp_path / "t")
    manifest = root / "m.csv"
    manifest.write_text(f"path,label\ns0.png,a\ns1.png,{'x' * 200_000}\ns2.png,c\n")
    report = import_path(catalog, manifest, "ds")
    assert report.added == 2
    [skipped] = report.skipped
    assert skipped.reason == Reason.BAD_ROW and "row 3" in skipped.detail and "longer than" in skipped.detail


def test_a_label_longer_than_the_catalog_holds_is_a_skipped_row(tmp_path, catalog):
    root = _images(tmp_path / "t", 2)
    manifest = root / "m.csv"
    manifest.write_text(f"path,label\ns0.png,a\ns1.png,{'y' * 300}\n")
    report = import_path(catalog, manifest, "ds")
    assert report.added == 1 and "at most 200" in report.skipped[0].detail


def test_latin1_manifest_is_one_clear_error_before_anything_is_written(tmp_path, catalog):
    root = _images(tmp_path / "t")
    manifest = root / "m.csv"
    manifest.write_bytes("path,label\ns0.png,calcáire\n".encode("latin-1"))
    with pytest.raises(InputError, match=r"not UTF-8 text.*line 2.*Latin-1.*save it as UTF-8"):
        import_path(catalog, manifest, "ds")
    assert _nothing_written(catalog)


def test_utf16_without_bom_is_named(tmp_path):
    manifest = tmp_path / "m.csv"
    manifest.write_bytes("path,label\ns0.png,a\n".encode("utf-16-le"))
    with pytest.raises(InputError, match=r"UTF-16 without a byte-order mark.*save it as UTF-8"):
        read_manifest(manifest, tmp_path)


@pytest.mark.parametrize("encoding", ["utf-16", "utf-8-sig", "utf-32"])
def test_manifests_with_a_byte_order_mark_are_read(tmp_path, catalog, encoding):
    root = _images(tmp_path / "t", 2)
    manifest = root / "m.csv"
    manifest.write_bytes("path,label\r\ns0.png,calcáire\r\ns1.png,grès\r\n".encode(encoding))
    assert manifest.read_bytes().startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF8, codecs.BOM_UTF32_LE))
    report = import_path(catalog, manifest, "ds")
    assert report.added == 2 and not report.skipped
    assert report.class_counts == {"default": {"calcáire": 1, "grès": 1}}


def test_a_manifest_with_only_a_header_says_so(tmp_path, catalog):
    manifest = tmp_path / "m.csv"
    manifest.write_text("path,label\n")
    with pytest.raises(InputError, match="has a header but no rows"):
        import_path(catalog, manifest, "ds")
    manifest.write_text("")
    with pytest.raises(InputError, match="is empty"):
        import_path(catalog, manifest, "ds")
    assert _nothing_written(catalog)
