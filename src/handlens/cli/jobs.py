"""``handlens jobs`` (submit, list, show, cancel, logs, work) and ``handlens worker`` (a Celery worker)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from handlens.cli.context import workspace_and_catalog
from handlens.cli.options import (
    BackboneOption,
    ConfigOption,
    FreezeOption,
    JsonFlag,
    LabelsetOption,
    OverridesArg,
    SplitOption,
    TrainDatasetOption,
    WeightsOption,
)
from handlens.cli.output import emit_json, handle_errors, stdout, table

jobs_app = typer.Typer(help="Jobs: queue train, study, evaluate, explain and import-urls runs; watch, cancel.",
                       no_args_is_help=True)
submit_app = typer.Typer(help="Queue a job; the last line printed is its id.", no_args_is_help=True)
jobs_app.add_typer(submit_app, name="submit")
app = typer.Typer()

BrokerOption = Annotated[str | None, typer.Option(
    "--broker", envvar="HANDLENS_BROKER_URL", help="Celery broker (amqp://... RabbitMQ, redis://... Redis); "
    "none: the local worker of `handlens serve` (or `handlens jobs work`) runs it.")]


WorkerBrokerOption = Annotated[str | None, typer.Option(
    "--broker", envvar="HANDLENS_BROKER_URL", help="The Celery broker to take jobs from: amqp://... (RabbitMQ) "
    "or redis://... (Redis); required.")]


def _submit(ctx: typer.Context, kind: str, config: dict[str, Any], *, broker: str | None, as_json: bool) -> None:
    from handlens.jobs.api import submit_job
    from handlens.jobs.broker import broker_url

    ws, catalog = workspace_and_catalog(ctx)
    try:
        job = submit_job(kind, config, workspace=ws, catalog=catalog, broker=broker_url(broker))
    finally:
        catalog.close()
    if as_json:
        emit_json(job.to_dict())
        return
    where = (f"the broker's {job.queue} queue" if job.executor == "celery" else "the catalog's local queue (run by "
             "`handlens serve`'s local worker, forwarded by a `serve --broker`, or `handlens jobs work`)")
    stdout.print(f"{kind} job queued on {where}; watch it with `handlens jobs show {job.id} --follow`")
    print(job.id, flush=True)


@submit_app.command("train")
@handle_errors
def submit_train(
    ctx: typer.Context,
    overrides: OverridesArg = None,
    *,
    dataset: TrainDatasetOption = None,
    labelset: LabelsetOption = None,
    split: SplitOption = None,
    backbone: BackboneOption = None,
    weights: WeightsOption = None,
    freeze: FreezeOption = None,
    epochs: Annotated[int | None, typer.Option("--epochs", min=1, help="Epochs (default 10).")] = None,
    policy: Annotated[str | None, typer.Option("--policy", help="Augmentation policy (as for train).")] = None,
    name: Annotated[str | None, typer.Option("--name", help="The run's name.")] = None,
    config: ConfigOption = None,
    broker: BrokerOption = None,
    as_json: JsonFlag = False,
) -> None:
    """Queue a training run (the flags and key=value overrides of `handlens train`)."""
    from handlens.cli.training import run_config

    cfg = run_config(config, overrides, dataset=dataset, labelset=labelset, split=split, backbone=backbone,
                     weights=weights, freeze=freeze, epochs=epochs, policy=policy, name=name)
    _submit(ctx, "train", cfg.model_dump(mode="json"), broker=broker, as_json=as_json)


def _settings(items: list[str] | None, config: Path | None) -> dict[str, Any]:
    """``key=value`` pairs (values read as YAML: 3, true, [a, b]) over a YAML/JSON config file."""
    import yaml

    from handlens.core.errors import InputError

    base: dict[str, Any] = {}
    if config is not None:
        loaded = yaml.safe_load(config.read_text())
        if not isinstance(loaded, dict):
            raise InputError(f"{config}: write the job's config as a mapping of key: value")
        base.update(loaded)
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise InputError(f"{item!r}: write settings as key=value, e.g. dataset=rocks")
        base[key.strip()] = yaml.safe_load(value) if value else ""
    return base


def _generic(kind: str, doc: str) -> None:
    @submit_app.command(kind, help=doc)
    @handle_errors
    def command(
        ctx: typer.Context,
        settings: Annotated[list[str] | None, typer.Argument(help="key=value settings of the job's config.")] = None,
        *,
        config: Annotated[Path | None, typer.Option("--config", help="YAML/JSON file of the job's config.")] = None,
        broker: BrokerOption = None,
        as_json: JsonFlag = False,
    ) -> None:
        _submit(ctx, kind, _settings(settings, config), broker=broker, as_json=as_json)


for _kind, _doc in (("study", "Queue a study (the settings of `study run`: dataset=D preset=quick trials=10 ...)."),
                    ("evaluate", "Queue an evaluation (bundle=RUN subset=test tta=true ...)."),
                    ("explain", "Queue explanations of a subset (bundle=RUN subset=test method=gradcam ...)."),
                    ("import-urls", "Queue a URL import (manifest=FILE.csv dataset=D concurrency=8 ...)."),
                    ("detect-train", "Queue a detector's training (dataset=D labelset=L epochs=12 ...).")):
    _generic(_kind, _doc)


def _row(job: Any) -> list[Any]:
    progress = job.progress
    at = f"{progress.get('epoch')}/{progress.get('epochs')}" if progress.get("epochs") else progress.get("message", "")
    return [job.id, job.kind, job.status, job.attempts, job.worker or "", at, job.created_at,
            job.result.get("run_id") or job.result.get("study") or "", (job.error or "")[:60]]


@jobs_app.command("list")
@handle_errors
def list_cmd(ctx: typer.Context, status: Annotated[str | None, typer.Option("--status")] = None,
             limit: Annotated[int, typer.Option("--limit", min=1)] = 50, as_json: JsonFlag = False) -> None:
    """The newest jobs: kind, status, attempts, worker, progress, result."""
    from handlens.jobs.api import list_jobs

    _, catalog = workspace_and_catalog(ctx)
    try:
        jobs = list_jobs(catalog=catalog, status=status, limit=limit)
    finally:
        catalog.close()
    if as_json:
        emit_json([job.to_dict() for job in jobs])
        return
    shown = table("jobs", ["id", "kind", "status", "attempts", "worker", "progress", "queued at", "result", "error"],
                  [_row(job) for job in jobs])
    shown.columns[0].no_wrap, shown.columns[0].min_width = True, 26  # an id is copied whole, never cut
    stdout.print(shown)


@jobs_app.command("show")
@handle_errors
def show_cmd(ctx: typer.Context, job_id: Annotated[str, typer.Argument(help="Job id.")], *,
             follow: Annotated[bool, typer.Option("--follow", help="Print status and progress events until it "
                                                  "ends.")] = False,
             as_json: JsonFlag = False) -> None:
    """One job: config, status, attempts, progress, result or error."""
    from handlens.jobs.api import events, get_job

    _, catalog = workspace_and_catalog(ctx)
    try:
        if follow:
            for event in events(job_id, catalog=catalog):
                if as_json:
                    emit_json(event)
                else:
                    stdout.print(_event_line(event), markup=False)
        job = get_job(job_id, catalog=catalog)
        if follow and not as_json:
            _print_outcome(job)
    finally:
        catalog.close()
    if as_json:
        emit_json(job.to_dict())
        return
    if not follow:
        for key in ("id", "kind", "status", "attempts", "worker", "executor", "queue", "created_at", "started_at",
                    "finished_at", "log_path", "error"):
            stdout.print(f"{key}: {getattr(job, key)}", markup=False)
        stdout.print(f"progress: {job.progress}", markup=False)
        stdout.print(f"result: {({k: v for k, v in job.result.items() if k != 'state'})}", markup=False)


def _print_outcome(job: Any) -> None:
    """What a finished or stopped job left: its run and bundle, or how to continue it."""
    result = {k: v for k, v in job.result.items() if k != "state"}
    run_id = result.get("run_id") or job.result.get("state", {}).get("run_id")
    if job.status == "finished":
        for key in ("run_id", "study", "bundle", "report", "index"):
            if result.get(key):
                stdout.print(f"{key}: {result[key]}", markup=False)
    elif job.status == "cancelled" and run_id and job.kind == "train":
        stdout.print(f"run {run_id} keeps its last checkpoint: `handlens train --resume {run_id}` continues it",
                     markup=False)
    elif job.status == "queued" and job.executor == "local":
        stdout.print("queued on the local queue: `handlens serve` without --broker (or `handlens jobs work`) runs it",
                     markup=False)


def _event_line(event: dict[str, Any]) -> str:
    data = event["data"]
    if event["event"] == "status":
        extra = f" ({data['error']})" if data.get("error") else ""
        return f"status: {data['status']} (attempt {data['attempts']}){extra}"
    metrics = "  ".join(f"{k}={v:.4f}" for k, v in (data.get("metrics") or {}).items() if isinstance(v, float))
    eta = f"  eta {data['eta_seconds']:.0f}s" if data.get("eta_seconds") is not None else ""
    if data.get("epochs"):
        return f"epoch {data.get('epoch')}/{data['epochs']}  {metrics}{eta}"
    return str(data.get("message") or data)


@jobs_app.command("cancel")
@handle_errors
def cancel_cmd(ctx: typer.Context, job_id: Annotated[str, typer.Argument(help="Job id.")], *,
               force: Annotated[bool, typer.Option("--force", help="Mark a running job cancelled now: for one "
                                                   "whose worker is gone (a lost machine).")] = False,
               as_json: JsonFlag = False) -> None:
    """Cancel a job: a queued one at once, a running one within one epoch (its checkpoint kept)."""
    from handlens.jobs.api import cancel_job

    _, catalog = workspace_and_catalog(ctx)
    try:
        job = cancel_job(job_id, catalog=catalog, force=force)
    finally:
        catalog.close()
    if as_json:
        emit_json(job.to_dict())
        return
    stdout.print(f"job {job.id}: {'cancelled' if job.status == 'cancelled' else 'cancel requested; it stops '}"
                 f"{'' if job.status == 'cancelled' else 'after its current epoch'}")


@jobs_app.command("resend")
@handle_errors
def resend_cmd(ctx: typer.Context, job_id: Annotated[str, typer.Argument(help="Job id.")], *,
               broker: WorkerBrokerOption = None) -> None:
    """Publish a queued job to the broker again (its message was lost); a job a worker has taken is refused."""
    from handlens.core.errors import InputError
    from handlens.jobs.api import resend_job
    from handlens.jobs.broker import broker_url

    url = broker_url(broker)
    if not url:
        raise InputError("`jobs resend` needs the broker: pass --broker URL or set HANDLENS_BROKER_URL")
    _, catalog = workspace_and_catalog(ctx)
    try:
        job = resend_job(job_id, catalog=catalog, broker=url)
    finally:
        catalog.close()
    stdout.print(f"job {job.id} sent again to the broker's {job.queue} queue")


@jobs_app.command("logs")
@handle_errors
def logs_cmd(ctx: typer.Context, job_id: Annotated[str, typer.Argument(help="Job id.")], *,
             follow: Annotated[bool, typer.Option("--follow", "-f", help="Keep printing until the job "
                                                  "ends.")] = False) -> None:
    """The job's log (what it printed), from the shared workspace."""
    from handlens.jobs.api import follow_log, get_job

    ws, catalog = workspace_and_catalog(ctx)
    try:
        for line in follow_log(get_job(job_id, catalog=catalog), catalog=catalog, workspace=ws, follow=follow):
            print(line, flush=True)
    finally:
        catalog.close()


