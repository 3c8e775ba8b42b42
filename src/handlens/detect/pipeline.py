"""Find, then classify and explain: ``handlens detect run``.

Each image's boxes come from the detector (sliced inference, ``detect.infer``). Each box is cut out with a
context margin (``margin`` of its width and height on each side, clipped to the image: a sigma clast's tails
and the matrix around it are what its sense is read from), classified by the classifier bundle as that bundle
sees whole images, and explained with any registered method. Each crop's map is normalised on its own (to its
largest magnitude) before it is pasted back at image coordinates, so a large clast does not drown a small
one; where crops overlap, the stronger value wins.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from handlens.core.errors import InputError
from handlens.detect.infer import Detections, Detector

DEFAULT_MARGIN = 0.15


def margin_box(box: Any, size: tuple[int, int], margin: float) -> tuple[int, int, int, int]:
    """``box`` grown by ``margin`` of its width and height on each side, in whole pixels, clipped to the image
    (``size`` is (width, height)); at least one pixel a side."""
    x0, y0, x1, y1 = (float(v) for v in box)
    dx, dy = margin * (x1 - x0), margin * (y1 - y0)
    left, top = max(0, int(np.floor(x0 - dx))), max(0, int(np.floor(y0 - dy)))
    right, bottom = min(size[0], int(np.ceil(x1 + dx))), min(size[1], int(np.ceil(y1 + dy)))
    return left, top, max(right, left + 1), max(bottom, top + 1)


@dataclass
class BoxResult:
    """One detected box: where, how sure, and (with a classifier) what it is and where that came from."""

    box: tuple[float, float, float, float]
    score: float
    detected: str  # the detector's class
    crop: tuple[int, int, int, int]  # the box with its margin, in image pixels
    label: str | None = None  # the classifier's class
    probabilities: dict[str, float] | None = None
    explained: bool = False
    #: the crop's map peak before its normalisation (0: a flat map, which shows no evidence at all)
    map_peak: float | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"box": [round(v, 2) for v in self.box], "score": round(self.score, 4),
                               "detected": self.detected, "crop": list(self.crop)}
        if self.label is not None:
            probabilities = {k: round(v, 6) for k, v in (self.probabilities or {}).items()}
            out |= {"label": self.label, "probabilities": probabilities}
        if self.map_peak is not None:
            out |= {"map_peak": float(f"{self.map_peak:.4g}"), "flat_map": self.map_peak == 0}
        return out


@dataclass
class ImageResult:
    """One image through the pipeline. ``heatmap``: (H, W) float32, each box's map normalised to [0, 1] (signed
    maps to [-1, 1]) and pasted at its crop; zero outside the crops; None without a method."""

    image: str
    size: tuple[int, int]
    boxes: list[BoxResult]
    tiles: int
    heatmap: np.ndarray | None = None
    signed: bool = False
    files: dict[str, str] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"image": self.image, "size": list(self.size), "tiles": self.tiles, "count": len(self.boxes),
                "boxes": [b.to_dict() for b in self.boxes], "files": self.files,
                "timings": {k: round(v, 4) for k, v in self.timings.items()}}


@dataclass
class PipelineReport:
    detector: str
    classifier: str | None
    method: str | None
    margin: float
    score_threshold: float
    images: list[ImageResult]

    def to_dict(self) -> dict[str, Any]:
        return {"detector": self.detector, "classifier": self.classifier, "method": self.method,
                "margin": self.margin, "score_threshold": self.score_threshold,
                "images": [r.to_dict() for r in self.images],
                "boxes": sum(len(r.boxes) for r in self.images)}


def check_pipeline(*, classifier: Any, method: str | None, margin: float) -> None:
    """Options that would do nothing, refused before any image is read."""
    if not 0 <= margin <= 2:
        raise InputError(f"--margin {margin}: a share of the box's width and height, between 0 and 2")
    if method is not None and classifier is None:
        raise InputError("--method explains the classifier's answer for each box: give --classifier BUNDLE too "
                         "(a detector alone has no class map to explain)")
    if method is not None:
        from handlens.explain.registry import EXPLAINERS

        EXPLAINERS.get(method)  # an unknown method: a clear error with the choices


def classify_boxes(classifier: Any, picture: np.ndarray, boxes: list[BoxResult], *, method: str | None,
                   layer: str | None = None, params: Any = None, tta: bool = False) -> tuple[np.ndarray | None, bool]:
    """Label each box with the classifier (and explain it with ``method``); returns the pasted per-box map.
    ``tta``: each crop's probabilities averaged over the views the classifier's training policy allows (a
    mirror that swaps labels is no such view); the map explains the crop as it is, for the label chosen."""
    from handlens.explain.image import explain_image

    if not boxes:
        return (np.zeros(picture.shape[:2], np.float32) if method else None), False
    crops = [picture[b.crop[1]:b.crop[3], b.crop[0]:b.crop[2]] for b in boxes]
    probabilities = classifier.predict_proba(crops, tta=True) if tta else classifier.predict_proba(crops)
    for box, probs in zip(boxes, probabilities, strict=True):
        box.probabilities = dict(zip(classifier.classes, map(float, probs), strict=True))
        box.label = list(classifier.classes)[int(np.argmax(probs))]
    if method is None:
        return None, False
    heat = np.zeros(picture.shape[:2], np.float32)
    signed = False
    for box, crop in zip(boxes, crops, strict=True):
        explained = explain_image(classifier, np.ascontiguousarray(crop), method=method, layer=layer,
                                  target=box.label, params=params)
        signed = explained.signed
        local = np.asarray(explained.heatmap, dtype=np.float32)
        peak = float(np.abs(local).max()) if signed else float(local.max() - min(0.0, local.min()))
        box.map_peak = peak
        local = local / peak if peak > 0 else np.zeros_like(local)
        if not signed:
            local = (local - min(0.0, local.min())).clip(0, 1)
        x0, y0, x1, y1 = box.crop
        region = heat[y0:y1, x0:x1]
        heat[y0:y1, x0:x1] = np.where(np.abs(local) > np.abs(region), local, region)
        box.explained = True
    return heat, signed


def detect_image(detector: Detector, image: Any, *, classifier: Any = None, method: str | None = None,
                 layer: str | None = None, margin: float = DEFAULT_MARGIN, score_threshold: float | None = None,
                 single_pass: bool = False, params: Any = None, max_tiles: int | None = None,
                 name: str = "", tta: bool = False) -> ImageResult:
    """One image through the pipeline (see the module docstring); no detection is an empty result."""
    from handlens.transforms.preprocess import load_rgb

    started = time.perf_counter()
    picture = np.asarray(load_rgb(image))
    found: Detections = detector.detect(picture, score_threshold=score_threshold, single_pass=single_pass,
                                        max_tiles=max_tiles)
    timings = {"detect": time.perf_counter() - started}
    size = (picture.shape[1], picture.shape[0])
    boxes = [BoxResult(box=tuple(float(v) for v in box), score=float(score), detected=label,  # type: ignore[arg-type]
                       crop=margin_box(box, size, margin))
             for box, score, label in zip(found.boxes, found.scores, found.labels, strict=True)]
    heat, signed = None, False
    if classifier is not None:
        started = time.perf_counter()
        heat, signed = classify_boxes(classifier, picture, boxes, method=method, layer=layer, params=params,
                                      tta=tta)
        timings["classify_explain"] = time.perf_counter() - started
    return ImageResult(image=name or (str(image) if isinstance(image, str | Path) else "upload"), size=size,
                       boxes=boxes, tiles=found.tiles, heatmap=heat, signed=signed, timings=timings)


def run_pipeline(detector: Detector, images: list[str], *, classifier: Any = None, method: str | None = None,
                 layer: str | None = None, margin: float = DEFAULT_MARGIN, score_threshold: float | None = None,
                 single_pass: bool = False, out: Path | None = None, params: Any = None,
                 tta: bool = False) -> PipelineReport:
    """Every image through the pipeline; with ``out``, each image's overlay, crops and map, and ``result.json``."""
    check_pipeline(classifier=classifier, method=method, margin=margin)
    if tta and classifier is None:
        raise InputError("--tta averages the classifier's views of each crop: give --classifier BUNDLE too")
    if classifier is not None and method is not None and layer is not None:
        from handlens.explain.image import check_request

        check_request(classifier, layer=layer, target="pred")
    results = []
    for path in images:
        result = detect_image(detector, path, classifier=classifier, method=method, layer=layer, margin=margin,
                              score_threshold=score_threshold, single_pass=single_pass, params=params, name=str(path),
                              tta=tta)
        if out is not None:
            from handlens.detect.render import write_image_outputs

            result.files = write_image_outputs(result, path, Path(out))
        results.append(result)
    report = PipelineReport(detector=str(detector.path), classifier=str(classifier.path) if classifier else None,
                            method=method, margin=margin,
                            score_threshold=detector.score_threshold if score_threshold is None else score_threshold,
                            images=results)
    if out is not None:
        import json

        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / "result.json").write_text(json.dumps(report.to_dict(), indent=1) + "\n")
    return report
