"""POST /api/v1/models/{id}/detect: a real tiny detector (and crop classifier) of the sigma demo, served; the
boxes, their labels and per-box maps, the bounds on the work, and the refusals between the two kinds."""

from __future__ import annotations

import base64
import io
import shutil

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from handlens.serve.app import create_app
from handlens.serve.settings import ServeSettings
from tests.serve.conftest import png_bytes


@pytest.fixture(scope="module")
def detecting(sigma_workspace, sigma_classifier, tmp_path_factory):
    """(client, detector id, classifier id, scene image bytes, a catalog scene image id): the sigma demo's
    workspace copied (the session's copy stays untouched), served."""
    from sqlalchemy import select

    from handlens.core.workspace import Workspace
    from handlens.data.catalog import Dataset, open_catalog
    from handlens.data.catalog import Image as ImageRow

    root = tmp_path_factory.mktemp("detect") / "ws"
    shutil.copytree(sigma_workspace["workspace"].root, root)
    ws = Workspace.open(root)
    demo = sigma_workspace["demo"]
    catalog = open_catalog(ws.db_url)
    try:
        with catalog.session() as session:
            scene = session.scalars(select(ImageRow.id).join(Dataset, Dataset.id == ImageRow.dataset_id)
                                    .where(Dataset.name == demo.scenes, ImageRow.path.endswith("sigma_002.png"))).one()
    finally:
        catalog.close()
    picture = (demo.report.out / demo.report.images[1]).read_bytes()  # the tiny detector finds boxes on 1 and 2
    settings = ServeSettings(workspace=ws.root, db_url=ws.db_url, max_upload_bytes=2_000_000, max_pixels=1_000_000,
                             max_backward_passes=16, allowed_hosts=["testserver"])
    with TestClient(create_app(settings), client=("127.0.0.1", 50000)) as client:
        yield client, sigma_workspace["detector_run"], sigma_classifier.parent.name, picture, scene


def detect(client, model_id, data=None, *, image_id=None, **query):
    url = f"/api/v1/models/{model_id}/detect"
    if image_id is not None:
        return client.post(url, params=query, json={"image_id": image_id})
    return client.post(url, params=query, files={"file": ("scene.png", data, "image/png")})


def decoded(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64)))


def test_an_upload_gets_the_detectors_boxes_in_its_own_pixels(detecting):
    client, detector, _, picture, _ = detecting
    answer = detect(client, detector, picture, score=0.0)
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["size"] == [480, 400] and body["tiles"] >= 1 and body["model"] == detector
    assert body["count"] == len(body["boxes"]) > 0 and body["explained"] == 0
    assert body["classifier"] is None and body["method"] is None and body["overlay_png"] is None
    scores = [b["score"] for b in body["boxes"]]
    assert scores == sorted(scores, reverse=True)
    for box in body["boxes"]:
        x0, y0, x1, y1 = box["box"]
        assert 0 <= x0 < x1 <= 480 and 0 <= y0 < y1 <= 400
        cx0, cy0, cx1, cy1 = box["crop"]
        assert cx0 <= x0 and cy0 <= y0 and cx1 >= x1 and cy1 >= y1  # the margin around it
        assert box["detected"] == "sigma-clast" and box["label"] is None and box["map_png"] is None
    # the detector's calibrated threshold, by default: never more boxes than with no threshold
    default = detect(client, detector, picture).json()
    assert default["score_threshold"] > 0 and default["count"] <= body["count"]


def test_a_classifier_and_method_label_and_explain_each_box(detecting):
    client, detector, classifier, _, scene = detecting
    query = {"classifier": classifier, "method": "gradcam", "score": 0.0, "overlay": "true"}
    answer = detect(client, detector, image_id=scene, **query)
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["image_id"] == scene and body["classifier"] == classifier and body["method"] == "gradcam"
    assert body["count"] > 0 and body["explained"] == body["count"] and not body["cached"]
    for box in body["boxes"]:
        assert box["label"] in ("cw", "ccw") and box["explained"]
        assert sum(box["probabilities"].values()) == pytest.approx(1.0, abs=1e-4)
        assert box["label"] == max(box["probabilities"], key=box["probabilities"].get)
        shown = decoded(box["map_png"])
        width, height = box["crop"][2] - box["crop"][0], box["crop"][3] - box["crop"][1]
        assert shown.mode == "RGBA" and max(shown.size) <= 96
        assert abs(shown.size[0] / shown.size[1] - width / height) < 0.15  # the crop's shape
    assert decoded(body["overlay_png"]).size == tuple(body["size"])
    again = detect(client, detector, image_id=scene, **query).json()
    assert again["cached"] and again["boxes"] == body["boxes"]
    labelled = detect(client, detector, image_id=scene, classifier=classifier, score=0.0).json()
    assert labelled["explained"] == 0 and all(b["label"] in ("cw", "ccw") and b["map_png"] is None
                                              for b in labelled["boxes"])


def test_the_services_tile_limit_bounds_detection_and_explained_boxes(detecting, monkeypatch):
    client, detector, classifier, picture, _ = detecting
    settings = client.app.state.handlens.settings
    tiles = detect(client, detector, picture, score=0.0).json()["tiles"]
    assert tiles > 1, "the scene should take several tiles at the tiny detector's scale"
    monkeypatch.setattr(settings, "max_explain_tiles", tiles - 1)
    refused = detect(client, detector, picture, score=0.0)
    assert refused.status_code == 422 and f"takes {tiles} tiles" in refused.json()["detail"]
    assert "single_pass" in refused.json()["detail"]
    one = detect(client, detector, picture, score=0.0, single_pass="true")
    assert one.status_code == 200 and one.json()["tiles"] == 1  # one tile: within the limit
    monkeypatch.setattr(settings, "max_explain_tiles", tiles)
    body = detect(client, detector, picture, score=0.0, classifier=classifier, method="saliency").json()
    assert body["count"] > tiles, "the scene should hold more boxes than the limit"
    # the best boxes explained, as many as the limit; the others labelled only
    assert body["explained"] == tiles and all(b["explained"] for b in body["boxes"][:tiles])
    assert all(b["label"] and not b["explained"] and b["map_png"] is None for b in body["boxes"][tiles:])


