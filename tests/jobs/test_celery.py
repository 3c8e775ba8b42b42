"""Jobs on Celery workers over the real RabbitMQ and Redis of the build machines (skipped with a reason where
neither runs): a job runs on a worker process, a SIGKILLed worker's job is delivered again and resumes, and a
broker restart keeps queued jobs."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest

from handlens.jobs.api import get_job, submit_job
from tests.conftest import tiny_train

pytestmark = pytest.mark.slow


def _listening(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(1)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _rabbitmqctl(*args: str) -> bool:
    tool = shutil.which("rabbitmqctl")
    if tool is None:
        return False
    return subprocess.run([tool, *args], capture_output=True, timeout=60).returncode == 0


@pytest.fixture(scope="module")
def rabbitmq_url():
    """A vhost of its own on the local RabbitMQ (deleted after), else the default vhost purged."""
    if not _listening(5672):
        pytest.skip("RabbitMQ is not listening on 127.0.0.1:5672: start it to run the Celery tests")
    vhost = f"handlens_test_{secrets.token_hex(3)}"
    if _rabbitmqctl("add_vhost", vhost) and _rabbitmqctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*"):
        yield f"amqp://guest:guest@127.0.0.1:5672/{vhost}"
        _rabbitmqctl("delete_vhost", vhost)
        return
    url = "amqp://guest:guest@127.0.0.1:5672//"
    _purge(url)
    yield url


@pytest.fixture(scope="module")
def redis_url():
    if not _listening(6379):
        pytest.skip("Redis is not listening on 127.0.0.1:6379: start it to run the Celery-on-Redis test")
    import redis

    db = 9 + secrets.randbelow(6)
    redis.Redis(host="127.0.0.1", port=6379, db=db).flushdb()
    yield f"redis://127.0.0.1:6379/{db}"
    redis.Redis(host="127.0.0.1", port=6379, db=db).flushdb()


def _purge(url: str) -> None:
    from handlens.jobs.broker import make_app

    app = make_app(url)
    try:
        with app.connection_for_write() as conn:
            for queue in ("train", "explain", "import"):
                try:
                    conn.default_channel.queue_purge(queue)
                except Exception:  # not declared yet
                    conn.default_channel  # noqa: B018  (a fresh channel after the error)
    finally:
        app.close()


def _worker(ws, broker: str, log) -> subprocess.Popen:
    """``handlens worker`` in a process group of its own (so a SIGKILL takes the parent and its children)."""
    return subprocess.Popen([sys.executable, "-m", "handlens.cli.main", "--workspace", str(ws.root), "--db",
                             ws.db_url, "worker", "--broker", broker, "--queues", "train", "--loglevel", "WARNING"],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def _stop(process: subprocess.Popen, sig: int = signal.SIGTERM) -> None:
    if process.poll() is None:
        os.killpg(process.pid, sig)
    try:
        process.wait(30)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(10)


def _wait(predicate, timeout=180.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.3)
    raise AssertionError("timed out waiting")


def _finished(catalog, job_id):
    job = get_job(job_id, catalog=catalog)
    return job if job.status in ("finished", "failed", "cancelled") else None


def test_jobs_run_on_two_workers_of_one_machine_over_rabbitmq(job_ws, rabbitmq_url, tmp_path):
    ws, catalog = job_ws
    with open(tmp_path / "worker.log", "wb") as log:
        workers = [_worker(ws, rabbitmq_url, log) for _ in range(2)]  # each gets a node name of its own
        try:
            jobs = [submit_job("train", tiny_train(f"train.seed={i}"), workspace=ws, catalog=catalog,
                               broker=rabbitmq_url) for i in range(2)]
            assert all(job.executor == "celery" and job.status == "queued" for job in jobs)
            done = [_wait(lambda job=job: _finished(catalog, job.id)) for job in jobs]
            alive = [worker.poll() is None for worker in workers]
        finally:
            for worker in workers:
                _stop(worker)
    assert alive == [True, True], (tmp_path / "worker.log").read_text()[-3000:]
    for job in done:
        assert job.status == "finished", (job.error, (tmp_path / "worker.log").read_text()[-3000:])
        assert job.attempts == 1 and job.worker.split(":")[0] == socket.gethostname()
        assert (ws.runs_dir / job.result["run_id"] / "bundle" / "bundle.json").is_file()


def test_a_sigkilled_worker_s_job_is_delivered_again_and_resumes(job_ws, rabbitmq_url, tmp_path):
    ws, catalog = job_ws
    with open(tmp_path / "worker.log", "wb") as log:
        first = _worker(ws, rabbitmq_url, log)
        try:
            job = submit_job("train", tiny_train("train.epochs=40"), workspace=ws, catalog=catalog,
                             broker=rabbitmq_url)
            _wait(lambda: get_job(job.id, catalog=catalog).progress.get("epoch", 0) >= 2)
        finally:
            _stop(first, signal.SIGKILL)  # the worker and its child, mid-training: nothing acknowledged
        assert get_job(job.id, catalog=catalog).status == "running"
        second = _worker(ws, rabbitmq_url, log)
        try:
            done = _wait(lambda: _finished(catalog, job.id))
        finally:
            _stop(second)
    assert done.status == "finished", (done.error, (tmp_path / "worker.log").read_text()[-3000:])
    assert done.attempts == 2 and done.result["resumed"] is True
    history = json.loads((ws.runs_dir / done.result["run_id"] / "history.json").read_text())
    assert [r["epoch"] for r in history] == list(range(1, 41))


def test_a_broker_restart_keeps_queued_jobs(job_ws, rabbitmq_url, tmp_path):
    if not _rabbitmqctl("status"):
        pytest.skip("rabbitmqctl cannot control the local RabbitMQ here: the restart cannot be tested")
    ws, catalog = job_ws
    job = submit_job("train", tiny_train(), workspace=ws, catalog=catalog, broker=rabbitmq_url)
    assert _rabbitmqctl("stop_app") and _rabbitmqctl("start_app")  # no worker yet: the job waits in the queue
    _wait(lambda: _listening(5672), timeout=60)
    with open(tmp_path / "worker.log", "wb") as log:
        worker = _worker(ws, rabbitmq_url, log)
        try:
            done = _wait(lambda: _finished(catalog, job.id))
        finally:
            _stop(worker)
    assert done.status == "finished", (done.error, (tmp_path / "worker.log").read_text()[-3000:])


def test_a_job_runs_over_redis_and_survives_its_worker_process_being_killed(job_ws, redis_url, tmp_path):
    ws, catalog = job_ws
    with open(tmp_path / "worker.log", "wb") as log:
        worker = _worker(ws, redis_url, log)
        try:
            job = submit_job("train", tiny_train("train.epochs=40"), workspace=ws, catalog=catalog, broker=redis_url)
            running = _wait(lambda: get_job(job.id, catalog=catalog).progress.get("epoch", 0) >= 1
                            and get_job(job.id, catalog=catalog))
            child = int(running.worker.rsplit(":", 1)[1])
            assert child != worker.pid  # the job runs in a prefork child, never in the parent
            os.kill(child, signal.SIGKILL)  # the child dies: the task is rejected and requeued (worker lost)
            done = _wait(lambda: _finished(catalog, job.id))
        finally:
            _stop(worker)
    assert done.status == "finished", (done.error, (tmp_path / "worker.log").read_text()[-3000:])
    assert done.attempts == 2 and done.result["resumed"] is True


def test_a_local_job_is_forwarded_and_a_worker_on_another_catalog_gives_it_back(job_ws, rabbitmq_url, tmp_path):
    """`jobs submit` without --broker beside a `serve --broker`: the service forwards it; a worker started on the
    wrong --db does not swallow it, it returns it to the queue for the right one."""
    from handlens.core.workspace import Workspace
    from handlens.jobs.api import forward_local_jobs

    ws, catalog = job_ws
    other = Workspace.open(tmp_path / "other-ws")
    job = submit_job("train", tiny_train(), workspace=ws, catalog=catalog)
    assert job.executor == "local"
    with open(tmp_path / "worker.log", "wb") as log:
        wrong = _worker(other, rabbitmq_url, log)
        try:
            time.sleep(3)  # its parent is up and consuming
            assert forward_local_jobs(catalog=catalog, broker=rabbitmq_url) == [job.id]
            assert get_job(job.id, catalog=catalog).executor == "celery"
            _wait(lambda: b"goes back to the queue" in (tmp_path / "worker.log").read_bytes(), timeout=60)
            right = _worker(ws, rabbitmq_url, log)
            try:
                done = _wait(lambda: _finished(catalog, job.id))
            finally:
                _stop(right)
        finally:
            _stop(wrong)
    assert done.status == "finished", (done.error, (tmp_path / "worker.log").read_text()[-3000:])
    assert forward_local_jobs(catalog=catalog, broker=rabbitmq_url) == []
