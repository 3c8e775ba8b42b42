"""The ``jobs`` table: create, claim, report, finish. Every state change is one short write transaction.

Claiming is what keeps two local workers (or a worker and a redelivery) from running one job twice: on
SQLite the write lock is taken first (``BEGIN IMMEDIATE``), on PostgreSQL the row is locked with
``FOR UPDATE SKIP LOCKED``.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import select, update

from handlens.core.errors import ConflictError, NotFoundError
from handlens.data.catalog import Job

QUEUED, RUNNING, FINISHED, FAILED, CANCELLED = "queued", "running", "finished", "failed", "cancelled"
TERMINAL = (FINISHED, FAILED, CANCELLED)
STATUSES = (QUEUED, RUNNING, FINISHED, FAILED, CANCELLED)
#: a job whose workers died this many times is failed rather than delivered again
MAX_WORKER_DEATHS = 3


def job_dir(ws: Any, job_id: str) -> Path:
    """Where a job's log (and an explain job's output) go: ``<workspace>/jobs/<id>/``."""
    return Path(ws.root) / "jobs" / job_id


def now() -> datetime:
    return datetime.now(UTC)


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


@dataclass
class JobRecord:
    """One job as the API, CLI and viewer show it."""

    id: str
    kind: str
    status: str
    queue: str
    executor: str
    config: dict[str, Any]
    attempts: int
    worker: str | None
    cancel_requested: bool
    created_at: str
    started_at: str | None
    finished_at: str | None
    log_path: str | None
    progress: dict[str, Any] = field(default_factory=dict)
    result: dict[str, Any] = field(default_factory=dict)
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _iso(value: datetime | None) -> str | None:
    if value is None:
        return None
    if value.tzinfo is None:  # SQLite hands back naive datetimes: they were written in UTC
        value = value.replace(tzinfo=UTC)
    return value.isoformat(timespec="seconds")


def record(row: Job) -> JobRecord:
    return JobRecord(id=row.id, kind=row.kind, status=row.status, queue=row.queue, executor=row.executor,
                     config=row.config, attempts=row.attempts, worker=row.worker,
                     cancel_requested=bool(row.cancel_requested), created_at=_iso(row.created_at) or "",
                     started_at=_iso(row.started_at), finished_at=_iso(row.finished_at), log_path=row.log_path,
                     progress=dict(row.progress or {}), result=dict(row.result or {}), error=row.error)


def insert(catalog: Any, *, job_id: str, kind: str, queue: str, config: dict[str, Any], executor: str,
           log_path: str) -> JobRecord:
    with catalog.write_session() as session:
        row = Job(id=job_id, kind=kind, queue=queue, config=config, status=QUEUED, executor=executor,
                  log_path=log_path, progress={}, result={}, created_at=now())
        session.add(row)
        session.flush()
        return record(row)


def fetch(catalog: Any, job_id: str) -> JobRecord:
    with catalog.session() as session:
        row = session.get(Job, job_id)
        if row is None:
            raise NotFoundError(f"no job {job_id!r}; see `handlens jobs list`")
        return record(row)


def listing(catalog: Any, *, status: str | None = None, limit: int = 100) -> list[JobRecord]:
    with catalog.session() as session:
        query = select(Job).order_by(Job.created_at.desc()).limit(limit)
        if status:
            query = query.where(Job.status == status)
        return [record(row) for row in session.scalars(query)]


def _locked(session: Any, job_id: str) -> Job | None:
    query = select(Job).where(Job.id == job_id)
    if session.bind.dialect.name == "postgresql":
        query = query.with_for_update()
    return session.scalars(query).first()


def _local_queue(session: Any, *, limit: int, queues: list[str] | None = None) -> Any:
    """The oldest jobs waiting on the catalog's local queue (of ``queues``), locked for this transaction; on
    PostgreSQL rows another worker holds are skipped, not waited for."""
    query = select(Job).where(Job.status == QUEUED, Job.executor == "local").order_by(Job.created_at).limit(limit)
    if queues:
        query = query.where(Job.queue.in_(queues))
    if session.bind.dialect.name == "postgresql":
        query = query.with_for_update(skip_locked=True)
    return query


def _start(row: Job) -> None:
    """This worker's attempt at ``row`` begins."""
    row.status, row.attempts, row.worker = RUNNING, row.attempts + 1, worker_name()
    row.started_at, row.heartbeat_at = row.started_at or now(), now()


def _cancel_unstarted(row: Job) -> None:
    row.status, row.finished_at, row.error = CANCELLED, now(), "cancelled before it started"


