"""Import a folder-per-class tree or a CSV manifest into the catalog, validating every file.

Bad files never stop an import: each is skipped with a reason, kept in the import report (and in
the catalog's ``imports`` table), and the rest go in. Re-importing the same tree adds nothing.

Results are written in short transactions (``batch_size`` files each), so a second import, a training
run or the service can use the catalog meanwhile, and an interrupted import (Ctrl-C, SIGTERM) keeps
what it committed: running it again adds the rest without decoding the committed files again.
"""

from __future__ import annotations

import codecs
import contextlib
import csv
import io
import multiprocessing
import os
import signal
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import insert, select, update
from sqlalchemy.exc import IntegrityError, SQLAlchemyError

from handlens.core.errors import ConflictError, HandlensError, InputError
from handlens.core.procs import worker_init
from handlens.data.catalog import Catalog, CatalogBusyError, Dataset, Image, ImportRecord, Label, Labelset
from handlens.data.catalog.schema import utcnow
from handlens.data.imaging import (
    DEFAULT_MAX_PIXELS,
    DEFAULT_MIN_SIDE,
    IMAGE_EXTENSIONS,
    Probe,
    Reason,
    inside_tree,
    printable_path,
    probe_image,
    valid_name,
)
from handlens.data.queries import duplicate_report

DEFAULT_LABELSET = "default"
#: Files written per transaction: the catalog's write lock is never held for longer than one batch.
DEFAULT_BATCH = 500
#: Labels, labelset names and groups are String(200) columns.
MAX_NAME_LENGTH = 200
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
    #: the folder every imported file lies in (symlinks resolved); None when outside files were allowed
    root: str | None = None
    #: files whose results were committed (all of them, unless the import was interrupted)
    committed: int = 0
    interrupted: bool = False

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


class ImportInterrupted(HandlensError):
    """An import stopped by Ctrl-C or SIGTERM; ``report`` holds what was committed before it stopped."""

    exit_code = 130  # the shell's code for an interrupted command

    def __init__(self, message: str, *, report: ImportReport) -> None:
        super().__init__(message)
        self.report = report


# --------------------------------------------------------------------------- discovering entries


