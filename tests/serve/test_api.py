"""The service through FastAPI's TestClient on a tiny trained bundle: routes, limits, batching, cache."""

import asyncio
import base64
import io
import json
import zlib

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from handlens.serve.app import create_app
from handlens.serve.pool import MicroBatcher
from tests.conftest import tiny_config
from tests.serve.conftest import png_bytes


def test_health_metrics_and_docs(served):
    client, _, _ = served
    assert client.get("/livez").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["models"] == 1
    assert client.get("/openapi.json").json()["paths"]["/api/v1/models/{model_id}/predict"]
    assert client.get("/docs").status_code == 200
    client.get("/api/v1/models")
    text = client.get("/metrics").text
    assert 'route="GET /api/v1/models"' in text and "handlens_queue_depth" in text


def test_models_and_catalog_resources(served):
    client, run_id, _ = served
    models = client.get("/api/v1/models").json()
    assert models[0]["id"] == run_id and models[0]["classes"] == ["blue", "green", "red"]
    assert models[0]["backbone"] == "tiny_cnn" and models[0]["layers"][0]
    assert models[0]["name"] == run_id  # one model: nothing differs, no --name
    assert "head" not in models[0]["layers"]  # the menu offers only layers a map can be drawn from
    detail = client.get(f"/api/v1/models/{run_id}").json()
    assert set(detail["split_membership"]) == {"train", "val", "test"} and "confusion" in detail["metrics"]["test"]
    assert client.get("/api/v1/datasets").json()[0]["name"] == "colours"
    labelsets = client.get("/api/v1/datasets/colours/labelsets").json()
    assert labelsets[0]["classes"] == ["blue", "green", "red"]
    listing = client.get("/api/v1/images", params={"dataset": "colours", "subset": "test", "limit": 5}).json()
    assert listing["total"] == 12 and len(listing["items"]) == 5 and listing["items"][0]["subset"] == "test"
    one = client.get(f"/api/v1/images/{listing['items'][0]['id']}").json()
    assert one["labels"]["default"] == listing["items"][0]["label"] and one["splits"][0]["subset"] == "test"
    thumb = client.get(f"/api/v1/images/{one['id']}/thumbnail", params={"size": 32})
    assert thumb.headers["content-type"] == "image/jpeg" and Image.open(io.BytesIO(thumb.content)).size == (32, 32)
    assert client.get(f"/api/v1/images/{one['id']}/file").content[:4] == b"\x89PNG"
    assert client.get("/api/v1/images/999999").status_code == 404
    assert client.get("/api/v1/datasets/nope/labelsets").status_code == 404


def test_predict_by_upload_and_by_catalog_id(served):
    client, run_id, _ = served
    answer = client.post(f"/api/v1/models/{run_id}/predict", files={"file": ("red.png", png_bytes())},
                         params={"top_k": 2})
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert len(body["top"]) == 2 and sum(body["probabilities"].values()) == pytest.approx(1, abs=1e-4)
    image_id = client.get("/api/v1/images", params={"dataset": "colours", "limit": 1}).json()["items"][0]["id"]
    by_id = client.post(f"/api/v1/models/{run_id}/predict", json={"image_id": image_id})
    assert by_id.status_code == 200 and by_id.json()["image_id"] == image_id


def test_explain_returns_an_overlay_and_is_cached(served):
    client, run_id, _ = served
    files = {"file": ("red.png", png_bytes())}
    first = client.post(f"/api/v1/models/{run_id}/explain", files=files, data={"method": "gradcam", "output": "both"})
    assert first.status_code == 200, first.text
    body = first.json()
    assert not body["cached"] and body["method"] == "gradcam" and body["layer"]
    overlay = Image.open(io.BytesIO(base64.b64decode(body["overlay_png"])))
    assert overlay.size == (40, 40)  # drawn on the uploaded image itself
    assert np.asarray(body["map"]).shape == tuple(body["map_shape"]) == (32, 32)  # the raw map: the model input
    again = client.post(f"/api/v1/models/{run_id}/explain", files=files, data={"method": "gradcam"}).json()
    assert again["cached"] and again["overlay_png"] == body["overlay_png"] and "map" not in again
    other = client.post(f"/api/v1/models/{run_id}/explain", files=files,
                        data={"method": "gradcam", "target": "blue"}).json()
    assert not other["cached"] and other["target"] == "blue"


