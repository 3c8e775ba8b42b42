"""Uploaded images: checked by size, content (not the name) and pixel count before any decoding."""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np

from handlens.core.errors import HandlensError


class UploadError(HandlensError):
    """A refused upload, with the HTTP status that says why."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


ALLOWED_FORMATS = {"PNG", "JPEG", "TIFF", "BMP", "WEBP", "GIF"}
MAX_ASPECT = 20  # longer side / shorter side: beyond it, resizing the shorter side to the input explodes


@dataclass
class UploadedImage:
    array: np.ndarray  # (H, W, 3) uint8
    sha256: str
    width: int
    height: int
    format: str


def read_upload(data: bytes, max_bytes: int, max_pixels: int) -> UploadedImage:
    """Bytes of an upload -> an RGB array, or an :class:`UploadError` (413 too big, 415 not an image,
    422 corrupt). The pixel count is read from the header, so a decompression bomb is never decoded."""
    import hashlib

    from PIL import Image, UnidentifiedImageError

    from handlens.transforms.preprocess import load_rgb

    if len(data) > max_bytes:
        raise UploadError(413, f"upload of {len(data):,} bytes exceeds the limit of {max_bytes:,} bytes")
    if not data:
        raise UploadError(422, "the upload is empty")
    try:
        opened = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as exc:  # Pillow's own header check, for the most extreme sizes
        raise UploadError(413, f"{exc} (a decompression bomb is refused before decoding)") from None
    except UnidentifiedImageError:
        raise UploadError(415, "the upload is not an image this service reads (PNG, JPEG, TIFF, BMP, WEBP, GIF); "
                               "its content, not its name, was checked") from None
    except Exception as exc:  # a recognised format whose header is broken
        raise UploadError(422, f"the image header could not be read ({type(exc).__name__}); it is corrupt") from None
    if opened.format not in ALLOWED_FORMATS:
        raise UploadError(415, f"{opened.format} images are not accepted; send PNG, JPEG, TIFF, BMP or WEBP")
    width, height = opened.size
    if width * height > max_pixels:
        raise UploadError(413, f"{width}x{height} = {width * height:,} pixels exceeds the limit of "
                               f"{max_pixels:,} (a decompression bomb is refused before decoding)")
    if min(width, height) < 1 or max(width, height) > MAX_ASPECT * min(width, height):
        raise UploadError(422, f"a {width}x{height} image is too elongated (more than {MAX_ASPECT}:1) to classify; "
                               "crop it first")
    try:
        opened.load()
        array = np.asarray(load_rgb(opened))
    except Exception as exc:  # truncated data, broken chunks, codec errors: the file is damaged
        raise UploadError(422, f"the image could not be decoded ({type(exc).__name__}: {exc}); "
                               "it is truncated or corrupt") from None
    return UploadedImage(array=np.ascontiguousarray(array), sha256=hashlib.sha256(data).hexdigest(), width=width,
                         height=height, format=str(opened.format))
