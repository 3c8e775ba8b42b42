"""Detector bundles and sliced inference: large images as overlapping tiles, boxes merged with ``batched_nms``.

An image larger than the detector's input is resized by the bundle's working ``scale`` and covered by tiles of
``tile`` pixels that overlap by the bundle's ``overlap`` (the project's tiler, ``explain.tiles.tile_origins``).
The overlap is chosen at training to hold the largest box whole, so a box cut by an *inner* tile edge is also
seen whole by the neighbouring tile: the cut copy is dropped, and the copies that remain are merged per class
with ``batched_nms`` (the SAHI idea: Akyon et al., "Slicing Aided Hyper Inference", ICIP 2022). Boxes come back
in the image's own pixels. ``single_pass`` instead resizes the whole image to one tile (fast, and blind to
objects that shrink below the pyramid's finest level).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from handlens.core.errors import InputError
from handlens.detect.data import resize_by
from handlens.detect.model import DetectorNet, build_detector
from handlens.explain.tiles import tile_origins

#: a box this close (working pixels) to an inner tile edge counts as cut by it
EDGE = 1.0


@dataclass
class Detections:
    """Boxes found on one image: (N, 4) x0 y0 x1 y1 in image pixels, scores, class names; sorted by score."""

    boxes: np.ndarray
    scores: np.ndarray
    labels: list[str]
    size: tuple[int, int]  # the image's (width, height)
    tiles: int = 1
    seconds: float = 0.0
    timings: dict[str, float] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.labels)

    def to_dict(self) -> dict[str, Any]:
        return {"size": list(self.size), "tiles": self.tiles, "seconds": round(self.seconds, 4),
                "boxes": [{"box": [round(float(v), 2) for v in box], "score": round(float(score), 4), "label": label}
                          for box, score, label in zip(self.boxes, self.scores, self.labels, strict=True)]}


class Detector:
    """A loaded detector bundle: the network in eval mode and how it sees images (its manifest's ``input``)."""

    def __init__(self, path: Path, manifest: dict[str, Any], net: DetectorNet) -> None:
        self.path, self.manifest, self.net = path, manifest, net
        self.classes: list[str] = list(manifest["classes"])
        spec = manifest["input"]
        self.scale, self.tile, self.overlap = float(spec["scale"]), int(spec["tile"]), float(spec["overlap"])
        self.score_threshold = float(manifest.get("score_threshold", 0.3))
        self.nms_iou = float(manifest.get("nms_iou", 0.5))
        self.max_detections = int(manifest.get("max_detections", 300))

    def __repr__(self) -> str:
        return f"Detector({self.manifest.get('architecture')} on {self.manifest.get('backbone')}, {self.path})"

    def detect(self, image: Any, *, score_threshold: float | None = None, single_pass: bool = False,
               batch_size: int = 4, max_tiles: int | None = None) -> Detections:
        """Boxes on one image (a path, PIL image or (H, W, 3) uint8 array); see the module docstring."""
        from handlens.transforms.preprocess import load_rgb

        picture = np.asarray(load_rgb(image))
        threshold = self.score_threshold if score_threshold is None else score_threshold
        return sliced_detect(self.net, picture, scale=self.scale, tile=self.tile, overlap=self.overlap,
                             classes=self.classes, score_threshold=threshold, nms_iou=self.nms_iou,
                             max_detections=self.max_detections, single_pass=single_pass, batch_size=batch_size,
                             max_tiles=max_tiles)


def load_detector(path: str | Path) -> Detector:
    """A detector bundle (``kind: detector``); a classifier bundle is a clear error, a damaged one says why."""
    from safetensors.torch import load_file

    from handlens.models.bundle import DamagedBundleError, check_weights_file, read_manifest

    path = Path(path).expanduser().resolve()
    manifest = read_manifest(path, kind="detector")
    weights = check_weights_file(path)
    net = build_detector(manifest["architecture"], manifest["backbone"], classes=len(manifest["classes"]),
                         tile=int(manifest["input"]["tile"]), channels=int(manifest["fpn_channels"]))
    try:
        net.load_state_dict(load_file(str(weights)), strict=True)
    except Exception as exc:  # a truncated file, or weights of another architecture
        raise DamagedBundleError(path, f"its weights do not load into the detector: {str(exc)[:300]}") from None
    net.eval()
    return Detector(path, manifest, net)


def _pad(crop: np.ndarray, tile: int) -> np.ndarray:
    if crop.shape[0] == tile and crop.shape[1] == tile:
        return crop
    out = np.zeros((tile, tile, 3), dtype=np.uint8)
    out[:crop.shape[0], :crop.shape[1]] = crop
    return out


def _cut_at_inner_edge(boxes: torch.Tensor, origin: tuple[int, int], tile: int, *, width: int,
                       height: int) -> torch.Tensor:
    """Which boxes (tile pixels) touch an edge of this tile that is not the working image's own edge."""
    x, y = origin
    cut = torch.zeros(len(boxes), dtype=torch.bool)
    if x > 0:
        cut |= boxes[:, 0] <= EDGE
    if y > 0:
        cut |= boxes[:, 1] <= EDGE
    if x + tile < width:
        cut |= boxes[:, 2] >= tile - EDGE
    if y + tile < height:
        cut |= boxes[:, 3] >= tile - EDGE
    return cut


def sliced_detect(net: DetectorNet, picture: np.ndarray, *, scale: float, tile: int, overlap: float,
                  classes: list[str], score_threshold: float, nms_iou: float, max_detections: int = 300,
                  single_pass: bool = False, batch_size: int = 4, max_tiles: int | None = None) -> Detections:
    """Detect on (H, W, 3) uint8 ``picture`` (see the module docstring); boxes in its own pixels."""
    from torchvision.ops import batched_nms

    started = time.perf_counter()
    height, width = picture.shape[:2]
    if single_pass:
        scale = tile / max(height, width)
    working = resize_by(picture, scale)
    h, w = working.shape[:2]
    origins = [(x, y) for y in tile_origins(h, tile, overlap) for x in tile_origins(w, tile, overlap)]
    if max_tiles is not None and len(origins) > max_tiles:
        raise InputError(f"detecting on this {width}x{height} image takes {len(origins)} tiles; the limit is "
                         f"{max_tiles}")
    found_boxes, found_scores, found_labels = [], [], []
    net.eval()
    with torch.inference_mode():
        for start in range(0, len(origins), batch_size):
            chunk = origins[start:start + batch_size]
            batch = [torch.tensor(_pad(working[y:y + tile, x:x + tile], tile)).permute(2, 0, 1).float() / 255
                     for x, y in chunk]
            for (x, y), out in zip(chunk, net(batch), strict=True):
                keep = (out["scores"] >= score_threshold) & (out["labels"] >= 1)  # 0: the background
                sides = out["boxes"][:, 2:] - out["boxes"][:, :2]
                keep &= (sides >= 1.0).all(dim=1)  # a degenerate box marks nothing
                keep &= ~_cut_at_inner_edge(out["boxes"], (x, y), tile, width=w, height=h)
                found_boxes.append(out["boxes"][keep] + torch.tensor([x, y, x, y], dtype=torch.float32))
                found_scores.append(out["scores"][keep])
                found_labels.append(out["labels"][keep])
    boxes, scores, labels = torch.cat(found_boxes), torch.cat(found_scores), torch.cat(found_labels)
    kept = batched_nms(boxes, scores, labels, nms_iou)[:max_detections]
    boxes = (boxes[kept] / scale).clamp_(min=0)
    boxes[:, [0, 2]] = boxes[:, [0, 2]].clamp(max=width)
    boxes[:, [1, 3]] = boxes[:, [1, 3]].clamp(max=height)
    names = [classes[int(i) - 1] for i in labels[kept]]
    return Detections(boxes=boxes.numpy(), scores=scores[kept].numpy(), labels=names, size=(width, height),
                      tiles=len(origins), seconds=time.perf_counter() - started)
