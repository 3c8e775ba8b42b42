"""Boxes in the catalog: import axis-aligned boxes from COCO, labelme or CSV, and describe them.

A box is a region to *find* before it is classified (a sigma-clast, then its sense of shear), so one box
may carry one label per labelset: the COCO category in ``--labelset`` (e.g. "detection") and each
string-valued COCO ``attributes`` entry (CVAT's export) in a labelset named after the attribute (e.g.
"rotation"), or two CSV files imported under two labelsets.

Formats (``fmt="auto"`` picks by content):

* ``coco``: one JSON with ``images`` (``id``, ``file_name``), ``annotations`` (``image_id``, ``bbox`` as
  ``[x, y, width, height]``, ``category_id``, optional ``attributes``) and ``categories`` (``id``, ``name``).
* ``labelme``: one labelme JSON per image (``imagePath``, ``shapes`` with ``shape_type: rectangle`` and two
  corner ``points``), or a folder of them; other shape types are skipped as ``not_a_rectangle``.
* ``csv``: ``path,x0,y0,x1,y1,label`` with an optional ``labelset`` column (header optional when the
  columns come in that order); an empty label adds the box without a label.

Each annotation names its image by path. The image is found in the dataset, in this order, by: the
absolute path; the path relative to the annotation file's folder; the file name alone, when exactly one
image in the dataset has it (several: ``ambiguous_image``; none: ``unknown_image``).

Nothing stops an import: a row that cannot be used is skipped with a reason (``bad_row``,
``not_a_rectangle``, ``degenerate``: ``x1 <= x0``, ``y1 <= y0`` or area under 1 px², ``unknown_image``,
``ambiguous_image``, ``outside_image``: beyond the catalog's width and height). A box already on the image
(same corners to 1e-3 px) is not added again, so a rerun adds nothing; a new label for one of its labelsets
replaces the old one (counted as relabelled).
"""

from __future__ import annotations

import csv
import json
import math
import statistics
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session, selectinload

from handlens.core.errors import InputError
from handlens.data.catalog import Box, BoxLabel, Catalog, Image
from handlens.data.queries import find_dataset

FORMATS = ("auto", "coco", "labelme", "csv")
CSV_COLUMNS = ("path", "x0", "y0", "x1", "y1", "label")
#: corners closer than this (pixels) are the same box
TOLERANCE = 1e-3
MAX_LABEL_LENGTH = 200


class BoxReason:
    """Why a row was skipped. Stable strings: they appear in ``--json`` reports."""

    BAD_ROW = "bad_row"
    NOT_A_RECTANGLE = "not_a_rectangle"
    DEGENERATE = "degenerate"
    UNKNOWN_IMAGE = "unknown_image"
    AMBIGUOUS_IMAGE = "ambiguous_image"
    OUTSIDE_IMAGE = "outside_image"


@dataclass
class BoxRow:
    """One box as read from an annotation file, before it is matched to an image."""

    where: str  # file:line, file#annotation id: where to look when it is skipped
    image: str  # the path or file name the annotation gives
    base: Path  # the annotation file's folder, for relative image paths
    box: tuple[float, float, float, float] | None  # x0, y0, x1, y1; None when the row could not be read
    labels: dict[str, str] = field(default_factory=dict)  # labelset -> label
    problem: tuple[str, str] | None = None  # (reason, detail) found while reading


@dataclass
class SkippedBox:
    where: str
    image: str
    reason: str
    detail: str


@dataclass
class BoxImportReport:
    """What one import did. ``labels``: the accepted rows' labels, per labelset and class."""

    dataset: str
    source: str
    format: str
    rows: int = 0
    added: int = 0  # new boxes
    unchanged: int = 0  # rows whose box and labels were already there
    labelled: int = 0  # labels added to a box that already existed
    relabelled: int = 0  # labels that replaced a different one
    skipped: list[SkippedBox] = field(default_factory=list)
    labels: dict[str, dict[str, int]] = field(default_factory=dict)

    def skipped_by_reason(self) -> dict[str, int]:
        return dict(sorted(Counter(s.reason for s in self.skipped).items()))

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["skipped_by_reason"] = self.skipped_by_reason()
        return data


# --------------------------------------------------------------------------- readers


