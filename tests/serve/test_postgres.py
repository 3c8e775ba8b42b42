"""A team's catalog on PostgreSQL: import, split, train, evaluate and the service's catalog, browse, predict,
explain, trust and runs routes against the real server (skipped with a reason where none runs)."""

import time

import pytest
from fastapi.testclient import TestClient

from handlens.serve.app import create_app
from handlens.serve.settings import ServeSettings
from tests.conftest import colour_tree, split_workspace, tiny_config


@pytest.fixture(scope="module")
def pg_served(tmp_path_factory, postgres_url):
    from handlens.train.run import train

    root = tmp_path_factory.mktemp("pg")
    # the session's PostgreSQL database is shared with other modules' tests: a dataset name of its own
    ws = split_workspace(root, colour_tree(root / "colours", per_class=8), "pg_colours", db_url=postgres_url)
    run_id = train(tiny_config("data.dataset=pg_colours", "tracking.name=on postgres"), ws).run_id
    settings = ServeSettings(workspace=ws.root, db_url=postgres_url, allowed_hosts=["testserver"])
    with TestClient(create_app(settings), client=("127.0.0.1", 50000)) as client:
        yield client, run_id, ws


def test_the_catalog_and_a_run_live_in_postgresql(pg_served):
    from handlens.train.evaluate import evaluate

    client, run_id, ws = pg_served
    assert ws.db_url.startswith("postgresql")
    datasets = client.get("/api/v1/datasets").json()
    assert "pg_colours" in [d["name"] for d in datasets]
    assert client.get("/api/v1/images", params={"dataset": "pg_colours", "limit": 5}).json()["total"] == 24
    report = evaluate(run_id, ws)
    assert report["n"] > 0 and report["leakage"]["verdict"].startswith(("no leak", "leaks"))
    runs = client.get("/api/v1/runs", params={"dataset": "pg_colours"}).json()
    assert runs[0]["name"] == "on postgres" and runs[0]["seconds"] is not None
    from handlens.audit.report import audit

    audited = audit(run_id, ws, sample=4, worst=2, steps=3)
    assert {b["name"] for b in audited.baselines} >= {"size only", "majority class"}  # facts read from PostgreSQL
    assert audited.leakage["verdict"].startswith(("no leak", "leaks"))


def test_browse_predict_explain_and_trust_on_postgresql(pg_served):
    client, run_id, _ = pg_served
    state = client.post(f"/api/v1/models/{run_id}/predictions").json()
    deadline = time.time() + 60
    while state["state"] == "computing" and time.time() < deadline:
        time.sleep(0.2)
        state = client.post(f"/api/v1/models/{run_id}/predictions").json()
    assert state["state"] == "ready" and state["of"] == 24
    test = client.get(f"/api/v1/models/{run_id}/browse", params={"subset": "test"}).json()
    assert test["total"] > 0 and sum(map(sum, test["confusion"])) == test["total"]
    image_id = test["items"][0]["id"]
    assert client.post(f"/api/v1/models/{run_id}/predict", json={"image_id": image_id}).status_code == 200
    explained = client.post(f"/api/v1/models/{run_id}/explain", json={"image_id": image_id}).json()
    assert explained["shortcuts"]["verdict"] in ("shortcut warning", "no shortcut sign", "empty map")
    trust = client.post(f"/api/v1/models/{run_id}/trust", json={"image_id": image_id, "steps": 4}).json()
    assert trust["verdict"] in ("faithful", "not better than random", "worse than random")
    region = {"polygons": [[[0, 0], [20, 0], [20, 20], [0, 20]]]}
    assert client.post(f"/api/v1/images/{image_id}/regions", json=region).status_code == 201
    assert client.get(f"/api/v1/images/{image_id}").json()["regions"][0]["polygons"] == region["polygons"]
