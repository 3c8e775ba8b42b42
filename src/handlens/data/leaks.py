"""Copies of training images among the images a model is judged on: exact and near-duplicates.

A test image that is a copy of a training image measures memory, not skill: the metrics look better
than the model is. Two kinds are found:

* **exact**: the same file bytes (same SHA-256);
* **near**: the same picture resized, re-encoded or slightly retouched, found by a 64-bit difference
  hash (dHash, N. Krawetz, "Kind of like that", hackerfactor.com 2013): the image in grey levels,
  reduced to 9x8 pixels by area averaging, one bit per horizontally adjacent pair (is the left one
  brighter?). Resizing and re-encoding keep almost every bit; unrelated images differ in about half
  of them (32 of 64). Two images are near-duplicates when their hashes differ in at most
  :data:`NEAR_DUPLICATE_MAX_DISTANCE` bits.

Hashes are computed from decoded pixels (the caller passes the arrays it already has, e.g. from the
decode cache), so the near check costs a 9x8 reduction per image and one XOR/popcount per pair. Each image
is hashed twice, as the model sees it (resized and cropped) and as a whole frame (:func:`frame_dhash`): a
copy squashed from 500x380 to 224x224 is 2-4 bits from its original frame but 14-27 bits from its centre
crop (measured on real thin sections), so two images are near when either pair of hashes is. A
flat image (the 9x8 reduction spans fewer than :data:`FLAT_RANGE` grey levels) has no structure to
hash: its bits are noise or all zero, so it is left out of the near check and counted. Mirrored or
rotated copies are not found (their hash differs).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

#: Hamming distance (bits of 64) up to which two hashes count as the same picture. Measured on pure-noise
#: 40x40 test images (the worst case: no structure above the pixel): a copy upscaled 1.3-2x is 0-1 bits
#: away, saved as JPEG (quality 75) 3-6 bits, halved in size 3-8 bits; unrelated images were 19-22 bits
#: apart at the closest (32 on average). Two unrelated random hashes come within 8 bits with probability
#: ~1e-9; images that share a layout (chest X-rays) come closer, so a near pair is worth a look, not proof.
NEAR_DUPLICATE_MAX_DISTANCE = 8
#: a 9x8 reduction spanning fewer grey levels than this is flat: its hash means nothing
FLAT_RANGE = 4.0
_POPCOUNT = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)


def dhash(image: np.ndarray) -> int | None:
    """The 64-bit difference hash of an (H, W[, C]) image array (any dtype), or None for a flat image."""
    from PIL import Image

    array = np.asarray(image)
    if array.ndim == 3:
        array = array[..., :3].astype(np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    grey = Image.fromarray(array.astype(np.float32), mode="F")
    small = np.asarray(grey.resize((9, 8), Image.Resampling.BOX), dtype=np.float32)
    if float(small.max() - small.min()) < FLAT_RANGE:
        return None
    bits = (small[:, :-1] > small[:, 1:]).ravel()
    return int.from_bytes(np.packbits(bits).tobytes(), "big")


def hamming(a: Sequence[int], b: Sequence[int]) -> np.ndarray:
    """(len(a), len(b)) matrix of bit differences between two lists of 64-bit hashes."""
    left = np.asarray(list(a), dtype=np.uint64).reshape(-1, 1)
    right = np.asarray(list(b), dtype=np.uint64).reshape(1, -1)
    xor = np.bitwise_xor(left, right)
    return _POPCOUNT[xor.view(np.uint8)].reshape(*xor.shape, 8).sum(-1, dtype=np.int64)


@dataclass(frozen=True)
class ImageRef:
    """One image on either side of the check: its path, the SHA-256 of its file, its dHash (None: flat or
    not hashed)."""

    path: str
    sha256: str
    dhash: int | None = None  # of the image as the model sees it (resized, cropped)
    frame: int | None = None  # of the whole file's frame (a squashed or re-framed copy matches here)


@dataclass(frozen=True)
class LeakPair:
    """A judged image and the training image it copies (the closest one; ``others``: further matches)."""

    test: str
    train: str
    kind: str  # exact | near
    distance: int
    others: int = 0


@dataclass
class LeakReport:
    """What the copy check found, with a verdict in words (same words in the CLI text and its --json)."""

    images: int
    reference: int
    pairs: list[LeakPair] = field(default_factory=list)
    near_checked: bool = True
    max_distance: int = NEAR_DUPLICATE_MAX_DISTANCE
    flat: int = 0
    notes: list[str] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)
    subject: str = "test"

    @property
    def exact(self) -> int:
        return sum(p.kind == "exact" for p in self.pairs)

    @property
    def near(self) -> int:
        return sum(p.kind == "near" for p in self.pairs)

    @property
    def verdict(self) -> str:
        n, what = self.images, f"{self.subject} images"
        if self.reference == 0:
            why = f" ({'; '.join(self.notes)})" if self.notes else ""
            return f"not checked: the training images of this model are unknown here{why}"
        if self.pairs:
            return (f"leaks: {len(self.pairs)} of {n} {what} are copies of training images "
                    f"({self.exact} exact, {self.near} near-duplicate{'s' if self.near != 1 else ''})")
        if not self.near_checked:
            return (f"no exact copy: none of the {n} {what} is a byte copy of a training image "
                    "(near-duplicates not checked)")
        return f"no leak: none of the {n} {what} matches a training image"

    def to_dict(self) -> dict[str, Any]:
        return {"verdict": self.verdict, "images": self.images, "training_images": self.reference,
                "exact": self.exact, "near": self.near, "near_checked": self.near_checked,
                "max_distance": self.max_distance, "flat_images_skipped": self.flat, "notes": self.notes,
                "pairs": [asdict(p) for p in self.pairs], "seconds": self.seconds}


def find_copies(test: Sequence[ImageRef], train: Sequence[ImageRef], *, near: bool = True,
                max_distance: int = NEAR_DUPLICATE_MAX_DISTANCE, subject: str = "test") -> LeakReport:
    """Each ``test`` image that is a copy of a ``train`` image: exact by SHA-256 first, else near by dHash.

    A test image is listed once, with its closest training image (an exact copy wins) and how many other
    training images match it too.
    """
    by_sha: dict[str, list[str]] = {}
    for ref in train:
        by_sha.setdefault(ref.sha256, []).append(ref.path)
    pairs: dict[int, LeakPair] = {}
    for index, ref in enumerate(test):
        same = by_sha.get(ref.sha256)
        if same:
            pairs[index] = LeakPair(ref.path, same[0], "exact", 0, len(same) - 1)
    flat = sum(ref.dhash is None and ref.frame is None for ref in test) if near else 0
    if near:
        todo = [i for i, ref in enumerate(test) if i not in pairs and (ref.dhash, ref.frame) != (None, None)]
        hashed = [ref for ref in train if (ref.dhash, ref.frame) != (None, None)]
        for start in range(0, len(todo), 256):  # bounded memory: 256 x M distances at a time
            chunk = todo[start:start + 256]
            if not hashed:
                break
            distances = np.minimum(_distances([test[i].dhash for i in chunk], [r.dhash for r in hashed]),
                                   _distances([test[i].frame for i in chunk], [r.frame for r in hashed]))
            for row, index in zip(distances, chunk, strict=True):
                close = np.flatnonzero(row <= max_distance)
                if close.size:
                    best = int(close[np.argmin(row[close])])
                    pairs[index] = LeakPair(test[index].path, hashed[best].path, "near", int(row[best]),
                                            int(close.size) - 1)
    return LeakReport(images=len(test), reference=len(train), pairs=[pairs[i] for i in sorted(pairs)],
                      near_checked=near, max_distance=max_distance, flat=flat, subject=subject)


def _distances(a: Sequence[int | None], b: Sequence[int | None]) -> np.ndarray:
    """:func:`hamming` where both hashes exist; 65 (farther than any two hashes) where either is missing."""
    known_a = np.array([h is not None for h in a])
    known_b = np.array([h is not None for h in b])
    out = hamming([h or 0 for h in a], [h or 0 for h in b])
    out[~known_a] = 65
    out[:, ~known_b] = 65
    return out


def frame_dhash(path: str) -> int | None:
    """The dHash of a file's whole frame (decoded small: JPEG at a reduced scale, 16-bit over its full range), or
    None when it cannot be read or is flat. A copy that was squashed to another aspect ratio or re-framed
    matches here even when the model's centre crop of it does not."""
    from PIL import UnidentifiedImageError

    from handlens.data.imaging import small_grey

    try:
        return dhash(small_grey(path, 72))
    except (OSError, UnidentifiedImageError, ValueError):
        return None


def hash_many(images: Iterable[np.ndarray]) -> list[int | None]:
    """dHash of each image array (None for flat ones)."""
    return [dhash(image) for image in images]


def short_path(path: str, parts: int = 3) -> str:
    """The last ``parts`` components of a path, for tables."""
    return str(Path(*Path(path).parts[-parts:])) if path else path
