"""Sliced inference: tiles cover the image, a box cut by an inner tile edge is dropped for its whole copy, copies
are merged, boxes come back in image pixels; detector bundles are refused where classifiers go, and vice versa."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from handlens.core.errors import InputError
from handlens.detect.infer import load_detector, sliced_detect
from handlens.models.bundle import DamagedBundleError, NotAClassifierError, load_bundle, scan_bundles

RECTS = [(10, 10, 30, 28), (55, 40, 75, 58), (100, 90, 118, 110), (60, 5, 78, 20)]


class WhiteBoxes(torch.nn.Module):
    """A perfect "detector" of white rectangles on black: each connected white region of a tile is a box, even
    where the tile's edge cuts it (as a real detector would box the part it sees)."""

    def forward(self, images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        from scipy import ndimage

        out = []
        for image in images:
            regions, _ = ndimage.label(image[0].numpy() > 0.5)
            boxes = [[s[1].start, s[0].start, s[1].stop, s[0].stop] for s in ndimage.find_objects(regions)]
            tensor = torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)
            out.append({"boxes": tensor, "scores": torch.full((len(boxes),), 0.9),
                        "labels": torch.ones(len(boxes), dtype=torch.int64)})
        return out


def picture(size: tuple[int, int] = (130, 120), rects: list[tuple[int, int, int, int]] = RECTS) -> np.ndarray:
    pixels = np.zeros((size[1], size[0], 3), np.uint8)
    for x0, y0, x1, y1 in rects:
        pixels[y0:y1, x0:x1] = 255
    return pixels


def found(result) -> list[tuple[int, ...]]:
    return sorted(tuple(round(float(v)) for v in box) for box in result.boxes)


def test_sliced_detection_finds_each_box_once_in_image_pixels() -> None:
    result = sliced_detect(WhiteBoxes(), picture(), scale=1.0, tile=48, overlap=0.5, classes=["thing"],
                           score_threshold=0.3, nms_iou=0.5)
    assert result.tiles > 9  # many tiles, and several cut through rectangles
    assert found(result) == sorted(RECTS)
    assert result.labels == ["thing"] * 4
    assert result.size == (130, 120)


def test_sliced_detection_scales_back_to_the_image() -> None:
    big = picture((260, 240), [(2 * a, 2 * b, 2 * c, 2 * d) for a, b, c, d in RECTS])
    result = sliced_detect(WhiteBoxes(), big, scale=0.5, tile=48, overlap=0.5, classes=["thing"],
                           score_threshold=0.3, nms_iou=0.5)
    assert len(result) == 4
    for got, want in zip(found(result), sorted((2 * a, 2 * b, 2 * c, 2 * d) for a, b, c, d in RECTS), strict=True):
        assert max(abs(g - w) for g, w in zip(got, want, strict=True)) <= 2


def test_single_pass_sees_the_whole_image_in_one_tile() -> None:
    result = sliced_detect(WhiteBoxes(), picture(), scale=1.0, tile=64, overlap=0.5, classes=["thing"],
                           score_threshold=0.3, nms_iou=0.5, single_pass=True)
    assert result.tiles == 1 and len(result) == 4


def test_an_empty_image_has_no_boxes_and_the_tile_limit_holds() -> None:
    empty = sliced_detect(WhiteBoxes(), picture(rects=[]), scale=1.0, tile=48, overlap=0.25, classes=["thing"],
                          score_threshold=0.3, nms_iou=0.5)
    assert len(empty) == 0 and empty.to_dict()["boxes"] == []
    with pytest.raises(InputError, match="limit is 2"):
        sliced_detect(WhiteBoxes(), picture(), scale=1.0, tile=48, overlap=0.25, classes=["thing"],
                      score_threshold=0.3, nms_iou=0.5, max_tiles=2)


def test_score_threshold_drops_weak_boxes() -> None:
    result = sliced_detect(WhiteBoxes(), picture(), scale=1.0, tile=48, overlap=0.5, classes=["thing"],
                           score_threshold=0.95, nms_iou=0.5)
    assert len(result) == 0


def test_detector_bundle_loads_and_detects(sigma_workspace) -> None:
    detector = load_detector(sigma_workspace["detector"])
    image = sigma_workspace["demo"].report.out / sigma_workspace["demo"].report.images[0]
    result = detector.detect(image, score_threshold=0.0)
    assert result.size == (480, 400)
    assert all(0 <= b[0] < b[2] <= 480 and 0 <= b[1] < b[3] <= 400 for b in result.boxes)
    assert set(result.labels) <= {"sigma-clast"}


def test_kinds_are_refused_where_the_other_is_needed(sigma_workspace, tmp_path) -> None:
    with pytest.raises(NotAClassifierError, match="detector bundle"):
        load_bundle(sigma_workspace["detector"])
    entries = scan_bundles(sigma_workspace["workspace"].runs_dir)
    assert [e.kind for e in entries if e.model_id == sigma_workspace["detector_run"]] == ["detector"]
    from handlens.models.backbones import BACKBONES
    from handlens.models.bundle import save_bundle
    from handlens.models.classifier import create_classifier

    model = create_classifier("tiny_cnn", 2, freeze="full", head="linear")
    classifier = save_bundle(tmp_path / "classifier", model.eval(), {
        "backbone": "tiny_cnn", "classes": ["cw", "ccw"], "freeze": "full", "head": {"type": "linear"},
        "preprocess": BACKBONES.get("tiny_cnn").preprocess().to_dict()})
    with pytest.raises(InputError, match="classifier bundle, not a detector"):
        load_detector(classifier)


def test_a_manifest_of_unknown_kind_is_damaged(tmp_path, sigma_workspace) -> None:
    bundle = tmp_path / "future"
    shutil.copytree(sigma_workspace["detector"], bundle)
    manifest = json.loads((bundle / "bundle.json").read_text())
    (bundle / "bundle.json").write_text(json.dumps({**manifest, "kind": "segmenter"}))
    with pytest.raises(DamagedBundleError, match="kind 'segmenter'"):
        load_detector(bundle)


def test_a_damaged_detector_says_why(tmp_path, sigma_workspace) -> None:
    bundle = tmp_path / "damaged"
    shutil.copytree(sigma_workspace["detector"], bundle)
    weights = bundle / "weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(DamagedBundleError, match="do not load"):
        load_detector(bundle)
