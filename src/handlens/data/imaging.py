"""Safe probing of image files: hash, decode, classify what is wrong.

``probe_image`` never raises for a bad file: it returns a :class:`Probe` with a reason. It runs in
worker processes during import, so it is a plain top-level function over plain data.
"""

from __future__ import annotations

import hashlib
import io
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

#: Extensions the folder scan treats as images. Files with these extensions that fail to decode are
#: reported; other files are ignored (and counted).
#: Common in the domains we serve but not decodable here: reported as unsupported, with a fix.
UNDECODABLE_EXTENSIONS = frozenset(
    {".heic", ".heif", ".avif", ".jxl", ".dcm", ".dicom", ".jp2", ".j2k", ".svs", ".ndpi", ".czi"}
)
IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".jpe", ".png", ".tif", ".tiff", ".bmp", ".webp", ".gif", ".ppm", ".pgm", ".pbm", ".pnm"}
) | UNDECODABLE_EXTENSIONS
#: Formats (as Pillow names them) that the rest of handlens reads.
SUPPORTED_FORMATS = frozenset({"JPEG", "PNG", "TIFF", "BMP", "WEBP", "GIF", "PPM", "MPO"})

DEFAULT_MIN_SIDE = 16
DEFAULT_MAX_PIXELS = 250_000_000  # 250 MP: a 20k x 12k whole-slide scan passes, a bomb does not


class Reason:
    """Why a file was skipped. Stable strings: they appear in ``--json`` reports."""

    EMPTY = "empty_file"
    UNREADABLE = "unreadable"
    NOT_AN_IMAGE = "not_an_image"
    UNSUPPORTED = "unsupported_format"
    TRUNCATED = "corrupt_or_truncated"
    TOO_SMALL = "too_small"
    TOO_MANY_PIXELS = "too_many_pixels"
    MISSING = "missing"
    OUTSIDE_TREE = "outside_tree"
    BAD_ROW = "bad_manifest_row"
    UNLABELLED = "unlabelled"


@dataclass(frozen=True)
class Probe:
    """What probing one file found: either image facts, or a reason and a detail for the report."""

    path: str
    ok: bool
    sha256: str = ""
    bytes: int = 0
    width: int = 0
    height: int = 0
    mode: str = ""
    format: str = ""
    reason: str = ""
    detail: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def sha256_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def probe_image(path: str, min_side: int = DEFAULT_MIN_SIDE, max_pixels: int = DEFAULT_MAX_PIXELS) -> Probe:
    """Hash and fully decode ``path``; report size, mode and format, or why it cannot be used.

    Decoding is complete (a truncated JPEG fails here, not in epoch 7 of training), but JPEGs are
    decoded in draft mode (DCT scaling): every entropy-coded byte is still read, at a fraction of
    the cost of a full-size decode. The pixel limit is checked from the header, before decoding.
    """
    from PIL import Image, UnidentifiedImageError

    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        return Probe(path, False, reason=Reason.MISSING, detail="file does not exist")
    except OSError as exc:
        return Probe(path, False, reason=Reason.UNREADABLE, detail=str(exc))
    size = len(data)
    digest = sha256_of(data)
    base = {"path": path, "sha256": digest, "bytes": size}
    if size == 0:
        return Probe(**base, ok=False, reason=Reason.EMPTY, detail="zero-byte file")

    ext = Path(path).suffix.lower()
    pillow_limit = Image.MAX_IMAGE_PIXELS
    try:
        # Pillow's own bomb check (at open, from the header) then fires exactly at our limit.
        Image.MAX_IMAGE_PIXELS = max_pixels
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        if ext in UNDECODABLE_EXTENSIONS:
            return Probe(**base, ok=False, reason=Reason.UNSUPPORTED,
                         detail=f"{ext} files cannot be decoded here; convert them to PNG or TIFF")
        return Probe(**base, ok=False, reason=Reason.NOT_AN_IMAGE, detail="not a recognised image format")
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        return Probe(**base, ok=False, reason=Reason.TOO_MANY_PIXELS,
                     detail=f"{exc} (possible decompression bomb); raise --max-pixels if genuine")
    except Exception as exc:  # a header so broken that Pillow cannot even open it
        return Probe(**base, ok=False, reason=Reason.TRUNCATED, detail=f"{type(exc).__name__}: {exc}")
    finally:
        Image.MAX_IMAGE_PIXELS = pillow_limit

    with img:
        width, height = img.size
        fmt = img.format or ""
        mode = img.mode
        facts = {**base, "width": width, "height": height, "mode": mode, "format": fmt}
        if fmt not in SUPPORTED_FORMATS:
            return Probe(**facts, ok=False, reason=Reason.UNSUPPORTED,
                         detail=f"{fmt or 'unknown'} images are not supported; convert to PNG or TIFF")
        if width * height > max_pixels:
            return Probe(**facts, ok=False, reason=Reason.TOO_MANY_PIXELS,
                         detail=f"{width}x{height} = {width * height:,} pixels exceeds the limit of "
                                f"{max_pixels:,} (possible decompression bomb); raise --max-pixels if genuine")
        if min(width, height) < min_side:
            return Probe(**facts, ok=False, reason=Reason.TOO_SMALL,
                         detail=f"{width}x{height} is below the minimum side of {min_side} px (--min-size)")
        try:
            if fmt == "JPEG":
                img.draft(img.mode, (max(1, width // 8), max(1, height // 8)))
            img.load()
        except Exception as exc:
            return Probe(**facts, ok=False, reason=Reason.TRUNCATED, detail=f"{type(exc).__name__}: {exc}")
    return Probe(**facts, ok=True)
