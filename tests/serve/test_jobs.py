"""The jobs API: submit (202, key rule), list, show, events (server-sent), cancel; the job-kinds schema."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from handlens.jobs.worker import work_locally
from handlens.serve.app import create_app
from handlens.serve.settings import ServeSettings
from tests.conftest import tiny_train

ORIGIN = {"Origin": "http://testserver"}


@pytest.fixture
def jobs_client(job_ws):
    ws, _ = job_ws
    settings = ServeSettings(workspace=ws.root, db_url=ws.db_url, allowed_hosts=["testserver"])
    with TestClient(create_app(settings), client=("127.0.0.1", 50000)) as client:
        yield client, ws


def _events(text: str) -> list[tuple[str, str]]:
    out = []
    for block in text.strip().split("\n\n"):
        lines = dict(line.split(": ", 1) for line in block.splitlines() if not line.startswith(":"))
        if lines:
            out.append((lines["event"], lines["data"]))
    return out


def test_submit_run_and_watch_a_training_job(jobs_client):
    import json

    client, ws = jobs_client
    answer = client.post("/api/v1/jobs", json={"kind": "train", "config": tiny_train()}, headers=ORIGIN)
    assert answer.status_code == 202, answer.text
    job = answer.json()
    assert job["status"] == "queued" and job["kind"] == "train" and "log_path" not in job
    assert [j["id"] for j in client.get("/api/v1/jobs").json()] == [job["id"]]
    work_locally(ws, stop_when_idle=True)
    shown = client.get(f"/api/v1/jobs/{job['id']}").json()
    assert shown["status"] == "finished" and shown["result"]["run_id"] and "state" not in shown["result"]
    stream = client.get(f"/api/v1/jobs/{job['id']}/events")
    assert stream.headers["content-type"].startswith("text/event-stream")
    events = _events(stream.text)
    kinds = [kind for kind, _ in events]
    assert kinds == ["progress", "status"]  # an ended job: its last progress, then the status that closes the stream
    status = json.loads(events[-1][1])
    assert status["status"] == "finished" and status["result"]["bundle"] and status["progress"]["epoch"] == 2
    progress = json.loads(next(data for kind, data in events if kind == "progress"))
    assert progress["epoch"] == 2 and progress["epochs"] == 2 and "val_macro_f1" in progress["metrics"]
    assert client.get("/api/v1/jobs", params={"status": "finished"}).json()[0]["id"] == job["id"]


def test_a_bad_job_is_a_422_that_names_the_key(jobs_client):
    client, _ = jobs_client
    config = tiny_train()
    config["model"]["backbon"] = "x"
    answer = client.post("/api/v1/jobs", json={"kind": "train", "config": config}, headers=ORIGIN)
    assert answer.status_code == 422 and "model.backbon" in answer.json()["detail"]
    answer = client.post("/api/v1/jobs", json={"kind": "nope", "config": {}}, headers=ORIGIN)
    assert answer.status_code == 422 and "train" in answer.json()["detail"]
    assert client.get("/api/v1/jobs/job-nope").status_code == 404
    assert client.get("/api/v1/jobs/job-nope/events").status_code == 404


def test_cancel_a_queued_job_over_the_api(jobs_client):
    client, ws = jobs_client
    job = client.post("/api/v1/jobs", json={"kind": "train", "config": tiny_train()}, headers=ORIGIN).json()
    answer = client.post(f"/api/v1/jobs/{job['id']}/cancel", headers=ORIGIN)
    assert answer.status_code == 200 and answer.json()["status"] == "cancelled"
    assert client.post(f"/api/v1/jobs/{job['id']}/cancel", headers=ORIGIN).status_code == 409
    assert work_locally(ws, stop_when_idle=True) == 0


def test_submitting_needs_the_key_when_one_is_set(job_ws):
    ws, _ = job_ws
    settings = ServeSettings(workspace=ws.root, db_url=ws.db_url, api_key="s3cret", allowed_hosts=["testserver"])
    with TestClient(create_app(settings), client=("127.0.0.1", 50000)) as client:
        body = {"kind": "train", "config": tiny_train()}
        assert client.post("/api/v1/jobs", json=body, headers=ORIGIN).status_code == 403
        ok = client.post("/api/v1/jobs", json=body, headers={**ORIGIN, "X-API-Key": "s3cret"})
        assert ok.status_code == 202
        job_id = ok.json()["id"]
        assert client.post(f"/api/v1/jobs/{job_id}/cancel", headers=ORIGIN).status_code == 403
        assert client.get("/api/v1/jobs").status_code == 200  # reading stays open


def test_job_kinds_list_their_config_schema(jobs_client):
    client, _ = jobs_client
    kinds = {k["name"]: k for k in client.get("/api/v1/job-kinds").json()}
    assert set(kinds) == {"train", "study", "evaluate", "explain", "import-urls", "detect-train"}
    assert "tiles_per_image" in kinds["detect-train"]["config_schema"]["properties"]
    assert "model" in kinds["train"]["config_schema"]["properties"]
    assert kinds["import-urls"]["queue"] == "import"


def test_over_the_api_a_job_reads_and_writes_only_inside_the_workspace(jobs_client, tmp_path):
    client, ws = jobs_client
    outside = tmp_path / "elsewhere.csv"
    outside.write_text("url,label\nhttp://127.0.0.1:1/a.png,x\n")
    for kind, config in (("import-urls", {"manifest": str(outside), "dataset": "web"}),
                         ("import-urls", {"manifest": "m.csv", "dataset": "web", "dest": "../../out"}),
                         ("explain", {"bundle": "/etc", "subset": "test"}),
                         ("evaluate", {"bundle": "RUN", "images": "/tmp"}),
                         ("detect-train", {"dataset": "d", "weights": str(outside)})):
        answer = client.post("/api/v1/jobs", json={"kind": kind, "config": config}, headers=ORIGIN)
        assert answer.status_code == 422, (kind, answer.text)
        assert "outside the workspace" in answer.json()["detail"]
    inside = ws.root / "m.csv"
    inside.write_text("url,label\n")
    ok = client.post("/api/v1/jobs", json={"kind": "import-urls", "config": {"manifest": "m.csv", "dataset": "web"}},
                     headers=ORIGIN)
    assert ok.status_code == 202, ok.text
    assert client.get("/api/v1/jobs").json()[0]["kind"] == "import-urls"