def scan_folder(root: Path, labelset: str = DEFAULT_LABELSET, *,
                allow_outside: bool = False) -> tuple[list[Entry], list[Skipped], int]:
    """Walk a folder-per-class tree: the first-level folder names the class, at any depth below.

    Returns (entries, skipped, ignored): images lying directly in ``root`` have no class and are
    skipped, as are symlinks whose target lies outside ``root`` (unless ``allow_outside``) and files
    whose name is not valid UTF-8; files without an image extension and hidden files are ignored
    (only counted). Symlinked folders are not followed.
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
            problem = _file_problem(path, root, allow_outside)
            if problem is not None:
                skipped.append(problem)
                continue
            if not rel.parts:
                skipped.append(Skipped(str(path), Reason.UNLABELLED,
                                       "image lies in the root folder; put it in a folder named after its class"))
                continue
            entries.append(Entry(str(path), {labelset: rel.parts[0]}))
    return entries, skipped, ignored


def _file_problem(path: Path, root: Path, allow_outside: bool) -> Skipped | None:
    """Why a file found in the tree cannot be imported (a non-UTF-8 name, a symlink out of the tree), or None."""
    if not valid_name(path):
        return Skipped(printable_path(path), Reason.BAD_NAME,
                       "its file or folder name is not valid UTF-8; rename it (e.g. `convmv -f latin1 -t utf-8`) "
                       "and import again")
    # Only a symlink can lead out: os.walk does not follow symlinked folders and ``root`` is resolved.
    if not allow_outside and os.path.islink(path) and not inside_tree(path, root):
        return Skipped(str(path), Reason.OUTSIDE_TREE,
                       f"a symlink that resolves to {printable_path(os.path.realpath(path))}, outside {root}; "
                       "copy the file into the tree, or pass --allow-outside to accept it")
    return None


def read_manifest(
    manifest: Path, base: Path, default_labelset: str = DEFAULT_LABELSET, allow_outside: bool = False
) -> tuple[list[Entry], list[Skipped]]:
    """Read a CSV with columns ``path,label[,labelset][,group]``; relative paths are under ``base``.

    Several rows may name the same path under different labelsets. A row whose path leaves ``base``
    (symlinks resolved) is refused unless ``allow_outside``. A bad row (too many fields, an overlong
    field, an empty path or label) is skipped with its line number; a manifest that is not text in
    UTF-8 (or UTF-16/32 with a byte-order mark) is refused before anything is written.
    """
    base = base.resolve()
    reader = csv.reader(io.StringIO(_manifest_text(manifest), newline=""))
    skipped: list[Skipped] = []
    rows = _csv_rows(reader, manifest, skipped)
    columns = _manifest_columns(manifest, next(rows, None), skipped)
    by_path: dict[str, Entry] = {}
    for line_no, fields in rows:
        entry, problem = _manifest_entry(line_no, fields, columns, manifest=manifest, base=base,
                                         default_labelset=default_labelset, allow_outside=allow_outside)
        if problem is not None:
            skipped.append(problem)
            continue
        assert entry is not None
        (labelset, label), = entry.labels.items()
        merged = by_path.setdefault(entry.path, Entry(entry.path, {}, entry.group))
        previous = merged.labels.get(labelset)
        if previous is not None and previous != label:
            skipped.append(Skipped(entry.path, Reason.BAD_ROW,
                                   f"row {line_no} gives label {label!r} under labelset {labelset!r}, "
                                   f"an earlier row gave {previous!r}; kept the first"))
            continue
        merged.labels[labelset] = label
        if entry.group:
            merged.group = entry.group
    return list(by_path.values()), skipped


#: byte-order marks, longest first (a UTF-32 LE mark begins with the UTF-16 LE one)
_BOMS = ((codecs.BOM_UTF32_LE, "utf-32"), (codecs.BOM_UTF32_BE, "utf-32"), (codecs.BOM_UTF8, "utf-8-sig"),
         (codecs.BOM_UTF16_LE, "utf-16"), (codecs.BOM_UTF16_BE, "utf-16"))


def _manifest_text(manifest: Path) -> str:
    """The manifest decoded: UTF-8, or UTF-8/16/32 with a byte-order mark; anything else is one clear error."""
    try:
        data = manifest.read_bytes()
    except OSError as exc:
        raise InputError(f"cannot read manifest {manifest}: {exc}") from exc
    encoding = next((name for bom, name in _BOMS if data.startswith(bom)), "utf-8")
    fix = "save it as UTF-8 (Excel: Save As 'CSV UTF-8'; or `iconv -f latin1 -t utf-8`) and import again"
    try:
        text = data.decode(encoding)
    except UnicodeDecodeError as exc:
        line = data[:exc.start].count(b"\n") + 1
        guess = ("it looks like UTF-16 without a byte-order mark" if b"\x00" in data[:4096]
                 else "it is probably Latin-1 / Windows-1252, as many spreadsheets save CSV")
        raise InputError(f"manifest {manifest} is not {encoding.upper().replace('-SIG', '')} text: byte "
                         f"0x{data[exc.start]:02x} on line {line} cannot be decoded ({guess}); {fix}") from None
    if "\x00" in text:
        raise InputError(f"manifest {manifest} holds NUL characters: it looks like UTF-16 without a byte-order "
                         f"mark; {fix}")
    return text


def _csv_rows(reader: Any, manifest: Path, skipped: list[Skipped]) -> Iterator[tuple[int, list[str]]]:
    """(line number, fields) of each non-blank row; a row the CSV parser refuses becomes a skipped row."""
    while True:
        before = reader.line_num
        try:
            fields = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            if reader.line_num == before:  # the parser cannot move on: nothing more can be read
                raise InputError(f"manifest {manifest} cannot be read past line {before}: {exc}; check its "
                                 "quoting (every opening quote needs a closing one)") from None
            skipped.append(Skipped(f"{manifest}:{reader.line_num}", Reason.BAD_ROW,
                                   f"row {reader.line_num}: {_csv_problem(exc)}"))
            continue
        if any(f.strip() for f in fields):
            yield reader.line_num, fields


def _csv_problem(exc: csv.Error) -> str:
    if "field limit" in str(exc):
        return (f"a field is longer than {csv.field_size_limit():,} characters; no path or label is that long "
                "(an unclosed quote?)")
    return f"cannot be parsed ({exc})"


def _manifest_columns(manifest: Path, header: tuple[int, list[str]] | None, skipped: list[Skipped]) -> list[str]:
    """The lower-cased column names of the header row, checked for ``path`` and ``label``."""
    expected = "expected a header row: path,label[,labelset][,group]"
    if skipped:
        raise InputError(f"the header of manifest {manifest} cannot be read ({skipped[0].detail}); {expected}")
    if header is None:
        raise InputError(f"manifest {manifest} is empty; {expected}, then one row per image")
    columns = [c.strip().lower() for c in header[1]]
    missing = {"path", "label"} - set(columns)
    if missing:
        raise InputError(f"manifest {manifest} lacks column(s) {', '.join(sorted(missing))}; {expected}")
    return columns


def _manifest_entry(line_no: int, fields: list[str], columns: list[str], *, manifest: Path, base: Path,
                    default_labelset: str, allow_outside: bool) -> tuple[Entry | None, Skipped | None]:
    """One manifest row as an entry with a single label, or why the row is skipped."""
    where = f"{manifest}:{line_no}"
    if len(fields) > len(columns):
        return None, Skipped(where, Reason.BAD_ROW,
                             f"row {line_no} has {len(fields)} fields but the header has {len(columns)}; "
                             "quote a field that holds a comma")
    row = dict(zip(columns, (f.strip() for f in fields), strict=False))
    rel, label = row.get("path", ""), row.get("label", "")
    labelset = row.get("labelset") or default_labelset
    if not rel or not label:
        return None, Skipped(where, Reason.BAD_ROW, f"row {line_no} needs both path and label")
    for name, value in (("label", label), ("labelset", labelset), ("group", row.get("group", ""))):
        if len(value) > MAX_NAME_LENGTH:
            return None, Skipped(where, Reason.BAD_ROW, f"row {line_no}: its {name} is {len(value):,} characters "
                                                        f"long; at most {MAX_NAME_LENGTH} are allowed")
    try:
        target = (base / rel).resolve()
    except (OSError, RuntimeError, ValueError) as exc:  # a NUL byte, a symlink loop
        return None, Skipped(where, Reason.BAD_ROW, f"row {line_no}: its path cannot be used ({exc})")
    if not allow_outside and not inside_tree(target, base):
        return None, Skipped(str(target), Reason.OUTSIDE_TREE,
                             f"row {line_no} points outside {base}; pass --allow-outside to accept it")
    return Entry(str(target), {labelset: label}, row.get("group") or None), None


# --------------------------------------------------------------------------- probing


def probe_many(
    paths: list[str],
    *,
    workers: int | None = None,
    min_side: int = DEFAULT_MIN_SIDE,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    progress: ProgressCallback | None = None,
) -> Iterator[Probe]:
    """Probe ``paths`` on ``workers`` processes (default: every core), yielding results in input order.

    A generator, so the caller writes results to the catalog while the workers keep decoding. Closing
    it early (an error, Ctrl-C) cancels the work not yet started; the workers never outlive this process.
    """
    workers = max(1, workers or os.cpu_count() or 1)
    total = len(paths)
    if workers == 1 or total < 8:
        results: Iterable[Probe] = (probe_image(path, min_side, max_pixels) for path in paths)
        yield from _counted(results, total, progress)
        return
    chunk = max(1, min(32, total // (workers * 8)))
    context = multiprocessing.get_context()
    # fork and spawn make the workers our children; a forkserver's are its children, not ours
    parent = os.getpid() if context.get_start_method() in ("fork", "spawn") else None
    pool = ProcessPoolExecutor(max_workers=workers, mp_context=context, initializer=worker_init,
                               initargs=(parent,))
    try:
        results = pool.map(probe_image, paths, [min_side] * total, [max_pixels] * total, chunksize=chunk)
        yield from _counted(results, total, progress)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _counted(results: Iterable[Probe], total: int, progress: ProgressCallback | None) -> Iterator[Probe]:
    for done, probe in enumerate(results, start=1):
        if progress:
            progress(done, total)
        yield probe


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """Within the block, SIGTERM stops an import as Ctrl-C does (main thread, default handler only)."""
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, None):
        yield
        return

    def interrupt(_signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


# --------------------------------------------------------------------------- writing to the catalog


def import_entries(
    catalog: Catalog,
    dataset_name: str,
    source: str,
    entries: Iterable[Entry],
    *,
    pre_skipped: Iterable[Skipped] = (),
    ignored_files: int = 0,
    workers: int | None = None,
    min_side: int = DEFAULT_MIN_SIDE,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    progress: ProgressCallback | None = None,
    batch_size: int = DEFAULT_BATCH,
    root: str | None = None,
) -> ImportReport:
    """Validate ``entries`` and add them to ``dataset_name`` (created with its first image). Returns the report.

    Results are committed every ``batch_size`` files, each batch in its own short write transaction.
    Ctrl-C or SIGTERM stops the import after the last committed batch with :class:`ImportInterrupted`
    (what was committed stays; the same import run again adds the rest); a catalog locked by another
    command past its busy timeout raises ``CatalogBusyError``. ``root`` is recorded in the report.
    """
    started = time.perf_counter()
    entries = list(entries)
    report = ImportReport(dataset=dataset_name, source=source, scanned=len(entries),
                          ignored_files=ignored_files, skipped=list(pre_skipped),
                          workers=max(1, workers or os.cpu_count() or 1), root=root)
    with catalog.session() as session:  # a read: which files are already in, unchanged since
        known = _known_files(session, dataset_name)
    # Unchanged files (same size and mtime as at their last import) are not decoded again.
    stats = {e.path: _stat(e.path) for e in entries}
    needs_probe = [not _unchanged(known.get(e.path), stats[e.path]) for e in entries]
    writer = _BatchWriter(catalog, dataset_name, source, report=report, stats=stats)
    try:
        with _sigterm_as_interrupt():
            _probe_and_write(entries, needs_probe, writer, batch_size=max(1, batch_size), workers=workers,
                             min_side=min_side, max_pixels=max_pixels, progress=progress)
    except KeyboardInterrupt:
        raise _interrupted(catalog, writer, started) from None
    except CatalogBusyError as exc:
        raise CatalogBusyError(f"{exc}. {_committed_note(writer)}") from exc
    report.seconds = time.perf_counter() - started
    dataset_id = writer.dataset_id
    if dataset_id is None:
        with catalog.session() as session:
            dataset_id = session.scalar(select(Dataset.id).where(Dataset.name == dataset_name))
    if dataset_id is None:  # nothing was written: no empty dataset left behind
        reasons = ", ".join(f"{n} {r}" for r, n in report.skipped_by_reason().items()) or "no images"
        example = report.skipped[0].detail if report.skipped else "no image files found"
        raise InputError(f"nothing imported from {source} ({reasons}); e.g. {example}")
    with catalog.session() as session:
        report.duplicates, report.label_conflicts = duplicate_report(session, dataset_id)
        report.class_counts = _class_counts(session, dataset_id)
    report.seconds = time.perf_counter() - started
    with catalog.write_session() as session:
        session.add(ImportRecord(dataset_id=dataset_id, source=source, report=report.to_dict()))
    return report


def _probe_and_write(entries: list[Entry], needs_probe: list[bool], writer: _BatchWriter, *, batch_size: int,
                     workers: int | None, min_side: int, max_pixels: int,
                     progress: ProgressCallback | None) -> None:
    """Probe the files that need it (streamed from the workers) and hand each result to ``writer``."""
    probes = probe_many([e.path for e, needed in zip(entries, needs_probe, strict=True) if needed],
                        workers=workers, min_side=min_side, max_pixels=max_pixels, progress=progress)
    try:
        for entry, needed in zip(entries, needs_probe, strict=True):
            probe = next(probes) if needed else None  # results stream in while workers decode
            if probe is not None and not probe.ok:
                writer.report.skipped.append(Skipped(entry.path, probe.reason, probe.detail))
                writer.done_without_write += 1
                continue
            writer.add(entry, probe)
            if writer.pending >= batch_size:
                writer.flush()
        writer.flush()
    finally:
        probes.close()  # stops the workers at once when leaving early


def _interrupted(catalog: Catalog, writer: _BatchWriter, started: float) -> ImportInterrupted:
    """The error for a stopped import; its committed part is recorded in the catalog's import history."""
    report = writer.report
    report.interrupted, report.seconds = True, time.perf_counter() - started
    if writer.dataset_id is not None:
        with contextlib.suppress(HandlensError, SQLAlchemyError), catalog.write_session() as session:
            session.add(ImportRecord(dataset_id=writer.dataset_id, source=report.source, report=report.to_dict()))
    return ImportInterrupted(f"import into dataset '{report.dataset}' interrupted. {_committed_note(writer)}",
                             report=report)


