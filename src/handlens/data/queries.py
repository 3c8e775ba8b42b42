"""Read-side catalog queries shared by import, statistics, splits and (later) training."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from handlens.core.errors import InputError, NotFoundError
from handlens.data.catalog import Dataset, Image, Label, Labelset, Split


@dataclass(frozen=True)
class LabelledImage:
    """An image as the data side sees it under one labelset."""

    id: int
    path: str
    sha256: str
    width: int
    height: int
    group: str | None
    label: str


def find_dataset(session: Session, name: str) -> Dataset:
    dataset = session.scalars(select(Dataset).where(Dataset.name == name)).first()
    if dataset is None:
        known = ", ".join(session.scalars(select(Dataset.name).order_by(Dataset.name))) or "(none yet)"
        raise NotFoundError(f"no dataset named {name!r}; known: {known}. Import one with `handlens import`")
    return dataset


def find_labelset(session: Session, dataset: Dataset, name: str | None) -> Labelset:
    """The named labelset, or the dataset's only one when ``name`` is None."""
    labelsets = list(session.scalars(select(Labelset).where(Labelset.dataset_id == dataset.id)
                                     .order_by(Labelset.name)))
    if name is None:
        if len(labelsets) == 1:
            return labelsets[0]
        if not labelsets:
            raise NotFoundError(f"dataset {dataset.name!r} has no labels yet")
        names = ", ".join(ls.name for ls in labelsets)
        raise InputError(f"dataset {dataset.name!r} has several labelsets ({names}); choose one with --labelset")
    for labelset in labelsets:
        if labelset.name == name:
            return labelset
    names = ", ".join(ls.name for ls in labelsets) or "(none)"
    raise NotFoundError(f"dataset {dataset.name!r} has no labelset {name!r}; it has: {names}")


def labelled_images(session: Session, labelset: Labelset) -> list[LabelledImage]:
    """Every image of the labelset's dataset that carries a label in it, in id order."""
    rows = session.execute(
        select(Image.id, Image.path, Image.sha256, Image.width, Image.height, Image.group, Label.label)
        .join(Label, Label.image_id == Image.id)
        .where(Label.labelset_id == labelset.id)
        .order_by(Image.id)
    )
    return [LabelledImage(*row) for row in rows]


def latest_split(session: Session, dataset: Dataset, labelset: Labelset | None = None) -> Split | None:
    query = select(Split).where(Split.dataset_id == dataset.id)
    if labelset is not None:
        query = query.where(Split.labelset_id == labelset.id)
    return session.scalars(query.order_by(Split.id.desc())).first()


