"""Leak-free splits: stratified by class, optionally grouped, optionally k-fold, reproducible.

* Stratified: each class is divided by the shares (largest-remainder rounding), so every split
  keeps the class proportions.
* Grouped (``group_by="group"``): whole groups go to one split (all images of one rock sample or
  one patient stay together); groups are placed greedily, largest first, where their classes are
  most lacking. ``group_by="hash"`` keeps identical files together. ``group_regex`` derives the groups
  from file names instead (``H1_23a_4.jpg`` -> ``H1`` with ``^([^_]+)_``), in memory: the catalog's
  own groups (a CSV's group column) are kept as they are, and the regex is recorded in the split's params.
* k-fold: an optional test share is held out first; the rest is cut into K parts, and fold k
  validates on part k and trains on the others.

After planning, identical images (same SHA-256) found in two subsets of a fold are reported as
leakage, and inverse-frequency class weights are computed from each fold's train subset.
"""

from __future__ import annotations

import random
import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from sqlalchemy import func, select

from handlens.core.errors import ConflictError, InputError
from handlens.data.catalog import Split, SplitAssignment
from handlens.data.queries import LabelledImage, find_dataset, find_labelset, labelled_images

SUBSETS = ("train", "val", "test")
GROUP_KEYS = ("group", "hash")


@dataclass
class SplitPlan:
    """Fold -> image id -> subset, with class weights per fold and a report of findings."""

    assignments: dict[int, dict[int, str]]
    class_weights: dict[str, dict[str, float]]
    counts: dict[str, dict[str, dict[str, int]]]
    leakage: list[dict[str, Any]] = field(default_factory=list)
    excluded: int = 0


def parse_ratios(text: str | list[float] | tuple[float, ...]) -> tuple[float, float, float]:
    """``"0.8,0.1,0.1"`` or ``"0.9,0.1"`` -> (train, val, test); shares must sum to 1."""
    try:
        values = [float(v) for v in (text.split(",") if isinstance(text, str) else text)]
    except ValueError:
        raise InputError(f"--ratios {text!r}: give two or three numbers like 0.8,0.1,0.1") from None
    if len(values) not in (2, 3) or any(v < 0 for v in values):
        raise InputError(f"--ratios {text!r}: give two (train,val) or three (train,val,test) non-negative shares")
    if abs(sum(values) - 1.0) > 1e-6:
        raise InputError(f"--ratios {text!r} sums to {sum(values):g}; the shares must sum to 1")
    if values[0] <= 0:
        raise InputError("--ratios: the train share must be above zero")
    return (values[0], values[1], values[2] if len(values) == 3 else 0.0)


def compile_group_regex(pattern: str) -> re.Pattern[str]:
    try:
        return re.compile(pattern)
    except re.error as exc:
        raise InputError(f"--group-regex {pattern!r} is not a valid regular expression: {exc}") from None


def name_group(regex: re.Pattern[str], path: str) -> str | None:
    """The group a file name gives under ``regex`` (searched in the file name, not the folders): its first
    capture group, or the whole match when it has none; None when it does not match or captures nothing."""
    found = regex.search(Path(path).name)
    if found is None:
        return None
    return (found.group(1) if regex.groups else found.group(0)) or None


def groups_from_names(images: list[LabelledImage], pattern: str) -> list[LabelledImage]:
    """``images`` with ``group`` taken from their file names by ``pattern`` (see :func:`name_group`).

    Every name must match: an image left without a group would be split on its own, next to the images
    of its sample or patient, which is the leak grouping is there to prevent.
    """
    regex = compile_group_regex(pattern)
    out, unmatched = [], []
    for img in images:
        group = name_group(regex, img.path)
        if group is None:
            unmatched.append(Path(img.path).name)
        out.append(replace(img, group=group))
    if unmatched:
        examples = ", ".join(unmatched[:5]) + (", ..." if len(unmatched) > 5 else "")
        raise InputError(
            f"--group-regex {pattern!r} matches no group in {len(unmatched)} of {len(images)} file names "
            f"(e.g. {examples}); every image needs a group, or it would be split apart from its sample. The "
            "regex is searched in the file name (not its folders) and its first capture group is the group: "
            "adjust it (e.g. make a separator optional) so that every name matches")
    return out


def _largest_remainder(n: int, shares: list[float]) -> list[int]:
    raw = [n * s for s in shares]
    counts = [int(r) for r in raw]
    order = sorted(range(len(shares)), key=lambda i: (raw[i] - counts[i], shares[i]), reverse=True)
    for i in order[: n - sum(counts)]:
        counts[i] += 1
    return counts


