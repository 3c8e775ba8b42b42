"""The runs page's resources: every model with what tells it apart, the studies, a study's trials."""

import json

import pytest
from fastapi.testclient import TestClient

from handlens.serve.app import create_app
from handlens.serve.settings import ServeSettings
from tests.conftest import colour_tree, split_workspace, tiny_config


@pytest.fixture(scope="module")
def runs_served(tmp_path_factory):
    """A workspace with one named run and one study's refitted winner, served."""
    from handlens.search.study import StudyConfig, run_study
    from handlens.train.run import train

    root = tmp_path_factory.mktemp("runs")
    ws = split_workspace(root, colour_tree(root / "colours"))
    named = train(tiny_config("tracking.name=my baseline"), ws)
    space = root / "space.yaml"
    space.write_text(json.dumps({"space": {"model.head": ["logistic", "linear"]}, "fixed": {
        "model.backbone": "tiny_cnn", "model.weights": "none", "model.freeze": "frozen", "train.epochs": 2,
        "train.batch_size": 8}}))
    study = run_study(StudyConfig(dataset="colours", space=str(space), cv=3, tracking="none", name="heads",
                                  sampler="grid"), ws)
    settings = ServeSettings(workspace=ws.root, db_url=ws.db_url, allowed_hosts=["testserver"])
    with TestClient(create_app(settings), client=("127.0.0.1", 50000)) as client:
        yield client, named.run_id, study


def test_runs_lists_every_model_with_what_tells_it_apart(runs_served):
    client, named_id, study = runs_served
    rows = client.get("/api/v1/runs", params={"dataset": "colours"}).json()
    by_id = {r["id"]: r for r in rows}
    assert by_id[named_id]["name"] == "my baseline" and by_id[named_id]["backbone"] == "tiny_cnn"
    refit = next(r for r in rows if r["study"] == "heads")
    assert refit["name"].startswith("study heads · trial ") and refit["cv_mean"] == pytest.approx(
        study.winner.cv_mean, abs=1e-6)
    assert refit["freeze"] == "frozen" and refit["size"] and refit["seconds"] is not None
    assert client.get("/api/v1/runs", params={"dataset": "elsewhere"}).json() == []


def test_studies_and_a_studys_trials_for_parallel_coordinates(runs_served):
    client, _, study = runs_served
    listed = client.get("/api/v1/studies", params={"dataset": "colours"}).json()
    assert [s["name"] for s in listed] == ["heads"] and listed[0]["trials"] == {"complete": 2}
    detail = client.get("/api/v1/studies/heads").json()
    assert {t["params"]["model.head"] for t in detail["trials"]} == {"logistic", "linear"}
    assert all(t["cv_mean"] is not None and t["cv_std"] is not None for t in detail["trials"])
    assert detail["winner"] == study.winner.number and detail["verdict"].startswith("winner trial")
    assert client.get("/api/v1/studies/nope").status_code == 404