def _committed_note(writer: _BatchWriter) -> str:
    report = writer.report
    return (f"Committed before it stopped: {report.committed:,} of {report.scanned:,} files ({report.added:,} "
            f"added, {report.updated:,} updated); run the same import again to do the rest (committed files "
            "are not decoded again)")


@dataclass
class _Pending:
    entry: Entry
    probe: Probe | None


@dataclass
class _BatchResult:
    dataset_id: int | None = None
    added: int = 0
    updated: int = 0
    unchanged: int = 0
    relabelled: int = 0
    skipped: list[Skipped] = field(default_factory=list)


class _BatchWriter:
    """Writes import results in short transactions, each checked against the catalog as it is then.

    Every batch re-reads which of its files the dataset holds inside its write transaction, so two
    imports into one dataset at once neither lose nor duplicate rows. A batch that collides with
    another writer's insert (PostgreSQL) is rolled back and redone.
    """

    def __init__(self, catalog: Catalog, dataset_name: str, source: str, *, report: ImportReport,
                 stats: dict[str, tuple[int, int] | None]) -> None:
        self.catalog, self.dataset_name, self.source = catalog, dataset_name, source
        self.report, self.stats = report, stats
        self.items: dict[str, _Pending] = {}
        self.dataset_id: int | None = None
        self.done_without_write = 0  # files finished without a write (bad ones): counted at the next flush

    @property
    def pending(self) -> int:
        return len(self.items)

    def add(self, entry: Entry, probe: Probe | None) -> None:
        self.items[entry.path] = _Pending(entry, probe)

    def flush(self, attempts: int = 3) -> None:
        """Commit the pending results in one write transaction, tried up to ``attempts`` times: after a lock
        wait that ran out (nothing was written) or a collision with another import's rows (rolled back)."""
        if not self.items:
            self.report.committed += self.done_without_write
            self.done_without_write = 0
            return
        for attempt in range(attempts):
            result = _BatchResult()
            try:
                with self.catalog.write_session() as session:
                    self._write(session, result)
                break
            except CatalogBusyError:
                if attempt == attempts - 1:
                    raise
            except IntegrityError as exc:
                if attempt == attempts - 1:
                    raise ConflictError(f"another command kept changing dataset '{self.dataset_name}' during this "
                                        f"import; run the import again. {_committed_note(self)}") from exc
        report = self.report
        report.added += result.added
        report.updated += result.updated
        report.unchanged += result.unchanged
        report.relabelled += result.relabelled
        report.skipped.extend(result.skipped)
        report.committed += len(self.items) + self.done_without_write
        self.done_without_write = 0
        self.dataset_id = result.dataset_id if result.dataset_id is not None else self.dataset_id
        self.items.clear()

    def _write(self, session: Any, result: _BatchResult) -> None:
        dataset = session.scalars(select(Dataset).where(Dataset.name == self.dataset_name)).first()
        if dataset is None:
            if not any(item.probe is not None for item in self.items.values()):
                result.skipped.extend(_vanished(path) for path in self.items)
                return
            dataset = Dataset(name=self.dataset_name, description=f"imported from {self.source}")
            session.add(dataset)
            session.flush()
        result.dataset_id = dataset.id
        labelsets = _ensure_labelsets(session, dataset.id,
                                      {name for item in self.items.values() for name in item.entry.labels})
        rows = _rows_by_path(session, dataset.id, list(self.items))
        labels = _labels_of(session, [row.id for row in rows.values()])
        new_rows: dict[str, dict[str, Any]] = {}
        new_labels: dict[str, dict[int, str]] = {}
        image_updates: list[dict[str, Any]] = []
        label_updates: list[dict[str, Any]] = []
        label_inserts: list[dict[str, Any]] = []
        for path, item in self.items.items():
            entry, probe, row = item.entry, item.probe, rows.get(path)
            wanted = {labelsets[n]: v for n, v in entry.labels.items()}
            if row is None:
                if probe is None:  # known at the start, removed meanwhile: its facts are not at hand
                    result.skipped.append(_vanished(path))
                    continue
                result.added += 1
                new_rows[path] = {"dataset_id": dataset.id, "path": path, "group": entry.group,
                                  "mtime_ns": _mtime(self.stats[path]), **_facts(probe)}
                new_labels[path] = wanted
                continue
            changes: dict[str, Any] = {}
            if probe is not None and probe.sha256 != row.sha256:
                changes.update(_facts(probe))
                result.updated += 1
            else:
                result.unchanged += 1
            if probe is not None:
                changes["mtime_ns"] = _mtime(self.stats[path])
            if entry.group and row.group != entry.group:
                changes["group"] = entry.group
            if changes:
                image_updates.append({"id": row.id, **changes})
            relabelled = 0
            for labelset_id, value in wanted.items():
                current = labels.get((row.id, labelset_id))
                if current is None:
                    label_inserts.append({"image_id": row.id, "labelset_id": labelset_id, "label": value})
                elif current[1] != value:
                    label_updates.append({"id": current[0], "label": value})
                    relabelled = 1
            result.relabelled += relabelled
        _bulk_insert(session, dataset.id, new_rows, new_labels)
        _bulk_update(session, Image, image_updates)
        _bulk_update(session, Label, label_updates)
        if label_inserts:
            session.execute(insert(Label), label_inserts)


