"""Detection scores: COCO mean average precision (torchmetrics, through the COCO evaluator) and the score
threshold with the best F1 at IoU 0.5 (what a user's boxes are cut at)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

#: thresholds tried when calibrating the reported boxes' score threshold
THRESHOLDS = tuple(round(t, 2) for t in np.arange(0.05, 0.96, 0.05))


def mean_average_precision(predictions: list[Any], truths: list[Any], classes: list[str]) -> dict[str, float]:
    """mAP@0.5 and mAP@[.5:.95] (COCO's 101-point interpolation) of ``predictions`` (``Detections``) against
    ``truths`` (``BoxedImage``), in image pixels."""
    from torchmetrics.detection import MeanAveragePrecision

    index = {name: i + 1 for i, name in enumerate(classes)}
    metric = MeanAveragePrecision(iou_type="bbox", box_format="xyxy")
    metric.warn_on_many_detections = False  # COCO counts the best 100 per image; that is the point
    preds = [{"boxes": torch.as_tensor(p.boxes, dtype=torch.float32).reshape(-1, 4),
              "scores": torch.as_tensor(p.scores, dtype=torch.float32),
              "labels": torch.as_tensor([index[n] for n in p.labels], dtype=torch.int64)} for p in predictions]
    target = [{"boxes": torch.as_tensor(t.boxes, dtype=torch.float32).reshape(-1, 4),
               "labels": torch.as_tensor([index[n] for n in t.labels], dtype=torch.int64)} for t in truths]
    metric.update(preds, target)
    result = metric.compute()
    return {"map_50": float(result["map_50"]), "map": float(result["map"]), "map_75": float(result["map_75"])}


def _iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod((rb - lt).clip(0), axis=2)
    area_a = np.prod(a[:, 2:] - a[:, :2], axis=1)
    area_b = np.prod(b[:, 2:] - b[:, :2], axis=1)
    return inter / np.maximum(area_a[:, None] + area_b[None] - inter, 1e-9)


def match_counts(prediction: Any, truth: Any, *, threshold: float, iou: float = 0.5) -> tuple[int, int, int]:
    """(true positives, false positives, missed) of one image's boxes above ``threshold``: greedy by score,
    each true box matched at most once, same class only."""
    keep = np.asarray(prediction.scores) >= threshold
    boxes = np.asarray(prediction.boxes, dtype=np.float64).reshape(-1, 4)[keep]
    labels = [n for n, k in zip(prediction.labels, keep, strict=True) if k]
    truth_boxes = np.asarray(truth.boxes, dtype=np.float64).reshape(-1, 4)
    if not len(boxes) or not len(truth_boxes):
        return 0, len(boxes), len(truth_boxes)
    overlaps = _iou(boxes, truth_boxes)
    used = np.zeros(len(truth_boxes), dtype=bool)
    hits = 0
    for i in range(len(boxes)):  # already sorted by score
        same = np.array([t == labels[i] for t in truth.labels]) & ~used
        candidates = np.where(same, overlaps[i], -1.0)
        best = int(candidates.argmax())
        if candidates[best] >= iou:
            used[best] = True
            hits += 1
    return hits, len(boxes) - hits, len(truth_boxes) - hits


def detection_f1(predictions: list[Any], truths: list[Any], *, threshold: float) -> dict[str, float]:
    tp = fp = fn = 0
    for prediction, truth in zip(predictions, truths, strict=True):
        a, b, c = match_counts(prediction, truth, threshold=threshold)
        tp, fp, fn = tp + a, fp + b, fn + c
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1, "threshold": threshold}


def best_threshold(predictions: list[Any], truths: list[Any]) -> dict[str, float]:
    """The threshold with the highest F1 at IoU 0.5 (ties: the higher threshold, fewer false boxes)."""
    scored = [detection_f1(predictions, truths, threshold=t) for t in THRESHOLDS]
    return max(scored, key=lambda s: (round(s["f1"], 9), s["threshold"]))
