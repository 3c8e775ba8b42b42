"""Baselines that look at one attribute of the file, never at its content: size only, mode only, format only.

Each is the simplest classifier of its kind: learnt on the training images (the majority class of each
attribute value; a value the training images never had gets the overall majority class) and scored on
the images the model is judged on. A model must beat all of them by a clear margin to show it learnt
from content; a baseline that comes near the model means the attribute alone carries the answer (a
shortcut, as :mod:`handlens.data.stats` warns before training).
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

#: a baseline within this much accuracy of the model (or above it) is a warning
NEAR_MODEL = 0.1


@dataclass(frozen=True)
class FileFacts:
    """What a file-attribute baseline may look at."""

    label: str
    width: int
    height: int
    mode: str
    format: str


ATTRIBUTES: dict[str, Callable[[FileFacts], str]] = {
    "size only": lambda f: f"{f.width}x{f.height}",
    "mode only": lambda f: f.mode or "-",
    "format only": lambda f: f.format or "-",
    "majority class": lambda f: "",
}


@dataclass(frozen=True)
class Baseline:
    name: str
    accuracy: float
    macro_f1: float
    values: int  # distinct attribute values seen in training

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def macro_f1(truth: Sequence[str], predicted: Sequence[str], classes: Sequence[str]) -> float:
    scores = []
    for c in classes:
        tp = sum(t == c and p == c for t, p in zip(truth, predicted, strict=True))
        fp = sum(t != c and p == c for t, p in zip(truth, predicted, strict=True))
        fn = sum(t == c and p != c for t, p in zip(truth, predicted, strict=True))
        scores.append(2 * tp / (2 * tp + fp + fn) if tp else 0.0)
    return float(np.mean(scores)) if scores else 0.0


def attribute_baselines(train: Sequence[FileFacts], judged: Sequence[FileFacts],
                        classes: Sequence[str]) -> list[Baseline]:
    """Every baseline of :data:`ATTRIBUTES`, learnt on ``train`` and scored on ``judged``."""
    if not train or not judged:
        return []
    majority = Counter(f.label for f in train).most_common(1)[0][0]
    truth = [f.label for f in judged]
    out = []
    for name, key in ATTRIBUTES.items():
        by_value: dict[str, Counter[str]] = defaultdict(Counter)
        for facts in train:
            by_value[key(facts)][facts.label] += 1
        rule = {value: counts.most_common(1)[0][0] for value, counts in by_value.items()}
        predicted = [rule.get(key(f), majority) for f in judged]
        accuracy = sum(p == t for p, t in zip(predicted, truth, strict=True)) / len(truth)
        score = macro_f1(truth, predicted, classes)
        out.append(Baseline(name=name, accuracy=round(accuracy, 4), macro_f1=round(score, 4), values=len(by_value)))
    return out


def baselines_verdict(baselines: list[Baseline], model_accuracy: float) -> str:
    """``shortcut: size only reaches accuracy 0.95 (model 0.97)`` when an attribute baseline comes within
    :data:`NEAR_MODEL` of the model and beats the majority class; else ``no shortcut: ...``."""
    if not baselines:
        return ("not checked: this catalog holds none of the model's training images (or none of the judged ones "
                "under its labelset), so no baseline could be learnt")
    majority = next((b.accuracy for b in baselines if b.name == "majority class"), 0.0)
    close = [b for b in baselines if b.name != "majority class" and b.accuracy > majority + 1e-9
             and b.accuracy >= model_accuracy - NEAR_MODEL]
    if close:
        best = max(close, key=lambda b: b.accuracy)
        return (f"shortcut: {best.name} reaches accuracy {best.accuracy:.2f} (model {model_accuracy:.2f}, majority "
                f"class {majority:.2f}): the file attribute alone nearly gives the answer")
    best_other = max((b.accuracy for b in baselines if b.name != "majority class"), default=majority)
    return (f"no shortcut: the model (accuracy {model_accuracy:.2f}) beats every file-attribute baseline "
            f"(best {best_other:.2f}, majority class {majority:.2f}) by more than {NEAR_MODEL:.2f}")
