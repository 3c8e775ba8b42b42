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


@pytest.mark.parametrize("seed", range(6))
def test_metrics_equal_torchmetrics(seed):
    """The NumPy metrics are torchmetrics' definitions: random cases with ties, a class never predicted, a class
    absent from the targets (macro-F1 then leaves out a class absent from both)."""
    from torchmetrics.functional.classification import (
        multiclass_accuracy,
        multiclass_auroc,
        multiclass_confusion_matrix,
        multiclass_f1_score,
        multiclass_precision,
    )

    generator = torch.Generator().manual_seed(seed)
    k, n = 4, 40
    probs = torch.softmax(torch.randint(0, 4, (n, k), generator=generator).float(), 1)  # many ties
    target = torch.randint(0, k - (seed % 2), (n,), generator=generator)  # odd seeds: class 3 absent
    if seed >= 4:
        probs[:, 2] = 0.0  # class 2 never predicted
        probs = probs / probs.sum(1, keepdim=True)
    m = classification_metrics(probs, target, list("abcd"))
    pred = probs.argmax(1)
    assert m["accuracy"] == pytest.approx(float(multiclass_accuracy(pred, target, k, average="micro")), abs=1e-6)
    assert m["macro_f1"] == pytest.approx(
        float(multiclass_f1_score(pred, target, k, average="macro", zero_division=0)), abs=1e-6)
    assert m["confusion"] == multiclass_confusion_matrix(pred, target, k).tolist()
    precision = multiclass_precision(pred, target, k, average=None, zero_division=0)
    assert [m["per_class"][c]["precision"] for c in "abcd"] == pytest.approx(precision.tolist(), abs=1e-6)
    if len(torch.unique(target)) == k:
        assert m["roc_auc"] == pytest.approx(float(multiclass_auroc(probs, target, k, average="macro")), abs=1e-5)
    else:
        assert m["roc_auc"] is None


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