def _vanished(path: str) -> Skipped:
    return Skipped(path, Reason.MISSING, "its catalog row was removed by another command during this import; "
                                         "import again to add it back")


def _known_files(session: Any, dataset_name: str) -> dict[str, tuple[int, int | None]]:
    """path -> (bytes, mtime_ns) of the images the dataset already holds (empty for a new dataset)."""
    rows = session.execute(select(Image.path, Image.bytes, Image.mtime_ns).join(Dataset)
                           .where(Dataset.name == dataset_name))
    return {path: (size, mtime) for path, size, mtime in rows}


def _stat(path: str) -> tuple[int, int] | None:
    """(size, mtime_ns) of a file, or None when it cannot be read."""
    try:
        stat = os.stat(path)
    except (OSError, ValueError):
        return None
    return stat.st_size, stat.st_mtime_ns


def _mtime(stat: tuple[int, int] | None) -> int | None:
    return stat[1] if stat is not None else None


def _unchanged(known: tuple[int, int | None] | None, stat: tuple[int, int] | None) -> bool:
    return known is not None and stat is not None and known[1] is not None and known == stat


def _facts(probe: Probe) -> dict[str, Any]:
    return {"sha256": probe.sha256, "width": probe.width, "height": probe.height,
            "mode": probe.mode, "format": probe.format, "bytes": probe.bytes}


