"""``handlens worker``: the Celery worker that runs jobs (the task is registered here, worker side only).

See :mod:`handlens.jobs.broker` for the settings and the faults they answer.
"""

from __future__ import annotations

import os
from typing import Any

from handlens.jobs.broker import QUEUES, TASK, make_app

#: jobs one worker child runs before it is replaced (its imports paid once; its memory given back regularly)
MAX_JOBS_PER_CHILD = 50


def worker_app(broker: str) -> Any:
    """The Celery app with the job task registered: what a worker runs."""
    app = make_app(broker)
    app.task(name=TASK, bind=True, acks_late=True, max_retries=None)(_run_job)
    return app


def _run_job(task: Any, job_id: str) -> str:
    """The Celery task: run the job from the worker's own catalog and workspace."""
    from handlens.core.workspace import Workspace
    from handlens.jobs.runner import execute

    outcome = execute(job_id, Workspace.open())
    if outcome.retry:
        raise task.retry(countdown=2.0)
    return outcome.status


def run_worker(broker: str, *, queues: list[str], concurrency: int = 1, loglevel: str = "INFO",
               hostname: str | None = None, max_jobs_per_child: int = MAX_JOBS_PER_CHILD) -> None:
    """``handlens worker``: a Celery worker (prefork pool, one job per child) on ``queues``."""
    from handlens.core.errors import InputError

    unknown = sorted(set(queues) - set(QUEUES))
    if unknown:
        raise InputError(f"unknown queue(s) {', '.join(unknown)}; choose from {', '.join(QUEUES)}")
    app = worker_app(broker)
    app.conf.worker_max_tasks_per_child = max_jobs_per_child
    argv = ["worker", f"--queues={','.join(queues)}", f"--concurrency={concurrency}", "--pool=prefork",
            f"--loglevel={loglevel}", "--without-gossip", "--without-mingle", "--without-heartbeat"]
    # a node name of its own: two workers named celery@HOST on one machine fight over RabbitMQ's reply queue
    argv.append(f"--hostname={hostname or f'handlens-{os.getpid()}@%h'}")
    app.worker_main(argv)