def test_no_detection_is_an_empty_answer(detecting, monkeypatch):
    from handlens.detect.infer import Detections, Detector

    client, detector, classifier, _, _ = detecting
    empty = Detections(boxes=np.zeros((0, 4), np.float32), scores=np.zeros(0, np.float32), labels=[], size=(40, 40))
    monkeypatch.setattr(Detector, "detect", lambda *a, **k: empty)
    for query in ({}, {"classifier": classifier, "method": "gradcam", "overlay": "true"}):
        answer = detect(client, detector, png_bytes(size=(40, 40)), **query)
        assert answer.status_code == 200, answer.text
        body = answer.json()
        assert body["boxes"] == [] and body["count"] == body["explained"] == 0 and body["size"] == [40, 40]


def test_each_kind_is_refused_where_the_other_is_needed(detecting):
    client, detector, classifier, picture, scene = detecting
    for route in ("predict", "explain", "trust"):
        answer = client.post(f"/api/v1/models/{detector}/{route}", json={"image_id": scene})
        assert answer.status_code == 422, (route, answer.text)
        assert "is a detector" in answer.json()["detail"] and f"/models/{detector}/detect" in answer.json()["detail"]
    assert client.get(f"/api/v1/models/{detector}/browse").status_code == 422
    answer = detect(client, classifier, picture)
    assert answer.status_code == 422 and "not a detector" in answer.json()["detail"]
    answer = detect(client, detector, picture, classifier=detector)
    assert answer.status_code == 422 and "?classifier=" in answer.json()["detail"]
    answer = detect(client, detector, picture, method="gradcam")
    assert answer.status_code == 422 and "give ?classifier=" in answer.json()["detail"]
    assert detect(client, detector, picture, classifier="no-such-model").status_code == 404
    assert detect(client, "no-such-model", picture).status_code == 404
    assert detect(client, detector, picture, classifier=classifier, method="gradcamm").status_code == 422
    assert detect(client, detector, picture, margin=3).status_code == 422
    answer = client.post(f"/api/v1/models/{detector}/detect", json={"image_id": scene, "method": "gradcam"})
    assert answer.status_code == 422 and "query parameters" in answer.json()["detail"]
    # a classifier still works beside the detector, loaded in the same pool
    assert client.post(f"/api/v1/models/{classifier}/predict", json={"image_id": scene}).status_code == 200


@pytest.mark.parametrize(("payload", "status", "words"), [
    (b"%PDF-1.4 not an image", 415, "not an image"),
    (b"", 422, "empty"),
    (b"\x89PNG" + b"0" * 2_100_000, 413, "exceeds"),
    (png_bytes(size=(1200, 1000)), 413, "pixels"),
])
def test_detect_checks_uploads_as_predict_does(detecting, payload, status, words):
    client, detector, _, _, _ = detecting
    answer = detect(client, detector, payload)
    assert answer.status_code == status, answer.text
    assert words in answer.json()["detail"]


def test_models_lists_detectors_with_their_kind_and_map(detecting):
    client, detector, classifier, _, _ = detecting
    models = {m["id"]: m for m in client.get("/api/v1/models").json()}
    assert models[detector]["kind"] == "detector" and models[classifier]["kind"] == "classifier"
    assert models[detector]["classes"] == ["sigma-clast"] and models[detector]["layers"] == []
    assert 0 <= models[detector]["metrics"]["val"]["map_50"] <= 1
    detail = client.get(f"/api/v1/models/{detector}")
    assert detail.status_code == 200 and detail.json()["kind"] == "detector"
    assert client.get(f"/api/v1/models/{detector}/evaluations").status_code == 200
    rows = client.get("/api/v1/runs").json()
    assert classifier in [r["id"] for r in rows] and detector not in [r["id"] for r in rows]
    assert client.get("/readyz").json()["models"] == 2


def test_the_schema_holds_for_a_detector_and_its_routes(detecting):
    """schemathesis on the routes a detector id reaches (as tests/serve/test_schema.py does for every route):
    no 5xx, every answer declared."""
    import schemathesis
    from hypothesis import HealthCheck, given, settings
    from schemathesis.specs.openapi.checks import positive_data_acceptance

    client, detector, _, _, _ = detecting
    schema = schemathesis.openapi.from_asgi("/openapi.json", client.app)
    wanted = {("POST", "/api/v1/models/{model_id}/detect"), ("POST", "/api/v1/models/{model_id}/predict"),
              ("GET", "/api/v1/models/{model_id}"), ("GET", "/api/v1/models"),
              ("GET", "/api/v1/models/{model_id}/browse")}
    operations = [op for op in (r.ok() for r in schema.get_all_operations())
                  if (op.method.upper(), op.path) in wanted]
    assert len(operations) == len(wanted)
    failures = []
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(max_examples=15, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def check(case):
            if case.path_parameters and "model_id" in case.path_parameters:
                case.path_parameters["model_id"] = detector
            case.headers = {**(case.headers or {}), "Host": "127.0.0.1"}
            case.call_and_validate(excluded_checks=[positive_data_acceptance])

        try:
            check()
        except Exception as exc:  # every operation's failure, reported together
            failures.append(f"{operation.method.upper()} {operation.path}: {str(exc)[:1500]}")
    assert not failures, "\n\n".join(failures)