def _chunks(values: list[Any], size: int = 500) -> Iterator[list[Any]]:
    """``values`` in slices small enough for any database's limit on bound parameters."""
    for start in range(0, len(values), size):
        yield values[start:start + size]


def _rows_by_path(session: Any, dataset_id: int, paths: list[str]) -> dict[str, Any]:
    """The dataset's current rows (id, path, sha256, group) for ``paths``."""
    found: dict[str, Any] = {}
    for part in _chunks(paths):
        query = select(Image.id, Image.path, Image.sha256, Image.group).where(
            Image.dataset_id == dataset_id, Image.path.in_(part))
        found.update((row.path, row) for row in session.execute(query))
    return found


def _labels_of(session: Any, image_ids: list[int]) -> dict[tuple[int, int], tuple[int, str]]:
    """(image id, labelset id) -> (label id, label) for ``image_ids``."""
    found: dict[tuple[int, int], tuple[int, str]] = {}
    for part in _chunks(image_ids):
        query = select(Label.id, Label.image_id, Label.labelset_id, Label.label).where(Label.image_id.in_(part))
        found.update(((image_id, labelset_id), (label_id, label))
                     for label_id, image_id, labelset_id, label in session.execute(query))
    return found


def _bulk_insert(session: Any, dataset_id: int, rows: dict[str, dict[str, Any]],
                 labels: dict[str, dict[int, str]]) -> None:
    """Insert new images and their labels with two Core statements: ORM objects cost more than decoding."""
    if not rows:
        return
    session.execute(insert(Image), [{**row, "added_at": utcnow()} for row in rows.values()])
    ids = _rows_by_path(session, dataset_id, list(rows))
    label_rows = [{"image_id": ids[path].id, "labelset_id": labelset_id, "label": value}
                  for path, per_labelset in labels.items() for labelset_id, value in per_labelset.items()]
    if label_rows:
        session.execute(insert(Label), label_rows)


