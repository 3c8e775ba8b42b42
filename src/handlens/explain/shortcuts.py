"""Where a map's energy sits: on the specimen, or on places an expert would reject (shortcut warnings).

A model that scores well by looking at a scale bar, a text label, the letterbox padding or the empty
glass around a thin section has learned a shortcut (Geirhos et al., "Shortcut learning in deep neural
networks", Nature Machine Intelligence 2020). A map tells where it looked; this module measures, per map,
the share of its **energy** (the sum of its positive part: the evidence *for* the class, for signed maps
too) that falls

* **outside the ROI**: outside the specimen (a threshold ROI) or outside the expert regions;
* **on padding**: the letterbox bars a ``letterbox`` model sees around the image;
* **in the border band**: the outer :data:`BORDER_BAND` of the image's shorter side on each edge, where
  burned-in scale bars, labels and vignetting live.

Each share is told beside the share of the *pixels* the region covers: a map that spreads evenly puts
as much energy in a region as its area, so only a surplus is a sign. A region is flagged when its energy
share exceeds its area share by at least :data:`SURPLUS` and is at least :data:`MIN_SHARE` of the energy.
The verdict words are the same in the CLI, JSON, API and viewer: :data:`SHORTCUT_WARNING` or
:data:`NO_SHORTCUT_SIGN` (or :data:`EMPTY_MAP` when the map has no positive energy at all).

For a ``shorter-crop`` model the part of the image outside the centre crop was never seen: no map can
sit there, so its *area* share is reported (``unseen``) and the viewer marks it rather than tinting it cold.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

#: the border band's width, as a share of the image's shorter side, on each edge
BORDER_BAND = 0.08
#: a region is flagged when its share of the energy exceeds its share of the pixels by this much ...
SURPLUS = 0.2
#: ... and holds at least this share of the energy
MIN_SHARE = 0.3
SHORTCUT_WARNING = "shortcut warning"
NO_SHORTCUT_SIGN = "no shortcut sign"
EMPTY_MAP = "empty map"

_REGION_WORDS = {"outside_roi": "outside the specimen/ROI", "padding": "on the letterbox padding",
                 "border": "in the border band"}


@dataclass(frozen=True)
class RegionShare:
    """One region's share of the map's energy beside its share of the pixels."""

    energy: float
    area: float
    flagged: bool

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class ShortcutShares:
    """The energy shares of one map and the verdict in words."""

    verdict: str  # SHORTCUT_WARNING, NO_SHORTCUT_SIGN or EMPTY_MAP
    border: RegionShare | None
    outside_roi: RegionShare | None = None  # None: no ROI for this image
    padding: RegionShare | None = None  # None: the model does not letterbox (or the image fills the input)
    unseen: float = 0.0  # share of the image's pixels the model never saw (outside a centre crop)
    warnings: list[str] = field(default_factory=list)

    def regions(self) -> dict[str, RegionShare]:
        found = {"outside_roi": self.outside_roi, "padding": self.padding, "border": self.border}
        return {name: share for name, share in found.items() if share is not None}

    def sentence(self) -> str:
        """e.g. ``shortcut warning · 52% of the energy in the border band (23% of the pixels)``."""
        if self.verdict == EMPTY_MAP:
            return f"{EMPTY_MAP} · the map has no positive energy: nothing to locate"
        shown = self.warnings or [_region_text(name, share) for name, share in self.regions().items()]
        text = f"{self.verdict} · {'; '.join(shown)}"
        if self.unseen > 0:
            text += f"; {self.unseen:.0%} of the image never seen (outside the crop)"
        return text

    def to_dict(self) -> dict[str, Any]:
        return {"verdict": self.verdict, "sentence": self.sentence(), "unseen": round(self.unseen, 4),
                "warnings": list(self.warnings),
                **{name: (share.to_dict() if share is not None else None)
                   for name, share in (("border", self.border), ("outside_roi", self.outside_roi),
                                       ("padding", self.padding))}}


def _region_text(name: str, share: RegionShare) -> str:
    return f"{share.energy:.0%} of the energy {_REGION_WORDS[name]} ({share.area:.0%} of the pixels)"


def border_band(height: int, width: int, *, band: float = BORDER_BAND,
                box: tuple[int, int, int, int] | None = None) -> np.ndarray:
    """Boolean (height, width) mask of the band along the edges of ``box`` (top, left, bottom, right; the whole
    array by default), ``band`` of the box's shorter side wide."""
    top, left, bottom, right = box or (0, 0, height, width)
    side = max(1, round(band * min(bottom - top, right - left)))
    mask = np.zeros((height, width), dtype=bool)
    mask[top:bottom, left:right] = True
    mask[top + side:bottom - side, left + side:right - side] = False
    return mask


