"""Jobs on the embedded executor: the catalog's queue, one worker, faults (user errors, cancel, worker death)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from handlens.core.errors import ConflictError, InputError
from handlens.jobs import store
from handlens.jobs.api import cancel_job, get_job, list_jobs, submit_job
from handlens.jobs.worker import work_locally
from tests.conftest import tiny_train


def test_a_train_job_runs_to_a_bundle_with_progress_and_a_log(job_ws):
    ws, catalog = job_ws
    job = submit_job("train", tiny_train(), workspace=ws, catalog=catalog)
    assert job.status == "queued" and job.executor == "local" and job.queue == "train"
    assert work_locally(ws, stop_when_idle=True) == 1
    done = get_job(job.id, catalog=catalog)
    assert done.status == "finished", done.error
    assert done.attempts == 1 and done.worker and done.started_at and done.finished_at
    run_id = done.result["run_id"]
    assert (ws.runs_dir / run_id / "bundle" / "bundle.json").is_file()
    assert done.result["bundle"].endswith("bundle") and done.result["epochs"] == 2
    assert done.progress["epoch"] == 2 and done.progress["epochs"] == 2
    assert "val_macro_f1" in done.progress["metrics"] and done.progress["eta_seconds"] == 0
    log = Path(done.log_path).read_text()
    assert "epoch 2/2" in log and "finished" in log
    assert [j.id for j in list_jobs(catalog=catalog)] == [job.id]


def test_a_typo_in_the_config_is_refused_at_submit_and_nothing_is_queued(job_ws):
    ws, catalog = job_ws
    config = tiny_train()
    config["train"]["epoch"] = 3  # not a key
    with pytest.raises(InputError, match=r"train\.epoch"):
        submit_job("train", config, workspace=ws, catalog=catalog)
    with pytest.raises(Exception, match="unknown job kind 'trian'"):
        submit_job("trian", {}, workspace=ws, catalog=catalog)
    assert list_jobs(catalog=catalog) == []


def test_a_user_error_fails_once_and_is_not_retried(job_ws):
    ws, catalog = job_ws
    job = submit_job("train", tiny_train("data.dataset=no-such-dataset"), workspace=ws, catalog=catalog)
    assert work_locally(ws, stop_when_idle=True) == 1
    failed = get_job(job.id, catalog=catalog)
    assert failed.status == "failed" and failed.attempts == 1
    assert "no-such-dataset" in failed.error and "not retried" in failed.error
    assert work_locally(ws, stop_when_idle=True) == 0  # nothing left in the queue


def test_cancel_a_queued_job_means_it_never_runs(job_ws):
    ws, catalog = job_ws
    job = submit_job("train", tiny_train(), workspace=ws, catalog=catalog)
    assert cancel_job(job.id, catalog=catalog).status == "cancelled"
    assert work_locally(ws, stop_when_idle=True) == 0
    assert get_job(job.id, catalog=catalog).status == "cancelled"
    with pytest.raises(ConflictError, match="already ended"):
        cancel_job(job.id, catalog=catalog)


def _wait_for(predicate, timeout=120.0, interval=0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError("timed out waiting")


def test_cancel_a_running_job_stops_within_an_epoch_and_keeps_the_checkpoint(job_ws):
    ws, catalog = job_ws
    job = submit_job("train", tiny_train("train.epochs=30"), workspace=ws, catalog=catalog)
    worker = threading.Thread(target=work_locally, args=(ws,), kwargs={"stop_when_idle": True})
    worker.start()
    _wait_for(lambda: get_job(job.id, catalog=catalog).progress.get("epoch", 0) >= 1)
    cancel_job(job.id, catalog=catalog)
    worker.join(timeout=120)
    assert not worker.is_alive()
    cancelled = get_job(job.id, catalog=catalog)
    assert cancelled.status == "cancelled" and cancelled.error == "cancelled by the user"
    run_dir = ws.runs_dir / cancelled.result["state"]["run_id"]
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    assert not (run_dir / "bundle").exists()
    epochs_done = cancelled.progress["epoch"]
    assert epochs_done < 30  # stopped long before the end: at most one epoch after the request


def _start_worker(ws):
    return subprocess.Popen([sys.executable, "-m", "handlens.jobs.worker", str(ws.root), ws.db_url,
                             str(os.getpid())], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)


def test_a_sigkilled_worker_s_job_is_run_again_and_resumes_from_its_checkpoint(job_ws):
    ws, catalog = job_ws
    job = submit_job("train", tiny_train("train.epochs=40"), workspace=ws, catalog=catalog)
    first = _start_worker(ws)
    try:
        _wait_for(lambda: get_job(job.id, catalog=catalog).progress.get("epoch", 0) >= 2)
        first.send_signal(signal.SIGKILL)
        first.wait(10)
    finally:
        first.kill()
    assert get_job(job.id, catalog=catalog).status == "running"  # the dead worker could not say otherwise
    assert work_locally(ws, stop_when_idle=True) == 1  # requeues the orphan, then runs it
    done = get_job(job.id, catalog=catalog)
    assert done.status == "finished", done.error
    assert done.attempts == 2 and done.result["resumed"] is True
    history = json.loads((ws.runs_dir / done.result["run_id"] / "history.json").read_text())
    assert [r["epoch"] for r in history] == list(range(1, 41))  # resumed, not restarted: no epoch twice
    assert "--- attempt 2" in Path(done.log_path).read_text()


def test_a_job_whose_workers_died_three_times_is_failed_with_the_reason(job_ws):
    ws, catalog = job_ws
    job = submit_job("train", tiny_train(), workspace=ws, catalog=catalog)
    for _ in range(3):  # a worker takes it and dies (its pid no longer runs); the next worker's start requeues it
        assert store.claim_next(catalog) == job.id
        assert store.requeue_orphans(catalog, alive=lambda worker: False) == [job.id]
    row = get_job(job.id, catalog=catalog)
    assert row.status == "failed" and row.attempts == 3
    assert "died 3 times" in row.error
    assert store.claim_next(catalog) is None


def test_a_redelivered_job_counts_the_death_in_start_attempt(job_ws):
    """The broker's path: the same message delivered again finds the job running."""
    ws, catalog = job_ws
    job = submit_job("train", tiny_train(), workspace=ws, catalog=catalog)
    for attempt in (1, 2, 3):
        action, row = store.start_attempt(catalog, job.id)
        assert action == "run" and row.attempts == attempt
    action, row = store.start_attempt(catalog, job.id)
    assert action == "dead" and row.status == "failed" and "died 3 times" in row.error


