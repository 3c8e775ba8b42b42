"""Safe probing of image files: hash, decode, classify what is wrong.

``probe_image`` never raises for a bad file: it returns a :class:`Probe` with a reason. It runs in
worker processes during import, so it is a plain top-level function over plain data.
"""

from __future__ import annotations

import hashlib
import io
import os
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from handlens.core.errors import ConflictError, HandlensError, NotFoundError
from handlens.core.formats import IMAGE_EXTENSIONS, SUPPORTED_FORMATS, UNDECODABLE_EXTENSIONS  # noqa: F401
from handlens.core.workspace import is_within

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
    BAD_NAME = "bad_file_name"
    UNLABELLED = "unlabelled"
    CHANGED = "changed_since_import"


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


#: EXIF orientations (tag 0x0112) whose displayed image is the stored one turned a quarter: width and
#: height swap. ``transforms.preprocess.load_rgb`` applies the orientation when decoding.
_QUARTER_TURNS = frozenset({5, 6, 7, 8})


def exif_orientation(img: Any) -> int:
    """The EXIF orientation of an open PIL image (1, upright, when absent or unreadable)."""
    try:
        return int(img.getexif().get(0x0112, 1))
    except Exception:  # a broken EXIF block must not fail an otherwise good image
        return 1


# --------------------------------------------------------------------------- where files really are


def inside_tree(path: str | Path, root: str | Path) -> bool:
    """True when ``path``, every symlink resolved, is ``root`` (also resolved) or lies below it.

    The one check both import modes (folder tree and CSV manifest) and the service use, so a
    symlink inside a dataset's folder cannot smuggle in a file from elsewhere on the disk. A path that
    cannot be resolved (a symlink loop, an embedded NUL byte) is not inside anything.
    """
    try:
        return is_within(Path(path).resolve(), Path(root).resolve())
    except (OSError, RuntimeError, ValueError):
        return False


def printable_path(path: str | Path) -> str:
    """``path`` as text that can be stored and shown: bytes that are not UTF-8 become ``\\xNN`` escapes."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def valid_name(path: str | Path) -> bool:
    """False when ``path`` holds bytes that are not UTF-8 (Python keeps them as lone surrogates)."""
    try:
        str(path).encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


class CatalogFileError(HandlensError):
    """A catalog image's file no longer is what the catalog recorded; ``reason`` is a :class:`Reason`."""

    def __init__(self, message: str, *, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


class CatalogFileMissingError(CatalogFileError, NotFoundError):
    """The file of a catalog image is gone."""


class CatalogFileChangedError(CatalogFileError, ConflictError):
    """The file now lies outside its dataset's folder, or its content differs from the catalog's."""


def verify_catalog_file(
    path: str | Path,
    *,
    sha256: str,
    size: int | None = None,
    mtime_ns: int | None = None,
    root: str | Path | Sequence[str | Path] | None = None,
) -> Path:
    """Check that a catalog image's file may still be served as the catalog describes it; its real path.

    ``root``: the dataset's folder (or several): the file, symlinks resolved, must lie inside one.
    Then its content must match: when ``size`` and ``mtime_ns`` are both given and both match, the file
    is taken as unchanged (the check an import makes, cheap); otherwise its SHA-256 is computed.
    Serve the returned path (symlinks already resolved), not ``path``: a link swapped after this check
    then cannot redirect the read. Raises :class:`CatalogFileMissingError` (a ``NotFoundError``) or
    :class:`CatalogFileChangedError` (a ``ConflictError``), each saying how to fix it.
    """
    shown = printable_path(path)
    try:
        real = Path(path).resolve()
        stat = real.stat()
    except (OSError, RuntimeError, ValueError):
        raise CatalogFileMissingError(f"image file {shown} is no longer on disk; restore it, or re-import "
                                      "its dataset to drop it", reason=Reason.MISSING) from None
    roots = [root] if isinstance(root, (str, Path)) else list(root or [])
    if roots and not any(inside_tree(real, r) for r in roots):
        raise CatalogFileChangedError(
            f"image file {shown} now resolves to {printable_path(real)}, outside its dataset's folder "
            f"{printable_path(roots[0])} (was a symlink changed?); restore the file or re-import the dataset",
            reason=Reason.OUTSIDE_TREE)
    if size is not None and stat.st_size != size:
        raise CatalogFileChangedError(
            f"image file {shown} changed since it was imported ({stat.st_size:,} bytes, the catalog recorded "
            f"{size:,}); re-import its dataset to record the new version", reason=Reason.CHANGED)
    if size is not None and mtime_ns is not None and stat.st_mtime_ns == mtime_ns:
        return real
    if _file_sha256(real) != sha256:
        raise CatalogFileChangedError(
            f"image file {shown} changed since it was imported (its SHA-256 differs from the catalog's); "
            "re-import its dataset to record the new version", reason=Reason.CHANGED)
    return real


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


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
        if exif_orientation(img) in _QUARTER_TURNS:  # stored on its side: record the size as displayed
            width, height = height, width
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
                img.draft(img.mode, (max(1, img.width // 8), max(1, img.height // 8)))
            img.load()
        except Exception as exc:
            return Probe(**facts, ok=False, reason=Reason.TRUNCATED, detail=f"{type(exc).__name__}: {exc}")
    return Probe(**facts, ok=True)


def small_grey(path: str | Path, side: int) -> Any:
    """A file decoded small and fast as a (side, side) uint8 grey array, stretched: JPEGs at a reduced scale,
    upright as shown, 16-bit and float images scaled over their full range (65535 -> 255, as training's decode
    does) rather than clipped at 255 by a plain ``convert("L")`` (an X-ray would be all white)."""
    import numpy as np
    from PIL import Image, ImageOps

    with Image.open(path) as opened:
        opened.draft("L", (side, side))  # JPEG only: decode at 1/2..1/8 scale
        upright = ImageOps.exif_transpose(opened)
        if upright.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
            array = np.asarray(upright, dtype=np.float32)
            wide = upright.mode != "F" and (upright.mode.startswith("I;16") or float(array.max(initial=0)) > 255)
            scaled = array / 257.0 if wide else (array * 255.0 if float(array.max(initial=0)) <= 1.0 else array)
            upright = Image.fromarray(scaled.round().clip(0, 255).astype(np.uint8))
        return np.asarray(upright.convert("L").resize((side, side), Image.Resampling.BOX))


#: the largest difference between an RGB image's channels (of 255, on a small thumbnail) still called grey:
#: a grey JPEG saved as RGB carries a little chroma noise
GREY_TOLERANCE = 4


def rgb_is_grey(path: str | Path, side: int = 64) -> bool | None:
    """Whether an RGB file holds a grey picture (R = G = B, within :data:`GREY_TOLERANCE`, on a ``side``-px
    thumbnail): such an image is, once training converts every file to RGB, what an L (grey) file becomes.
    None when the file cannot be read."""
    import numpy as np
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as opened:
            opened.draft("RGB", (side, side))  # JPEG only: decode at 1/2..1/8 scale
            small = opened.convert("RGB")
            small.thumbnail((side, side))
            array = np.asarray(small, dtype=np.int16)
    except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError):
        return None
    spread = np.abs(array[..., 0] - array[..., 1]).max(initial=0), np.abs(array[..., 1] - array[..., 2]).max(initial=0)
    return bool(max(spread) <= GREY_TOLERANCE)
