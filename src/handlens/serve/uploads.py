"""Uploaded images: checked by size, content (not the name) and pixel count before any decoding."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import numpy as np

from handlens.core.errors import InputError, TooLargeError
from handlens.serve.images import Header, decode_bounded, open_checked


@dataclass
class UploadedImage:
    array: np.ndarray  # (H, W, 3) uint8, longer side at most the working side
    sha256: str  # of the uploaded bytes
    width: int  # as uploaded
    height: int
    format: str


def open_upload(data: bytes, *, max_bytes: int, max_pixels: int) -> tuple[Any, Header]:
    """Check an upload's bytes and header (nothing decoded): 413 too many bytes or pixels, 415 not an image,
    422 empty, corrupt header or too elongated."""
    if len(data) > max_bytes:
        raise TooLargeError(f"upload of {len(data):,} bytes exceeds the limit of {max_bytes:,} bytes")
    if not data:
        raise InputError("the upload is empty")
    return open_checked(data, max_pixels=max_pixels)


def read_upload(data: bytes, *, max_bytes: int, max_pixels: int, max_side: int) -> UploadedImage:
    """Bytes of an upload -> an RGB array at most ``max_side`` long (see :func:`open_upload` for refusals;
    422 when the pixels cannot be decoded). A bomb is never decoded: its pixel count is read from the header."""
    opened, header = open_upload(data, max_bytes=max_bytes, max_pixels=max_pixels)
    array = decode_bounded(opened, header, max_side=max_side)
    return UploadedImage(array=array, sha256=hashlib.sha256(data).hexdigest(), width=header.width,
                         height=header.height, format=header.format)