def _bulk_update(session: Any, table: Any, changes: list[dict[str, Any]]) -> None:
    """UPDATE by primary key, one executemany per set of changed columns."""
    by_columns: dict[tuple[str, ...], list[dict[str, Any]]] = defaultdict(list)
    for change in changes:
        by_columns[tuple(sorted(change))].append(change)
    for group in by_columns.values():
        session.execute(update(table), group)


def _ensure_labelsets(session: Any, dataset_id: int, names: set[str]) -> dict[str, int]:
    """name -> id of the dataset's labelsets, creating those among ``names`` it lacks."""
    labelsets = dict(session.execute(select(Labelset.name, Labelset.id).where(Labelset.dataset_id == dataset_id)).all())
    missing = sorted(names - set(labelsets))
    for name in missing:
        session.add(Labelset(dataset_id=dataset_id, name=name))
    if missing:
        session.flush()
        labelsets = dict(session.execute(select(Labelset.name, Labelset.id)
                                         .where(Labelset.dataset_id == dataset_id)).all())
    return labelsets


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


def dataset_roots(session: Any, dataset_id: int) -> list[Path] | None:
    """The folders a dataset's files were imported from (symlinks resolved), for
    :func:`handlens.data.imaging.verify_catalog_file`'s ``root``; None when no such bound is known (an
    import accepted files outside its folder, or predates this record). Cheap enough per request for a
    few imports; a service may cache it per dataset."""
    roots: set[Path] = set()
    for report in session.scalars(select(ImportRecord.report).where(ImportRecord.dataset_id == dataset_id)):
        root = report.get("root") if isinstance(report, dict) else None
        if not root:
            return None
        roots.add(Path(root))
    return sorted(roots) or None