@jobs_app.command("work")
@handle_errors
def work_cmd(ctx: typer.Context, *, until_idle: Annotated[bool, typer.Option(
        "--until-idle", help="Stop when no local job waits (default: keep waiting).")] = False) -> None:
    """Run queued local jobs in this process, one after another (what `handlens serve` starts by itself)."""
    from handlens.cli.context import workspace
    from handlens.jobs.worker import work_locally

    ran = work_locally(workspace(ctx), stop_when_idle=until_idle)
    stdout.print(f"{ran} job(s) run")


@app.command("worker")
@handle_errors
def worker_cmd(
    ctx: typer.Context,
    *,
    broker: WorkerBrokerOption = None,
    queues: Annotated[str, typer.Option("--queues", help="Comma-separated queues: train, explain, "
                                        "import.")] = "train,explain,import",
    concurrency: Annotated[int, typer.Option("--concurrency", min=1, help="Jobs at once (one process "
                                             "each).")] = 1,
    loglevel: Annotated[str, typer.Option("--loglevel")] = "INFO",
    max_jobs_per_child: Annotated[int, typer.Option("--max-jobs-per-child", min=1, help="Jobs one worker process "
                                                    "runs before it is replaced.")] = 50,
    hostname: Annotated[str | None, typer.Option("--hostname", help="The worker's node name (default "
                                                 "handlens-PID@HOST: several workers per machine).")] = None,
) -> None:
    """A Celery worker for jobs, on the workspace and catalog given by --workspace/--db (shared with the
    service: PostgreSQL and a shared folder for a team)."""
    import os

    from handlens.cli.context import workspace
    from handlens.core.errors import InputError
    from handlens.core.workspace import DB_URL_ENV, WORKSPACE_ENV
    from handlens.jobs.broker import broker_url
    from handlens.jobs.celery_worker import run_worker

    url = broker_url(broker)
    if not url:
        raise InputError("`handlens worker` needs a broker: pass --broker amqp://guest:guest@127.0.0.1:5672// or "
                         "set HANDLENS_BROKER_URL (with no broker, `handlens serve` runs jobs itself)")
    ws = workspace(ctx)
    os.environ[WORKSPACE_ENV], os.environ[DB_URL_ENV] = str(ws.root), ws.db_url  # each job's process reads them
    run_worker(url, queues=[q.strip() for q in queues.split(",") if q.strip()], concurrency=concurrency,
               loglevel=loglevel, max_jobs_per_child=max_jobs_per_child,
               hostname=hostname)
