"""Detect, then classify and explain each box: crops with a margin, per-box maps normalised on their own."""

from __future__ import annotations

import json

import numpy as np
import pytest

from handlens.core.errors import InputError
from handlens.detect.infer import Detections, load_detector
from handlens.detect.pipeline import BoxResult, check_pipeline, classify_boxes, margin_box, run_pipeline


def test_margin_box_grows_and_clips() -> None:
    assert margin_box((100, 100, 200, 150), (1000, 1000), 0.1) == (90, 95, 210, 155)
    assert margin_box((0, 0, 50, 50), (60, 55), 0.5) == (0, 0, 60, 55)
    assert margin_box((10, 10, 10.2, 10.2), (100, 100), 0.0) == (10, 10, 11, 11)  # at least a pixel


def test_options_that_would_do_nothing_are_refused() -> None:
    with pytest.raises(InputError, match="give --classifier"):
        check_pipeline(classifier=None, method="gradcam", margin=0.15)
    with pytest.raises(InputError, match="--margin"):
        check_pipeline(classifier=None, method=None, margin=-1)
    with pytest.raises(Exception, match="gradcamm"):
        check_pipeline(classifier=object(), method="gradcamm", margin=0.15)


class Constant:
    """A classifier that calls every crop 'cw'."""

    classes = ("ccw", "cw")

    def predict_proba(self, crops):
        return np.tile([0.2, 0.8], (len(crops), 1))


def test_each_box_map_is_normalised_on_its_own(monkeypatch) -> None:
    import handlens.explain.image as image_module

    strength = iter([100.0, 1.0])  # a big clast's map is 100x a small one's

    def fake_explain(classifier, crop, **_):
        heat = np.zeros(crop.shape[:2], np.float32)
        heat[crop.shape[0] // 2, crop.shape[1] // 2] = next(strength)
        return type("E", (), {"heatmap": heat, "signed": False})()

    monkeypatch.setattr(image_module, "explain_image", fake_explain)
    picture = np.zeros((100, 200, 3), np.uint8)
    boxes = [BoxResult(box=(0, 0, 80, 80), score=0.9, detected="clast", crop=(0, 0, 80, 80)),
             BoxResult(box=(150, 50, 160, 60), score=0.8, detected="clast", crop=(150, 50, 160, 60))]
    heat, signed = classify_boxes(Constant(), picture, boxes, method="gradcam")
    assert not signed and heat.shape == (100, 200)
    assert heat[0:80, 0:80].max() == 1.0 and heat[50:60, 150:160].max() == 1.0  # both as strong
    assert heat[:, 90:140].max() == 0.0  # nothing outside the crops
    assert [b.label for b in boxes] == ["cw", "cw"] and boxes[0].probabilities == {"ccw": 0.2, "cw": 0.8}


def test_no_detection_is_an_empty_result(monkeypatch, sigma_workspace, tmp_path) -> None:
    detector = load_detector(sigma_workspace["detector"])
    empty = Detections(boxes=np.zeros((0, 4), np.float32), scores=np.zeros(0, np.float32), labels=[], size=(480, 400))
    monkeypatch.setattr(detector, "detect", lambda *a, **k: empty)
    image = sigma_workspace["demo"].report.out / sigma_workspace["demo"].report.images[0]
    report = run_pipeline(detector, [str(image)], out=tmp_path / "out")
    assert report.to_dict()["boxes"] == 0 and report.images[0].boxes == []
    assert (tmp_path / "out" / "sigma_000.overlay.png").is_file()


def test_pipeline_writes_boxes_crops_maps_and_json(sigma_workspace, sigma_classifier, tmp_path) -> None:
    from handlens.explain.api import load_bundle

    detector = load_detector(sigma_workspace["detector"])
    classifier = load_bundle(sigma_classifier)
    report = sigma_workspace["demo"].report
    images = [str(report.out / name) for name in report.images[:2]]
    out = tmp_path / "out"
    result = run_pipeline(detector, images, classifier=classifier, method="gradcam", score_threshold=0.0, out=out)
    document = json.loads((out / "result.json").read_text())
    assert document["boxes"] == sum(len(r.boxes) for r in result.images) > 0
    first = next(r for r in result.images if r.boxes)
    assert all(b.label in ("ccw", "cw") and b.explained for b in first.boxes)
    assert first.heatmap.shape == (400, 480) and float(np.abs(first.heatmap).max()) <= 1.0 + 1e-6
    stem = first.files["overlay"].removesuffix(".overlay.png")
    assert (out / first.files["overlay"]).is_file() and (out / first.files["map"]).is_file()
    assert len(list((out / stem).glob("box_*.png"))) == len(first.boxes)


def test_a_flat_map_is_said_and_not_drawn_as_cold(monkeypatch) -> None:
    import handlens.explain.image as image_module
    from handlens.detect.pipeline import ImageResult
    from handlens.detect.render import draw_result

    monkeypatch.setattr(image_module, "explain_image", lambda classifier, crop, **_: type(
        "E", (), {"heatmap": np.zeros(crop.shape[:2], np.float32), "signed": False})())
    picture = np.full((100, 200, 3), 128, np.uint8)
    boxes = [BoxResult(box=(20, 20, 60, 60), score=0.9, detected="clast", crop=(10, 10, 70, 70))]
    heat, _ = classify_boxes(Constant(), picture, boxes, method="gradcam")
    assert boxes[0].map_peak == 0 and boxes[0].to_dict()["flat_map"] is True
    drawn = draw_result(picture, ImageResult(image="x", size=(200, 100), boxes=boxes, tiles=1, heatmap=heat))
    assert (drawn[35:45, 35:45] == 128).all()  # inside the box, away from its outline and label: untouched


def test_tta_reaches_the_classifier_and_needs_one(monkeypatch) -> None:
    asked = []

    class Recording(Constant):
        def predict_proba(self, crops, **options):
            asked.append(options)
            return super().predict_proba(crops)

    picture = np.zeros((50, 50, 3), np.uint8)
    boxes = [BoxResult(box=(5, 5, 20, 20), score=0.9, detected="clast", crop=(0, 0, 25, 25))]
    classify_boxes(Recording(), picture, boxes, method=None, tta=True)
    classify_boxes(Recording(), picture, boxes, method=None)
    assert asked == [{"tta": True}, {}]
    with pytest.raises(InputError, match="--tta"):
        run_pipeline(object(), [], tta=True)
