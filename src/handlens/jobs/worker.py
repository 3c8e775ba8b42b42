"""The local worker loop: take queued local jobs from the catalog, one at a time.

Run as ``python -m handlens.jobs.worker ROOT DB_URL PARENT_PID`` by :class:`handlens.jobs.local.LocalExecutor`
(a process of its own, spawned fresh: no torch or CUDA state inherited), or by ``handlens jobs work``.
"""

from __future__ import annotations

import contextlib
import os
import socket
import sys
import time

from handlens.core.workspace import Workspace
from handlens.jobs import store

POLL_SECONDS = 0.5


def _alive(worker: str | None) -> bool:
    """Whether the worker named ``host:pid`` still runs (a worker on another host is assumed to)."""
    if not worker or ":" not in worker:
        return False
    host, _, pid = worker.rpartition(":")
    if host != socket.gethostname():
        return True
    if pid == str(os.getpid()):  # a restarted container often gets its predecessor's pid: that one is gone
        return False
    try:
        os.kill(int(pid), 0)
    except (ValueError, ProcessLookupError):
        return False
    except PermissionError:
        return True
    return True


def work_locally(ws: Workspace, *, queues: list[str] | None = None, once: bool = False,
                 stop_when_idle: bool = False) -> int:
    """Take queued local jobs one after another, forever (or until none waits, with ``stop_when_idle``);
    returns how many ran."""
    from handlens.data.catalog import open_catalog
    from handlens.jobs.runner import execute

    catalog = open_catalog(ws.db_url)
    ran = 0
    try:
        requeued = store.requeue_orphans(catalog, alive=_alive)
        if requeued:
            print(f"local worker: {len(requeued)} job(s) left running by a stopped worker queued again: "
                  f"{', '.join(requeued)}", flush=True)
        while True:
            job_id = store.claim_next(catalog, queues=queues)
            if job_id is None:
                if once or stop_when_idle:
                    return ran
                time.sleep(POLL_SECONDS)
                continue
            execute(job_id, ws, claimed=True)
            ran += 1
            if once:
                return ran
    finally:
        catalog.close()


def main(argv: list[str]) -> None:
    from handlens.core.procs import worker_init

    root, db_url, parent = argv[0], argv[1], int(argv[2])
    worker_init(parent)
    with contextlib.suppress(KeyboardInterrupt):
        work_locally(Workspace.open(root, db_url))


if __name__ == "__main__":
    main(sys.argv[1:])