def detect_format(path: Path) -> str:
    """``csv`` for a .csv file, ``labelme`` for a folder, else what the JSON holds."""
    if path.is_dir():
        return "labelme"
    if path.suffix.lower() == ".csv":
        return "csv"
    data = _load_json(path)
    if isinstance(data, dict) and "annotations" in data and "images" in data:
        return "coco"
    if isinstance(data, dict) and "shapes" in data:
        return "labelme"
    raise InputError(f"{path}: cannot tell its format (COCO has 'images' and 'annotations', labelme has 'shapes'); "
                     "pass --format coco|labelme|csv")


def _load_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise InputError(f"cannot read {path} as JSON: {exc}") from exc


def _corners(values: list[Any]) -> tuple[float, float, float, float]:
    """Four finite floats, or ValueError."""
    box = tuple(float(v) for v in values)
    if len(box) != 4 or not all(math.isfinite(v) for v in box):
        raise ValueError(f"need 4 finite numbers, got {values!r}")
    return box  # type: ignore[return-value]


def _label(value: Any) -> str:
    label = str(value).strip()
    if len(label) > MAX_LABEL_LENGTH:
        raise ValueError(f"label longer than {MAX_LABEL_LENGTH} characters")
    return label


def read_coco(path: Path, labelset: str) -> list[BoxRow]:
    """COCO ``bbox`` ``[x, y, w, h]`` -> corners; the category in ``labelset``, string attributes in their own."""
    data = _load_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("annotations"), list):
        raise InputError(f"{path} is not COCO JSON: it needs 'images', 'annotations' and 'categories' lists")
    images = {im.get("id"): str(im.get("file_name", "")) for im in data.get("images") or [] if isinstance(im, dict)}
    categories = {c.get("id"): c.get("name") for c in data.get("categories") or [] if isinstance(c, dict)}
    rows = []
    for index, ann in enumerate(data["annotations"]):
        ann = ann if isinstance(ann, dict) else {}
        row = BoxRow(where=f"{path.name}#{ann.get('id', index)}", image=images.get(ann.get("image_id"), ""),
                     base=path.parent, box=None)
        try:
            if ann.get("image_id") not in images:
                raise ValueError(f"image_id {ann.get('image_id')!r} is not in 'images'")
            x, y, w, h = _corners(ann.get("bbox") or [])
            row.box = (x, y, x + w, y + h)
            if "category_id" in ann:
                if ann["category_id"] not in categories:
                    raise ValueError(f"category_id {ann['category_id']!r} is not in 'categories'")
                row.labels[labelset] = _label(categories[ann["category_id"]])
            for key, value in (ann.get("attributes") or {}).items():
                if isinstance(value, str) and value.strip() and key != labelset:
                    row.labels[_label(key)] = _label(value)
        except (ValueError, TypeError, AttributeError) as exc:
            row.box, row.problem = None, (BoxReason.BAD_ROW, str(exc))
        rows.append(row)
    return rows


def read_labelme(path: Path, labelset: str) -> list[BoxRow]:
    """Rectangles of one labelme file (or every ``*.json`` under a folder); the shape label in ``labelset``."""
    if path.is_dir():
        return [row for file in sorted(path.rglob("*.json")) for row in read_labelme(file, labelset)]
    data = _load_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("shapes"), list):
        raise InputError(f"{path} is not labelme JSON: it needs 'imagePath' and a 'shapes' list")
    image = str(data.get("imagePath") or "").replace("\\", "/")
    rows = []
    for index, shape in enumerate(data["shapes"]):
        shape = shape if isinstance(shape, dict) else {}
        row = BoxRow(where=f"{path.name}#shape{index}", image=image, base=path.parent, box=None)
        kind = shape.get("shape_type") or "polygon"
        try:
            if kind != "rectangle":
                row.problem = (BoxReason.NOT_A_RECTANGLE, f"shape_type {kind!r}")
            else:
                (ax, ay), (bx, by) = shape["points"]
                x0, y0, x1, y1 = _corners([ax, ay, bx, by])
                row.box = (min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1))  # corners in drawing order
                if shape.get("label"):
                    row.labels[labelset] = _label(shape["label"])
        except (ValueError, TypeError, KeyError) as exc:
            row.box, row.problem = None, (BoxReason.BAD_ROW, f"points must be two [x, y] corners: {exc}")
        rows.append(row)
    return rows


