"""``handlens worker``: the Celery worker that runs jobs (the task is registered here, worker side only).

See :mod:`handlens.jobs.broker` for the settings and the faults they answer.
"""

from __future__ import annotations

import os
from typing import Any, NoReturn

from handlens.jobs.broker import QUEUES, TASK, make_app

#: jobs one worker child runs before it is replaced (its imports paid once; its memory given back regularly)
MAX_JOBS_PER_CHILD = 50
#: a job this worker's catalog does not know goes back to the queue after this pause
REJECT_PAUSE_S = 5.0


def worker_app(broker: str) -> Any:
    """The Celery app with the job task registered: what a worker runs."""
    app = make_app(broker)
    app.task(name=TASK, bind=True, acks_late=True, max_retries=None)(_run_job)
    return app


def _give_back(exc: Exception, message: str) -> NoReturn:
    """Say why, pause (never a hot loop between the broker and a worker that cannot run the job), and return the
    message to the queue for another delivery."""
    import time

    from celery.exceptions import Reject

    print(message, flush=True)
    time.sleep(REJECT_PAUSE_S)
    raise Reject(str(exc), requeue=True) from exc


def _run_job(task: Any, job_id: str) -> str:
    """The Celery task: run the job from the worker's own catalog and workspace."""
    from handlens.core.errors import NotFoundError
    from handlens.core.workspace import Workspace
    from handlens.jobs.runner import execute

    try:
        outcome = execute(job_id, Workspace.open())
    except NotFoundError as exc:  # this worker is on another catalog than the service
        _give_back(exc, f"error: {exc}; the job goes back to the queue for a worker on the right --db")
    except Exception as exc:  # the runner could not record an end (a catalog gone, a full disk): start_attempt
        # counts each such death and fails the job after MAX_WORKER_DEATHS
        _give_back(exc, f"error: job {job_id} could not be run or recorded ({type(exc).__name__}: {exc}); back "
                   "to the queue")
    if outcome.retry:
        from celery.exceptions import Reject, Retry

        try:
            raise task.retry(countdown=2.0)
        except Retry:
            raise
        except Exception as exc:  # the retry could not be published (the broker is flapping): keep the message
            raise Reject(str(exc), requeue=True) from exc
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