def _partition(units: dict[str, list[LabelledImage]], shares: list[float], rng: random.Random,
               grouped: bool) -> dict[str, int]:
    """Assign each unit (a group of images) to one part, keeping class proportions per part."""
    placement: dict[str, int] = {}
    if not grouped:  # every unit is one image: exact per-class stratification
        by_class: dict[str, list[str]] = defaultdict(list)
        for key, members in sorted(units.items()):
            by_class[members[0].label].append(key)
        for label in sorted(by_class):
            keys = by_class[label]
            rng.shuffle(keys)
            start = 0
            for part, count in enumerate(_largest_remainder(len(keys), shares)):
                for key in keys[start:start + count]:
                    placement[key] = part
                start += count
        return placement
    totals = Counter(img.label for members in units.values() for img in members)
    targets = [{c: n * s for c, n in totals.items()} for s in shares]
    current: list[Counter[str]] = [Counter() for _ in shares]
    keys = sorted(units)
    rng.shuffle(keys)
    keys.sort(key=lambda k: len(units[k]), reverse=True)  # stable: ties keep the seeded order
    for key in keys:
        composition = Counter(img.label for img in units[key])

        def need(part: int, composition: Counter[str] = composition) -> float:
            return sum(k * (targets[part][c] - current[part][c]) / totals[c] for c, k in composition.items())

        candidates = [p for p, s in enumerate(shares) if s > 0]
        best = max(candidates, key=lambda p: (need(p), shares[p]))
        placement[key] = best
        current[best].update(composition)
    return placement


def _unit_key(img: LabelledImage, group_by: str | None) -> str:
    if group_by == "group":
        return f"g:{img.group}" if img.group else f"i:{img.id}"
    if group_by == "hash":
        return f"h:{img.sha256}"
    return f"i:{img.id}"


def plan_split(
    images: list[LabelledImage],
    ratios: tuple[float, float, float],
    *,
    seed: int = 0,
    group_by: str | None = None,
    folds: int | None = None,
    min_per_class: int = 1,
    max_per_class: int | None = None,
) -> SplitPlan:
    """Plan a split of ``images`` (see the module docstring). Pure: same input and seed, same plan."""
    _check_split_request(images, group_by, folds)
    rng = random.Random(seed)
    kept = _cap_per_class(images, max_per_class, rng) if max_per_class is not None else images
    units: dict[str, list[LabelledImage]] = defaultdict(list)
    for img in kept:
        units[_unit_key(img, group_by)].append(img)
    grouped = group_by is not None
    if folds is None:
        assignments, active = _holdout_assignments(units, ratios, rng, grouped)
    else:
        assignments, active = _fold_assignments(units, ratios[2], folds=folds, rng=rng, grouped=grouped)
    counts = _subset_counts(kept, assignments, active, min_per_class=min_per_class, folds=folds)
    return SplitPlan(
        assignments=assignments,
        class_weights={fold: inverse_frequency_weights(c["train"]) for fold, c in counts.items()},
        counts=counts,
        leakage=find_leakage(kept, assignments),
        excluded=len(images) - len(kept),
    )


def _check_split_request(images: list[LabelledImage], group_by: str | None, folds: int | None) -> None:
    if group_by is not None and group_by not in GROUP_KEYS:
        raise InputError(f"--group-by {group_by!r}: choose 'group' (the import's group column) or 'hash'")
    if group_by == "group" and not any(img.group for img in images):
        raise InputError("--group-by group: no image has a group; import a CSV manifest with a group column")
    if folds is not None and folds < 2:
        raise InputError("--folds must be 2 or more")
    if not images:
        raise InputError("no labelled images to split")


def _cap_per_class(images: list[LabelledImage], max_per_class: int, rng: random.Random) -> list[LabelledImage]:
    """At most ``max_per_class`` images of each class, drawn at random (seeded), in id order."""
    by_class: dict[str, list[LabelledImage]] = defaultdict(list)
    for img in images:
        by_class[img.label].append(img)
    kept: list[LabelledImage] = []
    for label in sorted(by_class):
        members = sorted(by_class[label], key=lambda i: i.id)
        rng.shuffle(members)
        kept.extend(members[:max_per_class])
    return sorted(kept, key=lambda i: i.id)