def _share(energy: np.ndarray, total: float, region: np.ndarray, within: np.ndarray) -> RegionShare:
    area = float(region[within].mean()) if within.any() else 0.0
    share = float(energy[region].sum() / total)
    return RegionShare(energy=round(share, 4), area=round(area, 4),
                       flagged=share >= MIN_SHARE and share - area >= SURPLUS)


def energy_shares(heat: np.ndarray, *, content: np.ndarray | None = None, roi: np.ndarray | None = None,
                  band: float = BORDER_BAND, unseen: float = 0.0) -> ShortcutShares:
    """The shares of ``heat``'s (H, W) positive energy outside ``roi``, off ``content`` (the pixels that are
    image, not padding; all by default) and in the border band of the content's bounding box. ``roi`` and
    ``content`` are boolean (H, W) masks on the same grid; ``unseen`` is passed through (see module doc)."""
    energy = np.clip(np.nan_to_num(np.asarray(heat, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0), 0.0, None)
    height, width = energy.shape
    everywhere = np.ones((height, width), dtype=bool)
    content = everywhere if content is None else np.asarray(content, dtype=bool)
    total = float(energy.sum())
    if total <= 0.0 or not content.any():
        return ShortcutShares(verdict=EMPTY_MAP, border=None, unseen=unseen)
    rows, cols = np.nonzero(content)
    box = (int(rows.min()), int(cols.min()), int(rows.max()) + 1, int(cols.max()) + 1)
    border = _share(energy, total, border_band(height, width, band=band, box=box) & content, content)
    padding = None if content.all() else _share(energy, total, ~content, everywhere)
    outside = None if roi is None else _share(energy, total, ~np.asarray(roi, dtype=bool) & content, content)
    found = {"outside_roi": outside, "padding": padding, "border": border}
    warnings = [_region_text(name, share) for name, share in found.items() if share is not None and share.flagged]
    return ShortcutShares(verdict=SHORTCUT_WARNING if warnings else NO_SHORTCUT_SIGN, border=border,
                          outside_roi=outside, padding=padding, unseen=unseen, warnings=warnings)


def input_content(width: int, height: int, preprocess: Any) -> tuple[np.ndarray, float]:
    """Which pixels of the size x size model input are image (not letterbox padding) for a width x height
    image, and the share of the image the model never sees (outside a centre crop)."""
    from handlens.transforms.preprocess import input_placement

    placement = input_placement(width, height, preprocess)
    (rw, rh), (ox, oy) = placement.resized, placement.offset
    size = preprocess.size
    content = np.zeros((size, size), dtype=bool)
    content[max(0, oy):min(size, oy + rh), max(0, ox):min(size, ox + rw)] = True
    seen = min(size, rw) * min(size, rh) / float(rw * rh)
    return content, round(1.0 - seen, 4)


def model_input_shares(model_map: np.ndarray, *, width: int, height: int, preprocess: Any,
                       roi: np.ndarray | None = None) -> ShortcutShares:
    """:func:`energy_shares` of a whole-image model's map on its input, for a width x height image (``roi`` on
    the input grid, e.g. from ``transforms.roi.mask_for_input``)."""
    content, unseen = input_content(width, height, preprocess)
    return energy_shares(model_map, content=content, roi=roi, unseen=unseen)


def shares_summary(shares: list[ShortcutShares]) -> dict[str, Any]:
    """Over many maps (e.g. one class's): the median energy and area share per region and how many maps were
    flagged, with the words for it."""
    judged = [s for s in shares if s.verdict != EMPTY_MAP]
    out: dict[str, Any] = {"maps": len(shares), "empty": len(shares) - len(judged),
                           "flagged": sum(s.verdict == SHORTCUT_WARNING for s in judged)}
    for name in ("outside_roi", "padding", "border"):
        found = [s.regions()[name] for s in judged if name in s.regions()]
        if found:
            out[name] = {"energy": round(float(np.median([f.energy for f in found])), 4),
                         "area": round(float(np.median([f.area for f in found])), 4),
                         "flagged": sum(f.flagged for f in found), "maps": len(found)}
    flagged = out["flagged"]
    if not judged:
        out["verdict"] = f"not checked: {EMPTY_MAP} in all {len(shares)} maps" if shares else "not checked: no map"
    else:
        out["verdict"] = (f"{SHORTCUT_WARNING}: {flagged} of {len(judged)} maps" if flagged
                          else f"{NO_SHORTCUT_SIGN} in {len(judged)} maps")
    return out