def test_a_patch_trained_model_is_explained_tile_by_tile(served):
    """It is explained as it sees images: patches at its own scale, their maps stitched over the image."""
    from handlens.core.workspace import Workspace
    from handlens.train.run import train

    client, _, root = served
    patches = ["preprocess.patches.enabled=true", "preprocess.patches.size=16", "preprocess.patches.max_side=0",
               "preprocess.size=16"]
    run_id = train(tiny_config(*patches), Workspace.open(root / "ws")).run_id
    assert next(m for m in client.get("/api/v1/models").json() if m["id"] == run_id)["patch_trained"]
    upload = {"file": ("wide.png", png_bytes(size=(48, 32)))}
    body = client.post(f"/api/v1/models/{run_id}/explain", files=upload,
                       data={"method": "gradcam", "output": "both"}).json()
    assert body["map_shape"] == [32, 48]  # over the whole image, not one 16-px model input
    assert Image.open(io.BytesIO(base64.b64decode(body["overlay_png"]))).size == (48, 32)
    assert body["layer"] and sum(body["probabilities"].values()) == pytest.approx(1, abs=1e-3)
    huge = {"file": ("huge.png", png_bytes(size=(400, 300)))}
    refused = client.post(f"/api/v1/models/{run_id}/explain", files=huge, data={"method": "gradcam"})
    assert refused.status_code == 422 and "tiles" in refused.json()["detail"]


def test_expensive_methods_have_budgets(served):
    client, run_id, _ = served
    image_id = client.get("/api/v1/images", params={"dataset": "colours", "limit": 1}).json()["items"][0]["id"]
    over = client.post(f"/api/v1/models/{run_id}/explain",
                       json={"image_id": image_id, "method": "integrated_gradients", "params": {"steps": 500}})
    assert over.status_code == 422 and "limit of 16" in over.json()["detail"]
    within = client.post(f"/api/v1/models/{run_id}/explain",
                         json={"image_id": image_id, "method": "integrated_gradients", "params": {"steps": 8}})
    assert within.status_code == 200, within.text
    bad = client.post(f"/api/v1/models/{run_id}/explain", json={"image_id": image_id, "method": "gradcam",
                                                                "layer": "nope"})
    assert bad.status_code == 422 and "layers are" in bad.json()["detail"]


