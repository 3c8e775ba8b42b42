"""Running one job, the same way in the local worker and in a Celery worker.

The job's output goes to its log file (``jobs logs ID --follow`` reads it); its progress (epoch, metrics,
ETA) to its row, which the events stream polls. A cancel is checked after each epoch (train and import-urls
stop there, their checkpoint or ledger kept); other kinds are interrupted where they are.
"""

from __future__ import annotations

import _thread
import contextlib
import signal
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from typing import Any

from handlens.core.errors import BusyError, ConflictError, HandlensError, InputError, NotFoundError
from handlens.core.workspace import Workspace
from handlens.jobs import store
from handlens.jobs.runs import RUNNERS
from handlens.jobs.specs import JOB_KINDS, JobContext, validate_config

#: an error of these kinds is the user's (bad config, unknown dataset): running it again cannot help
USER_ERRORS = (InputError, NotFoundError, ConflictError)
#: worth another attempt: the catalog was busy, a disk or network hiccup
TRANSIENT_ERRORS = (BusyError, ConnectionError, TimeoutError)
#: how many attempts a transient failure gets
MAX_ATTEMPTS = 3
CANCELLED_BY_USER = "cancelled by the user"


@dataclass
class Outcome:
    """How one attempt ended: the job's status, and whether the job should be delivered again."""

    status: str
    retry: bool = False
    error: str | None = None


def execute(job_id: str, ws: Workspace, *, claimed: bool = False) -> Outcome:
    """Run job ``job_id`` to its end; ``claimed``: the local queue already marked it running for us."""
    from handlens.data.catalog import open_catalog

    catalog = open_catalog(ws.db_url)
    try:
        if claimed:
            job = store.fetch(catalog, job_id)
        else:
            action, job = store.start_attempt(catalog, job_id)
            if action != "run":
                return Outcome(job.status, error=job.error)
        return _run(catalog, ws, job)
    finally:
        catalog.close()


#: modules an interrupt must not land in (see :class:`_Watch`), and how soon it is asked for again
UNSAFE_MODULES = ("sqlalchemy", "sqlite3", "psycopg", "psycopg2", "optuna.storages", "alembic", "importlib")
SAFE_POINT_RETRY_S = 0.05


def _unsafe_to_interrupt(frame: Any) -> bool:
    """Whether ``frame`` or a caller is in database code or in the import machinery (whose frozen frames are
    modules ``importlib._bootstrap`` and ``importlib._bootstrap_external``)."""
    while frame is not None:
        module = frame.f_globals.get("__name__") or ""
        if any(module == name or module.startswith(name + ".") for name in UNSAFE_MODULES):
            return True
        frame = frame.f_back
    return False


class _Watch:
    """Polls the cancel flag in a thread. For a kind that cannot stop at an epoch (a study, an evaluation,
    explanations) it interrupts the main thread: workers ignore SIGINT (Celery's children, the local worker),
    and ``_thread.interrupt_main`` then does nothing, so while the job runs a SIGINT handler of our own is
    installed that raises ``KeyboardInterrupt`` for a cancel only. A lock keeps a late interrupt from arriving
    after the job ended.

    The interrupt waits for a safe point: raised inside a database call it would leave the query's SQLite
    cursor alive in the traceback, and with it a lock on the catalog file, so the job could not even be
    marked cancelled ("database is locked"); raised inside an import it would leave a library half
    initialised in a worker that runs the next job. In either place the handler asks again a moment later."""

    def __init__(self, catalog: Any, job_id: str, *, interrupt: bool, interval: float = 1.0) -> None:
        self.catalog, self.job_id, self.interval = catalog, job_id, interval
        self.cancelled = False
        self._done = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._loop, name=f"job-{job_id}-cancel", daemon=True)
        self.interrupt = interrupt and threading.current_thread() is threading.main_thread()
        self._previous: Any = None

    def _on_sigint(self, signum: int, frame: Any) -> None:
        if not self.cancelled:
            return
        if _unsafe_to_interrupt(frame):
            retry = threading.Timer(SAFE_POINT_RETRY_S, self._interrupt_main)
            retry.daemon = True
            retry.start()
            return
        raise KeyboardInterrupt(CANCELLED_BY_USER)

    def _interrupt_main(self) -> None:
        with self._lock:
            if not self._done.is_set():
                _thread.interrupt_main(signal.SIGINT)

    def __enter__(self) -> _Watch:
        if self.interrupt:
            self._previous = signal.signal(signal.SIGINT, self._on_sigint)
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        with self._lock:
            self._done.set()
        self._thread.join(timeout=5)
        if self.interrupt:
            signal.signal(signal.SIGINT, self._previous)

    def _loop(self) -> None:
        while not self._done.wait(self.interval):
            with contextlib.suppress(Exception):  # a busy catalog: ask again next time
                if store.cancel_requested(self.catalog, self.job_id):
                    with self._lock:
                        if self._done.is_set():
                            return
                        self.cancelled = True
                        if self.interrupt:
                            _thread.interrupt_main(signal.SIGINT)
                    return