def _holdout_assignments(units: dict[str, list[LabelledImage]], ratios: tuple[float, float, float],
                         rng: random.Random, grouped: bool) -> tuple[dict[int, dict[int, str]], dict[str, bool]]:
    train, val, test = ratios
    placement = _partition(units, [train, val, test], rng, grouped)
    assignment = {img.id: SUBSETS[placement[key]] for key, members in units.items() for img in members}
    return {0: assignment}, {"train": True, "val": val > 0, "test": test > 0}


def _fold_assignments(units: dict[str, list[LabelledImage]], test: float, *, folds: int, rng: random.Random,
                      grouped: bool) -> tuple[dict[int, dict[int, str]], dict[str, bool]]:
    """K folds over what the test share leaves: each fold's val is one part, its train the others."""
    rest = units
    test_ids: set[int] = set()
    if test > 0:
        outer = _partition(units, [1 - test, test], rng, grouped)
        rest = {k: v for k, v in units.items() if outer[k] == 0}
        test_ids = {img.id for k, v in units.items() if outer[k] == 1 for img in v}
    inner = _partition(rest, [1 / folds] * folds, rng, grouped)
    assignments: dict[int, dict[int, str]] = {}
    for fold in range(folds):
        assignment = {img_id: "test" for img_id in test_ids}
        for key, members in rest.items():
            for img in members:
                assignment[img.id] = "val" if inner[key] == fold else "train"
        assignments[fold] = assignment
    return assignments, {"train": True, "val": True, "test": test > 0}


def _subset_counts(images: list[LabelledImage], assignments: dict[int, dict[int, str]], active: dict[str, bool],
                   *, min_per_class: int, folds: int | None) -> dict[str, dict[str, dict[str, int]]]:
    """Images per class per subset per fold; refuses a subset with fewer than ``min_per_class`` of a class."""
    classes = sorted({img.label for img in images})
    label_of = {img.id: img.label for img in images}
    counts: dict[str, dict[str, dict[str, int]]] = {}
    for fold, assignment in assignments.items():
        per_subset: dict[str, Counter[str]] = {s: Counter() for s in SUBSETS}
        for img_id, subset in assignment.items():
            per_subset[subset][label_of[img_id]] += 1
        counts[str(fold)] = {s: {c: per_subset[s][c] for c in classes} for s in SUBSETS if active[s]}
        for subset, per_class in counts[str(fold)].items():
            short = {c: n for c, n in per_class.items() if n < min_per_class}
            if short:
                where = f" in fold {fold}" if folds else ""
                detail = ", ".join(f"{c!r} ({n})" for c, n in short.items())
                raise InputError(
                    f"the {subset} split{where} would hold fewer than {min_per_class} image(s) of class "
                    f"{detail}; raise that share in --ratios, use fewer --folds, set its share to 0, "
                    "or add images of that class"
                )
    return counts


def inverse_frequency_weights(train_counts: dict[str, int]) -> dict[str, float]:
    """w_c = N / (K * n_c): balanced classes all get 1; rare classes weigh more."""
    total, k = sum(train_counts.values()), len(train_counts)
    return {c: round(total / (k * n), 6) if n else 0.0 for c, n in train_counts.items()}


def find_leakage(images: list[LabelledImage], assignments: dict[int, dict[int, str]]) -> list[dict[str, Any]]:
    """Identical files (by SHA-256) placed in more than one subset of the same fold."""
    by_hash: dict[str, list[LabelledImage]] = defaultdict(list)
    for img in images:
        by_hash[img.sha256].append(img)
    leaks = []
    for fold, assignment in assignments.items():
        for sha, members in by_hash.items():
            subsets: dict[str, list[str]] = defaultdict(list)
            for img in members:
                if img.id in assignment:
                    subsets[assignment[img.id]].append(img.path)
            if len(subsets) > 1:
                leaks.append({"fold": fold, "sha256": sha, "subsets": dict(sorted(subsets.items()))})
    return leaks


# --------------------------------------------------------------------------- catalog side