def import_path(
    catalog: Catalog,
    path: Path,
    dataset_name: str,
    *,
    labelset: str | None = None,
    csv_file: Path | None = None,
    allow_outside: bool = False,
    workers: int | None = None,
    min_side: int = DEFAULT_MIN_SIDE,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    progress: ProgressCallback | None = None,
    batch_size: int = DEFAULT_BATCH,
) -> ImportReport:
    """Import ``path``: a folder-per-class tree, or a CSV manifest (``path`` itself, or ``csv_file``).

    With a manifest, relative paths resolve against ``path`` when it is a folder, else against the
    manifest's folder; that folder is also the tree rows may not leave. A folder tree's files may not
    leave it through symlinks either (both unless ``allow_outside``).
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
        base = path if path.is_dir() else Path(csv_file).parent
        entries, skipped = read_manifest(Path(csv_file), base, labelset, allow_outside)
        ignored, source, tree = 0, str(Path(csv_file).resolve()), base.resolve()
        if not entries and not skipped:
            raise InputError(f"the manifest {csv_file} has a header but no rows; add one row per image: "
                             "path,label[,labelset][,group]")
    else:
        entries, skipped, ignored = scan_folder(path, labelset, allow_outside=allow_outside)
        tree = path.resolve()
        source = str(tree)
    if not entries and not skipped:
        raise InputError(f"no images found under {path}; expected class folders holding image files")
    return import_entries(catalog, dataset_name, source, entries, pre_skipped=skipped, ignored_files=ignored,
                          workers=workers, min_side=min_side, max_pixels=max_pixels, progress=progress,
                          batch_size=batch_size, root=None if allow_outside else str(tree))
