"""CLI contract for jobs (cli/jobs.py): submit prints the job id last, list/show/cancel/logs, the local worker,
and the worker command's clear error without a broker."""

import json

from typer.testing import CliRunner

from handlens.cli.app import app
from handlens.jobs import store

runner = CliRunner()
TINY = ["--dataset", "colours", "--backbone", "tiny_cnn", "--weights", "none", "--freeze", "full", "--epochs", "2",
        "tracking.backend=none", "train.batch_size=8"]


def cli(ws, *args):
    return runner.invoke(app, ["--workspace", str(ws.root), *args])


def test_submit_work_show_logs_and_list(job_ws):
    ws, _ = job_ws
    submitted = cli(ws, "jobs", "submit", "train", *TINY)
    assert submitted.exit_code == 0, submitted.output
    job_id = submitted.stdout.strip().splitlines()[-1]
    assert job_id.startswith("job-") and "local queue" in submitted.stdout
    worked = cli(ws, "jobs", "work", "--until-idle")
    assert worked.exit_code == 0 and "1 job(s) run" in worked.stdout
    shown = json.loads(cli(ws, "jobs", "show", job_id, "--json").stdout)
    assert shown["status"] == "finished" and shown["result"]["bundle"].endswith("bundle")
    followed = cli(ws, "jobs", "show", job_id, "--follow").stdout
    assert "status: finished (attempt 1)" in followed and "epoch 2/2" in followed
    logs = cli(ws, "jobs", "logs", job_id, "--follow").stdout
    assert "epoch 2/2" in logs and "--- attempt 1" in logs
    listed = cli(ws, "jobs", "list").stdout
    assert job_id[:12] in listed and "finished" in listed
    assert cli(ws, "jobs", "list", "--status", "nope").exit_code == 2


def test_bad_settings_and_cancel(job_ws):
    ws, catalog = job_ws
    typo = cli(ws, "jobs", "submit", "evaluate", "bundel=x")
    assert typo.exit_code == 2 and "bundel" in typo.output
    queued = cli(ws, "jobs", "submit", "evaluate", "bundle=no-such-run").stdout.strip().splitlines()[-1]
    cancelled = cli(ws, "jobs", "cancel", queued)
    assert cancelled.exit_code == 0 and "cancelled" in cancelled.stdout
    assert cli(ws, "jobs", "cancel", queued).exit_code == 4  # already ended
    stuck = cli(ws, "jobs", "submit", "evaluate", "bundle=no-such-run").stdout.strip().splitlines()[-1]
    assert store.claim_next(catalog) == stuck  # a worker took it, then its machine was lost
    forced = cli(ws, "jobs", "cancel", stuck, "--force", "--json")
    assert forced.exit_code == 0 and json.loads(forced.stdout)["status"] == "cancelled"
    assert cli(ws, "jobs", "show", "job-nope").exit_code == 3


def test_a_failed_evaluate_job_says_why(job_ws):
    ws, _ = job_ws
    job_id = cli(ws, "jobs", "submit", "evaluate", "bundle=no-such-run").stdout.strip().splitlines()[-1]
    cli(ws, "jobs", "work", "--until-idle")
    shown = json.loads(cli(ws, "jobs", "show", job_id, "--json").stdout)
    assert shown["status"] == "failed" and "no-such-run" in shown["error"] and "not retried" in shown["error"]


def test_worker_needs_a_broker(job_ws, monkeypatch):
    ws, _ = job_ws
    monkeypatch.delenv("HANDLENS_BROKER_URL", raising=False)
    result = cli(ws, "worker")
    assert result.exit_code == 2 and "needs a broker" in result.output
    bad = cli(ws, "worker", "--broker", "http://x")
    assert bad.exit_code == 2 and "amqp://" in bad.output
