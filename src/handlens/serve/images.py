"""Images the service decodes: uploads and catalog files, checked by content, size and pixels, one way.

Every image a request makes the service decode goes through :func:`open_checked` (the header only: the
format from the content, never the name; the pixel count against the per-request cap, so a decompression
bomb is never decoded) and :func:`decode_bounded` (JPEGs decoded at a reduced scale where that is enough,
then scaled down once, right after decoding, to the working size). Decoding itself runs under a
:class:`PixelBudget`: a semaphore weighted by pixels, so many concurrent large images wait for each other
instead of multiplying the service's memory. Pillow's errors become 413 (too many pixels) or 422
(unreadable), never 500.
"""

from __future__ import annotations

import asyncio
import io
import warnings
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from handlens.core.errors import BusyError, ConflictError, InputError, TooLargeError, UnsupportedMediaError

#: the formats the service reads (what ``import`` accepts), and the content type each is served as
CONTENT_TYPES = {"PNG": "image/png", "JPEG": "image/jpeg", "TIFF": "image/tiff", "BMP": "image/bmp",
                 "WEBP": "image/webp", "GIF": "image/gif", "PPM": "image/x-portable-anymap",
                 "MPO": "image/jpeg"}  # a camera's multi-picture JPEG: its first picture is a JPEG
MAX_ASPECT = 20  # longer side / shorter side: beyond it, resizing the shorter side to the input explodes
#: decoded images are scaled down to at most this longer side (or a patch model's own working side)
WORKING_SIDE = 2048


@dataclass
class Header:
    """What the header of an image says, before any pixel is decoded."""

    format: str
    width: int
    height: int

    @property
    def pixels(self) -> int:
        return self.width * self.height

    @property
    def content_type(self) -> str:
        return CONTENT_TYPES[self.format]


def open_checked(source: bytes | str | Path, *, max_pixels: int, what: str = "the upload") -> tuple[Any, Header]:
    """Open ``source`` lazily and check it: a format this service reads (by content), at most ``max_pixels``
    pixels, not absurdly elongated. Returns the open PIL image (nothing decoded yet) and its header."""
    from PIL import Image, UnidentifiedImageError

    stream = io.BytesIO(source) if isinstance(source, bytes) else source
    try:
        with warnings.catch_warnings():  # the pixel count is checked below, against this service's own limit
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            opened = Image.open(stream)
    except Image.DecompressionBombError:
        raise TooLargeError(f"{what} has more than {2 * (Image.MAX_IMAGE_PIXELS or 0):,} pixels, over this "
                            f"service's limit of {max_pixels:,} (a decompression bomb is refused before "
                            "decoding); downscale it first") from None
    except UnidentifiedImageError:
        raise UnsupportedMediaError(f"{what} is not an image this service reads ({', '.join(CONTENT_TYPES)}); "
                                    "its content, not its name, was checked") from None
    except FileNotFoundError:
        raise ConflictError(f"{what} is no longer on disk: re-import the dataset") from None
    except Exception as exc:  # a recognised format whose header is broken
        raise InputError(f"the header of {what} could not be read ({type(exc).__name__}); it is corrupt") from None
    header = Header(str(opened.format), *opened.size)
    if header.format not in CONTENT_TYPES:
        opened.close()
        raise UnsupportedMediaError(f"{header.format} images are not accepted; send "
                                    f"{', '.join(CONTENT_TYPES)}")
    if header.pixels > max_pixels:
        opened.close()
        raise TooLargeError(f"{what} has {header.width}x{header.height} = {header.pixels:,} pixels, over this "
                            f"service's limit of {max_pixels:,} (a decompression bomb is refused before "
                            "decoding); downscale it first")
    if min(header.width, header.height) < 1 or max(header.width, header.height) > MAX_ASPECT * min(
            header.width, header.height):
        opened.close()
        raise InputError(f"a {header.width}x{header.height} image is too elongated (more than {MAX_ASPECT}:1) "
                         "to classify; crop it first")
    return opened, header


def decode_bounded(opened: Any, header: Header, *, max_side: int, what: str = "the upload") -> np.ndarray:
    """Decode an opened image to (H, W, 3) uint8 RGB with its longer side at most ``max_side`` (0: full size):
    a JPEG is decoded at the smallest of 1/2, 1/4, 1/8 scale still above that size (``Image.draft``), and any
    image larger than it is scaled down once, here, before anything else sees it."""
    from PIL import Image

    from handlens.transforms.preprocess import load_rgb

    longest = max(header.width, header.height)
    try:
        if max_side and longest > max_side and header.format == "JPEG":
            scale = max_side / longest
            opened.draft("RGB", (max(1, int(header.width * scale)), max(1, int(header.height * scale))))
        opened.load()
        picture = load_rgb(opened)
        width, height = picture.size
        if max_side and max(width, height) > max_side:
            scale = max_side / max(width, height)
            picture = picture.resize((max(1, round(width * scale)), max(1, round(height * scale))), Image.BICUBIC,
                                     reducing_gap=3.0)
        return np.ascontiguousarray(np.asarray(picture, dtype=np.uint8))
    except Image.DecompressionBombError as exc:
        raise TooLargeError(f"{what} is refused: {exc}") from None
    except Exception as exc:  # truncated data, broken chunks, codec errors: the file is damaged
        raise InputError(f"{what} could not be decoded ({type(exc).__name__}); it is truncated or "
                         "corrupt") from None
    finally:
        opened.close()


def sniff_content_type(path: str | Path) -> str:
    """The content type of an image file from its first bytes (its name is never trusted): what ``/file``
    serves it as. Raises 415 for content that is none of the formats the service reads."""
    with open(path, "rb") as handle:
        head = handle.read(16)
    signatures = ((b"\x89PNG\r\n\x1a\n", "PNG"), (b"\xff\xd8\xff", "JPEG"), (b"GIF87a", "GIF"), (b"GIF89a", "GIF"),
                  (b"II*\x00", "TIFF"), (b"MM\x00*", "TIFF"), (b"BM", "BMP"))
    for magic, name in signatures:
        if head.startswith(magic):
            return CONTENT_TYPES[name]
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return CONTENT_TYPES["WEBP"]
    if len(head) > 2 and head[:1] == b"P" and head[1:2] in b"123456" and head[2:3].isspace():
        return CONTENT_TYPES["PPM"]
    raise UnsupportedMediaError(f"{Path(path).name} is no longer an image this service serves: re-import the "
                                "dataset")


class PixelBudget:
    """An asyncio semaphore weighted by pixels: at most ``capacity`` pixels decoded at once over all requests.
    A request waits its turn for at most ``wait_s`` seconds, then gets 503."""

    def __init__(self, capacity: int, wait_s: float = 30.0) -> None:
        self.capacity, self.wait_s = capacity, wait_s
        self.in_use = 0
        self._changed: asyncio.Condition | None = None

    def _condition(self) -> asyncio.Condition:
        if self._changed is None:
            self._changed = asyncio.Condition()
        return self._changed

    @asynccontextmanager
    async def hold(self, pixels: int) -> Any:
        need = min(pixels, self.capacity)  # one image over the total still runs, alone
        changed = self._condition()
        async with changed:
            try:
                await asyncio.wait_for(changed.wait_for(lambda: self.in_use + need <= self.capacity), self.wait_s)
            except TimeoutError:
                raise BusyError(f"the service is decoding {self.in_use:,} pixels for other requests; retry "
                                "shortly") from None
            self.in_use += need
        try:
            yield
        finally:
            async with changed:
                self.in_use -= need
                changed.notify_all()

