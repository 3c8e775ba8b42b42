"""Burned-in marks: scale bars, text labels and stamps drawn into the pixels at a fixed place.

A microscope's "0.5 mm" scale bar or a scanner's label sits at the same place in every image it was
burned into. When one class carries it and the others do not, a model can recognise the class by the
mark alone (a shortcut; Geirhos et al., Nature Machine Intelligence 2020). Specimen content is never at
the same place in most images of a class, so a mark shows up as a spot of **high local contrast at a
fixed position**:

1. each image, in grey levels, is stretched to a square (position, not size, is what a mark keeps) of
   :data:`FINE` x :data:`GRID` pixels, where a pixel counts as *contrasted* when it differs from its 9x9
   neighbourhood's mean by more than :data:`CONTRAST` grey levels (a thin bright line or a letter's stroke
   does; smooth content does not), and a cell of the :data:`GRID` x :data:`GRID` grid is contrasted when
   any of its pixels is;
2. per class, the share of its images contrasted at each pixel;
3. a cell of the border band (the outer :data:`BAND` of each side: where marks are put) is hot for a class
   when its share is at least :data:`MIN_SHARE` and stands :data:`SIGMAS` binomial standard deviations (and
   at least MIN_SHARE) above the class's median share: a scale bar on 12% of 429 thin sections stands out
   of texture that is contrasted at 3% of them anywhere; chance alone, over 9,216 cells, almost never does;
4. each group of at least :data:`MIN_PIXELS` hot cells (cells up to two apart joined) is a mark, placed by
   its cells (two marks in two corners are two marks, not one "in the middle"; a frame is said so).

A mark found for one class is told with the share of that class's images that carry it and the share of
the other classes' images that do: a mark on one class alone is a shortcut, one on every class is a
distraction the maps should not sit on (``handlens audit`` measures whether they do).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

GRID = 96
FINE = 4  # contrast is found at FINE x GRID pixels, then pooled to the grid
CONTRAST = 60.0
BAND = 0.2
#: a hot cell is contrasted in at least this share of a class's images ...
MIN_SHARE = 0.05
#: ... this many binomial standard deviations above the class's median share
SIGMAS = 5.0
MIN_PIXELS = 8
#: marks told per class, the largest first
MOST_PER_CLASS = 3
#: an image carries a class's mark when this share of the mark's pixels are contrasted in it
CARRIES = 0.3
#: a mark on this much more of its class's images than of the others' is a shortcut
SHORTCUT_GAP = 0.3


@dataclass(frozen=True)
class Mark:
    """A burned-in mark found at a fixed place in one class's images."""

    label: str
    where: str  # e.g. "bottom-right corner", "bottom edge", "frame along the edges"
    pixels: int  # on the GRID x GRID grid
    box: tuple[int, int, int, int]  # top, left, bottom, right on the grid
    in_class: float  # share of the class's images that carry it
    in_others: float  # share of the other classes' images that do
    shortcut: bool

    def sentence(self) -> str:
        return (f"class {self.label!r} has a fixed high-contrast mark in the {self.where} in {self.in_class:.0%} of "
                f"its images (other classes: {self.in_others:.0%})")

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "sentence": self.sentence()}


def contrasted(image: np.ndarray) -> np.ndarray:
    """Boolean GRID x GRID mask of where an (H, W[, 3]) uint8 image stands out from its neighbourhood: at
    FINE x GRID pixels a pixel counts when it differs from its 9x9 neighbourhood's mean by more than
    CONTRAST grey levels (a thin line survives at that scale), then any such pixel marks its GRID cell."""
    from PIL import Image
    from scipy.ndimage import uniform_filter

    array = np.asarray(image)
    grey = Image.fromarray(array if array.ndim == 2 else np.ascontiguousarray(array[..., :3])).convert("L")
    side = GRID * FINE
    fine = np.asarray(grey.resize((side, side), Image.Resampling.BOX), dtype=np.float32)
    standing = np.abs(fine - uniform_filter(fine, size=9, mode="nearest")) > CONTRAST
    return standing.reshape(GRID, FINE, GRID, FINE).any(axis=(1, 3))


def grid_image(path: str) -> np.ndarray:
    """A file decoded small and fast for the mark search (:func:`handlens.data.imaging.small_grey`)."""
    from handlens.data.imaging import small_grey

    return small_grey(path, GRID * FINE)


