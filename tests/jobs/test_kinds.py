"""Every job kind runs through the queue as its library call: study, evaluate, explain and import-urls (train is
in test_local.py); a cancelled URL import keeps its ledger."""

from __future__ import annotations

import io
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
from PIL import Image

from handlens.jobs.api import get_job, submit_job
from handlens.jobs.worker import work_locally
from tests.conftest import tiny_train


def _run_one(ws, catalog, kind, config):
    job = submit_job(kind, config, workspace=ws, catalog=catalog)
    assert work_locally(ws, stop_when_idle=True) == 1
    done = get_job(job.id, catalog=catalog)
    assert done.status == "finished", done.error
    return done


def test_study_evaluate_and_explain_jobs(job_ws, tmp_path):
    ws, catalog = job_ws
    space = ws.root / "space.yaml"  # relative paths of a CLI submit are pinned to the current folder
    space.write_text(json.dumps({"space": {"train.lr": [0.01, 0.003]},
                                 "fixed": {"model.backbone": "tiny_cnn", "model.weights": "none",
                                           "model.freeze": "frozen", "train.epochs": 2, "train.batch_size": 8}}))
    study = _run_one(ws, catalog, "study", {"dataset": "colours", "space": str(space), "sampler": "grid", "cv": 2,
                                            "tracking": "none"})
    assert study.result["study"].startswith("colours-job-") and study.result["bundle"].endswith("bundle")
    trained = _run_one(ws, catalog, "train", tiny_train())
    run_id = trained.result["run_id"]
    evaluated = _run_one(ws, catalog, "evaluate", {"bundle": run_id, "subset": "test"})
    assert 0.0 <= evaluated.result["macro_f1"] <= 1.0 and evaluated.result["leakage"]
    refit_val = _run_one(ws, catalog, "evaluate", {"bundle": study.result["bundle"], "subset": "val"})
    assert refit_val.result["held_out"] == "not held out"  # the study's refit trained on val
    explained = _run_one(ws, catalog, "explain", {"bundle": run_id, "subset": "test", "method": "gradcam",
                                                  "formats": ["png", "geojson"]})
    assert explained.result["images"] == 6  # a quarter of 24 images
    index = json.loads(Path(explained.result["index"]).read_text())
    assert len(index["images"]) == 6 and str(ws.root / "jobs") in explained.result["out"]
    assert len(list(Path(explained.result["out"]).glob("*.geojson"))) == 6


def _png(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


class _Images(BaseHTTPRequestHandler):
    delay = threading.Event()

    def do_GET(self):
        if self.path.startswith("/slow"):
            self.delay.wait(5)
        body = _png(int(self.path.rsplit("/", 1)[1].split(".")[0]))
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def _server():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Images)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def test_an_import_urls_job_downloads_into_the_catalog(job_ws):
    ws, catalog = job_ws
    server = _server()
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}"
        manifest = ws.root / "urls.csv"
        manifest.write_text("url,label\n" + "".join(f"{base}/img/{i}.png,c{i % 2}\n" for i in range(6)))
        done = _run_one(ws, catalog, "import-urls", {"manifest": str(manifest), "dataset": "web", "backoff": 0.01})
    finally:
        server.shutdown()
    assert done.result["added"] == 6 or done.result.get("counts", {}).get("downloaded") == 6, done.result


def test_a_detect_train_job_trains_a_detector_and_confines_its_weights_file(sigma_workspace, tmp_path):
    import shutil

    import pytest

    from handlens.core.errors import InputError
    from handlens.core.workspace import Workspace
    from handlens.data.catalog import open_catalog
    from handlens.jobs.specs import pin_raw_paths
    from tests.conftest import tiny_detector_config

    shutil.copytree(sigma_workspace["workspace"].root, tmp_path / "ws")
    ws = Workspace.open(tmp_path / "ws")
    catalog = open_catalog(ws.db_url)
    try:
        done = _run_one(ws, catalog, "detect-train", tiny_detector_config().model_dump(mode="json"))
    finally:
        catalog.close()
    bundle = Path(done.result["bundle"])
    assert json.loads((bundle / "bundle.json").read_text())["kind"] == "detector"
    assert done.result["epochs"] == 1 and done.progress["epoch"] == 1 and "map_50" in done.result["metrics"]["val"]
    with pytest.raises(InputError, match="outside the workspace"):
        pin_raw_paths("detect-train", {"dataset": "d", "weights": "/etc/hostname"}, root=ws.root, confine=True)
    assert pin_raw_paths("detect-train", {"dataset": "d", "weights": "packaged"}, root=ws.root,
                         confine=True)["weights"] == "packaged"
