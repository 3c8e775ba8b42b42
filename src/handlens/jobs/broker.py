"""The broker side of jobs: Celery 5 on RabbitMQ (``amqp://``) or Redis (``redis://``): the way past one machine.

The message carries only the job id; the worker reads the job's kind and config from the catalog it was
started on (``handlens --db URL worker``), so every worker and the service must share one catalog
(PostgreSQL for a team) and one workspace folder (a shared volume).

Settings, each for a fault the jobs issue names:
- ``task_acks_late`` + ``task_reject_on_worker_lost``: a job is acknowledged when it ends, so a worker
  SIGKILLed mid-run has it delivered again (RabbitMQ at once when the connection drops; Redis after the
  visibility timeout), and :func:`handlens.jobs.store.start_attempt` counts the death and resumes the run.
- ``worker_prefetch_multiplier=1``: a worker holds one job at a time, so a queued job is not stuck behind
  a long run on a busy worker while another idles.
- ``visibility_timeout`` (Redis) longer than the longest run (24 h), or Redis hands a running job to a
  second worker. RabbitMQ's own ``consumer_timeout`` (30 min by default) must be raised on the server for
  runs longer than that (README).
- durable queues and persistent messages: a broker restart keeps queued jobs.
- the prefork pool under a parent that never imports torch: no CUDA state is ever forked into a job. A child
  runs up to ``max_jobs_per_child`` jobs (default 50: its torch imports are paid once, its memory is given
  back regularly), then is replaced.
"""

from __future__ import annotations

import os
from typing import Any

#: the queues, by the kind of machine a job wants
QUEUES = ("train", "explain", "import")
VISIBILITY_TIMEOUT = 24 * 3600
BROKER_ENV = "HANDLENS_BROKER_URL"
TASK = "handlens.run_job"


def broker_url(given: str | None = None) -> str | None:
    """The broker to use: ``given``, else ``$HANDLENS_BROKER_URL``, else None (the local executor)."""
    url = given or os.environ.get(BROKER_ENV) or None
    if url and not url.startswith(("amqp://", "amqps://", "pyamqp://", "redis://", "rediss://")):
        from handlens.core.errors import InputError

        raise InputError(f"broker URL {url!r}: use amqp://user:pass@host:5672// (RabbitMQ) or "
                         "redis://host:6379/0 (Redis)")
    return url


def make_app(broker: str) -> Any:
    from celery import Celery
    from kombu import Exchange, Queue

    app = Celery("handlens", broker=broker, set_as_current=False)
    app.conf.update(
        task_acks_late=True, task_reject_on_worker_lost=True, worker_prefetch_multiplier=1,
        task_acks_on_failure_or_timeout=True, task_ignore_result=True, task_serializer="json",
        accept_content=["json"], task_default_queue="train", task_create_missing_queues=False,
        task_queues=[Queue(name, Exchange(name, type="direct"), routing_key=name, durable=True) for name in QUEUES],
        task_default_delivery_mode="persistent",
        broker_transport_options={"visibility_timeout": VISIBILITY_TIMEOUT}, broker_connection_retry_on_startup=True,
        broker_connection_timeout=5, worker_hijack_root_logger=False,
        worker_send_task_events=False, worker_cancel_long_running_tasks_on_connection_loss=False,
    )
    return app


def send(broker: str, job_id: str, queue: str) -> None:
    """Publish one job (its id only) to ``queue``; a broker that cannot be reached is a clear error."""
    from handlens.core.errors import BusyError

    app = make_app(broker)
    try:
        app.send_task(TASK, args=[job_id], queue=queue, retry=True,
                      retry_policy={"max_retries": 2, "interval_start": 0.2, "interval_step": 0.5})
    except Exception as exc:  # kombu's OperationalError and socket errors
        raise BusyError(f"cannot reach the broker {redact(broker)}: {exc}. Check that it runs and the URL "
                        "(--broker / HANDLENS_BROKER_URL) is right") from exc
    finally:
        app.close()


def redact(url: str) -> str:
    """The URL as it may be shown: any password masked."""
    from kombu.utils.url import maybe_sanitize_url

    return str(maybe_sanitize_url(url))
