"""What a client of the jobs API cannot do (found by attacking it): make a worker or the service read files
outside the workspace through any field of a config, read server paths in job rows, point a job's log
elsewhere through a shared catalog, or slip an infinite number through JSON."""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient

from handlens.jobs.worker import work_locally
from handlens.serve.app import create_app
from handlens.serve.settings import ServeSettings

ORIGIN = {"Origin": "http://testserver"}
TINY = {"data": {"dataset": "colours"}, "model": {"backbone": "tiny_cnn", "weights": "none", "freeze": "full"},
        "train": {"epochs": 1, "batch_size": 8}, "tracking": {"backend": "none"}}


@pytest.fixture
def api(job_ws, tmp_path):
    ws, _ = job_ws
    outside = tmp_path / "outside"
    outside.mkdir()
    settings = ServeSettings(workspace=ws.root, db_url=ws.db_url, allowed_hosts=["testserver"])
    with TestClient(create_app(settings), client=("127.0.0.1", 50000)) as client:
        yield client, ws, outside


def _submit(client, kind, config):
    return client.post("/api/v1/jobs", json={"kind": kind, "config": config}, headers=ORIGIN)


def test_a_policy_file_outside_is_refused_before_it_is_read_and_not_echoed(api):
    client, _, outside = api
    (outside / "secret.conf").write_text('password: hunter2\n  db_secret: "s3cr3t-value"\n')
    answer = _submit(client, "train", {**TINY, "augment": {"policy": str(outside / "secret.conf")}})
    assert answer.status_code == 422 and "outside the workspace" in answer.text
    assert "s3cr3t-value" not in answer.text and "secret.conf" not in answer.text
    traversal = _submit(client, "train", {**TINY, "augment": {"policy": "../../outside/x"}})
    assert traversal.status_code == 422 and "outside the workspace" in traversal.text


def test_weights_files_and_study_overrides_outside_are_refused(api):
    client, _, outside = api
    (outside / "w.safetensors").write_bytes(b"\0" * 64)
    weights = _submit(client, "train", {**TINY, "model": {**TINY["model"], "weights": str(outside / "w.safetensors")}})
    assert weights.status_code == 422 and "model.weights" in weights.text
    study = _submit(client, "study", {"dataset": "colours", "preset": "quick",
                                      "overrides": [f"augment.policy={outside / 'p.yaml'}"]})
    assert study.status_code == 422 and "augment.policy" in study.text
    assert _submit(client, "train", {**TINY, "augment": {"policy": "basic"}}).status_code == 202  # presets stay


def test_a_bare_bundle_name_is_the_workspace_s_run_never_the_worker_s_folder(api, monkeypatch):
    client, ws, outside = api
    (outside / "mybundle").mkdir()
    (outside / "mybundle" / "bundle.json").write_text("{}")
    monkeypatch.chdir(outside)  # the service (and its local worker) started in this folder
    job = _submit(client, "evaluate", {"bundle": "mybundle"}).json()
    work_locally(ws, stop_when_idle=True)
    error = client.get(f"/api/v1/jobs/{job['id']}").json()["error"]
    assert "neither a bundle directory nor a run id" in error, error


def test_job_rows_and_events_carry_no_server_paths(api):
    client, ws, _ = api
    job = _submit(client, "evaluate", {"bundle": "nope", "images": "colours-not-there"}).json()
    work_locally(ws, stop_when_idle=True)
    rows = client.get("/api/v1/jobs").text
    events = client.get(f"/api/v1/jobs/{job['id']}/events").text
    for text in (rows, events):
        assert str(ws.root) not in text
    assert json.loads(rows)[0]["config"]["images"] == "colours-not-there"  # relative to the workspace
    assert client.get("/api/v1/jobs/" + "x" * 70).status_code == 422  # not a job id: not echoed back


def test_an_infinite_number_is_a_422(api):
    client, _, _ = api
    body = json.dumps({"kind": "train", "config": TINY}).replace('"epochs": 1', '"epochs": 1, "lr": 1e400')
    answer = client.post("/api/v1/jobs", content=body, headers={**ORIGIN, "Content-Type": "application/json"})
    assert answer.status_code == 422, answer.text


def test_the_worker_writes_the_log_only_in_the_job_s_folder(api):
    from sqlalchemy import update

    from handlens.data.catalog import Job, open_catalog

    client, ws, outside = api
    job = _submit(client, "evaluate", {"bundle": "nope"}).json()
    catalog = open_catalog(ws.db_url)
    with catalog.write_session() as session:  # someone with write access to a shared catalog
        session.execute(update(Job).where(Job.id == job["id"]).values(log_path=str(outside / "bashrc")))
    catalog.close()
    work_locally(ws, stop_when_idle=True)
    assert not (outside / "bashrc").exists()
    assert (ws.root / "jobs" / job["id"] / "log.txt").is_file()


def test_an_import_job_over_the_api_fetches_public_addresses_only_unless_allowed(api, job_ws):
    client, ws, _ = api
    (ws.root / "m.csv").write_text("url,label\nhttp://127.0.0.1:9/a.png,x\n")
    job = _submit(client, "import-urls", {"manifest": "m.csv", "dataset": "web"}).json()
    assert job["config"]["public_only"] is True
    work_locally(ws, stop_when_idle=True)
    done = client.get(f"/api/v1/jobs/{job['id']}").json()
    assert done["status"] == "finished" and done["result"]["counts"].get("refused") == 1, done
    settings = ServeSettings(workspace=ws.root, db_url=ws.db_url, allowed_hosts=["testserver"],
                             allow_private_urls=True)
    with TestClient(create_app(settings), client=("127.0.0.1", 50000)) as open_client:
        allowed = open_client.post("/api/v1/jobs", json={"kind": "import-urls", "config": {
            "manifest": "m.csv", "dataset": "web"}}, headers=ORIGIN).json()
        assert allowed["config"]["public_only"] is False