def duplicate_report(session: Session, dataset_id: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Exact duplicates (same SHA-256) in a dataset, and those among them whose labels disagree."""
    dup_hashes = select(Image.sha256).where(Image.dataset_id == dataset_id).group_by(Image.sha256) \
        .having(func.count(Image.id) > 1)
    images = list(session.scalars(select(Image).where(Image.dataset_id == dataset_id,
                                                      Image.sha256.in_(dup_hashes)).order_by(Image.id)))
    by_hash: dict[str, list[Image]] = defaultdict(list)
    for image in images:
        by_hash[image.sha256].append(image)
    duplicates: list[dict[str, Any]] = []
    conflicts: list[dict[str, Any]] = []
    for sha, group in by_hash.items():
        duplicates.append({"sha256": sha, "paths": [img.path for img in group]})
        per_labelset: dict[str, dict[str, str]] = defaultdict(dict)
        for img in group:
            for label in img.labels:
                per_labelset[label.labelset.name][img.path] = label.label
        for labelset_name, labels in sorted(per_labelset.items()):
            if len(set(labels.values())) > 1:
                conflicts.append({"sha256": sha, "labelset": labelset_name, "labels": labels})
    return duplicates, conflicts


def dataset_summaries(session: Session) -> list[dict[str, Any]]:
    """One row per dataset: name, image count, labelsets with their class counts, splits."""
    summaries = []
    for dataset in session.scalars(select(Dataset).order_by(Dataset.name)):
        count = session.scalar(select(func.count(Image.id)).where(Image.dataset_id == dataset.id)) or 0
        labelsets = {}
        for labelset in session.scalars(select(Labelset).where(Labelset.dataset_id == dataset.id)
                                        .order_by(Labelset.name)):
            classes = session.scalar(select(func.count(func.distinct(Label.label)))
                                     .where(Label.labelset_id == labelset.id)) or 0
            labelsets[labelset.name] = classes
        splits = list(session.scalars(select(Split.name).where(Split.dataset_id == dataset.id).order_by(Split.id)))
        summaries.append({"name": dataset.name, "images": count, "labelsets": labelsets, "splits": splits,
                          "created_at": dataset.created_at.isoformat() if dataset.created_at else None})
    return summaries


def list_images(session: Session, *, dataset: str, labelset: str | None = None, label: str | None = None,
                split: str | None = None, subset: str | None = None, limit: int = 100,
                offset: int = 0) -> dict[str, Any]:
    """A page of a dataset's images under one labelset (its default when None), optionally of one class and
    one split's subset (the dataset's newest split when only ``subset`` is given): {dataset, labelset, split,
    total, offset, items: [{id, name, width, height, label, subset}]}."""
    from pathlib import Path

    from handlens.data.catalog import SplitAssignment

    ds = find_dataset(session, dataset)
    ls = find_labelset(session, ds, labelset)
    chosen = None
    if split or subset:
        chosen = (session.scalars(select(Split).where(Split.dataset_id == ds.id, Split.name == split)).first()
                  if split else latest_split(session, ds, ls))
        if chosen is None:
            raise NotFoundError(f"dataset {dataset!r} has no split {split or '(none yet)'!r}")
    query = (select(Image.id, Image.path, Image.width, Image.height, Label.label)
             .join(Label, Label.image_id == Image.id).where(Label.labelset_id == ls.id))
    if label:
        query = query.where(Label.label == label)
    if chosen is not None:
        query = query.join(SplitAssignment, SplitAssignment.image_id == Image.id).where(
            SplitAssignment.split_id == chosen.id, SplitAssignment.fold == 0)
        if subset:
            query = query.where(SplitAssignment.subset == subset)
        query = query.add_columns(SplitAssignment.subset)
    total = session.scalar(select(func.count()).select_from(query.subquery()))
    rows = session.execute(query.order_by(Image.id).limit(limit).offset(offset)).all()
    items = [{"id": r[0], "name": Path(r[1]).name, "width": r[2], "height": r[3], "label": r[4],
              "subset": r[5] if len(r) > 5 else None} for r in rows]
    return {"dataset": dataset, "labelset": ls.name, "split": chosen.name if chosen is not None else None,
            "total": int(total or 0), "offset": offset, "items": items}


def image_detail(session: Session, image_id: int) -> dict[str, Any] | None:
    """One image with its labels (per labelset), split memberships and expert regions; None when absent.
    Only the file's name is given, never its path on the server."""
    from pathlib import Path

    from handlens.data.catalog import Annotation, SplitAssignment

    row = session.get(Image, image_id)
    if row is None:
        return None
    labels = {name: value for name, value in session.execute(
        select(Labelset.name, Label.label).join(Labelset, Label.labelset_id == Labelset.id)
        .where(Label.image_id == image_id))}
    splits = [{"split": name, "fold": fold, "subset": subset} for name, fold, subset in session.execute(
        select(Split.name, SplitAssignment.fold, SplitAssignment.subset)
        .join(Split, SplitAssignment.split_id == Split.id).where(SplitAssignment.image_id == image_id)
        .order_by(Split.id, SplitAssignment.fold))]
    regions = [{"id": a.id, "kind": a.kind, "label": a.label, "polygons": a.polygons, "has_mask": bool(a.mask_path)}
               for a in session.scalars(select(Annotation).where(Annotation.image_id == image_id))]
    return {"id": row.id, "name": Path(row.path).name, "dataset_id": row.dataset_id, "width": row.width,
            "height": row.height, "format": row.format, "sha256": row.sha256, "group": row.group,
            "labels": labels, "splits": splits, "regions": regions}


def browse_rows(session: Session, *, dataset: str, labelset: str | None, split: str | None,
                subset: str | None = None) -> tuple[str, str | None, list[dict[str, Any]]]:
    """Every labelled image of a dataset under one labelset (its default when None), with its subset in
    ``split`` (fold 0) when given: (labelset name, split name, rows of id, name, path, sha256, label, bytes,
    mtime_ns, subset)."""
    from pathlib import Path

    from handlens.data.catalog import SplitAssignment

    ds = find_dataset(session, dataset)
    ls = find_labelset(session, ds, labelset)
    chosen = session.scalars(select(Split).where(Split.dataset_id == ds.id, Split.name == split)).first() \
        if split else None
    query = (select(Image.id, Image.path, Image.sha256, Label.label, Image.bytes, Image.mtime_ns)
             .join(Label, Label.image_id == Image.id).where(Label.labelset_id == ls.id))
    if chosen is not None:
        query = query.outerjoin(SplitAssignment, (SplitAssignment.image_id == Image.id)
                                & (SplitAssignment.split_id == chosen.id) & (SplitAssignment.fold == 0))
        query = query.add_columns(SplitAssignment.subset)
        if subset:
            query = query.where(SplitAssignment.subset == subset)
    rows = [{"id": r[0], "name": Path(r[1]).name, "path": r[1], "sha256": r[2], "label": r[3], "bytes": r[4],
             "mtime_ns": r[5], "subset": r[6] if len(r) > 6 else None}
            for r in session.execute(query.order_by(Image.id))]
    return ls.name, chosen.name if chosen is not None else None, rows
