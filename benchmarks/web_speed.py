"""Web page speed: ms per image of the exported model in the offline page (onnxruntime-web, WebAssembly, one
thread, in Debian's chromium) against onnxruntime in Python and torch, on one CPU.

For each backbone (default: tiny_cnn at 32 px and resnet18 at 224 px, randomly initialised: speed does not
depend on the weights) a bundle is saved, exported with ``export_web`` and served from a loopback static
server; the page's ``handlensBenchmark(runs)`` times ``session.run`` alone on one image, and the same
input is timed through an onnxruntime session (``handlens.export.runtime.session_options``) and through the
bundle's torch module (``inference_mode``). Median ms of ``--runs`` calls after a warm-up.

Usage::

    python benchmarks/web_speed.py                      # tiny_cnn and resnet18
    python benchmarks/web_speed.py --backbones tiny_cnn --runs 20 --out /tmp/web_speed.json

Needs onnxruntime-web (``npm ci`` in web/) and chromium; prints a table and writes JSON (``--out``).
"""

from __future__ import annotations

import argparse
import functools
import http.server
import json
import shutil
import tempfile
import threading
import time
from pathlib import Path

import numpy as np


def save_random_bundle(directory: Path, backbone: str) -> Path:
    """A randomly initialised 3-class bundle of ``backbone`` with a linear head (so the export has maps)."""
    import torch

    from handlens.models.backbones import BACKBONES
    from handlens.models.bundle import save_bundle
    from handlens.models.classifier import create_classifier

    torch.manual_seed(0)
    model = create_classifier(backbone, 3, head="linear").eval()
    manifest = {"backbone": backbone, "classes": ["a", "b", "c"], "freeze": "full",
                "head": {"type": "linear", "hidden": 0, "dropout": 0.0, "pool": "avg"},
                "preprocess": BACKBONES.get(backbone).preprocess().to_dict(), "dataset": "bench",
                "labelset": "default", "split": "split1", "run_id": f"bench-{backbone}"}
    return save_bundle(directory, model, manifest)


def median_ms(call, runs: int) -> float:
    call()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        call()
        times.append((time.perf_counter() - start) * 1000)
    return float(np.median(times))


class Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:  # no request log in the table
        pass


def page_ms(site: Path, runs: int, chromium: str) -> float:
    from playwright.sync_api import sync_playwright

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(site)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium, headless=True, args=["--no-sandbox", "--disable-gpu"])
            page = browser.new_page()
            page.goto(f"http://127.0.0.1:{server.server_address[1]}/")
            deadline = time.monotonic() + 120
            while not page.evaluate("window.handlensReady === true"):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the page did not load: {page.inner_text('#status')}")
                time.sleep(0.05)
            result = page.evaluate(f"window.handlensBenchmark({int(runs)})")
            browser.close()
    finally:
        server.shutdown()
        server.server_close()
    return float(result["median"])


def measure(backbone: str, runs: int, chromium: str, root: Path) -> dict:
    import onnxruntime as ort
    import torch

    from handlens.export.runtime import session_options
    from handlens.export.web import export_web
    from handlens.models.bundle import load_bundle

    bundle_dir = save_random_bundle(root / backbone / "bundle", backbone)
    site = root / backbone / "site"
    export_web(bundle_dir, site)
    bundle = load_bundle(bundle_dir)
    size = bundle.preprocess.size
    batch = np.full((1, 3, size, size), 0.1, dtype=np.float32)
    session = ort.InferenceSession(str(site / "model.onnx"), session_options(), providers=["CPUExecutionProvider"])
    tensor = torch.from_numpy(batch)
    with torch.inference_mode():
        torch_ms = median_ms(lambda: bundle.module(tensor), runs)
    return {"backbone": backbone, "size": size, "wasm_ms": page_ms(site, runs, chromium),
            "onnxruntime_ms": median_ms(lambda: session.run(None, {"input": batch}), runs), "torch_ms": torch_ms,
            "torch_threads": torch.get_num_threads()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbones", default="tiny_cnn,resnet18")
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        raise SystemExit("needs Debian's chromium (apt-get install chromium)")
    with tempfile.TemporaryDirectory() as tmp:
        rows = [measure(name, args.runs, chromium, Path(tmp)) for name in args.backbones.split(",")]
    print(f"{'backbone':<20}{'size':>6}{'wasm ms':>10}{'ORT ms':>10}{'torch ms':>10}")
    for row in rows:
        print(f"{row['backbone']:<20}{row['size']:>6}{row['wasm_ms']:>10.2f}{row['onnxruntime_ms']:>10.2f}"
              f"{row['torch_ms']:>10.2f}")
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
