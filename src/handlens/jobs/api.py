"""What the CLI and the service call: submit, list, show, cancel, and follow a job's log and events."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

from handlens.core.workspace import Workspace
from handlens.jobs import store
from handlens.jobs.specs import JOB_KINDS, pin_paths, pin_raw_paths, validate_config
from handlens.jobs.store import JobRecord

JobInfo = JobRecord


def new_job_id() -> str:
    """``job-YYYYMMDD-HHMMSS-xxxxxx``: sorts by submission time, unique across machines."""
    import secrets
    from datetime import UTC, datetime

    return f"job-{datetime.now(UTC):%Y%m%d-%H%M%S}-{secrets.token_hex(3)}"


def submit_job(kind: str, config: dict[str, Any], *, workspace: Workspace, catalog: Any,
               broker: str | None = None, confine: bool = False) -> JobRecord:
    """Validate ``config`` for ``kind`` now (a typo is an error at submit, not on a worker), record the job as
    queued, and hand it to the broker's queue when one is given (else the local executor takes it).
    ``confine``: the job's files and folders must lie inside the workspace (the service's submissions)."""
    raw = pin_raw_paths(kind, config, root=workspace.root, confine=confine)  # before validation reads a file
    validated = pin_paths(kind, validate_config(kind, raw), root=workspace.root, confine=confine)
    job_id = new_job_id()
    log_path = store.job_dir(workspace, job_id) / "log.txt"
    job = store.insert(catalog, job_id=job_id, kind=kind, queue=JOB_KINDS.get(kind).queue,
                       config=validated.model_dump(mode="json", exclude_unset=True),
                       executor="celery" if broker else "local", log_path=str(log_path))
    if broker:
        from handlens.jobs.broker import send

        try:
            send(broker, job_id, job.queue)
        except Exception as exc:
            store.end(catalog, job_id, status=store.FAILED, error=str(exc))
            raise
    return job


def forward_local_jobs(*, catalog: Any, broker: str) -> list[str]:
    """Hand the jobs waiting on the catalog's local queue to the broker (a service with a broker runs no local
    worker: a job submitted without ``--broker`` would otherwise wait forever). Returns their ids."""
    from handlens.jobs.broker import send

    moved = store.take_local(catalog)
    for index, (job_id, queue) in enumerate(moved):
        try:
            send(broker, job_id, queue)
        except Exception:
            for unsent, _ in moved[index:]:  # the broker is down: every job not sent waits for the next try
                store.give_back_local(catalog, unsent)
            raise
    return [job_id for job_id, _ in moved]


def resend_job(job_id: str, *, catalog: Any, broker: str) -> JobRecord:
    """Publish a queued job again (its message was lost: a broker's queue purged, a worker that failed to give it
    back). A job a worker has taken is refused. A resend of a message that was not lost is delivered twice: the
    second delivery finds the job running and counts a worker death (heartbeats would tell them apart)."""
    from handlens.core.errors import ConflictError
    from handlens.jobs.broker import send

    job = store.fetch(catalog, job_id)
    if job.status != store.QUEUED:
        raise ConflictError(f"job {job_id} is {job.status}: only a queued job can be sent again")
    if job.executor != "celery":
        store.set_executor(catalog, job_id, "celery")
    send(broker, job_id, job.queue)
    return store.fetch(catalog, job_id)


def get_job(job_id: str, *, catalog: Any) -> JobRecord:
    return store.fetch(catalog, job_id)


def list_jobs(*, catalog: Any, status: str | None = None, limit: int = 100) -> list[JobRecord]:
    if status is not None and status not in store.STATUSES:
        from handlens.core.errors import InputError

        raise InputError(f"unknown status {status!r}; choose one of {', '.join(store.STATUSES)}")
    return store.listing(catalog, status=status, limit=limit)


def cancel_job(job_id: str, *, catalog: Any, force: bool = False) -> JobRecord:
    return store.request_cancel(catalog, job_id, force=force)


def changes(job: JobRecord, last: tuple[Any, ...] | None) -> tuple[list[dict[str, Any]], tuple[Any, ...]]:
    """The events (``progress``, then ``status``) that tell a watcher what changed since ``last``; and the new
    mark. Progress comes first: a watcher that stops at the final status has seen the last progress."""
    seen = (job.status, job.attempts, repr(sorted(job.progress.items())))
    out: list[dict[str, Any]] = []
    if seen == last:
        return out, seen
    if job.progress and (last is None or seen[2] != last[2]):
        out.append({"event": "progress", "data": {"id": job.id, **job.progress}})
    if last is None or seen[:2] != last[:2]:
        ended = job.status in store.TERMINAL
        out.append({"event": "status", "data": {"id": job.id, "status": job.status, "attempts": job.attempts,
                                                "worker": job.worker, "error": job.error,
                                                "progress": job.progress if ended else {},
                                                "result": _public(job.result) if ended else {}}})
    return out, seen


def _public(result: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in result.items() if k != "state"}


def events(job_id: str, *, catalog: Any, interval: float = 0.5, timeout: float | None = None) -> Iterator[
        dict[str, Any]]:
    """The job's changes as events until it ends (what ``jobs show --follow`` prints)."""
    deadline = time.monotonic() + timeout if timeout else None
    last: tuple[Any, ...] | None = None
    while True:
        job = store.fetch(catalog, job_id)
        found, last = changes(job, last)
        yield from found
        if job.status in store.TERMINAL or (deadline is not None and time.monotonic() > deadline):
            return
        time.sleep(interval)


def follow_log(job: JobRecord, *, catalog: Any, workspace: Workspace, follow: bool = False,
               interval: float = 0.5) -> Iterator[str]:
    """The job's log lines (always ``WORKSPACE/jobs/ID/log.txt``: a path stored in a shared catalog is never
    trusted); with ``follow``, new lines as they come until the job ends."""
    path = store.job_dir(workspace, job.id) / "log.txt"
    offset, partial = 0, ""
    while True:
        if path.is_file():
            with path.open("r", errors="replace") as handle:
                handle.seek(offset)
                chunk = partial + handle.read()
                offset = handle.tell()
            lines = chunk.split("\n")
            partial = lines.pop()  # a line still being written waits for its end
            yield from lines
        if not follow or store.fetch(catalog, job.id).status in store.TERMINAL:
            if follow and path.is_file() and path.stat().st_size > offset:
                continue  # the last lines written as it ended
            if partial:
                yield partial
            return
        time.sleep(interval)