def test_two_local_workers_on_postgresql_run_each_job_once(tmp_path, postgres_url):
    """A team's catalog: two workers (as on two machines) share one PostgreSQL queue; ``FOR UPDATE SKIP LOCKED``
    hands each job to exactly one of them."""
    from handlens.data.catalog import open_catalog
    from tests.conftest import colour_tree, split_workspace

    ws = split_workspace(tmp_path, colour_tree(tmp_path / "colours", per_class=8, size=32), "pg_jobs",
                         db_url=postgres_url)
    catalog = open_catalog(ws.db_url)
    try:
        jobs = [submit_job("train", tiny_train("data.dataset=pg_jobs"), workspace=ws, catalog=catalog)
                for _ in range(4)]
        workers = [subprocess.Popen([sys.executable, "-c", "import sys; from handlens.core.workspace import "
                                     "Workspace; from handlens.jobs.worker import work_locally; "
                                     "work_locally(Workspace.open(sys.argv[1], sys.argv[2]), stop_when_idle=True)",
                                     str(ws.root), ws.db_url]) for _ in range(2)]
        for process in workers:
            assert process.wait(240) == 0
        done = [get_job(job.id, catalog=catalog) for job in jobs]
    finally:
        catalog.close()
    assert [job.status for job in done] == ["finished"] * 4, [job.error for job in done]
    assert [job.attempts for job in done] == [1] * 4  # nobody ran a job twice
    assert len({job.result["run_id"] for job in done}) == 4


def test_the_worker_parent_and_the_service_side_of_jobs_import_no_torch():
    """A Celery worker's parent (which forks the job processes) and the service's job routes never load torch or
    Lightning: no CUDA state can be forked into a job, and the service stays light."""
    code = ("import sys; import handlens.cli.jobs, handlens.jobs.celery_worker as w, handlens.jobs.api, "
            "handlens.jobs.local; w.worker_app('amqp://guest:guest@127.0.0.1:1//'); "
            "print(sorted(m for m in ('torch', 'lightning', 'mlflow') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_only_a_queued_job_can_be_sent_again(job_ws):
    from handlens.jobs.api import resend_job

    ws, catalog = job_ws
    job = submit_job("train", tiny_train(), workspace=ws, catalog=catalog)
    cancel_job(job.id, catalog=catalog)
    with pytest.raises(ConflictError, match="only a queued job"):
        resend_job(job.id, catalog=catalog, broker="amqp://guest:guest@127.0.0.1:1//")


def test_cancel_interrupts_a_study_in_a_worker_that_ignores_sigint(job_ws):
    """A study cannot stop at an epoch: the cancel interrupts it, also in a worker process that ignores SIGINT
    (the local worker and Celery's children do)."""
    ws, catalog = job_ws
    space = ws.root / "space.yaml"
    space.write_text(json.dumps({"space": {"train.lr": {"float": [1e-4, 1e-1], "log": True}},
                                 "fixed": {"model.backbone": "tiny_cnn", "model.weights": "none",
                                           "model.freeze": "full", "train.epochs": 3, "train.batch_size": 8}}))
    job = submit_job("study", {"dataset": "colours", "space": str(space), "sampler": "random", "trials": 500,
                               "cv": 2, "tracking": "none"}, workspace=ws, catalog=catalog)
    worker = _start_worker(ws)
    try:
        _wait_for(lambda: get_job(job.id, catalog=catalog).status == "running")
        time.sleep(3)  # well inside its first trials
        cancel_job(job.id, catalog=catalog)
        done = _wait_for(lambda: get_job(job.id, catalog=catalog).status in store.TERMINAL and
                         get_job(job.id, catalog=catalog), timeout=60)
        assert worker.poll() is None  # the worker lives on for the next job
    finally:
        worker.kill()
        worker.wait(10)
    assert done.status == "cancelled", (done.status, done.error)