def _context(catalog: Any, ws: Workspace, job: store.JobRecord, watch: _Watch) -> JobContext:
    started = time.monotonic()
    state = dict(job.result.get("state", {}))

    def report(**progress: Any) -> None:
        epoch, epochs = progress.get("epoch"), progress.get("epochs")
        if epoch and epochs:
            progress["eta_seconds"] = round((time.monotonic() - started) / epoch * max(0, epochs - epoch), 1)
        with contextlib.suppress(Exception):  # progress is for people: a busy catalog must not stop the run
            if store.report(catalog, job.id, progress):
                watch.cancelled = True

    def should_stop() -> str | None:
        return CANCELLED_BY_USER if watch.cancelled else None

    def remember(key: str, value: Any) -> None:
        state[key] = value
        store.remember(catalog, job.id, key, value)

    return JobContext(job_id=job.id, workspace=ws, report=report, should_stop=should_stop, state=state,
                      remember=remember)


def _run(catalog: Any, ws: Workspace, job: store.JobRecord) -> Outcome:
    from handlens.train.run import RunInterrupted

    kind = JOB_KINDS.get(job.kind)
    log_path = store.job_dir(ws, job.id) / "log.txt"  # never the row's path: a shared catalog is not trusted
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("a", buffering=1) as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        print(f"--- attempt {job.attempts} on {store.worker_name()} at {store.now():%Y-%m-%d %H:%M:%S} UTC", flush=True)
        watch = _Watch(catalog, job.id, interrupt=not kind.cooperative_cancel)
        try:
            with watch:
                config = validate_config(job.kind, job.config)
                result = RUNNERS[job.kind](config, _context(catalog, ws, job, watch))
        except (KeyboardInterrupt, RunInterrupted) as exc:
            if not watch.cancelled and not store.cancel_requested(catalog, job.id):
                raise  # a real Ctrl-C or SIGTERM of the worker: the job stays running, to be delivered again
            return _cancelled(catalog, job, exc)
        except Exception as exc:
            if watch.cancelled or store.cancel_requested(catalog, job.id):  # a kind's own stop on cancel
                return _cancelled(catalog, job, exc)
            return _failed(catalog, job, exc)
        print(f"finished: {result}", flush=True)
    store.end(catalog, job.id, status=store.FINISHED, result=result)
    return Outcome(store.FINISHED)


def _cancelled(catalog: Any, job: store.JobRecord, exc: BaseException) -> Outcome:
    print(f"cancelled: {exc}", flush=True)
    store.end(catalog, job.id, status=store.CANCELLED, error=CANCELLED_BY_USER)
    return Outcome(store.CANCELLED, error=CANCELLED_BY_USER)


def _failed(catalog: Any, job: store.JobRecord, exc: Exception) -> Outcome:
    """A user error fails the job for good; a transient one is tried again, up to :data:`MAX_ATTEMPTS`."""
    message = str(exc) if isinstance(exc, HandlensError) else f"{type(exc).__name__}: {exc}"
    if isinstance(exc, HandlensError):
        print(f"error: {message}", flush=True)
    else:
        traceback.print_exc(file=sys.stderr)
    if isinstance(exc, TRANSIENT_ERRORS) and not isinstance(exc, USER_ERRORS) and job.attempts < MAX_ATTEMPTS:
        store.set_status_where(catalog, job.id, old=store.RUNNING, new=store.QUEUED)
        return Outcome(store.QUEUED, retry=True, error=message)
    if isinstance(exc, USER_ERRORS):
        message = f"{message} (a problem with the job's config or data: not retried)"
    store.end(catalog, job.id, status=store.FAILED, error=message)
    return Outcome(store.FAILED, error=message)
