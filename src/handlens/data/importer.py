"""Import a folder-per-class tree or a CSV manifest into the catalog, validating every file.

Bad files never stop an import: each is skipped with a reason, kept in the import report (and in
the catalog's ``imports`` table), and the rest go in. Re-importing the same tree adds nothing.
"""

from __future__ import annotations

import csv
import os
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import insert, select

from handlens.core.errors import InputError
from handlens.core.workspace import is_within
from handlens.data.catalog import Catalog, Dataset, Image, ImportRecord, Label, Labelset
from handlens.data.catalog.schema import utcnow
from handlens.data.imaging import (
    DEFAULT_MAX_PIXELS,
    DEFAULT_MIN_SIDE,
    IMAGE_EXTENSIONS,
    Probe,
    Reason,
    probe_image,
)
from handlens.data.queries import duplicate_report

DEFAULT_LABELSET = "default"
ProgressCallback = Callable[[int, int], None]


@dataclass
class Entry:
    """One image to import: where it is, its labels per labelset, its group (e.g. rock sample id)."""

    path: str
    labels: dict[str, str]
    group: str | None = None


@dataclass
class Skipped:
    path: str
    reason: str
    detail: str


@dataclass
class ImportReport:
    dataset: str
    source: str
    scanned: int = 0
    added: int = 0
    unchanged: int = 0
    updated: int = 0
    relabelled: int = 0
    ignored_files: int = 0
    skipped: list[Skipped] = field(default_factory=list)
    duplicates: list[dict[str, Any]] = field(default_factory=list)
    label_conflicts: list[dict[str, Any]] = field(default_factory=list)
    class_counts: dict[str, dict[str, int]] = field(default_factory=dict)
    seconds: float = 0.0
    workers: int = 1

    @property
    def images_per_second(self) -> float:
        return self.scanned / self.seconds if self.seconds > 0 else 0.0

    @property
    def nothing_new(self) -> bool:
        return self.added == 0 and self.updated == 0 and self.relabelled == 0

    def skipped_by_reason(self) -> dict[str, int]:
        counts: dict[str, int] = defaultdict(int)
        for item in self.skipped:
            counts[item.reason] += 1
        return dict(sorted(counts.items()))

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["images_per_second"] = round(self.images_per_second, 1)
        data["skipped_by_reason"] = self.skipped_by_reason()
        data["nothing_new"] = self.nothing_new
        return data


# --------------------------------------------------------------------------- discovering entries


def scan_folder(root: Path, labelset: str = DEFAULT_LABELSET) -> tuple[list[Entry], list[Skipped], int]:
    """Walk a folder-per-class tree: the first-level folder names the class, at any depth below.

    Returns (entries, skipped, ignored): images lying directly in ``root`` have no class and are
    skipped; files without an image extension and hidden files are ignored (only counted).
    """
    root = root.resolve()
    entries: list[Entry] = []
    skipped: list[Skipped] = []
    ignored = 0
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        rel = Path(dirpath).relative_to(root)
        for name in sorted(filenames):
            path = Path(dirpath) / name
            if name.startswith(".") or path.suffix.lower() not in IMAGE_EXTENSIONS:
                ignored += 1
                continue
            if not rel.parts:
                skipped.append(Skipped(str(path), Reason.UNLABELLED,
                                       "image lies in the root folder; put it in a folder named after its class"))
                continue
            entries.append(Entry(str(path), {labelset: rel.parts[0]}))
    return entries, skipped, ignored


def read_manifest(
    manifest: Path, base: Path, default_labelset: str = DEFAULT_LABELSET, allow_outside: bool = False
) -> tuple[list[Entry], list[Skipped]]:
    """Read a CSV with columns ``path,label[,labelset][,group]``; relative paths are under ``base``.

    Several rows may name the same path under different labelsets. A row whose path leaves ``base``
    is refused unless ``allow_outside``.
    """
    base = base.resolve()
    try:
        handle = manifest.open(newline="", encoding="utf-8-sig")
    except OSError as exc:
        raise InputError(f"cannot read manifest {manifest}: {exc}") from exc
    with handle:
        reader = csv.DictReader(handle)
        columns = {c.strip().lower() for c in (reader.fieldnames or [])}
        missing = {"path", "label"} - columns
        if missing:
            raise InputError(
                f"manifest {manifest} lacks column(s) {', '.join(sorted(missing))}; "
                "expected a header row: path,label[,labelset][,group]"
            )
        by_path: dict[str, Entry] = {}
        skipped: list[Skipped] = []
        for line_no, raw in enumerate(reader, start=2):
            row = {(k or "").strip().lower(): (v or "").strip() for k, v in raw.items()}
            rel, label = row.get("path", ""), row.get("label", "")
            labelset = row.get("labelset") or default_labelset
            if not rel or not label:
                skipped.append(Skipped(f"{manifest}:{line_no}", Reason.BAD_ROW, "row needs both path and label"))
                continue
            target = (base / rel).resolve()
            if not allow_outside and not is_within(target, base):
                skipped.append(Skipped(str(target), Reason.OUTSIDE_TREE,
                                       f"row {line_no} points outside {base}; pass --allow-outside to accept it"))
                continue
            entry = by_path.setdefault(str(target), Entry(str(target), {}, row.get("group") or None))
            previous = entry.labels.get(labelset)
            if previous is not None and previous != label:
                skipped.append(Skipped(str(target), Reason.BAD_ROW,
                                       f"row {line_no} gives label {label!r} under labelset {labelset!r}, "
                                       f"an earlier row gave {previous!r}; kept the first"))
                continue
            entry.labels[labelset] = label
            if row.get("group"):
                entry.group = row["group"]
    return list(by_path.values()), skipped