def read_csv(path: Path, labelset: str) -> list[BoxRow]:
    """``path,x0,y0,x1,y1,label[,labelset]`` rows (a header row is recognised by its 'path' and 'x0' names)."""
    try:
        with path.open(newline="", encoding="utf-8-sig") as handle:
            lines = list(csv.reader(handle))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise InputError(f"cannot read {path} as CSV: {exc}") from exc
    columns = [*CSV_COLUMNS, "labelset"]
    start = 1
    if lines and {"path", "x0"} <= {c.strip().lower() for c in lines[0]}:
        columns = [c.strip().lower() for c in lines[0]]
        missing = [c for c in CSV_COLUMNS if c not in columns]
        if missing:
            raise InputError(f"{path}: the header lacks {', '.join(missing)}; expected {','.join(CSV_COLUMNS)}")
        start = 2
        lines = lines[1:]
    rows = []
    for number, line in enumerate(lines, start=start):
        if not any(cell.strip() for cell in line):
            continue
        values = dict(zip(columns, (cell.strip() for cell in line), strict=False))
        row = BoxRow(where=f"{path.name}:{number}", image=values.get("path", "").replace("\\", "/"),
                     base=path.parent, box=None)
        try:
            row.box = _corners([values.get(c, "") for c in ("x0", "y0", "x1", "y1")])
            if values.get("label"):
                row.labels[values.get("labelset") or labelset] = _label(values["label"])
        except (ValueError, TypeError) as exc:
            row.box, row.problem = None, (BoxReason.BAD_ROW, str(exc))
        rows.append(row)
    return rows


READERS = {"coco": read_coco, "labelme": read_labelme, "csv": read_csv}


# --------------------------------------------------------------------------- matching and validation


class ImageIndex:
    """A dataset's images by absolute path and by file name, to find what an annotation names."""

    def __init__(self, images: list[Image]) -> None:
        self.by_path = {image.path: image for image in images}
        self.by_name: dict[str, list[Image]] = defaultdict(list)
        for image in images:
            self.by_name[Path(image.path).name].append(image)

    def find(self, name: str, base: Path) -> tuple[Image | None, tuple[str, str] | None]:
        """The image, or None and (reason, detail)."""
        if not name:
            return None, (BoxReason.UNKNOWN_IMAGE, "the annotation names no image")
        given = Path(name).expanduser()
        candidates = [given] if given.is_absolute() else [base / given]
        for candidate in candidates:
            found = self.by_path.get(str(candidate)) or self.by_path.get(str(candidate.resolve()))
            if found is not None:
                return found, None
        named = self.by_name.get(given.name, [])
        if len(named) == 1:
            return named[0], None
        if named:
            return None, (BoxReason.AMBIGUOUS_IMAGE, f"{len(named)} images in the dataset are named {given.name!r}; "
                                                     "give its path relative to the annotation file")
        return None, (BoxReason.UNKNOWN_IMAGE, f"no image in the dataset at {name!r} or named {given.name!r}")


def degenerate(box: tuple[float, float, float, float]) -> tuple[str, str] | None:
    """``degenerate`` with a detail when ``x1 <= x0``, ``y1 <= y0`` or the area is under 1 px², else None."""
    x0, y0, x1, y1 = box
    if x1 <= x0 or y1 <= y0 or (x1 - x0) * (y1 - y0) < 1:
        return BoxReason.DEGENERATE, f"({x0:g}, {y0:g})-({x1:g}, {y1:g}) needs x0 < x1, y0 < y1 and 1 px² or more"
    return None


def box_problem(box: tuple[float, float, float, float], *, width: int, height: int) -> tuple[str, str] | None:
    """``degenerate`` or ``outside_image`` (beyond ``0..width``, ``0..height``) with a detail, or None."""
    problem = degenerate(box)
    if problem is not None:
        return problem
    x0, y0, x1, y1 = box
    if x0 < 0 or y0 < 0 or x1 > width or y1 > height:
        return BoxReason.OUTSIDE_IMAGE, (f"({x0:g}, {y0:g})-({x1:g}, {y1:g}) leaves the {width}x{height} image: "
                                         f"x must be in 0..{width}, y in 0..{height}")
    return None


def _same(a: tuple[float, ...], b: tuple[float, ...]) -> bool:
    return all(abs(p - q) <= TOLERANCE for p, q in zip(a, b, strict=True))


# --------------------------------------------------------------------------- import


