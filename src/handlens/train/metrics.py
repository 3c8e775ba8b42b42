"""Classification metrics (torchmetrics functional): accuracy, macro-F1, per-class P/R/F1, ROC-AUC, confusion."""

from __future__ import annotations

import math
from typing import Any

import torch


def classification_metrics(probs: torch.Tensor, target: torch.Tensor, classes: list[str]) -> dict[str, Any]:
    """All metrics from (N, C) probabilities and (N,) integer targets, as plain Python values.

    One-vs-rest ROC-AUC (macro) is reported only when every class occurs in ``target`` (it is
    undefined otherwise) and is ``None`` then.
    """
    from torchmetrics.functional.classification import (
        multiclass_accuracy,
        multiclass_auroc,
        multiclass_confusion_matrix,
        multiclass_f1_score,
        multiclass_precision,
        multiclass_recall,
    )

    k = len(classes)
    probs, target = probs.float(), target.long()
    if target.numel() == 0:
        return {"n": 0}
    pred = probs.argmax(1)
    per_p = multiclass_precision(pred, target, k, average=None, zero_division=0)
    per_r = multiclass_recall(pred, target, k, average=None, zero_division=0)
    per_f = multiclass_f1_score(pred, target, k, average=None, zero_division=0)
    auroc = None
    if len(torch.unique(target)) == k:
        value = float(multiclass_auroc(probs, target, k, average="macro"))
        auroc = value if math.isfinite(value) else None
    return {
        "n": int(target.numel()),
        "accuracy": float(multiclass_accuracy(pred, target, k, average="micro")),
        "macro_f1": float(multiclass_f1_score(pred, target, k, average="macro", zero_division=0)),
        "roc_auc": auroc,
        "per_class": {c: {"precision": float(per_p[i]), "recall": float(per_r[i]), "f1": float(per_f[i]),
                          "support": int((target == i).sum())} for i, c in enumerate(classes)},
        "confusion": multiclass_confusion_matrix(pred, target, k).tolist(),
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
