"""`handlens serve --runtime onnx`: predictions on onnxruntime agree with torch, the models route says which
runtime serves a loaded model, explanations still run (on torch), and a model that cannot be exported is
served by torch with the reason given, never a 500."""

import os

import numpy as np
import pytest
from fastapi.testclient import TestClient

from handlens.serve.app import create_app
from handlens.serve.settings import ServeSettings
from tests.serve.conftest import png_bytes

IMAGE = png_bytes((180, 60, 50), size=(48, 40))


def onnx_client(root, **settings):
    """A service over the ``served`` fixture's workspace (the same trained model) with predictions on ONNX."""
    from handlens.core.workspace import Workspace

    ws = Workspace.open(root / "ws")
    config = ServeSettings(workspace=ws.root, db_url=ws.db_url, runtime="onnx", allowed_hosts=["testserver"],
                           **settings)
    return TestClient(create_app(config), client=("127.0.0.1", 50000))


def predict(client, run_id):
    answer = client.post(f"/api/v1/models/{run_id}/predict", files={"file": ("x.png", IMAGE)},
                         params={"top_k": 3})
    assert answer.status_code == 200, answer.text
    return answer.json()


@pytest.fixture(scope="module")
def onnx_served(served):
    torch_client, run_id, root = served
    with onnx_client(root) as client:
        yield client, torch_client, run_id, root


def test_onnx_predictions_match_torch_and_the_model_says_it_runs_on_onnx(onnx_served):
    client, torch_client, run_id, root = onnx_served
    assert client.get(f"/api/v1/models/{run_id}").json()["runtime"] is None  # not loaded yet
    on_onnx, on_torch = predict(client, run_id), predict(torch_client, run_id)
    assert on_onnx["label"] == on_torch["label"]
    classes = sorted(on_torch["probabilities"])
    np.testing.assert_allclose([on_onnx["probabilities"][c] for c in classes],
                               [on_torch["probabilities"][c] for c in classes], atol=1e-4)
    assert sum(on_onnx["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
    assert client.get(f"/api/v1/models/{run_id}").json()["runtime"] == "onnx"
    listed = {m["id"]: m for m in client.get("/api/v1/models").json()}
    assert listed[run_id]["runtime"] == "onnx"
    assert torch_client.get(f"/api/v1/models/{run_id}").json()["runtime"] == "torch"
    cached = list((root / "ws" / "cache" / "onnx").glob("*.onnx"))  # exported into the workspace's cache
    assert len(cached) == 1
    loaded = client.app.state.handlens.pool.get(run_id)
    assert loaded.predictor is not None and loaded.predictor.model_path == cached[0]
    torch_bytes = sum(p.numel() * p.element_size() for p in loaded.bundle.module.parameters())
    assert loaded.nbytes >= torch_bytes + cached[0].stat().st_size  # the .onnx counts in the pool's memory


def test_concurrent_requests_are_still_micro_batched_on_onnx(onnx_served):
    import asyncio

    client, _, run_id, _ = onnx_served
    loaded = client.app.state.handlens.pool.get(run_id)
    arrays = [np.full((40, 40, 3), (30 * i, 200 - 20 * i, 90), dtype=np.uint8) for i in range(6)]

    async def burst():
        return await asyncio.gather(*(loaded.batcher.submit(a) for a in arrays))

    together = asyncio.run(burst())
    assert max(loaded.batcher.batches[-6:]) > 1  # served in shared batches
    alone = loaded.predictor.predict_proba(arrays, batch_size=1)
    np.testing.assert_allclose(np.stack(together), alone, atol=1e-5)


def test_explanations_still_work_on_the_onnx_runtime(onnx_served):
    """They run on torch (hooks, gradients): the same map as the torch service's."""
    client, torch_client, run_id, _ = onnx_served
    maps = []
    for each in (client, torch_client):
        answer = each.post(f"/api/v1/models/{run_id}/explain", files={"file": ("x.png", IMAGE)},
                           data={"method": "gradcam", "output": "both"})
        assert answer.status_code == 200, answer.text
        body = answer.json()
        assert body["method"] == "gradcam" and body["overlay_png"]
        maps.append(np.asarray(body["map"], dtype=np.float32))
    np.testing.assert_allclose(maps[0], maps[1], atol=1e-3)
    loaded = client.app.state.handlens.pool.get(run_id)  # torch is free to explain: no second copy loaded
    explainer = loaded.explainer()
    assert explainer.bundle is loaded.bundle and explainer.lock is not loaded.lock


def test_a_model_that_cannot_be_exported_is_served_by_torch_with_the_reason(served, monkeypatch, caplog):
    import handlens.export.runtime as runtime
    from handlens.export.onnx import ExportError

    def refuse(*args, **kwargs):
        raise ExportError("operator 'weird_op' has no ONNX translation")

    monkeypatch.setattr(runtime, "OnnxPredictor", refuse)
    torch_client, run_id, root = served
    with caplog.at_level("WARNING", logger="handlens.serve"), onnx_client(root) as client:
        answer = predict(client, run_id)
        assert answer["label"] == predict(torch_client, run_id)["label"]
        shown = client.get(f"/api/v1/models/{run_id}").json()["runtime"]
        assert shown.startswith("torch (onnx export failed:") and "weird_op" in shown
        assert client.app.state.handlens.pool.get(run_id).predictor is None
    assert any("weird_op" in r.getMessage() and run_id in r.getMessage() for r in caplog.records)


def test_the_runtime_is_checked():
    from pydantic import ValidationError

    with pytest.raises(ValidationError):
        ServeSettings(runtime="tensorrt")


@pytest.mark.parametrize(("flags", "expected"), [([], "torch"), (["--runtime", "onnx"], "onnx")])
def test_the_serve_command_passes_the_runtime_to_the_service(tmp_path, monkeypatch, flags, expected):
    import uvicorn
    from typer.testing import CliRunner

    import handlens.jobs.local as local
    from handlens.cli.app import app
    from handlens.serve.app import SETTINGS_ENV

    class NoWorker:
        def __init__(self, *args, **kwargs): ...
        def start(self): ...
        def stop(self): ...

    seen = {}
    monkeypatch.setattr(local, "LocalExecutor", NoWorker)
    monkeypatch.setattr(uvicorn, "run", lambda *a, **k: seen.update(settings=os.environ[SETTINGS_ENV]))
    monkeypatch.delenv(SETTINGS_ENV, raising=False)
    result = CliRunner().invoke(app, ["--workspace", str(tmp_path / "ws"), "serve", *flags])
    assert result.exit_code == 0, result.output
    assert ServeSettings.model_validate_json(seen["settings"]).runtime == expected
    refused = CliRunner().invoke(app, ["--workspace", str(tmp_path / "ws"), "serve", "--runtime", "tensorrt"])
    assert refused.exit_code != 0 and "torch, onnx" in refused.output