def import_boxes(catalog: Catalog, dataset: str, path: Path, *, fmt: str = "auto",
                 labelset: str = "default") -> BoxImportReport:
    """Attach the boxes of an annotation file (or a folder of labelme files) to the dataset's images.

    Bad rows are skipped with their reasons (see the module docstring); a box already on the image is not
    added again, so importing the same file twice adds nothing.
    """
    path = Path(path).expanduser().resolve()
    if fmt not in FORMATS:
        raise InputError(f"unknown box format {fmt!r}; use one of {', '.join(FORMATS)}")
    if not labelset.strip() or len(labelset) > MAX_LABEL_LENGTH:
        raise InputError(f"--labelset must be 1..{MAX_LABEL_LENGTH} characters")
    if not path.exists():
        raise InputError(f"{path} does not exist: give a COCO or labelme JSON, a CSV, or a folder of labelme JSON")
    chosen = detect_format(path) if fmt == "auto" else fmt
    if path.is_dir() and chosen != "labelme":
        raise InputError(f"{path} is a folder: only --format labelme reads a folder (of labelme JSON files)")
    rows = READERS[chosen](path, labelset)
    report = BoxImportReport(dataset=dataset, source=str(path), format=chosen, rows=len(rows))
    labels: dict[str, Counter[str]] = defaultdict(Counter)
    with catalog.write_session() as session:
        ds = find_dataset(session, dataset)
        index = ImageIndex(list(session.scalars(select(Image).where(Image.dataset_id == ds.id))))
        existing: dict[int, list[Box]] = {}
        for row in rows:
            image, problem = _check(row, index)
            if image is None or problem is not None or row.box is None:
                reason, detail = problem or (BoxReason.BAD_ROW, "")
                report.skipped.append(SkippedBox(where=row.where, image=row.image, reason=reason, detail=detail))
                continue
            if image.id not in existing:
                existing[image.id] = list(session.scalars(select(Box).options(selectinload(Box.labels))
                                                          .where(Box.image_id == image.id)))
            _store(session, row, image, boxes=existing[image.id], report=report)
            for name, label in row.labels.items():
                labels[name][label] += 1
    report.labels = {name: dict(sorted(counts.items())) for name, counts in sorted(labels.items())}
    return report


def _check(row: BoxRow, index: ImageIndex) -> tuple[Image | None, tuple[str, str] | None]:
    if row.problem is not None or row.box is None:
        return None, row.problem
    problem = degenerate(row.box)  # whatever the image
    if problem is not None:
        return None, problem
    image, problem = index.find(row.image, row.base)
    if image is None:
        return None, problem
    return image, box_problem(row.box, width=image.width, height=image.height)


def _store(session: Session, row: BoxRow, image: Image, *, boxes: list[Box], report: BoxImportReport) -> None:
    """Add the box (or find it among ``boxes``) and set its labels, counting what changed in ``report``."""
    assert row.box is not None
    box = next((b for b in boxes if _same((b.x0, b.y0, b.x1, b.y1), row.box)), None)
    if box is None:
        x0, y0, x1, y1 = row.box
        box = Box(image_id=image.id, x0=x0, y0=y0, x1=x1, y1=y1, source=report.source)
        box.labels = [BoxLabel(labelset=name, label=label) for name, label in row.labels.items()]
        session.add(box)
        boxes.append(box)
        report.added += 1
        return
    held = {item.labelset: item for item in box.labels}
    changed = False
    for name, label in row.labels.items():
        if name not in held:
            box.labels.append(BoxLabel(labelset=name, label=label))
            report.labelled += 1
            changed = True
        elif held[name].label != label:
            held[name].label = label
            report.relabelled += 1
            changed = True
    if not changed:
        report.unchanged += 1


# --------------------------------------------------------------------------- stats


def _spread(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"min": None, "median": None, "max": None}
    return {"min": min(values), "median": float(statistics.median(values)), "max": max(values)}


