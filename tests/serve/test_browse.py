"""Browsing on the server: every image paged with exact counts, predictions stored once and filtered by result."""

import time


def wait_ready(client, run_id, timeout=60):
    deadline = time.time() + timeout
    state = client.post(f"/api/v1/models/{run_id}/predictions").json()
    while state["state"] == "computing" and time.time() < deadline:
        time.sleep(0.2)
        state = client.post(f"/api/v1/models/{run_id}/predictions").json()
    return state


def test_pages_cover_every_image_with_exact_counts(served):
    client, run_id, _ = served
    first = client.get(f"/api/v1/models/{run_id}/browse", params={"limit": 10}).json()
    everything = client.get("/api/v1/images", params={"dataset": "colours", "limit": 1000}).json()["total"]
    assert first["total"] == everything and len(first["items"]) == 10
    assert first["covers"] == f"1-10 of {everything} images"
    ids = [i["id"] for page in range(0, everything, 10) for i in client.get(
        f"/api/v1/models/{run_id}/browse", params={"limit": 10, "offset": page}).json()["items"]]
    assert len(ids) == len(set(ids)) == everything  # every image once, in pages
    red = client.get(f"/api/v1/models/{run_id}/browse", params={"label": "red", "subset": "test"}).json()
    assert red["items"] and all(i["label"] == "red" and i["subset"] == "test" for i in red["items"])
    named = client.get(f"/api/v1/models/{run_id}/browse", params={"q": "GREEN_0"}).json()
    assert named["items"] and all("green_0" in i["name"] for i in named["items"])


def test_result_filters_wait_for_stored_predictions_then_cover_all_images(served):
    client, run_id, _ = served
    state = wait_ready(client, run_id)
    assert state["state"] == "ready" and state["done"] == state["of"] > 0, state
    test = client.get(f"/api/v1/models/{run_id}/browse", params={"subset": "test", "limit": 500}).json()
    assert all(i["predicted"] in test["classes"] for i in test["items"])
    wrong = client.get(f"/api/v1/models/{run_id}/browse", params={"subset": "test", "result": "wrong"}).json()
    right = client.get(f"/api/v1/models/{run_id}/browse", params={"subset": "test", "result": "right"}).json()
    assert wrong["total"] + right["total"] == test["total"] and wrong["complete"]
    assert all(not i["correct"] for i in wrong["items"])
    # a confusion cell's count is exactly the images its filter shows
    matrix = test["confusion"]
    assert sum(map(sum, matrix)) == test["total"]
    classes = test["classes"]
    for i, truth in enumerate(classes):
        for j, guess in enumerate(classes):
            cell = client.get(f"/api/v1/models/{run_id}/browse",
                              params={"subset": "test", "label": truth, "predicted": guess}).json()
            assert cell["total"] == matrix[i][j]
    sure = client.get(f"/api/v1/models/{run_id}/browse", params={"min_confidence": 0.99}).json()
    assert all(i["confidence"] >= 0.99 for i in sure["items"])


def test_predictions_are_read_back_after_a_restart(served, tmp_path):
    from handlens.serve.predictions import PredictionStore

    client, run_id, _ = served
    state = client.app.state.handlens
    assert wait_ready(client, run_id)["state"] == "ready"
    model = state.pool.get(run_id)
    labelset = model.bundle.manifest.get("labelset")
    fresh = PredictionStore(state.workspace.cache_dir)  # a new service process on the same workspace
    assert fresh.get(model, labelset).state == "ready"
    assert PredictionStore(tmp_path).get(model, labelset).state == "none"


def test_a_file_changed_since_import_is_skipped_and_named_never_scored(tmp_path):
    """Scoring the dataset reads files as the service reads every file: one replaced since import is refused."""
    from fastapi.testclient import TestClient
    from PIL import Image

    from handlens.serve.app import create_app
    from handlens.serve.settings import ServeSettings
    from handlens.train.run import train
    from tests.conftest import colour_tree, split_workspace, tiny_config

    tree = colour_tree(tmp_path / "colours", per_class=6)
    ws = split_workspace(tmp_path, tree)
    run_id = train(tiny_config(), ws).run_id
    victim = sorted((tree / "red").iterdir())[0]
    Image.new("RGB", (40, 40), (0, 0, 255)).save(victim)  # another picture under the imported name
    settings = ServeSettings(workspace=ws.root, db_url=ws.db_url, allowed_hosts=["testserver"])
    with TestClient(create_app(settings), client=("127.0.0.1", 50000)) as client:
        state = wait_ready(client, run_id)
        assert state["state"] == "ready" and state["skipped"] == 1, state
        assert state["skipped_examples"][0].startswith(victim.name)
        page = client.get(f"/api/v1/models/{run_id}/browse", params={"q": victim.name}).json()
        assert page["items"][0]["predicted"] is None  # not scored, still listed


def test_images_added_after_scoring_make_the_predictions_stale_until_they_are_scored(tmp_path):
    from fastapi.testclient import TestClient
    from PIL import Image

    from handlens.data.catalog import open_catalog
    from handlens.data.importer import import_path
    from handlens.serve.app import create_app
    from handlens.serve.settings import ServeSettings
    from handlens.train.run import train
    from tests.conftest import colour_tree, split_workspace, tiny_config

    ws = split_workspace(tmp_path, colour_tree(tmp_path / "colours", per_class=6))
    run_id = train(tiny_config(), ws).run_id
    settings = ServeSettings(workspace=ws.root, db_url=ws.db_url, allowed_hosts=["testserver"])
    with TestClient(create_app(settings), client=("127.0.0.1", 50000)) as client:
        assert wait_ready(client, run_id)["state"] == "ready"
        extra = tmp_path / "colours" / "red"
        for i in range(3):
            Image.new("RGB", (40, 40), (200 + i, 30, 30)).save(extra / f"late_{i}.png")
        catalog = open_catalog(ws.db_url)
        try:
            import_path(catalog, tmp_path / "colours", "colours", workers=1)
        finally:
            catalog.close()
        page = client.get(f"/api/v1/models/{run_id}/browse", params={"result": "wrong"}).json()
        assert page["predictions"]["state"] == "stale" and page["predictions"]["of"] == 3
        assert not page["complete"] and "3 images not scored yet" in page["covers"]  # never counts of a subset
        assert wait_ready(client, run_id)["state"] == "ready"
        late = client.get(f"/api/v1/models/{run_id}/browse", params={"q": "late_"}).json()
        assert len(late["items"]) == 3 and all(i["predicted"] for i in late["items"])
        assert client.get(f"/api/v1/models/{run_id}/browse", params={"result": "wrong"}).json()["complete"]
