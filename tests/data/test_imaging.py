"""Every kind of bad file is classified with a reason; every odd-but-valid image decodes."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from handlens.data.imaging import Reason, probe_image
from tests.conftest import write_image


def test_good_png_reports_its_facts(tmp_path: Path):
    path = write_image(tmp_path / "a.png", 1, (50, 30))
    probe = probe_image(str(path))
    assert probe.ok, probe
    assert (probe.width, probe.height, probe.mode, probe.format) == (50, 30, "RGB", "PNG")
    assert probe.bytes == path.stat().st_size
    assert len(probe.sha256) == 64


@pytest.mark.parametrize(
    ("mode", "fmt", "suffix"),
    [
        ("L", "PNG", ".png"),  # grayscale
        ("P", "PNG", ".png"),  # palette
        ("RGBA", "PNG", ".png"),
        ("CMYK", "JPEG", ".jpg"),
        ("CMYK", "TIFF", ".tif"),
        ("RGB", "JPEG", ".jpg"),
        ("RGB", "BMP", ".bmp"),
        ("RGB", "WEBP", ".webp"),
    ],
)
def test_uncommon_modes_import(tmp_path: Path, mode: str, fmt: str, suffix: str):
    path = write_image(tmp_path / f"img{suffix}", 3, (40, 40), mode=mode, fmt=fmt)
    probe = probe_image(str(path))
    assert probe.ok, probe
    assert probe.format == fmt


def test_sixteen_bit_grayscale_imports(tmp_path: Path):
    """X-rays are often 16-bit grayscale PNG or TIFF."""
    ramp = (np.arange(64 * 64, dtype=np.uint16).reshape(64, 64) * 15).astype(np.uint16)
    for name in ("xray.png", "xray.tif"):
        Image.fromarray(ramp).save(tmp_path / name)
        probe = probe_image(str(tmp_path / name))
        assert probe.ok, probe
        assert probe.mode.startswith("I;16") or probe.mode == "I", probe.mode


def test_truncated_jpeg_is_corrupt(tmp_path: Path):
    path = write_image(tmp_path / "full.jpg", 4, (256, 256), fmt="JPEG")
    data = path.read_bytes()
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(data[: len(data) // 2])
    probe = probe_image(str(cut))
    assert not probe.ok
    assert probe.reason == Reason.TRUNCATED


def test_truncated_png_is_corrupt(tmp_path: Path):
    path = write_image(tmp_path / "full.png", 5, (128, 128))
    cut = tmp_path / "cut.png"
    cut.write_bytes(path.read_bytes()[:400])
    probe = probe_image(str(cut))
    assert (probe.ok, probe.reason) == (False, Reason.TRUNCATED)


def test_text_file_with_image_extension_is_not_an_image(tmp_path: Path):
    fake = tmp_path / "notes.png"
    fake.write_text("these are my field notes, not a picture")
    probe = probe_image(str(fake))
    assert (probe.ok, probe.reason) == (False, Reason.NOT_AN_IMAGE)


def test_zero_byte_file(tmp_path: Path):
    empty = tmp_path / "empty.jpg"
    empty.touch()
    assert probe_image(str(empty)).reason == Reason.EMPTY


def test_missing_file(tmp_path: Path):
    assert probe_image(str(tmp_path / "gone.png")).reason == Reason.MISSING


def test_format_pillow_knows_but_we_do_not_support(tmp_path: Path):
    path = tmp_path / "icon.png"  # an ICO behind a .png extension: sniffed by content
    Image.new("RGB", (32, 32), "red").save(path, format="ICO")
    probe = probe_image(str(path))
    assert (probe.ok, probe.reason) == (False, Reason.UNSUPPORTED)
    assert "ICO" in probe.detail


def test_undecodable_domain_format_says_how_to_fix(tmp_path: Path):
    heic = tmp_path / "phone.heic"
    heic.write_bytes(b"\x00\x00\x00\x18ftypheic" + b"\x00" * 64)
    probe = probe_image(str(heic))
    assert probe.reason == Reason.UNSUPPORTED
    assert "convert" in probe.detail


def test_tiny_image_is_too_small(tmp_path: Path):
    path = write_image(tmp_path / "tiny.png", 6, (8, 8))
    probe = probe_image(str(path), min_side=16)
    assert (probe.ok, probe.reason) == (False, Reason.TOO_SMALL)
    assert probe_image(str(path), min_side=8).ok


def test_decompression_bomb_is_refused_from_its_header(tmp_path: Path):
    """A 1-bit 20000x20000 PNG is a few KB on disk but 400 MP once decoded."""
    bomb = tmp_path / "bomb.png"
    Image.new("1", (20000, 20000)).save(bomb, optimize=True)
    assert bomb.stat().st_size < 200_000
    probe = probe_image(str(bomb))
    assert (probe.ok, probe.reason) == (False, Reason.TOO_MANY_PIXELS)
    assert "--max-pixels" in probe.detail


def test_pixel_limit_is_configurable(tmp_path: Path):
    path = write_image(tmp_path / "mid.png", 7, (300, 200))
    assert probe_image(str(path), max_pixels=60_000).ok
    over = probe_image(str(path), max_pixels=59_999)
    assert (over.ok, over.reason) == (False, Reason.TOO_MANY_PIXELS)


def test_probe_restores_pillows_global_limit(tmp_path: Path):
    before = Image.MAX_IMAGE_PIXELS
    probe_image(str(write_image(tmp_path / "a.png", 8)), max_pixels=1234)
    assert before == Image.MAX_IMAGE_PIXELS


def test_exif_rotated_jpeg_reports_its_displayed_size(tmp_path: Path):
    """A phone photo stored 400x200 with orientation 6 is shown 200x400: the catalog records that."""
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "phone.jpg"
    Image.new("RGB", (400, 200), (90, 120, 30)).save(path, exif=exif)
    probe = probe_image(str(path))
    assert probe.ok and (probe.width, probe.height) == (200, 400)