def box_stats(catalog: Catalog, dataset: str) -> dict[str, Any]:
    """Boxes per class in each labelset, box width/height/area (px) and boxes per image (min/median/max).

    ``boxes_per_image`` is over the images that have boxes; ``images_without_boxes`` counts the rest.
    ``labelsets[L]["unlabelled"]`` counts the boxes without a label in ``L``.
    """
    with catalog.session() as session:
        ds = find_dataset(session, dataset)
        images = session.scalar(select(func.count(Image.id)).where(Image.dataset_id == ds.id)) or 0
        boxes = list(session.execute(select(Box.id, Box.image_id, Box.x0, Box.y0, Box.x1, Box.y1)
                                     .join(Image, Box.image_id == Image.id).where(Image.dataset_id == ds.id)))
        labelled = list(session.execute(select(BoxLabel.labelset, BoxLabel.label, func.count(BoxLabel.id))
                                        .join(Box, BoxLabel.box_id == Box.id).join(Image, Box.image_id == Image.id)
                                        .where(Image.dataset_id == ds.id)
                                        .group_by(BoxLabel.labelset, BoxLabel.label)))
    classes: dict[str, dict[str, int]] = defaultdict(dict)
    for name, label, count in sorted(labelled, key=lambda r: (r[0], -r[2], r[1])):
        classes[name][label] = count
    per_image = Counter(b.image_id for b in boxes)
    widths = [b.x1 - b.x0 for b in boxes]
    heights = [b.y1 - b.y0 for b in boxes]
    return {
        "dataset": ds.name,
        "boxes": len(boxes),
        "images": images,
        "images_with_boxes": len(per_image),
        "images_without_boxes": images - len(per_image),
        "labelsets": {name: {"classes": counts, "labelled": sum(counts.values()),
                             "unlabelled": len(boxes) - sum(counts.values())}
                      for name, counts in sorted(classes.items())},
        "width": _spread(widths),
        "height": _spread(heights),
        "area": _spread([w * h for w, h in zip(widths, heights, strict=True)]),
        "boxes_per_image": _spread([float(n) for n in per_image.values()]),
    }


@dataclass(frozen=True)
class BoxedImage:
    """One image with its boxes in one box labelset: what a detector trains and is scored on."""

    image_id: int
    path: str
    sha256: str
    width: int
    height: int
    group: str | None
    boxes: list[tuple[float, float, float, float]]
    labels: list[str]


def box_labelsets(catalog: Catalog, dataset: str) -> list[str]:
    """The box labelsets of a dataset, sorted."""
    with catalog.session() as session:
        ds = find_dataset(session, dataset)
        rows = session.scalars(select(BoxLabel.labelset).join(Box, BoxLabel.box_id == Box.id)
                               .join(Image, Box.image_id == Image.id).where(Image.dataset_id == ds.id).distinct())
        return sorted(rows)


def resolve_box_labelset(catalog: Catalog, dataset: str, labelset: str | None) -> str:
    """``labelset`` if the dataset's boxes have it, else the only one they have; a clear error otherwise."""
    names = box_labelsets(catalog, dataset)
    if not names:
        raise InputError(f"dataset {dataset!r} has no labelled boxes; import some with `handlens boxes import "
                         f"{dataset} FILE --labelset NAME` (COCO, labelme or CSV)")
    if labelset is None:
        if len(names) > 1:
            raise InputError(f"dataset {dataset!r} has boxes in several labelsets ({', '.join(names)}); choose one "
                             "with --labelset")
        return names[0]
    if labelset not in names:
        raise InputError(f"dataset {dataset!r} has no boxes in labelset {labelset!r}; its box labelsets are: "
                         f"{', '.join(names)}")
    return labelset


def boxed_images(catalog: Catalog, dataset: str, labelset: str, *, with_empty: bool = True) -> list[BoxedImage]:
    """Every image of ``dataset`` (by id) with its boxes labelled in ``labelset``; images without any such box
    are included when ``with_empty`` (a detector learns from empty images too: nothing to find there)."""
    with catalog.session() as session:
        ds = find_dataset(session, dataset)
        images = list(session.scalars(select(Image).where(Image.dataset_id == ds.id).order_by(Image.id)))
        rows = list(session.execute(select(Box.image_id, Box.x0, Box.y0, Box.x1, Box.y1, BoxLabel.label)
                                    .join(BoxLabel, BoxLabel.box_id == Box.id).join(Image, Box.image_id == Image.id)
                                    .where(Image.dataset_id == ds.id, BoxLabel.labelset == labelset)
                                    .order_by(Box.id)))
        found: dict[int, list[Any]] = defaultdict(list)
        for row in rows:
            found[row.image_id].append(row)
        return [BoxedImage(image_id=img.id, path=img.path, sha256=img.sha256, width=img.width, height=img.height,
                           group=img.group, boxes=[(r.x0, r.y0, r.x1, r.y1) for r in found[img.id]],
                           labels=[r.label for r in found[img.id]])
                for img in images if with_empty or found[img.id]]