def bomb_png(width: int, height: int) -> bytes:
    """A valid PNG header announcing width x height pixels, with a tiny (truncated) body."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")

    header = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([8, 2, 0, 0, 0])
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\x00" * 64))


def elongated_png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (4000, 10)).save(buffer, "PNG")
    return buffer.getvalue()


def cut_jpeg() -> bytes:
    return png_bytes(fmt="JPEG")[:200]  # Pillow fails while reading the header: OSError at open


@pytest.mark.parametrize("payload,status,words", [
    (elongated_png(), 422, "too elongated"),               # 1x400: resizing its short side would explode
    (cut_jpeg(), 422, "corrupt"),                          # a JPEG cut inside its header
    (b"x" * 300_000, 413, "exceeds the upload limit"),     # oversize, refused from Content-Length
    (b"x" * 230_000, 413, "exceeds the limit"),            # oversize, refused after reading at most limit+1
    (bomb_png(20_000, 20_000), 413, "decompression bomb"),  # pixel bomb, refused from the header
    (b"%PDF-1.4 not an image at all", 415, "not an image"),  # wrong type, whatever the name says
    (png_bytes()[:60], 422, "truncated or corrupt"),        # corrupt
    (b"", 422, "empty"),
])
def test_every_upload_limit(served, payload, status, words):
    client, run_id, _ = served
    answer = client.post(f"/api/v1/models/{run_id}/predict", files={"file": ("photo.png", payload)})
    assert answer.status_code == status and words in answer.json()["detail"]


def test_no_request_reaches_files_outside_the_catalog(served):
    client, _, _ = served
    for model_id in ("..", "../..", "..%2F..%2Fetc", "%2e%2e", "a/../../b", "~root"):
        answer = client.get(f"/api/v1/models/{model_id}")
        assert answer.status_code in (404, 405), model_id
    answer = client.post("/api/v1/models/..%2F..%2Fetc/predict", json={"image_id": 1})
    assert answer.status_code == 404
    for path in ("/api/v1/images/..%2F..%2Fetc%2Fpasswd/file", "/api/v1/images/-1/file",
                 "/api/v1/images/%2Fetc%2Fpasswd/thumbnail"):
        answer = client.get(path)
        assert answer.status_code in (404, 422) and b"root:" not in answer.content, path  # ids are integers
    bad_json = client.post(f"/api/v1/models/{served[1]}/predict", json={"path": "/etc/passwd"})
    assert bad_json.status_code == 422 and "image_id" in bad_json.json()["detail"]


def test_micro_batcher_groups_concurrent_requests():
    calls = []

    def predict(arrays):
        calls.append(len(arrays))
        return np.stack([np.full(2, a.mean()) for a in arrays])

    async def scenario(batch_size):
        batcher = MicroBatcher(predict, batch_size, max_wait_s=0.05)
        results = await asyncio.gather(*[batcher.submit(np.full((2, 2), i, float)) for i in range(10)])
        return [float(r[0]) for r in results]

    assert asyncio.run(scenario(4)) == [float(i) for i in range(10)]  # each request gets its own answer
    assert max(calls) == 4 and sum(calls) == 10 and len(calls) <= 4
    calls.clear()
    asyncio.run(scenario(1))
    assert calls == [1] * 10  # batch size 1: no batching


def test_one_bad_image_fails_only_its_own_request():
    def predict(arrays):
        if any(a.mean() < 0 for a in arrays):
            raise ValueError("cannot read this one")
        return np.stack([np.full(2, a.mean()) for a in arrays])

    async def scenario():
        batcher = MicroBatcher(predict, 8, max_wait_s=0.05)
        values = [1.0, -1.0, 2.0, 3.0]
        return await asyncio.gather(*[batcher.submit(np.full((2, 2), v)) for v in values], return_exceptions=True)

    results = asyncio.run(scenario())
    assert isinstance(results[1], ValueError)
    assert [float(r[0]) for i, r in enumerate(results) if i != 1] == [1.0, 2.0, 3.0]


def test_cors_is_off_by_default(served):
    client, _, _ = served
    answer = client.get("/api/v1/models", headers={"Origin": "http://evil.example"})
    assert "access-control-allow-origin" not in answer.headers
    assert json.loads(answer.text)


def test_mutating_endpoints_need_the_key_off_loopback(served):
    client, _, _ = served
    state = client.app.state.handlens
    image_id = client.get("/api/v1/images", params={"dataset": "colours", "limit": 1}).json()["items"][0]["id"]
    region = {"label": "grain", "polygons": [[[1, 1], [20, 1], [20, 20]]]}
    added = client.post(f"/api/v1/images/{image_id}/regions", json=region)  # loopback, no key set: allowed
    assert added.status_code == 201, added.text
    assert client.get(f"/api/v1/images/{image_id}").json()["regions"][-1]["polygons"] == region["polygons"]
    remote = TestClient(client.app, client=("10.1.2.3", 40000))
    assert remote.post(f"/api/v1/images/{image_id}/regions", json=region).status_code == 403  # not on loopback
    original = state.settings
    try:
        state.settings = original.model_copy(update={"host": "0.0.0.0"})
        refused = client.post(f"/api/v1/images/{image_id}/regions", json=region)
        assert refused.status_code == 403 and "--api-key" in refused.json()["detail"]
        assert client.get("/api/v1/models").status_code == 200  # read-only endpoints stay open
        state.settings = original.model_copy(update={"host": "0.0.0.0", "api_key": "s3cret"})
        assert client.post(f"/api/v1/images/{image_id}/regions", json=region).status_code == 403
        wrong = client.post(f"/api/v1/images/{image_id}/regions", json=region, headers={"X-API-Key": "guess"})
        assert wrong.status_code == 403
        right = client.post(f"/api/v1/images/{image_id}/regions", json=region, headers={"X-API-Key": "s3cret"})
        assert right.status_code == 201
    finally:
        state.settings = original
    bad = client.post(f"/api/v1/images/{image_id}/regions", json={"polygons": [[[1, 1], [2, 2]]]})
    assert bad.status_code == 422
    not_a_number = client.post(f"/api/v1/images/{image_id}/regions",
                               content='{"polygons": [[[1, 1], [2, NaN], [3, 3]]]}',
                               headers={"Content-Type": "application/json"})
    assert not_a_number.status_code == 422
    assert client.get(f"/api/v1/images/{image_id}").status_code == 200


def test_evaluation_reports_are_served(served):
    from handlens.core.workspace import Workspace
    from handlens.train.evaluate import evaluate

    client, run_id, root = served
    before = client.get(f"/api/v1/models/{run_id}/evaluations").json()
    assert {"training: val", "training: test"} <= {r["source"] for r in before}
    report = evaluate(run_id, Workspace.open(root / "ws"), subset="val")
    after = client.get(f"/api/v1/models/{run_id}/evaluations").json()
    assert len(after) == len(before) + 1 and after[-1]["macro_f1"] == pytest.approx(report["macro_f1"])
    assert "top_losses" in after[-1] and "confusion" in after[-1]


def test_the_pool_keeps_models_within_its_memory_budget(trained_workspace):
    from handlens.serve.pool import ModelPool
    from handlens.train.run import train

    first = train(tiny_config(), trained_workspace).run_id
    second = train(tiny_config("train.seed=1"), trained_workspace).run_id
    pool = ModelPool(trained_workspace.runs_dir, memory_mb=0.001, batch_size=4, max_wait_ms=1)
    one = pool.get(first)
    assert pool.get(first) is one and pool.loaded == [first]  # warm: the same object
    pool.get(second)
    assert pool.loaded == [second]  # over budget: the least recently used model was dropped
    roomy = ModelPool(trained_workspace.runs_dir, memory_mb=512, batch_size=4, max_wait_ms=1)
    roomy.get(first), roomy.get(second), roomy.get(first)
    assert roomy.loaded == [second, first]


def test_a_chunked_oversize_body_is_refused_without_reading_it_all(served):
    client, run_id, _ = served

    def chunks():
        for _ in range(50):
            yield b"x" * 10_000  # 500 kB, no Content-Length

    answer = client.post(f"/api/v1/models/{run_id}/predict", content=chunks(),
                         headers={"Content-Type": "multipart/form-data; boundary=b"})
    assert answer.status_code == 413 and "upload limit" in answer.json()["detail"]


@pytest.mark.parametrize("params,words", [
    ({"noise": "lots"}, "noise='lots'"),
    ({"stpes": 2}, "did you mean 'steps'"),  # a typo is refused, never a silent default
    ({"window": 500}, "window <= the input size"),
    ({"window": 8, "stride": 16}, "stride <= window"),
    ({"baseline": "purple"}, "baseline"),
])
def test_bad_explain_parameters_are_422(served, params, words):
    client, run_id, _ = served
    image_id = client.get("/api/v1/images", params={"dataset": "colours", "limit": 1}).json()["items"][0]["id"]
    method = "smoothgrad" if "noise" in params else "occlusion" if "window" in params else "integrated_gradients"
    answer = client.post(f"/api/v1/models/{run_id}/explain", json={"image_id": image_id, "method": method,
                                                                   "params": params})
    assert answer.status_code == 422 and words in answer.json()["detail"]


def test_the_uvicorn_factory_builds_the_app_from_the_environment(served, monkeypatch):
    from handlens.serve.app import SETTINGS_ENV, app_from_env

    settings = served[0].app.state.handlens.settings
    monkeypatch.setenv(SETTINGS_ENV, settings.model_copy(update={"batch_size": 3}).model_dump_json())
    assert app_from_env().state.handlens.settings.batch_size == 3


def test_a_request_past_the_time_limit_gets_504(served, monkeypatch):
    import time as clock

    from handlens.serve.pool import ModelPool

    client, run_id, _ = served
    settings = client.app.state.handlens.settings.model_copy(update={"request_timeout_s": 0.3})
    original = ModelPool.get

    def slow(self, model_id):
        clock.sleep(1.0)
        return original(self, model_id)

    monkeypatch.setattr(ModelPool, "get", slow)
    with TestClient(create_app(settings), client=("127.0.0.1", 50001)) as impatient:
        answer = impatient.post(f"/api/v1/models/{run_id}/predict", files={"file": ("a.png", png_bytes())})
        assert answer.status_code == 504 and "longer than 0.3 s" in answer.json()["detail"]
        assert impatient.get("/livez").status_code == 200  # the service is still answering


def test_overfit_sanity_runs_are_not_listed_as_models(served):
    from handlens.core.workspace import Workspace
    from handlens.train.run import train

    client, _, root = served
    sanity = train(tiny_config("train.overfit_batches=1", "train.epochs=2"), Workspace.open(root / "ws"))
    assert sanity.verdict  # it said whether the model learns
    assert sanity.run_id not in {m["id"] for m in client.get("/api/v1/models").json()}
    assert client.get(f"/api/v1/models/{sanity.run_id}").status_code == 200  # still reachable by id
