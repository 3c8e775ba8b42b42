"""Dataset statistics users need before they train: balance, sizes, duplicates, shortcuts.

The size-shortcut check answers "could a model tell the classes apart by image size alone?" by
scoring the simplest size-only classifier (majority class per exact width x height) against the
majority-class baseline. On thin sections where one class was scanned at another resolution, this
catches the shortcut before a model learns it.
"""

from __future__ import annotations

import statistics
from collections import Counter, defaultdict
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from handlens.data.catalog import Dataset, Image, Labelset
from handlens.data.queries import LabelledImage, duplicate_report, labelled_images

#: A class is flagged when the size-only classifier finds it with this precision and recall.
SIZE_SHORTCUT_SCORE = 0.9
#: ... or when this share of the other classes' images have sizes the class never has.
SIZE_NEVER_SEEN_SHARE = 0.5
#: The dataset is flagged when size alone beats the majority baseline by this much accuracy.
SIZE_ACCURACY_MARGIN = 0.15


def size_shortcut(images: list[LabelledImage]) -> dict[str, Any]:
    """How well image size alone predicts the class (see module docstring).

    Per class: precision and recall of the size-only classifier for that class. A class with both
    high is one a model can recognise without looking at its content.
    """
    if not images:
        return {"size_only_accuracy": 0.0, "majority_baseline": 0.0, "distinct_sizes": 0, "per_class": {}}
    by_size: dict[tuple[int, int], Counter[str]] = defaultdict(Counter)
    for img in images:
        by_size[(img.width, img.height)][img.label] += 1
    predicted = {size: counter.most_common(1)[0][0] for size, counter in by_size.items()}
    class_counts = Counter(img.label for img in images)
    hits: Counter[str] = Counter()
    predicted_counts: Counter[str] = Counter()
    for size, counter in by_size.items():
        guess = predicted[size]
        predicted_counts[guess] += sum(counter.values())
        hits[guess] += counter[guess]
    per_class = {}
    for c, n in sorted(class_counts.items()):
        own_sizes = {size for size, counter in by_size.items() if counter[c]}
        foreign = Counter({size: sum(counter.values()) for size, counter in by_size.items() if size not in own_sizes})
        others = len(images) - n
        per_class[c] = {
            "precision": round(hits[c] / predicted_counts[c], 4) if predicted_counts[c] else 0.0,
            "recall": round(hits[c] / n, 4),
            # share of the *other* classes' images whose size this class never has: a size-only
            # rule rules this class out for them (e.g. "224x224, so not class0").
            "others_with_sizes_never_seen": round(sum(foreign.values()) / others, 4) if others else 0.0,
            "sizes_never_seen": [f"{w}x{h}" for (w, h), _ in foreign.most_common(3)],
        }
    return {
        "size_only_accuracy": round(sum(hits.values()) / len(images), 4),
        "majority_baseline": round(max(class_counts.values()) / len(images), 4),
        "distinct_sizes": len(by_size),
        "per_class": per_class,
    }


def _size_summary(values: list[int]) -> dict[str, float]:
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


def dataset_stats(session: Session, dataset: Dataset, labelset: Labelset) -> dict[str, Any]:
    """Everything ``handlens stats`` shows, as plain data."""
    images = labelled_images(session, labelset)
    total_in_dataset = session.scalar(select(func.count(Image.id)).where(Image.dataset_id == dataset.id)) or 0
    counts = Counter(img.label for img in images)
    n = len(images)
    per_class: dict[str, dict[str, Any]] = {}
    for label in sorted(counts):
        members = [img for img in images if img.label == label]
        per_class[label] = {
            "count": counts[label],
            "share": round(counts[label] / n, 4),
            "width": _size_summary([img.width for img in members]),
            "height": _size_summary([img.height for img in members]),
        }
    shortcut = size_shortcut(images)
    duplicates, conflicts = duplicate_report(session, dataset.id)
    conflicts = [c for c in conflicts if c["labelset"] == labelset.name]
    groups = {img.group for img in images if img.group}
    warnings: list[str] = []
    if counts and len(counts) > 1:
        ratio = max(counts.values()) / min(counts.values())
        if ratio >= 3:
            warnings.append(f"classes are imbalanced ({ratio:.1f}:1); train with class_weights=auto or balancing")
    else:
        ratio = 1.0
        warnings.append("fewer than two classes: nothing to classify yet")
    for label, score in shortcut["per_class"].items():
        if min(score["precision"], score["recall"]) >= SIZE_SHORTCUT_SCORE and counts[label] >= 5 and len(counts) > 1:
            warnings.append(
                f"class {label!r}: image size alone identifies it (precision {score['precision']:.2f}, recall "
                f"{score['recall']:.2f}): a shortcut. Training resizes every image to one input size, so size "
                "itself is gone, but the resampling (grain scale, blur) still differs by class: compare "
                "explanations, and collect images of this class at the other sizes if you can"
            )
        elif score["others_with_sizes_never_seen"] >= SIZE_NEVER_SEEN_SHARE and len(counts) > 1:
            warnings.append(
                f"class {label!r} never has size {', '.join(score['sizes_never_seen'])}, which "
                f"{score['others_with_sizes_never_seen']:.0%} of the other classes' images have: size alone "
                f"tells {label!r} apart from them (a shortcut). Training resizes every image to one input size, "
                "so size itself is gone, but the resampling (grain scale, blur) still differs by class: "
                "check what the model looks at with `handlens explain`"
            )
    if shortcut["size_only_accuracy"] - shortcut["majority_baseline"] >= SIZE_ACCURACY_MARGIN:
        warnings.append(
            f"image size alone predicts the class with accuracy {shortcut['size_only_accuracy']:.2f} "
            f"(majority baseline {shortcut['majority_baseline']:.2f})"
        )
    if duplicates:
        warnings.append(f"{len(duplicates)} sets of identical images; split with --group-by hash to keep "
                        "each set in one split")
    if conflicts:
        warnings.append(f"{len(conflicts)} identical images carry different labels (label conflicts)")
    return {
        "dataset": dataset.name,
        "labelset": labelset.name,
        "images": n,
        "images_in_dataset": total_in_dataset,
        "unlabelled_in_labelset": total_in_dataset - n,
        "classes": per_class,
        "imbalance_ratio": round(ratio, 3),
        "size_shortcut": shortcut,
        "groups": len(groups),
        "duplicates": duplicates,
        "label_conflicts": conflicts,
        "warnings": warnings,
    }
