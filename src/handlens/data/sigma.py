"""Synthetic sigma clasts: large images of a textured matrix with 3-8 porphyroclasts, boxed and labelled by
shear sense, for a find-then-classify job (a detector boxes the clasts, the crop classifier names the sense).

A sigma clast is an elliptical porphyroclast with two wedge-shaped tails that leave it at opposite ends of
its long axis and bend in the same rotational sense. Every clast is drawn in its shear frame (``u`` along
the shear plane, ``v`` across it, ``v`` up on the screen): for ``cw`` (dextral, top-to-the-right shear, in
which the clast turns clockwise) the right-hand tail leaves the upper side of the clast and the left-hand
tail the lower side, so the tails step up to the right; ``ccw`` is its mirror image. The tails are
point-symmetric about the clast centre, so a 180 degree turn keeps the label and a mirror flips it
(``tail_sense`` reads the sense back from the masks, which is how the tests check it).

The shear plane has one orientation per image (one shear zone per picture, as in a thin section), with a
few degrees of jitter per clast; the sense is drawn per clast (a balanced crop dataset). The matrix is fine,
low-contrast noise with small grains elongated along the shear plane (a faint foliation).

Everything is exact: a clast's box is the tight box of the pixels it was painted on (ellipse and tails),
not of its parameters, and image ``i`` depends only on ``(seed, i)`` (``np.random.default_rng([seed, i])``),
so a seed names a dataset and another seed is a held-out set. Pure numpy, scipy and scikit-image.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from handlens.core.errors import InputError

if TYPE_CHECKING:
    import numpy as np

#: the two labels, by shear sense
SENSES = ("cw", "ccw")
CATEGORY = "sigma-clast"
#: context kept around a clast in its crop, as a share of the box's width and height on each side
CROP_MARGIN = 0.15
CLASTS_PER_IMAGE = (3, 8)
LONG_AXIS = (60.0, 220.0)
#: the smallest image side that still holds 8 clasts of the smallest size
MIN_SIDE = 400
#: placements tried per clast before the image is given up as too crowded
TRIES = 400
JITTER_DEG = 4.0


@dataclass(frozen=True)
class DrawnClast:
    """One clast as drawn: its tight box (x0, y0, x1, y1; x1 and y1 exclusive, in pixels), label, shear-plane
    angle (degrees, counter-clockwise on the screen from the x axis) and its masks over the box."""

    box: tuple[int, int, int, int]
    label: str
    shear_deg: float
    body: np.ndarray = field(repr=False)
    tails: np.ndarray = field(repr=False)

    @property
    def mask(self) -> np.ndarray:
        """Every pixel of the clast (ellipse and tails) over its box."""
        return self.body | self.tails


@dataclass(frozen=True)
class SigmaClast:
    """A written clast: the image it is in, its box, label, shear-plane angle and crop file (relative paths)."""

    image: str
    box: tuple[int, int, int, int]
    label: str
    shear_deg: float
    crop: str

    def to_dict(self) -> dict[str, Any]:
        return {"image": self.image, "box": list(self.box), "label": self.label,
                "shear_deg": round(self.shear_deg, 3), "crop": self.crop}


@dataclass(frozen=True)
class SigmaReport:
    """What ``generate_sigma_clasts`` wrote under ``out``: images, clasts, and the box and crop files."""

    out: Path
    seed: int
    size: tuple[int, int]
    images: list[str]
    clasts: list[SigmaClast]

    @property
    def coco(self) -> Path:
        return self.out / "boxes.coco.json"

    @property
    def csv(self) -> Path:
        return self.out / "boxes.csv"

    @property
    def crops(self) -> Path:
        return self.out / "crops"

    def counts(self) -> dict[str, int]:
        """Clasts per label."""
        return {sense: sum(c.label == sense for c in self.clasts) for sense in SENSES}

    def to_dict(self) -> dict[str, Any]:
        return {"out": str(self.out), "seed": self.seed, "size": list(self.size), "images": len(self.images),
                "clasts": len(self.clasts), "labels": self.counts(), "coco": str(self.coco), "csv": str(self.csv),
                "crops": str(self.crops)}


def generate_sigma_clasts(out: Path, *, images: int, seed: int, size: tuple[int, int] = (2000, 1500),
                          image_format: str = "png") -> SigmaReport:
    """Write ``images`` images (``images/sigma_<i>.png``, or ``.jpg`` at quality 92 with
    ``image_format="jpeg"``) of ``size`` (width, height) under ``out``, with ``boxes.coco.json``,
    ``boxes.csv`` (path,x0,y0,x1,y1,label) and ``crops/<cw|ccw>/*.png`` (each clast with a 15% margin), a
    folder-per-class tree for ``handlens import``. Deterministic from ``seed``."""
    import numpy as np
    from PIL import Image

    if images < 1:
        raise InputError(f"--images must be at least 1 (got {images})")
    if image_format not in ("png", "jpeg"):
        raise InputError(f"image format {image_format!r} is not one of: png, jpeg")
    width, height = size
    if min(width, height) < MIN_SIDE:
        raise InputError(f"sigma-clast images need sides of at least {MIN_SIDE} px to hold 8 clasts "
                         f"(got {width}x{height})")
    out = Path(out)
    for sub in ("images", *(f"crops/{s}" for s in SENSES)):
        (out / sub).mkdir(parents=True, exist_ok=True)
    suffix = ".png" if image_format == "png" else ".jpg"
    names: list[str] = []
    clasts: list[SigmaClast] = []
    for index in range(images):
        pixels, drawn = draw_sigma_image(np.random.default_rng([seed, index]), (width, height))
        name = f"images/sigma_{index:03d}{suffix}"
        picture = Image.fromarray(pixels, "RGB")
        if image_format == "png":
            picture.save(out / name, compress_level=3)
        else:
            picture.save(out / name, quality=92)
        names.append(name)
        for number, clast in enumerate(drawn):
            crop = f"crops/{clast.label}/sigma_{index:03d}_{number:02d}.png"
            Image.fromarray(pixels[_slices(crop_box(clast.box, (width, height)))], "RGB").save(out / crop)
            clasts.append(SigmaClast(image=name, box=clast.box, label=clast.label, shear_deg=clast.shear_deg,
                                     crop=crop))
    report = SigmaReport(out=out, seed=seed, size=(width, height), images=names, clasts=clasts)
    _write_csv(report)
    _write_coco(report)
    return report


def draw_sigma_image(rng: np.random.Generator, size: tuple[int, int]) -> tuple[np.ndarray, list[DrawnClast]]:
    """One image (``size`` = width, height) as an RGB uint8 array, and its 3-8 clasts with their masks."""
    import numpy as np

    width, height = size
    shear = float(rng.uniform(0.0, 180.0))
    gray = _matrix(rng, (width, height), shear)
    count = int(rng.integers(CLASTS_PER_IMAGE[0], CLASTS_PER_IMAGE[1] + 1))
    longest = min(LONG_AXIS[1], min(width, height) / 6.0)
    drawn: list[DrawnClast] = []
    for _ in range(count):
        clast = _place(rng, (width, height), shear=shear, longest=longest, boxes=[c.box for c in drawn])
        _paint(rng, gray, clast)
        drawn.append(clast)
    tint = rng.uniform(0.9, 1.0, size=3)
    tint /= tint.max()
    rgb = np.clip(gray[..., None] * tint * 255.0 + 0.5, 0, 255).astype(np.uint8)
    return rgb, drawn


def tail_sense(body: np.ndarray, tails: np.ndarray) -> str:
    """The shear sense a clast's masks show: ``cw`` when the principal axis of the tails is turned
    counter-clockwise (on the screen) from the long axis of the ellipse, ``ccw`` otherwise.

    Why it names the sense: in the shear frame the ``cw`` tails sit up-right and down-left of the centre,
    so the line through them is turned counter-clockwise from the shear plane, which the ellipse's long
    axis follows to within ``JITTER_DEG``. The angle between two axes is kept by any turn of the picture
    and negated by a mirror, so a mirrored ``cw`` clast reads ``ccw``."""
    import numpy as np

    turn = _axis_angle(tails) - _axis_angle(body)
    turn = (turn + np.pi / 2) % np.pi - np.pi / 2
    return "cw" if turn > 0 else "ccw"


def crop_box(box: tuple[int, int, int, int], size: tuple[int, int]) -> tuple[int, int, int, int]:
    """``box`` grown by ``CROP_MARGIN`` of its width and height on each side, clipped to the image."""
    x0, y0, x1, y1 = box
    dx, dy = round(CROP_MARGIN * (x1 - x0)), round(CROP_MARGIN * (y1 - y0))
    return max(0, x0 - dx), max(0, y0 - dy), min(size[0], x1 + dx), min(size[1], y1 + dy)


@dataclass(frozen=True)
class SigmaDemo:
    """The sigma-clast demo in a workspace: what was generated, the import of its crops (the classifier's
    dataset) and of its large images with their boxes (the detector's)."""

    dataset: str
    report: SigmaReport
    imported: Any
    scenes: str = ""
    scenes_imported: Any = None
    boxes: Any = None

    def to_dict(self) -> dict[str, Any]:
        out = {"dataset": self.dataset, **self.report.to_dict(), "import": self.imported.to_dict()}
        if self.scenes:
            out |= {"scenes": self.scenes, "scenes_import": self.scenes_imported.to_dict(),
                    "boxes_import": self.boxes.to_dict()}
        return out


#: the crop classifier's augmentation: a mirror swaps the sense, a turn keeps it (written beside the demo data)
CHIRAL_POLICY = """name: chiral-sigma
description: sigma clasts; a mirror swaps cw and ccw, a turn keeps the sense
steps:
  - {op: resized_crop, p: 1.0, scale: [0.8, 1.0]}
  - {op: hflip, p: 0.5, labels: {cw: ccw, ccw: cw}}
  - {op: vflip, p: 0.5, labels: {cw: ccw, ccw: cw}}
  - {op: rotate, p: 0.5, degrees: right_angles}
"""

#: the large images' one image-level label (a catalog image has a label); their boxes carry the classes
SCENE_LABELSET, SCENE_LABEL = "scene", "sigma-clasts"
#: the box labelsets of the scenes: the COCO category, and the sense from each annotation's attributes
DETECTION_LABELSET, ROTATION_LABELSET = "detection", "rotation"


def prepare_sigma_demo(workspace: Any, *, images: int, seed: int, size: tuple[int, int] = (2000, 1500)) -> SigmaDemo:
    """Generate ``images`` sigma-clast images into ``<workspace>/demo/sigma-clasts-<seed>/``; import their crops
    as dataset ``sigma-crops-<seed>`` (labels cw/ccw) and the large images as ``sigma-clasts-<seed>`` with their
    boxes in box labelsets ``detection`` (sigma-clast) and ``rotation`` (cw/ccw). Running it again imports
    nothing new."""
    from handlens.data.boxes import import_boxes
    from handlens.data.catalog import open_catalog
    from handlens.data.importer import import_path

    report = generate_sigma_clasts(workspace.demo_dir / f"sigma-clasts-{seed}", images=images, seed=seed, size=size)
    (report.out / "chiral-sigma.yaml").write_text(CHIRAL_POLICY)
    manifest = report.out / "images.csv"
    with manifest.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "label", "labelset"])
        writer.writerows([name, SCENE_LABEL, SCENE_LABELSET] for name in report.images)
    dataset, scenes = f"sigma-crops-{seed}", f"sigma-clasts-{seed}"
    catalog = open_catalog(workspace.db_url)
    try:
        imported = import_path(catalog, report.crops, dataset)
        scenes_imported = import_path(catalog, report.out, scenes, csv_file=manifest)
        boxes = import_boxes(catalog, scenes, report.coco, fmt="coco", labelset=DETECTION_LABELSET)
    finally:
        catalog.close()
    return SigmaDemo(dataset=dataset, report=report, imported=imported, scenes=scenes,
                     scenes_imported=scenes_imported, boxes=boxes)


# --------------------------------------------------------------------------- drawing


def _matrix(rng: np.random.Generator, size: tuple[int, int], shear: float) -> np.ndarray:
    """The matrix: coarse and fine smoothed noise plus small grains along the shear plane, low contrast."""
    import numpy as np
    from scipy.ndimage import gaussian_filter
    from skimage.draw import ellipse
    from skimage.transform import resize

    width, height = size
    coarse = gaussian_filter(rng.standard_normal((height // 8 + 2, width // 8 + 2)), 1.5)
    coarse = resize(coarse / coarse.std(), (height, width), order=1, mode="edge")
    fine = gaussian_filter(rng.standard_normal((height, width)).astype(np.float32), 0.8)
    gray = (0.55 + 0.035 * coarse + 0.03 * fine / fine.std()).astype(np.float32)
    # skimage's rotation is measured from the row axis (its first radius): +90 degrees lays it along x
    rotation = np.deg2rad(shear + 90.0)
    for _ in range(width * height // 3000):
        r, c = rng.uniform(0, height), rng.uniform(0, width)
        along = rng.uniform(2.0, 7.0)
        rr, cc = ellipse(r, c, along, along * rng.uniform(0.3, 0.6), shape=(height, width), rotation=rotation)
        gray[rr, cc] += np.float32(rng.uniform(-0.06, 0.06))
    return gray


def _place(rng: np.random.Generator, size: tuple[int, int], *, shear: float, longest: float,
           boxes: list[tuple[int, int, int, int]]) -> DrawnClast:
    """A new clast whose box, grown by the crop margin, meets no other grown box; redrawn until one fits."""
    width, height = size
    for _ in range(TRIES):
        label = SENSES[int(rng.integers(0, 2))]
        tilt = shear + float(rng.uniform(-JITTER_DEG, JITTER_DEG))
        body, tails = _clast_masks(rng, float(rng.uniform(LONG_AXIS[0], longest)), shear=shear, tilt=tilt,
                                   sense=1 if label == "cw" else -1)
        bh, bw = body.shape
        if bw >= width or bh >= height:
            continue
        x0, y0 = int(rng.integers(0, width - bw + 1)), int(rng.integers(0, height - bh + 1))
        box = (x0, y0, x0 + bw, y0 + bh)
        grown = crop_box(box, size)
        if all(_disjoint(grown, crop_box(other, size)) for other in boxes):
            return DrawnClast(box=box, label=label, shear_deg=shear, body=body, tails=tails)
    raise InputError(f"could not place {len(boxes) + 1} sigma clasts without overlap in a {width}x{height} "
                     "image; use a larger size")


def _clast_masks(rng: np.random.Generator, long_axis: float, *, shear: float, tilt: float,
                 sense: int) -> tuple[np.ndarray, np.ndarray]:
    """The ellipse and tail masks of one clast, cut to their tight common box.

    The ellipse (semi-axes ``a`` > ``b``) lies along ``tilt``; in the shear frame (``shear``) the right tail is
    a wedge along a quadratic Bezier curve from the ellipse's upper side (``sense`` = +1; lower for -1) out
    past its end, leaving level with the shoulder and sinking toward the plane; the left tail is its
    point reflection."""
    import numpy as np
    from skimage.draw import polygon

    a = long_axis / 2.0
    b = a * float(rng.uniform(0.45, 0.75))
    alpha = np.deg2rad(rng.uniform(35.0, 65.0))
    length = a * float(rng.uniform(0.7, 1.3))
    root = float(rng.uniform(0.35, 0.55)) * b
    start = np.array([0.85 * a * np.cos(alpha), sense * 0.85 * b * np.sin(alpha)])
    end = np.array([a + length, sense * b * float(rng.uniform(0.05, 0.3))])
    control = np.array([start[0] + 0.6 * (end[0] - start[0]), start[1]])
    t = np.linspace(0.0, 1.0, 48)[:, None]
    line = (1 - t) ** 2 * start + 2 * (1 - t) * t * control + t**2 * end
    tangent = 2 * (1 - t) * (control - start) + 2 * t * (end - control)
    normal = np.stack([-tangent[:, 1], tangent[:, 0]], axis=1) / np.linalg.norm(tangent, axis=1, keepdims=True)
    half = root * (1 - t) ** 1.2 + 0.6
    wedge = np.concatenate([line + half * normal, (line - half * normal)[::-1]])
    reach = int(np.ceil(a + length + root + 3))
    side = 2 * reach + 1
    tails = np.zeros((side, side), bool)
    for points in (wedge, -wedge):
        x, y = _turn(points, shear)
        rr, cc = polygon(reach - y, reach + x, shape=tails.shape)
        tails[rr, cc] = True
    rows, cols = np.mgrid[0:side, 0:side]
    u, v = _turn(np.stack([cols.ravel() - reach, reach - rows.ravel()], axis=1).astype(float), -tilt)
    body = ((u / a) ** 2 + (v / b) ** 2 <= 1.0).reshape(side, side)
    mask = body | tails
    ys, xs = np.nonzero(mask)
    cut = (slice(ys.min(), ys.max() + 1), slice(xs.min(), xs.max() + 1))
    return body[cut], tails[cut] & ~body[cut]


def _paint(rng: np.random.Generator, gray: np.ndarray, clast: DrawnClast) -> None:
    """Paint the clast into ``gray``: a darker or brighter ellipse with smoothed internal texture, and tails
    of the same material at lower contrast. Only the clast's own pixels change."""
    import numpy as np
    from scipy.ndimage import gaussian_filter

    region = gray[_slices(clast.box)]
    shift = float(rng.choice([-1.0, 1.0]) * rng.uniform(0.14, 0.26))
    grain = gaussian_filter(rng.standard_normal(region.shape).astype(np.float32), 2.0)
    grain *= np.float32(0.02 / max(float(grain.std()), 1e-6))
    region[clast.body] = (0.55 + shift) + 0.3 * (region[clast.body] - 0.55) + grain[clast.body]
    region[clast.tails] += np.float32(shift * rng.uniform(0.5, 0.75))


# --------------------------------------------------------------------------- files


def _write_csv(report: SigmaReport) -> None:
    with report.csv.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "x0", "y0", "x1", "y1", "label"])
        writer.writerows([c.image, *c.box, c.label] for c in report.clasts)


def _write_coco(report: SigmaReport) -> None:
    """COCO boxes ([x, y, w, h] in pixels), one category, the sense in each annotation's ``attributes``."""
    width, height = report.size
    ids = {name: number for number, name in enumerate(report.images, start=1)}
    annotations = [{"id": number, "image_id": ids[c.image], "category_id": 1,
                    "bbox": [c.box[0], c.box[1], c.box[2] - c.box[0], c.box[3] - c.box[1]],
                    "area": (c.box[2] - c.box[0]) * (c.box[3] - c.box[1]), "iscrowd": 0,
                    "attributes": {"rotation": c.label, "shear_plane_deg": round(c.shear_deg, 3)}, "crop": c.crop}
                   for number, c in enumerate(report.clasts, start=1)]
    document = {"info": {"description": "handlens synthetic sigma clasts", "seed": report.seed},
                "images": [{"id": ids[name], "file_name": name, "width": width, "height": height}
                           for name in report.images],
                "annotations": annotations,
                "categories": [{"id": 1, "name": CATEGORY, "supercategory": "porphyroclast"}]}
    report.coco.write_text(json.dumps(document, indent=1) + "\n")


# --------------------------------------------------------------------------- geometry


def _turn(points: np.ndarray, degrees: float) -> tuple[np.ndarray, np.ndarray]:
    """``points`` (n, 2; x right, y up) turned counter-clockwise by ``degrees``, as x and y arrays."""
    import numpy as np

    angle = np.deg2rad(degrees)
    cos, sin = np.cos(angle), np.sin(angle)
    return points[:, 0] * cos - points[:, 1] * sin, points[:, 0] * sin + points[:, 1] * cos


def _axis_angle(mask: np.ndarray) -> float:
    """The principal axis of ``mask``'s pixels, in radians counter-clockwise on the screen (y up)."""
    import numpy as np

    rows, cols = np.nonzero(mask)
    x, y = cols - cols.mean(), -(rows - rows.mean())
    return 0.5 * float(np.arctan2(2 * (x * y).mean(), (x * x).mean() - (y * y).mean()))


def _slices(box: tuple[int, int, int, int]) -> tuple[slice, slice]:
    return slice(box[1], box[3]), slice(box[0], box[2])


def _disjoint(one: tuple[int, int, int, int], other: tuple[int, int, int, int]) -> bool:
    return one[2] <= other[0] or other[2] <= one[0] or one[3] <= other[1] or other[3] <= one[1]
