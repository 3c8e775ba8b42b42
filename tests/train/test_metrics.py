import numpy as np
import pytest
import torch

from handlens.train.evaluate import top_losses
from handlens.train.metrics import classification_metrics, confusion_png, scalar_metrics


def test_metrics_on_a_known_case():
    probs = torch.tensor([[0.9, 0.1, 0.0], [0.2, 0.7, 0.1], [0.6, 0.3, 0.1], [0.1, 0.1, 0.8]])
    target = torch.tensor([0, 1, 1, 2])
    m = classification_metrics(probs, target, ["a", "b", "c"])
    assert m["accuracy"] == pytest.approx(0.75)
    assert m["confusion"] == [[1, 0, 0], [1, 1, 0], [0, 0, 1]]
    assert m["per_class"]["a"]["precision"] == pytest.approx(0.5)
    assert m["per_class"]["b"]["recall"] == pytest.approx(0.5)
    assert m["macro_f1"] == pytest.approx((2 / 3 + 2 / 3 + 1) / 3)
    assert 0.5 < m["roc_auc"] <= 1.0
    assert scalar_metrics(m, "val").keys() == {"val_accuracy", "val_macro_f1", "val_roc_auc"}


def test_auroc_is_none_when_a_class_is_absent():
    m = classification_metrics(torch.tensor([[0.9, 0.1], [0.8, 0.2]]), torch.tensor([0, 0]), ["a", "b"])
    assert m["roc_auc"] is None and "val_roc_auc" not in scalar_metrics(m, "val")


def test_top_losses_are_the_most_confidently_wrong():
    probs = np.array([[0.9, 0.1], [0.4, 0.6], [0.05, 0.95], [0.7, 0.3]])
    targets = np.array([0, 0, 0, 1])
    worst = top_losses(probs, targets, ["a.png", "b.png", "c.png", "d.png"], ["x", "y"], count=2)
    assert [w["path"] for w in worst] == ["c.png", "d.png"]
    assert worst[0]["predicted"] == "y" and worst[0]["confidence"] == 0.95


def test_confusion_png_is_written(tmp_path):
    from PIL import Image

    confusion_png([[3, 1], [0, 4]], ["limestone", "dolomite"], tmp_path / "c.png", "title")
    assert Image.open(tmp_path / "c.png").size[0] > 100