def start_attempt(catalog: Any, job_id: str) -> tuple[str, JobRecord]:
    """Mark the job running for this worker. Returns what to do: ``run``, ``skip`` (already ended, or
    cancelled while queued) or ``dead`` (its workers died :data:`MAX_WORKER_DEATHS` times: now failed).

    A job found ``running`` was started by a worker that did not end it: that worker died (a SIGKILL, a lost
    machine) and the broker delivered the job again.
    """
    with catalog.write_session() as session:
        row = _locked(session, job_id)
        if row is None:
            raise NotFoundError(f"no job {job_id!r} in the catalog {catalog.url}: is the worker on the same --db?")
        if row.status in TERMINAL:
            return "skip", record(row)
        if row.cancel_requested:
            _cancel_unstarted(row)
            return "skip", record(row)
        if row.status == RUNNING and row.attempts >= MAX_WORKER_DEATHS:
            row.status, row.finished_at = FAILED, now()
            row.error = (f"its worker died {row.attempts} times (last: {row.worker}), e.g. killed for memory; "
                         "not delivered again. Check the worker's log, then submit it again")
            return "dead", record(row)
        _start(row)
        return "run", record(row)


def claim_next(catalog: Any, *, queues: list[str] | None = None) -> str | None:
    """The oldest queued job (of ``queues``), taken by this worker: its id, or None when none waits."""
    with catalog.write_session() as session:
        row = session.scalars(_local_queue(session, limit=1, queues=queues)).first()
        if row is None:
            return None
        if row.cancel_requested:
            _cancel_unstarted(row)
            return None
        _start(row)
        return row.id


def take_local(catalog: Any, *, limit: int = 100) -> list[tuple[str, str]]:
    """The local queue's waiting jobs, switched to the broker: (id, queue) of each (for a forwarder to send)."""
    with catalog.write_session() as session:
        rows = session.scalars(_local_queue(session, limit=limit)).all()
        for row in rows:
            row.executor = "celery"
        return [(row.id, row.queue) for row in rows]


def give_back_local(catalog: Any, job_id: str) -> None:
    set_executor(catalog, job_id, "local")


def set_executor(catalog: Any, job_id: str, executor: str) -> None:
    with catalog.write_session() as session:
        session.execute(update(Job).where(Job.id == job_id, Job.status == QUEUED).values(executor=executor))


def report(catalog: Any, job_id: str, progress: dict[str, Any]) -> bool:
    """Merge ``progress`` into the job's; returns whether a cancel was asked for."""
    with catalog.write_session() as session:
        row = session.get(Job, job_id)
        if row is None:
            return False
        row.progress = {**(row.progress or {}), **progress}
        row.heartbeat_at = now()
        return bool(row.cancel_requested)


def remember(catalog: Any, job_id: str, key: str, value: Any) -> None:
    """Keep an id the job fixed (its run id, its study) in its result, for a redelivery to resume."""
    with catalog.write_session() as session:
        row = session.get(Job, job_id)
        state = dict((row.result or {}).get("state", {}))
        state[key] = value
        row.result = {**(row.result or {}), "state": state}


def cancel_requested(catalog: Any, job_id: str) -> bool:
    with catalog.session() as session:
        return bool(session.scalars(select(Job.cancel_requested).where(Job.id == job_id)).first())


def end(catalog: Any, job_id: str, *, status: str, result: dict[str, Any] | None = None,
        error: str | None = None) -> JobRecord:
    with catalog.write_session() as session:
        row = session.get(Job, job_id)
        row.status, row.finished_at, row.error = status, now(), error
        if result is not None:
            row.result = {**(row.result or {}), **result}
        return record(row)


def request_cancel(catalog: Any, job_id: str, *, force: bool = False) -> JobRecord:
    """Ask a job to stop: a queued one is cancelled now; a running one stops within one epoch. ``force``: a
    running job whose worker is gone (nothing will ever end its row) is marked cancelled now."""
    with catalog.write_session() as session:
        row = _locked(session, job_id)
        if row is None:
            raise NotFoundError(f"no job {job_id!r}; see `handlens jobs list`")
        if row.status in TERMINAL:
            raise ConflictError(f"job {job_id} already ended ({row.status}); nothing to cancel")
        row.cancel_requested = True
        if row.status == QUEUED:
            _cancel_unstarted(row)
        elif force:
            row.status, row.finished_at = CANCELLED, now()
            row.error = f"cancelled by force while its worker ({row.worker}) was not seen to end it"
        return record(row)


def requeue_orphans(catalog: Any, *, executor: str = "local", alive: Any = None) -> list[str]:
    """Jobs left ``running`` by a local worker that is gone (the service was killed): queued again, so a restarted
    service resumes them. ``alive(worker)`` says whether the worker named in a row still runs."""
    with catalog.write_session() as session:
        rows = session.scalars(select(Job).where(Job.status == RUNNING, Job.executor == executor)).all()
        back = [row for row in rows if alive is None or not alive(row.worker)]
        for row in back:
            if row.attempts >= MAX_WORKER_DEATHS:
                row.status, row.finished_at = FAILED, now()
                row.error = f"its worker died {row.attempts} times (last: {row.worker}); not run again"
            else:
                row.status = QUEUED
        return [row.id for row in back]


def set_status_where(catalog: Any, job_id: str, *, old: str, new: str) -> bool:
    with catalog.write_session() as session:
        done = session.execute(update(Job).where(Job.id == job_id, Job.status == old).values(status=new))
        return bool(done.rowcount)
