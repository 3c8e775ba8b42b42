"""EXIF orientation: every decode shows a phone photo upright, as a browser does, and no cache serves it sideways."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from handlens.transforms.cache import decode_many, decoded_key
from handlens.transforms.preprocess import Preprocess, decode_working, load_rgb, preprocess_image

RED, BLUE = (255, 0, 0), (0, 0, 255)


def _phone_photo(path: Path, orientation: int = 6) -> Path:
    """Stored 400x200, blue with a red top-left corner, tagged to be shown rotated 90 degrees clockwise."""
    pixels = np.zeros((200, 400, 3), dtype=np.uint8)
    pixels[:] = BLUE
    pixels[:50, :50] = RED
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(pixels).save(path, exif=exif, quality=95)
    return path


def _close(pixel, colour) -> bool:
    return all(abs(int(a) - b) < 40 for a, b in zip(pixel, colour, strict=True))


def test_load_rgb_applies_the_exif_orientation(tmp_path):
    img = load_rgb(_phone_photo(tmp_path / "p.jpg"))
    assert img.size == (200, 400)
    assert _close(img.getpixel((190, 10)), RED)  # the stored top-left is shown top-right
    assert _close(img.getpixel((10, 10)), BLUE)


def test_an_open_pil_image_is_turned_too(tmp_path):
    """Uploads reach load_rgb as an opened PIL image."""
    with Image.open(_phone_photo(tmp_path / "p.jpg")) as opened:
        assert load_rgb(opened).size == (200, 400)


@pytest.mark.parametrize(("orientation", "size"), [(1, (400, 200)), (3, (400, 200)), (8, (200, 400))])
def test_other_orientations(tmp_path, orientation, size):
    assert load_rgb(_phone_photo(tmp_path / "p.jpg", orientation)).size == size


def test_model_input_and_working_image_are_upright(tmp_path):
    path = _phone_photo(tmp_path / "p.jpg")
    assert decode_working(str(path), 0).shape == (400, 200, 3)
    stretched = preprocess_image(str(path), Preprocess(size=40, resize="stretch"))
    assert _close(stretched[2, 37], RED) and _close(stretched[2, 2], BLUE)


def test_the_decode_cache_does_not_serve_decodes_made_before_orientation_was_applied(tmp_path):
    """A cache entry under the old key (the preprocessing's own key) holds the sideways decode."""
    path = _phone_photo(tmp_path / "p.jpg")
    preprocess, sha = Preprocess(size=32, resize="stretch"), "ab" * 32
    stale = tmp_path / "cache" / "decoded" / preprocess.key() / sha[:2] / f"{sha}.npy"
    stale.parent.mkdir(parents=True)
    np.save(stale, np.zeros((32, 32, 3), dtype=np.uint8))
    fresh = decode_many([str(path)], preprocess, sha256s=[sha], cache_dir=tmp_path / "cache", workers=1)
    assert fresh.max() > 0 and _close(fresh[0, 1, 30], RED)
    assert decoded_key(preprocess) != preprocess.key()
