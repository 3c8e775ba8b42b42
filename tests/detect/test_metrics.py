"""Detection scores: COCO mAP through torchmetrics, greedy matching, and the calibrated threshold."""

from __future__ import annotations

import numpy as np

from handlens.data.boxes import BoxedImage
from handlens.detect.infer import Detections
from handlens.detect.metrics import best_threshold, match_counts, mean_average_precision

TRUTH = [(10, 10, 50, 50), (100, 100, 160, 140)]


def truth(boxes=TRUTH) -> BoxedImage:
    return BoxedImage(image_id=1, path="x", sha256="x", width=200, height=200, group=None, boxes=list(boxes),
                      labels=["clast"] * len(boxes))


def detections(boxes, scores) -> Detections:
    return Detections(boxes=np.asarray(boxes, np.float32).reshape(-1, 4), scores=np.asarray(scores, np.float32),
                      labels=["clast"] * len(boxes), size=(200, 200))


def test_perfect_boxes_score_one_and_shifted_boxes_zero() -> None:
    perfect = mean_average_precision([detections(TRUTH, [0.9, 0.8])], [truth()], ["clast"])
    assert perfect["map_50"] == 1.0 and perfect["map"] == 1.0
    shifted = [(x0 + 30, y0 + 30, x1 + 30, y1 + 30) for x0, y0, x1, y1 in TRUTH]  # IoU well under 0.5
    assert mean_average_precision([detections(shifted, [0.9, 0.8])], [truth()], ["clast"])["map_50"] == 0.0


def test_a_missed_box_halves_recall() -> None:
    scores = mean_average_precision([detections(TRUTH[:1], [0.9])], [truth()], ["clast"])
    assert 0.45 < scores["map_50"] < 0.55


def test_matching_counts_each_true_box_once() -> None:
    doubled = detections([TRUTH[0], TRUTH[0], TRUTH[1]], [0.9, 0.8, 0.7])
    assert match_counts(doubled, truth(), threshold=0.5) == (2, 1, 0)
    assert match_counts(doubled, truth(), threshold=0.85) == (1, 0, 1)
    assert match_counts(detections([], []), truth(), threshold=0.5) == (0, 0, 2)


def test_the_calibrated_threshold_cuts_false_boxes_off() -> None:
    found = detections([TRUTH[0], TRUTH[1], (0, 150, 30, 190)], [0.9, 0.8, 0.3])  # a false box at 0.3
    best = best_threshold([found], [truth()])
    assert best["f1"] == 1.0 and 0.3 < best["threshold"] <= 0.8
