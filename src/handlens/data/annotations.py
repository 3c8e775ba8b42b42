"""Expert regions: import binary masks or polygons per image, and rasterise them.

A folder of annotations names each file after its image: ``<image stem>.png`` (a mask, any non-zero
pixel inside the region; resized to the image if its size differs) or ``<image stem>.json`` with
``{"label": "optional class", "polygons": [[[x, y], ...], ...]}`` in the image's pixel coordinates.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import select

from handlens.core.errors import InputError
from handlens.data.catalog import Annotation, Catalog, Image
from handlens.data.queries import find_dataset


def import_annotations(catalog: Catalog, dataset_name: str, folder: Path, replace: bool = True) -> dict[str, Any]:
    """Attach every mask/polygon file in ``folder`` to the dataset image with the same stem."""
    from PIL import Image as PILImage

    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"{folder} is not a folder of annotation files (<image stem>.png or .json)")
    report: dict[str, Any] = {"dataset": dataset_name, "added": 0, "unmatched": [], "ambiguous": [], "invalid": []}
    with catalog.session() as session:
        dataset = find_dataset(session, dataset_name)
        by_stem: dict[str, list[Image]] = defaultdict(list)
        for image in session.scalars(select(Image).where(Image.dataset_id == dataset.id)):
            by_stem[Path(image.path).stem].append(image)
        for path in sorted(p for p in folder.rglob("*") if p.suffix.lower() in (".png", ".json")):
            matches = by_stem.get(path.stem, [])
            if not matches:
                report["unmatched"].append(str(path))
                continue
            if len(matches) > 1:
                report["ambiguous"].append(str(path))
                continue
            image = matches[0]
            try:
                if path.suffix.lower() == ".json":
                    data = json.loads(path.read_text())
                    polygons = data["polygons"] if isinstance(data, dict) else data
                    label = data.get("label") if isinstance(data, dict) else None
                    check_polygons(polygons)
                    row = Annotation(image_id=image.id, kind="polygon", polygons=polygons, label=label,
                                     source=str(path))
                else:
                    with PILImage.open(path) as mask:
                        mask.load()
                    row = Annotation(image_id=image.id, kind="mask", mask_path=str(path.resolve()), source=str(path))
            except (ValueError, KeyError, OSError, TypeError) as exc:
                report["invalid"].append({"path": str(path), "reason": f"{type(exc).__name__}: {exc}"})
                continue
            if replace:
                for old in session.scalars(select(Annotation).where(Annotation.image_id == image.id,
                                                                    Annotation.kind == row.kind)):
                    session.delete(old)
            session.add(row)
            report["added"] += 1
    return report


def check_polygons(polygons: Any) -> None:
    if not isinstance(polygons, list) or not polygons:
        raise ValueError("'polygons' must be a non-empty list of polygons")
    for polygon in polygons:
        if len(polygon) < 3 or any(len(point) != 2 for point in polygon):
            raise ValueError("each polygon needs at least 3 [x, y] points")


def check_inside(polygons: list[Any], *, width: int, height: int) -> None:
    """Each polygon's points finite and inside the image (0..width, 0..height), and its area above zero."""
    for index, polygon in enumerate(polygons):
        points = np.asarray(polygon, dtype=np.float64)
        if not np.isfinite(points).all():
            raise ValueError(f"polygon {index}: coordinates must be finite numbers")
        if (points < 0).any() or (points[:, 0] > width).any() or (points[:, 1] > height).any():
            raise ValueError(f"polygon {index} leaves the {width}x{height} image: x must be in 0..{width} and y "
                             f"in 0..{height}")
        x, y = points[:, 0], points[:, 1]
        if abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1)))) / 2 == 0:
            raise ValueError(f"polygon {index} has no area (its points are on one line)")


#: a mask file larger than this many pixels is not decoded
MAX_MASK_PIXELS = 100_000_000


def region_mask(annotations: list[Annotation], width: int, height: int) -> np.ndarray:
    """The union of an image's annotations as a (height, width) boolean mask in image coordinates; a mask file
    that can no longer be read (moved, deleted, damaged) adds nothing rather than failing the caller."""
    from PIL import Image as PILImage
    from PIL import ImageDraw

    canvas = PILImage.new("L", (width, height), 0)
    for annotation in annotations:
        if annotation.kind == "mask" and annotation.mask_path:
            try:
                with PILImage.open(annotation.mask_path) as mask:
                    if mask.width * mask.height > MAX_MASK_PIXELS:
                        continue  # a decompression bomb is no region
                    layer = mask.convert("L")
            except (OSError, ValueError, PILImage.DecompressionBombError):
                continue  # a mask file moved, deleted or damaged since import: that region is not drawn
            if layer.size != (width, height):
                layer = layer.resize((width, height), PILImage.NEAREST)
            canvas.paste(255, mask=layer.point(lambda v: 255 if v > 0 else 0))
        elif annotation.polygons:
            draw = ImageDraw.Draw(canvas)
            for polygon in annotation.polygons:
                draw.polygon([tuple(map(float, point)) for point in polygon], fill=255)
    return np.asarray(canvas) > 0


def annotated_images(session: Any, dataset_id: int) -> dict[int, list[Annotation]]:
    rows = session.scalars(select(Annotation).join(Image).where(Image.dataset_id == dataset_id))
    out: dict[int, list[Annotation]] = defaultdict(list)
    for row in rows:
        out[row.image_id].append(row)
    return dict(out)


def annotated_images_by_id(session: Any, image_ids: list[int]) -> dict[int, list[Annotation]]:
    """Annotations of the given images (chunked, so any number of ids works on every database)."""
    out: dict[int, list[Annotation]] = defaultdict(list)
    for start in range(0, len(image_ids), 500):
        chunk = image_ids[start:start + 500]
        for row in session.scalars(select(Annotation).where(Annotation.image_id.in_(chunk))):
            out[row.image_id].append(row)
    return dict(out)


def add_polygon_region(session: Any, image_id: int, *, polygons: list[Any], label: str | None,
                       source: str) -> int:
    """Add one expert region of ``polygons`` (image pixels, checked) to catalog image ``image_id``; its new id.
    Raises NotFoundError when the image is not in the catalog."""
    from handlens.core.errors import NotFoundError

    check_polygons(polygons)
    image = session.get(Image, image_id)
    if image is None:
        raise NotFoundError(f"no image {image_id} in the catalog")
    check_inside(polygons, width=image.width, height=image.height)
    row = Annotation(image_id=image_id, kind="polygon", polygons=polygons, label=label, source=source)
    session.add(row)
    session.flush()
    return int(row.id)
