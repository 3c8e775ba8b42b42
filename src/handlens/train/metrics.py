"""Classification metrics from one confusion matrix (NumPy): accuracy, macro-F1, per-class P/R/F1, ROC-AUC.

The definitions are torchmetrics' functional ones (``multiclass_*`` with ``zero_division=0``; macro-F1
leaves out a class absent from both the targets and the predictions; one-vs-rest ROC-AUC is the
Mann-Whitney statistic, ties counted half, which is the trapezoidal area under the ROC curve), computed
here from one ``bincount`` and one ranking. The same numbers, without seven validated library calls:
a frozen head's epoch took longer to score than to train, and a study scores thousands of epochs.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch


def confusion_matrix(pred: np.ndarray, target: np.ndarray, k: int) -> np.ndarray:
    """(k, k) counts, rows the true class, columns the predicted one."""
    return np.bincount(target * k + pred, minlength=k * k).reshape(k, k)


def _safe_divide(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    return np.divide(num, den, out=np.zeros_like(num, dtype=np.float64), where=den != 0)


def macro_f1_score(pred: np.ndarray, target: np.ndarray, k: int) -> float:
    """Macro-F1 from integer predictions and targets, classes absent from both left out (torchmetrics')."""
    confusion = confusion_matrix(pred, target, k)
    tp = np.diag(confusion).astype(np.float64)
    fp, fn = confusion.sum(0) - tp, confusion.sum(1) - tp
    f1 = _safe_divide(2 * tp, 2 * tp + fp + fn)
    seen = (tp + fp + fn) > 0
    return float(f1[seen].mean()) if seen.any() else 0.0


def ovr_auroc(probs: np.ndarray, target: np.ndarray, k: int) -> float | None:
    """Macro one-vs-rest ROC-AUC, or None unless every class occurs in ``target`` (undefined otherwise)."""
    from scipy.stats import rankdata

    counts = np.bincount(target, minlength=k)
    if (counts == 0).any():
        return None
    ranks = rankdata(probs, axis=0)  # average ranks per column: ties count half
    positive_rank_sum = np.array([ranks[target == c, c].sum() for c in range(k)])
    negatives = len(target) - counts
    if (negatives == 0).any():
        return None
    auc = (positive_rank_sum - counts * (counts + 1) / 2) / (counts * negatives)
    value = float(auc.mean())
    return value if math.isfinite(value) else None


def classification_metrics(probs: torch.Tensor, target: torch.Tensor, classes: list[str]) -> dict[str, Any]:
    """All metrics from (N, C) probabilities and (N,) integer targets, as plain Python values.

    One-vs-rest ROC-AUC (macro) is reported only when every class occurs in ``target`` (it is
    undefined otherwise) and is ``None`` then.
    """
    k = len(classes)
    scores = probs.detach().float().cpu().numpy()
    truth = target.detach().long().cpu().numpy()
    if truth.size == 0:
        return {"n": 0}
    pred = scores.argmax(1)
    confusion = confusion_matrix(pred, truth, k)
    tp = np.diag(confusion).astype(np.float64)
    predicted, support = confusion.sum(0), confusion.sum(1)
    precision, recall = _safe_divide(tp, predicted), _safe_divide(tp, support)
    f1 = _safe_divide(2 * tp, predicted + support)
    seen = (predicted + support) > 0
    return {
        "n": int(truth.size),
        "accuracy": float(tp.sum() / truth.size),
        "macro_f1": float(f1[seen].mean()) if seen.any() else 0.0,
        "roc_auc": ovr_auroc(scores, truth, k),
        "per_class": {c: {"precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]),
                          "support": int(support[i])} for i, c in enumerate(classes)},
        "confusion": confusion.tolist(),
    }


def scalar_metrics(metrics: dict[str, Any], prefix: str) -> dict[str, float]:
    """The scalar entries, prefixed (``val_macro_f1``...), for logging and monitoring."""
    return {f"{prefix}_{k}": float(v) for k, v in metrics.items()
            if k in ("accuracy", "macro_f1", "roc_auc") and v is not None}


def confusion_png(confusion: list[list[int]], classes: list[str], path: Any, title: str = "") -> None:
    """Draw a confusion matrix (rows: true, columns: predicted) to a PNG with Pillow."""
    from PIL import Image, ImageDraw, ImageFont

    k = len(classes)
    cell, margin = 56, 120
    width, height = margin + k * cell + 20, margin + k * cell + 40
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    peak = max(1, max(max(row) for row in confusion))
    for i in range(k):
        for j in range(k):
            value = confusion[i][j]
            shade = int(255 - 200 * value / peak)
            colour = (shade, shade, 255) if i == j else (255, shade, shade)
            x0, y0 = margin + j * cell, margin + i * cell
            draw.rectangle([x0, y0, x0 + cell - 2, y0 + cell - 2], fill=colour)
            ink = "white" if shade < 128 else "black"
            draw.text((x0 + cell // 2 - 8, y0 + cell // 2 - 6), str(value), fill=ink, font=font)
    for i, name in enumerate(classes):
        label = name[:14]
        draw.text((8, margin + i * cell + cell // 2 - 6), label, fill="black", font=font)
        draw.text((margin + i * cell + 2, margin - 18), label[:8], fill="black", font=font)
    draw.text((8, 8), title or "confusion matrix", fill="black", font=font)
    draw.text((8, margin - 36), "rows: true class, columns: predicted", fill="black", font=font)
    img.save(path)
