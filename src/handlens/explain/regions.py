"""A map's top regions as polygons on the original image: what QuPath and GIS tools read (GeoJSON).

Computing is kept apart from drawing: :func:`top_regions` turns one (H, W) map into :class:`Region` polygons
(pure numpy and scikit-image), :func:`feature_collection` dresses them as an RFC 7946 FeatureCollection, and
:func:`write_geojson` writes it. The PNG overlay and the .npy map are written elsewhere
(:mod:`handlens.explain.output`).

Which pixels: the map's top ``fraction`` of pixels, as ``handlens agreement --top`` ranks them (the value
of the k-th highest pixel is the threshold; pixels tied with it are all in), of the pixels that show the
image (a letterbox's padding is not the image) and carry positive relevance (a map that is zero on half the
image has no "top 20 %" there to draw). Each 8-connected blob of them is one region: its outline is traced
by marching squares (``skimage.measure.find_contours`` on the blob's mask, padded so every outline
closes), simplified by ``skimage.measure.approximate_polygon`` (``tolerance`` map pixels) and placed on the
ORIGINAL image's pixels by a :class:`Frame` (undoing the model's resize and centre crop or letterbox, or
the scale of a stitched map), x = column, y = row, pixel (r, c) covering [c, c + 1] x [r, r + 1] as in
QuPath. A blob with holes becomes a Polygon with interior rings.

Winding follows RFC 7946 section 3.1.6 on the coordinates as written: exterior rings counter-clockwise,
holes clockwise, by the signed shoelace area of [x, y] (on screen, where y points down, that reads
mirrored; GeoJSON readers only need the rings to be consistent).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from handlens.core.errors import InputError

#: classification colours (r, g, b) by class index, as QuPath draws them (matplotlib's tab10)
PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]

#: maps with a longer side than this are averaged down before tracing (a stitched slide map of 40,000
#: pixels would give polygons of millions of vertices; a region under the block size is not worth a polygon)
MAX_SIDE = 2048

#: simplification tolerance in map pixels: straight runs collapse to their ends, while the half-pixel corner
#: cuts of marching squares survive (at 0.5 they would not, and a square's corners would wander)
TOLERANCE = 0.3


@dataclass(frozen=True)
class Frame:
    """Where map pixels land on the original image: ``x = col * scale_x + offset_x`` (the same for y),
    with map pixel edges at integers, over a ``width`` x ``height`` image."""

    scale_x: float
    scale_y: float
    offset_x: float
    offset_y: float
    width: int
    height: int

    @classmethod
    def identity(cls, map_shape: tuple[int, ...], width: int, height: int) -> Frame:
        """A map laid over the whole image (a stitched tiled map, or any map of the image's aspect)."""
        rows, cols = map_shape[-2:]
        return cls(width / cols, height / rows, 0.0, 0.0, width, height)

    @classmethod
    def for_input(cls, map_shape: tuple[int, ...], width: int, height: int, preprocess: Any) -> Frame:
        """A map over a whole-image model's size x size input, for a width x height image: undoes
        ``preprocess.resize`` (``transforms.preprocess.input_placement``: stretch, shorter-crop's centre crop,
        letterbox's padding)."""
        from handlens.transforms.preprocess import input_placement

        placement = input_placement(width, height, preprocess)
        (rw, rh), (ox, oy) = placement.resized, placement.offset
        rows, cols = map_shape[-2:]
        size = preprocess.size
        # map pixel -> input pixel (size / cols), input -> the resized image (- offset), -> original (width / rw)
        return cls(size / cols * width / rw, size / rows * height / rh, -ox * width / rw, -oy * height / rh,
                   width, height)

    def scaled(self, factor: int) -> Frame:
        """The frame of the map averaged down by ``factor`` (one pixel for factor x factor of the old)."""
        return Frame(self.scale_x * factor, self.scale_y * factor, self.offset_x, self.offset_y, self.width,
                     self.height)

    def content(self, map_shape: tuple[int, ...]) -> np.ndarray:
        """The (H, W) mask of map pixels whose centre lies on the image (False on letterbox padding)."""
        rows, cols = map_shape[-2:]
        xs = (np.arange(cols) + 0.5) * self.scale_x + self.offset_x
        ys = (np.arange(rows) + 0.5) * self.scale_y + self.offset_y
        return ((ys >= 0) & (ys <= self.height))[:, None] & ((xs >= 0) & (xs <= self.width))[None, :]

    def place(self, points: np.ndarray) -> np.ndarray:
        """(n, 2) [x, y] in map pixel-edge coordinates -> image pixels, kept on the image."""
        x = np.clip(points[:, 0] * self.scale_x + self.offset_x, 0.0, self.width)
        y = np.clip(points[:, 1] * self.scale_y + self.offset_y, 0.0, self.height)
        return np.stack([x, y], axis=1)


@dataclass(frozen=True, eq=False)  # numpy rings: compare their fields, not the objects
class Region:
    """One blob of the top pixels as a polygon on the image: closed rings of [x, y] image pixels."""

    exterior: np.ndarray  # (n, 2), first point == last, counter-clockwise (RFC 7946)
    holes: list[np.ndarray]  # each (n, 2), closed, clockwise
    energy_share: float  # the blob's share of the map's positive energy
    area: float  # polygon area in image pixels (exterior less holes)
    map_pixels: int  # how many map pixels the blob holds

    def rings(self, decimals: int = 2) -> list[list[list[float]]]:
        """GeoJSON Polygon coordinates: the exterior, then the holes."""
        return [np.round(ring, decimals).tolist() for ring in (self.exterior, *self.holes)]

    def bounds(self) -> tuple[float, float, float, float]:
        """(min x, min y, max x, max y) in image pixels."""
        return (float(self.exterior[:, 0].min()), float(self.exterior[:, 1].min()),
                float(self.exterior[:, 0].max()), float(self.exterior[:, 1].max()))


def signed_area(ring: np.ndarray) -> float:
    """The shoelace area of a closed ring of [x, y]: positive when counter-clockwise (x right, y up)."""
    x, y = ring[:, 0], ring[:, 1]
    return float(0.5 * (np.dot(x[:-1], y[1:]) - np.dot(x[1:], y[:-1])))


def top_mask(heatmap: np.ndarray, fraction: float, *, content: np.ndarray | None = None) -> np.ndarray:
    """The map's top ``fraction`` of (``content``) pixels with positive relevance, ties at the threshold in."""
    if not 0 < fraction <= 1:
        raise InputError(f"--top {fraction}: the top share of the map must lie in (0, 1], e.g. 0.2")
    heat = np.nan_to_num(np.asarray(heatmap, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    candidates = heat > 0 if content is None else (heat > 0) & content
    pool = heat[content] if content is not None else heat.reshape(-1)
    if not candidates.any() or pool.size == 0:
        return np.zeros(heat.shape, dtype=bool)
    count = max(1, round(fraction * pool.size))
    threshold = np.partition(pool, pool.size - count)[pool.size - count]
    return candidates & (heat >= threshold)


def _downscaled(heat: np.ndarray, max_side: int | None) -> tuple[np.ndarray, int]:
    """``heat`` block-averaged so its long side is at most ``max_side``, and the block size."""
    if not max_side or max(heat.shape) <= max_side:
        return heat, 1
    from skimage.measure import block_reduce

    factor = int(np.ceil(max(heat.shape) / max_side))
    return block_reduce(heat, (factor, factor), np.mean), factor


def _ring(points: np.ndarray, *, tolerance: float) -> np.ndarray:
    """A closed (rows, cols) contour of the padded blob crop, simplified; still closed, at least a triangle."""
    from skimage.measure import approximate_polygon

    simple = approximate_polygon(points, tolerance=tolerance) if tolerance > 0 else points
    if len(simple) < 4:  # simplified down to a line: the traced outline says more
        simple = points
    if not np.array_equal(simple[0], simple[-1]):
        simple = np.vstack([simple, simple[:1]])
    return simple


def _blob_rings(blob: np.ndarray, *, row0: int, col0: int, tolerance: float) -> list[np.ndarray]:
    """The outline rings of one 8-connected blob (a boolean crop whose top-left map pixel is (row0, col0)),
    as [x, y] map pixel-edge coordinates, the exterior (the largest) first."""
    from skimage.measure import find_contours

    padded = np.pad(blob, 1).astype(np.float32)  # a blob on the crop's edge still gets a closed outline
    # fully_connected="high": diagonal neighbours are one blob, as the 8-connected labelling says
    contours = find_contours(padded, 0.5, fully_connected="high")
    rings = []
    for contour in contours:
        ring = _ring(contour, tolerance=tolerance)
        # padded index -> map index (- 1 + crop origin) -> pixel edges (+ 0.5); (row, col) -> [x, y]
        rings.append(np.stack([ring[:, 1] - 0.5 + col0, ring[:, 0] - 0.5 + row0], axis=1))
    rings.sort(key=lambda r: -abs(signed_area(r)))
    return rings


def _oriented(ring: np.ndarray, *, counter_clockwise: bool) -> np.ndarray:
    return ring if (signed_area(ring) > 0) == counter_clockwise else ring[::-1].copy()


def top_regions(heatmap: np.ndarray, fraction: float = 0.2, *, frame: Frame | None = None, tolerance: float = TOLERANCE,
                min_pixels: int = 4, max_side: int | None = MAX_SIDE) -> list[Region]:
    """The polygons of ``heatmap``'s top ``fraction`` (see the module's words), most energy first.

    ``frame`` places them on the original image (default: the map is the image); blobs of fewer than
    ``min_pixels`` map pixels (speckle of a gradient map) are left out; ``tolerance`` is the simplification's
    in map pixels; a map longer than ``max_side`` is block-averaged first.
    """
    from scipy import ndimage
    from skimage.measure import label

    heat = np.asarray(heatmap, dtype=np.float64)
    if heat.ndim != 2:
        raise InputError(f"a map for polygons is (H, W); this one is {heat.shape} (pick one class's map)")
    heat = np.nan_to_num(heat, nan=0.0, posinf=0.0, neginf=0.0)
    frame = frame or Frame.identity(heat.shape, heat.shape[1], heat.shape[0])
    heat, factor = _downscaled(heat, max_side)
    frame = frame.scaled(factor) if factor > 1 else frame
    content = frame.content(heat.shape)
    mask = top_mask(heat, fraction, content=content)
    positive = np.clip(heat, 0.0, None)
    total = float(positive[content].sum())
    labels = label(mask, connectivity=2)
    regions = []
    for number, where in enumerate(ndimage.find_objects(labels), start=1):
        if where is None:
            continue
        blob = labels[where] == number
        pixels = int(blob.sum())
        if pixels < min_pixels:
            continue
        rings = [frame.place(r) for r in _blob_rings(blob, row0=where[0].start, col0=where[1].start,
                                                     tolerance=tolerance)]
        exterior = _oriented(rings[0], counter_clockwise=True)
        holes = [_oriented(r, counter_clockwise=False) for r in rings[1:] if len(r) >= 4 and abs(signed_area(r)) > 0]
        area = abs(signed_area(exterior)) - sum(abs(signed_area(h)) for h in holes)
        energy = float(positive[where][blob].sum()) / total if total > 0 else 0.0
        regions.append(Region(exterior, holes, round(energy, 6), round(area, 2), pixels))
    regions.sort(key=lambda r: (-r.energy_share, -r.area))
    return regions


def feature_collection(regions: list[Region], *, image: str, target: str, method: str, layer: str | None,
                       fraction: float, class_index: int = 0) -> dict[str, Any]:
    """An RFC 7946 FeatureCollection of ``regions``, one Polygon Feature each, with the properties QuPath
    imports annotations from (``objectType``, ``name``, ``classification`` with a colour, ``measurements``)
    beside handlens' own (image, class, method, layer, top, energy_share, area_px)."""
    colour = list(PALETTE[class_index % len(PALETTE)])
    features = []
    for number, region in enumerate(regions, start=1):
        features.append({
            "type": "Feature",
            "geometry": {"type": "Polygon", "coordinates": region.rings()},
            "properties": {
                "objectType": "annotation",
                "name": f"{target} top {fraction:.0%} #{number}",
                "classification": {"name": target, "color": colour},
                "isLocked": False,
                "measurements": {"energy share": region.energy_share, "area px": region.area,
                                 "top share": fraction},
                "image": image, "class": target, "method": method, "layer": layer, "top": fraction,
                "energy_share": region.energy_share, "area_px": region.area, "map_pixels": region.map_pixels,
            },
        })
    return {"type": "FeatureCollection", "features": features}


def write_geojson(path: Path, collection: dict[str, Any]) -> Path:
    """Write ``collection`` to ``path`` (a temp file, then rename: never half a file)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(collection, separators=(",", ":")))
    tmp.replace(path)
    return path