def make_split(
    catalog: Any,
    dataset_name: str,
    labelset_name: str | None = None,
    *,
    ratios: str | tuple[float, ...] = (0.8, 0.1, 0.1),
    seed: int = 0,
    group_by: str | None = None,
    folds: int | None = None,
    name: str | None = None,
    min_per_class: int = 1,
    max_per_class: int | None = None,
    group_regex: str | None = None,
) -> dict[str, Any]:
    """Plan a split of a catalog dataset and store it; returns its summary (what ``split`` prints).

    ``group_regex``: groups from file names (:func:`groups_from_names`) for this split only.
    """
    shares = parse_ratios(ratios)
    if group_regex is not None:
        if group_by == "hash":
            raise InputError("--group-regex groups by file name; it cannot be combined with --group-by hash")
        group_by = "group"
    with catalog.session() as session:
        dataset = find_dataset(session, dataset_name)
        labelset = find_labelset(session, dataset, labelset_name)
        images = labelled_images(session, labelset)
        if group_regex is not None:
            images = groups_from_names(images, group_regex)
        plan = plan_split(images, shares, seed=seed, group_by=group_by, folds=folds, min_per_class=min_per_class,
                          max_per_class=max_per_class)
        if name is None:
            existing = session.scalar(select(func.count(Split.id)).where(Split.dataset_id == dataset.id)) or 0
            name = f"split{existing + 1}"
        if session.scalars(select(Split).where(Split.dataset_id == dataset.id, Split.name == name)).first():
            raise ConflictError(f"dataset {dataset_name!r} already has a split named {name!r}; choose another --name")
        params = {"ratios": list(shares), "seed": seed, "group_by": group_by, "folds": folds,
                  "min_per_class": min_per_class, "max_per_class": max_per_class}
        if group_regex is not None:
            params["group_regex"] = group_regex
        report = {"counts": plan.counts, "leakage": plan.leakage, "excluded_by_max_per_class": plan.excluded}
        if group_by == "group":
            report["groups"] = group_summary(images, "file names" if group_regex is not None else "catalog")
        split = Split(dataset_id=dataset.id, labelset_id=labelset.id, name=name, params=params,
                      class_weights=plan.class_weights, report=report)
        session.add(split)
        session.flush()
        session.execute(
            SplitAssignment.__table__.insert(),
            [{"split_id": split.id, "image_id": img_id, "fold": fold, "subset": subset}
             for fold, assignment in plan.assignments.items() for img_id, subset in assignment.items()],
        )
        return split_summary(split, dataset_name, labelset.name)


def split_summary(split: Any, dataset_name: str, labelset_name: str) -> dict[str, Any]:
    return {
        "id": split.id,
        "name": split.name,
        "dataset": dataset_name,
        "labelset": labelset_name,
        "params": split.params,
        "counts": split.report["counts"],
        "class_weights": split.class_weights,
        "leakage": split.report["leakage"],
        "excluded_by_max_per_class": split.report.get("excluded_by_max_per_class", 0),
        "groups": split.report.get("groups"),
    }


def group_summary(images: list[LabelledImage], source: str) -> dict[str, Any]:
    """How many groups a grouped split placed, their sizes, and where the groups came from."""
    sizes = Counter(img.group for img in images if img.group)
    return {"source": source, "groups": len(sizes), "ungrouped_images": sum(1 for img in images if not img.group),
            "min_images": min(sizes.values(), default=0), "max_images": max(sizes.values(), default=0)}


def split_members(session: Any, split_id: int, fold: int = 0) -> dict[str, list[int]]:
    """Image ids per subset for one fold of a stored split."""
    members: dict[str, list[int]] = {s: [] for s in SUBSETS}
    rows = session.execute(select(SplitAssignment.image_id, SplitAssignment.subset)
                           .where(SplitAssignment.split_id == split_id, SplitAssignment.fold == fold)
                           .order_by(SplitAssignment.image_id))
    for image_id, subset in rows:
        members[subset].append(image_id)
    return members


def split_groups(session: Any, dataset_id: int, split_name: str, ids: list[int]) -> list[str | None] | None:
    """Each image's group when split ``split_name`` keeps groups together (``--group-by group|hash`` or
    ``--group-regex``), in ``ids`` order; None for an ungrouped split. Cross-validation inside such a split must
    keep the groups together too, or images of one sample land on both sides of a fold."""
    from handlens.data.catalog import Image

    split = session.scalars(select(Split).where(Split.dataset_id == dataset_id, Split.name == split_name)).first()
    params = dict(split.params or {}) if split is not None else {}
    group_by, regex = params.get("group_by"), params.get("group_regex")
    if not group_by and not regex:
        return None
    rows = {row.id: row for row in session.scalars(select(Image).where(Image.id.in_(ids)))}
    if regex:
        pattern = compile_group_regex(regex)
        return [name_group(pattern, rows[i].path) for i in ids]
    if group_by == "hash":
        return [rows[i].sha256 for i in ids]
    return [rows[i].group for i in ids]
