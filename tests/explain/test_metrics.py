"""Trust metrics on cases whose answer is known."""

import numpy as np
import pytest
import torch
from torch import nn

from handlens.core.errors import InputError
from handlens.explain.metrics import (
    agreement,
    deletion_insertion,
    energy_inside,
    parameter_randomisation,
    pointing_game,
    spearman,
    top_fraction_iou,
)
from handlens.models.classifier import create_classifier


class TopLeftModel(nn.Module):
    """Class 0 is evidenced only by bright pixels in the top-left quadrant."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        evidence = (x[:, :, :16, :16].mean((1, 2, 3)) - 0.5) * 8  # bright: +4, the mean baseline: -2
        return torch.stack([evidence, torch.zeros_like(evidence)], 1)


def test_a_faithful_map_beats_random_and_an_unfaithful_one_does_not():
    x = torch.zeros(2, 3, 32, 32)
    x[:, :, :16, :16] = 1.0
    right = np.zeros((2, 32, 32), dtype=np.float32)
    right[:, :16, :16] = 1.0
    wrong = 1.0 - right
    model = TopLeftModel()
    good = deletion_insertion(model, x, right, [0, 0], baseline="mean", steps=16)
    bad = deletion_insertion(model, x, wrong, [0, 0], baseline="mean", steps=16)
    assert good["deletion_auc"] < good["random_deletion_auc"] - 0.05
    assert good["insertion_auc"] > good["random_insertion_auc"] + 0.05
    assert bad["deletion_auc"] > bad["random_deletion_auc"] and bad["insertion_auc"] < bad["random_insertion_auc"]
    curve = good["images"][0]["deletion"]
    assert len(curve) == 17 and curve[0] > 0.95 and curve[-1] < 0.2  # sigmoid(4) falls to sigmoid(-2)
    with pytest.raises(InputError, match="do not match"):
        deletion_insertion(model, x, right[:, :8], [0, 0])


def test_sanity_check_passes_for_gradcam_and_fails_for_a_model_blind_map(monkeypatch):
    torch.manual_seed(0)
    model = create_classifier("tiny_cnn", 3).eval()
    x = torch.randn(3, 3, 32, 32)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = parameter_randomisation(model, x, ["a", "b", "c"], "gradcam", layer="stage2")
    assert [s["randomised_down_to"] for s in result["steps"]] == ["head", "stages.2", "stages.1", "stages.0"]
    assert result["passed"] and result["final_spearman"] < 0.5
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # the original is untouched

    import handlens.explain.api as api
    from handlens.explain.base import Explanation

    def edge_detector(model, inputs, classes, method, *, layer, target, **params):  # ignores the model entirely
        edges = (inputs[:, :, 1:, :] - inputs[:, :, :-1, :]).abs().sum(1)
        maps = torch.nn.functional.pad(edges, (0, 0, 0, 1)).numpy()
        return Explanation(maps=maps, method=method, layer=layer, targets=[0] * len(inputs), classes=classes,
                           probabilities=np.zeros((len(inputs), len(classes))))

    monkeypatch.setattr(api, "explain", edge_detector)
    blind = parameter_randomisation(model, x, ["a", "b", "c"], "gradcam")
    assert not blind["passed"] and blind["final_spearman"] > 0.99


def test_agreement_measures_on_a_known_region():
    region = np.zeros((10, 10), dtype=bool)
    region[:5, :5] = True
    inside = np.zeros((10, 10))
    inside[2, 2] = 5.0
    inside[:5, :5] += 1.0
    assert pointing_game(inside, region)
    assert energy_inside(inside, region) == pytest.approx(1.0)
    assert top_fraction_iou(inside, region, fraction=0.25) == pytest.approx(1.0)
    outside = np.zeros((10, 10))
    outside[9, 9] = 1.0
    assert not pointing_game(outside, region) and pointing_game(outside, region, tolerance=5)
    assert energy_inside(outside, region) == 0.0
    half = np.zeros((10, 10))
    half[:5, :] = 1.0  # top half: half its energy inside the top-left quarter
    assert energy_inside(half, region) == pytest.approx(0.5)
    report = agreement(inside, region)
    assert report["pointing_hit"] and report["region_share"] == 0.25
    with pytest.raises(InputError, match="empty expert region"):
        pointing_game(inside, np.zeros((10, 10), dtype=bool))


def test_spearman_of_identical_and_reversed_maps():
    a = np.arange(16.0).reshape(4, 4)
    assert spearman(a, a) == pytest.approx(1.0) and spearman(a, -a) == pytest.approx(-1.0)
    assert spearman(a, np.zeros_like(a)) == 0.0


def test_a_roi_keeps_background_out_of_deletion_and_insertion():
    """Only the ROI's pixels are removed or inserted: evidence outside it never changes on either curve."""
    x = torch.zeros(1, 3, 32, 32)
    x[:, :, :16, :16] = 1.0  # the evidence sits in the top-left quadrant...
    roi = np.zeros((1, 32, 32), dtype=bool)
    roi[:, 16:, :] = True  # ...and the ROI is the bottom half: evidence is background here
    heat = np.random.default_rng(0).random((1, 32, 32)).astype(np.float32)
    plain = deletion_insertion(TopLeftModel(), x, heat, [0], baseline="mean", steps=8)
    masked = deletion_insertion(TopLeftModel(), x, heat, [0], baseline="mean", steps=8, rois=roi)
    deletion, insertion = masked["images"][0]["deletion"], masked["images"][0]["insertion"]
    assert max(deletion) - min(deletion) < 0.05 and max(insertion) - min(insertion) < 0.05
    assert masked["roi"] and masked["images"][0]["roi_share"] == 0.5
    assert plain["images"][0]["deletion"][-1] < 0.2  # without the ROI the evidence is deleted
    with pytest.raises(InputError, match="ROI masks"):
        deletion_insertion(TopLeftModel(), x, heat, [0], rois=roi[:, :8])


def test_the_curves_ends_are_scored_once_and_match_scoring_every_point():
    """Deletion starts at the image and ends at the replaced image, insertion the other way round, for any map:
    scoring the ends once gives the same curves as scoring every point."""
    import torch
    from torch import nn

    from handlens.explain import metrics

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
    model.eval()
    image, base = torch.randn(3, 16, 16), torch.zeros(3, 16, 16)
    heat = np.random.default_rng(1).random((16, 16))
    calls = []
    original = metrics._probabilities

    def counting(model_, batch, **kw):
        calls.append(len(batch))
        return original(model_, batch, **kw)

    metrics._probabilities = counting
    try:
        deletion, insertion, ends = metrics._curves(model, image, base, heat, target=1, steps=8, batch_size=16)
        again, again_ins, _ = metrics._curves(model, image, base, heat, target=1, steps=8, batch_size=16, ends=ends)
    finally:
        metrics._probabilities = original
    assert calls == [14, 2, 14]  # interiors of both curves, the two ends once, then interiors only
    assert np.allclose(deletion, again) and np.allclose(insertion, again_ins)
    with torch.no_grad():
        full = torch.softmax(model(base[None] * 0 + image[None]), 1)[0, 1].item()
    assert deletion[0] == pytest.approx(full, abs=1e-6) and insertion[-1] == pytest.approx(full, abs=1e-6)
    assert deletion[-1] == pytest.approx(insertion[0], abs=1e-7)