# --------------------------------------------------------------------------- probing


def probe_many(
    paths: list[str],
    workers: int | None = None,
    min_side: int = DEFAULT_MIN_SIDE,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    progress: ProgressCallback | None = None,
) -> Iterator[Probe]:
    """Probe ``paths`` on ``workers`` processes (default: every core), yielding results in input order.

    A generator, so the caller writes results to the catalog while the workers keep decoding.
    """
    workers = max(1, workers or os.cpu_count() or 1)
    total = len(paths)
    if workers == 1 or total < 8:
        results: Iterable[Probe] = (probe_image(path, min_side, max_pixels) for path in paths)
        yield from _counted(results, total, progress)
        return
    chunk = max(1, min(32, total // (workers * 8)))
    with ProcessPoolExecutor(max_workers=workers) as pool:
        results = pool.map(probe_image, paths, [min_side] * total, [max_pixels] * total, chunksize=chunk)
        yield from _counted(results, total, progress)


def _counted(results: Iterable[Probe], total: int, progress: ProgressCallback | None) -> Iterator[Probe]:
    for done, probe in enumerate(results, start=1):
        if progress:
            progress(done, total)
        yield probe


# --------------------------------------------------------------------------- writing to the catalog


def import_entries(
    catalog: Catalog,
    dataset_name: str,
    source: str,
    entries: Iterable[Entry],
    pre_skipped: Iterable[Skipped] = (),
    ignored_files: int = 0,
    workers: int | None = None,
    min_side: int = DEFAULT_MIN_SIDE,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    progress: ProgressCallback | None = None,
) -> ImportReport:
    """Validate ``entries`` and add them to ``dataset_name`` (created if new). Returns the report."""
    started = time.perf_counter()
    entries = list(entries)
    report = ImportReport(dataset=dataset_name, source=source, scanned=len(entries),
                          ignored_files=ignored_files, skipped=list(pre_skipped),
                          workers=max(1, workers or os.cpu_count() or 1))
    with catalog.session() as session:
        dataset = session.scalars(select(Dataset).where(Dataset.name == dataset_name)).first()
        created = dataset is None
        if dataset is None:
            dataset = Dataset(name=dataset_name, description=f"imported from {source}")
            session.add(dataset)
            session.flush()
        existing = {img.path: img for img in session.scalars(select(Image).where(Image.dataset_id == dataset.id))}

        # Unchanged files (same size and mtime as at their last import) are not decoded again.
        stats = {e.path: _stat(e.path) for e in entries}
        needs_probe = [not _unchanged(existing.get(e.path), stats[e.path]) for e in entries]
        probes = probe_many([e.path for e, needed in zip(entries, needs_probe, strict=True) if needed],
                            workers, min_side, max_pixels, progress)

        labelsets = _ensure_labelsets(session, dataset, {name for e in entries for name in e.labels})
        current_labels: dict[int, dict[int, Label]] = defaultdict(dict)
        for label in session.scalars(select(Label).join(Image).where(Image.dataset_id == dataset.id)):
            current_labels[label.image_id][label.labelset_id] = label
        new_rows: dict[str, dict[str, Any]] = {}
        new_labels: dict[str, dict[int, str]] = {}
        for entry, needed in zip(entries, needs_probe, strict=True):
            probe = next(probes) if needed else None  # results stream in while workers decode
            image = existing.get(entry.path)
            if probe is not None and not probe.ok:
                report.skipped.append(Skipped(entry.path, probe.reason, probe.detail))
                continue
            if image is None:  # new: collected for one bulk insert below
                assert probe is not None
                if entry.path not in new_rows:
                    report.added += 1
                new_rows[entry.path] = {"dataset_id": dataset.id, "path": entry.path, "group": entry.group,
                                        "mtime_ns": stats[entry.path], **_facts(probe)}
                new_labels[entry.path] = {labelsets[n].id: v for n, v in entry.labels.items()}
                continue
            if probe is not None and probe.sha256 != image.sha256:
                for key, value in _facts(probe).items():
                    setattr(image, key, value)
                report.updated += 1
            else:
                report.unchanged += 1
            if probe is not None:
                image.mtime_ns = stats[entry.path]
            if entry.group and image.group != entry.group:
                image.group = entry.group
            report.relabelled += _apply_labels(image, entry.labels, labelsets, current_labels[image.id])

        _bulk_insert(session, dataset.id, new_rows, new_labels)
        session.flush()
        dups, conflicts = duplicate_report(session, dataset.id)
        report.duplicates, report.label_conflicts = dups, conflicts
        report.class_counts = _class_counts(session, dataset.id)
        report.seconds = time.perf_counter() - started
        if created and report.added == 0:
            session.rollback()  # no empty dataset left behind
            reasons = ", ".join(f"{n} {r}" for r, n in report.skipped_by_reason().items()) or "no images"
            example = report.skipped[0].detail if report.skipped else "no image files found"
            raise InputError(f"nothing imported from {source} ({reasons}); e.g. {example}")
        session.add(ImportRecord(dataset_id=dataset.id, source=source, report=report.to_dict()))
    return report


def _stat(path: str) -> int | None:
    try:
        return os.stat(path).st_mtime_ns
    except OSError:
        return None


def _unchanged(image: Image | None, mtime_ns: int | None) -> bool:
    if image is None or mtime_ns is None or image.mtime_ns != mtime_ns:
        return False
    try:
        return os.path.getsize(image.path) == image.bytes
    except OSError:
        return False


def _facts(probe: Probe) -> dict[str, Any]:
    return {"sha256": probe.sha256, "width": probe.width, "height": probe.height,
            "mode": probe.mode, "format": probe.format, "bytes": probe.bytes}


def _bulk_insert(session: Any, dataset_id: int, rows: dict[str, dict[str, Any]],
                 labels: dict[str, dict[int, str]]) -> None:
    """Insert new images and their labels with two Core statements: ORM objects cost more than decoding."""
    if not rows:
        return
    session.flush()
    session.execute(insert(Image), [{**row, "added_at": utcnow()} for row in rows.values()])
    ids = dict(session.execute(select(Image.path, Image.id).where(Image.dataset_id == dataset_id)).all())
    label_rows = [{"image_id": ids[path], "labelset_id": labelset_id, "label": value}
                  for path, per_labelset in labels.items() for labelset_id, value in per_labelset.items()]
    if label_rows:
        session.execute(insert(Label), label_rows)


def _ensure_labelsets(session: Any, dataset: Dataset, names: set[str]) -> dict[str, Labelset]:
    labelsets = {ls.name: ls for ls in session.scalars(select(Labelset).where(Labelset.dataset_id == dataset.id))}
    for name in sorted(names - set(labelsets)):
        labelsets[name] = Labelset(dataset_id=dataset.id, name=name)
        session.add(labelsets[name])
    session.flush()
    return labelsets


def _apply_labels(image: Image, labels: dict[str, str], labelsets: dict[str, Labelset],
                  current: dict[int, Label]) -> int:
    """Set an existing image's labels; returns 1 if a label it already had changed, else 0."""
    changed = 0
    for name, value in labels.items():
        label = current.get(labelsets[name].id)
        if label is None:
            image.labels.append(Label(labelset_id=labelsets[name].id, label=value))
        elif label.label != value:
            label.label = value
            changed = 1
    return changed


def _class_counts(session: Any, dataset_id: int) -> dict[str, dict[str, int]]:
    from sqlalchemy import func

    rows = session.execute(
        select(Labelset.name, Label.label, func.count(Label.id))
        .join(Label, Label.labelset_id == Labelset.id)
        .where(Labelset.dataset_id == dataset_id)
        .group_by(Labelset.name, Label.label)
        .order_by(Labelset.name, Label.label)
    )
    counts: dict[str, dict[str, int]] = defaultdict(dict)
    for labelset, label, count in rows:
        counts[labelset][label] = count
    return dict(counts)


def import_path(
    catalog: Catalog,
    path: Path,
    dataset_name: str,
    labelset: str | None = None,
    csv_file: Path | None = None,
    allow_outside: bool = False,
    workers: int | None = None,
    min_side: int = DEFAULT_MIN_SIDE,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    progress: ProgressCallback | None = None,
) -> ImportReport:
    """Import ``path``: a folder-per-class tree, or a CSV manifest (``path`` itself, or ``csv_file``).

    With a manifest, relative paths resolve against ``path`` when it is a folder, else against the
    manifest's folder; that folder is also the tree rows may not leave.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise InputError(f"{path} does not exist; give a folder of class folders or a CSV manifest")
    labelset = labelset or DEFAULT_LABELSET
    if csv_file is None and path.is_file():
        if path.suffix.lower() != ".csv":
            raise InputError(f"{path} is a file; give a folder of class folders, or a .csv manifest")
        csv_file = path
    if csv_file is not None:
        base = path if path.is_dir() else csv_file.parent
        entries, skipped = read_manifest(Path(csv_file), base, labelset, allow_outside)
        ignored, source = 0, str(Path(csv_file).resolve())
    else:
        entries, skipped, ignored = scan_folder(path, labelset)
        source = str(path.resolve())
    if not entries and not skipped:
        raise InputError(f"no images found under {path}; expected class folders holding image files")
    return import_entries(catalog, dataset_name, source, entries, skipped, ignored, workers,
                          min_side, max_pixels, progress)