def band_mask(band: float = BAND) -> np.ndarray:
    side = max(1, round(band * GRID))
    mask = np.ones((GRID, GRID), dtype=bool)
    mask[side:GRID - side, side:GRID - side] = False
    return mask


def _where(hot: np.ndarray) -> str:
    """Where a group of hot cells sits, in words: a corner, an edge, or the frame (along every edge)."""
    rows, cols = np.nonzero(hot)
    if rows.max() - rows.min() >= 0.6 * GRID and cols.max() - cols.min() >= 0.6 * GRID:
        return "frame along the edges"
    row, col = rows.mean() / GRID, cols.mean() / GRID
    vertical = "top" if row < 1 / 3 else ("bottom" if row > 2 / 3 else "")
    horizontal = "left" if col < 1 / 3 else ("right" if col > 2 / 3 else "")
    if vertical and horizontal:
        return f"{vertical}-{horizontal} corner"
    return f"{vertical or horizontal} edge" if (vertical or horizontal) else "middle"


def find_marks(images: Iterable[tuple[str, np.ndarray]]) -> tuple[list[Mark], dict[str, np.ndarray]]:
    """Burned-in marks in ``images`` ((label, uint8 array) pairs): the marks found and, per class with a mark,
    its GRID x GRID boolean mask (to measure a map's energy on it)."""
    masks: dict[str, list[np.ndarray]] = {}
    for label, image in images:
        masks.setdefault(label, []).append(contrasted(image))
    stacked = {label: np.stack(found) for label, found in masks.items()}
    band = band_mask()
    marks: list[Mark] = []
    regions: dict[str, np.ndarray] = {}
    for label, found in sorted(stacked.items()):
        others = [m for other, m in stacked.items() if other != label]
        rest = np.concatenate(others) if others else None
        for hot in _hot_groups(found, band):
            rows, cols = np.nonzero(hot)
            box = (int(rows.min()), int(cols.min()), int(rows.max()) + 1, int(cols.max()) + 1)
            in_class = _carrying(found, hot)
            in_others = _carrying(rest, hot) if rest is not None else 0.0
            marks.append(Mark(label=label, where=_where(hot), pixels=int(hot.sum()), box=box,
                              in_class=round(in_class, 4), in_others=round(in_others, 4),
                              shortcut=in_class - in_others >= SHORTCUT_GAP))
            regions[label] = regions[label] | hot if label in regions else hot
    return marks, regions


def _hot_groups(found: np.ndarray, band: np.ndarray) -> list[np.ndarray]:
    """The connected groups of hot cells (see module doc) of one class's (N, GRID, GRID) contrast masks, the
    largest first."""
    from scipy.ndimage import binary_dilation
    from scipy.ndimage import label as connected

    share = found.mean(0)
    n = len(found)
    median = max(float(np.median(share)), 1.0 / n)
    spread = float(np.sqrt(median * (1.0 - median) / n))
    hot = band & (share >= MIN_SHARE) & (share >= median + max(SIGMAS * spread, MIN_SHARE))
    # cells up to two apart belong together: a letter's strokes, a bar's broken edge
    groups, count = connected(binary_dilation(hot), structure=np.ones((3, 3), dtype=bool))
    parts = [hot & (groups == g) for g in range(1, count + 1)]
    parts.sort(key=lambda part: -int(part.sum()))
    return [part for part in parts[:MOST_PER_CLASS] if part.sum() >= MIN_PIXELS]


def _carrying(found: np.ndarray, hot: np.ndarray) -> float:
    """Share of the (N, GRID, GRID) contrast masks that cover at least CARRIES of the ``hot`` pixels."""
    covered = (found & hot).sum(axis=(1, 2)) / max(1, int(hot.sum()))
    return float((covered >= CARRIES).mean())


def marks_verdict(marks: list[Mark]) -> str:
    """The words for the marks found: ``shortcut: ...``, ``burned-in mark, not a shortcut by itself ...`` or
    ``no burned-in mark``."""
    shortcuts = [m for m in marks if m.shortcut]
    if shortcuts:
        more = f" and {len(shortcuts) - 1} more" if len(shortcuts) > 1 else ""
        return f"shortcut: burned-in mark on one class: {shortcuts[0].sentence()}{more}"
    if marks:
        more = f" and {len(marks) - 1} more" if len(marks) > 1 else ""
        return f"burned-in mark, not a shortcut by itself (check the maps avoid it): {marks[0].sentence()}{more}"
    return "no burned-in mark found at a fixed place in the border band"
