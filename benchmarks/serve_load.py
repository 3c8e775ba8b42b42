"""Service load: throughput and latency of predict with micro-batching vs without, and cached explanations.

For each model (resnet18, efficientnet_lite0; small frozen models trained on the embedded textures demo
so the bundles are real), the real service (``handlens serve`` on a free loopback port) is started
twice: micro-batching on (``--batch-size 16 --max-wait-ms 5``) and off (``--batch-size 1``). Each time
8 client threads post 224x224 PNG uploads to ``/predict`` for ``--seconds`` (30 by default). Reported:
requests/s, p50/p99 latency, errors, server RSS before and after. Then one explanation is asked for,
and repeated 200 times: the cached p50 (target <= 20 ms). Loopback only, bounded in time.

    python benchmarks/serve_load.py              # 30 s per run, 4 runs
    python benchmarks/serve_load.py --seconds 5  # a smoke run
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent
DEFAULT_OUT = ROOT / "results" / "serve_load.json"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def make_models(ws: Any) -> dict[str, str]:
    from handlens.data.catalog import open_catalog
    from handlens.data.demo import build_textures
    from handlens.data.importer import import_path
    from handlens.data.splits import make_split
    from handlens.train.config import load_config
    from handlens.train.run import train

    catalog = open_catalog(ws.db_url)
    import_path(catalog, build_textures(ws.demo_dir / "textures"), "textures", workers=os.cpu_count())
    make_split(catalog, "textures", ratios="0.7,0.15,0.15", seed=0)
    catalog.close()
    runs = {}
    for backbone, weights in (("resnet18", "none"), ("efficientnet_lite0", "packaged")):
        cfg = load_config(None, ["data.dataset=textures", f"model.backbone={backbone}", f"model.weights={weights}",
                                 "model.freeze=frozen", "train.epochs=1", "tracking.backend=none",
                                 "train.progress=false"])
        runs[backbone] = train(cfg, ws).run_id
    return runs


def upload_body(seed: int) -> tuple[bytes, str]:
    import numpy as np
    from PIL import Image

    buffer = io.BytesIO()
    pixels = np.random.default_rng(seed).integers(0, 255, (224, 224, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(buffer, "PNG")
    boundary = f"handlens{seed}"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"x.png\"\r\n"
            f"Content-Type: image/png\r\n\r\n").encode() + buffer.getvalue() + f"\r\n--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


def post(url: str, body: bytes, content_type: str) -> tuple[int, bytes]:
    request = urllib.request.Request(url, data=body, headers={"Content-Type": content_type}, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def start_service(ws_root: Path, port: int, batch_size: int) -> subprocess.Popen[bytes]:
    process = subprocess.Popen([sys.executable, "-m", "handlens.cli.main", "--workspace", str(ws_root), "serve",
                                "--port", str(port), "--batch-size", str(batch_size), "--max-wait-ms", "5"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(240):
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/livez", timeout=1)
            return process
        except OSError:
            time.sleep(0.25)
    process.kill()
    raise SystemExit("the service did not start")


def load(url: str, clients: int, seconds: float) -> dict[str, Any]:
    bodies = [upload_body(i) for i in range(clients)]
    latencies: list[float] = []
    errors: list[int] = []
    lock = threading.Lock()
    stop = time.perf_counter() + seconds

    def client(index: int) -> None:
        body, content_type = bodies[index]
        while time.perf_counter() < stop:
            started = time.perf_counter()
            status, _ = post(url, body, content_type)
            elapsed = time.perf_counter() - started
            with lock:
                (latencies if status == 200 else errors).append(elapsed if status == 200 else status)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    ordered = sorted(latencies)
    return {"requests": len(latencies), "errors": len(errors), "error_statuses": sorted(set(errors)),
            "requests_per_s": round(len(latencies) / wall, 2),
            "p50_ms": round(1000 * ordered[len(ordered) // 2], 1) if ordered else None,
            "p99_ms": round(1000 * ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))], 1) if ordered else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()

    from handlens.core.workspace import Workspace
    from handlens.train.run import quiet_lightning

    quiet_lightning()
    tmp = Path(tempfile.mkdtemp(prefix="handlens-serve-"))
    results: dict[str, Any] = {"benchmark": "serve_load", "clients": args.clients, "seconds": args.seconds,
                               "machine": {"cpus": os.cpu_count(), "platform": platform.platform()}, "models": {}}
    try:
        ws = Workspace.open(tmp / "ws")
        runs = make_models(ws)
        for backbone, run_id in runs.items():
            entry: dict[str, Any] = {"run_id": run_id}
            for mode, batch_size in (("batched", 16), ("unbatched", 1)):
                port = free_port()
                process = start_service(ws.root, port, batch_size)
                try:
                    url = f"http://127.0.0.1:{port}/api/v1/models/{run_id}/predict"
                    post(url, *upload_body(999))  # load the model before measuring
                    before = rss_mb(process.pid)
                    figures = load(url, args.clients, args.seconds)
                    figures.update(rss_before_mb=round(before, 1), rss_after_mb=round(rss_mb(process.pid), 1))
                    if mode == "batched":
                        explain_url = url.replace("/predict", "/explain")
                        body, content_type = upload_body(7)
                        first_started = time.perf_counter()
                        status, _ = post(explain_url, body, content_type)
                        first = time.perf_counter() - first_started
                        repeats = []
                        for _ in range(200):
                            started = time.perf_counter()
                            status, answer = post(explain_url, body, content_type)
                            repeats.append(time.perf_counter() - started)
                            assert status == 200 and json.loads(answer)["cached"]
                        figures["explain_first_ms"] = round(1000 * first, 1)
                        figures["explain_cached_p50_ms"] = round(1000 * statistics.median(repeats), 1)
                finally:
                    process.terminate()
                    process.wait(timeout=20)
                entry[mode] = figures
                print(f"{backbone:18} {mode:9} {figures['requests_per_s']:7.1f} req/s  p50 {figures['p50_ms']} ms  "
                      f"p99 {figures['p99_ms']} ms  errors {figures['errors']}  RSS {figures['rss_before_mb']} -> "
                      f"{figures['rss_after_mb']} MB", flush=True)
            entry["batching_speedup"] = round(entry["batched"]["requests_per_s"] /
                                              max(entry["unbatched"]["requests_per_s"], 1e-9), 2)
            print(f"{backbone:18} micro-batching: {entry['batching_speedup']}x (target >= 1.5x); cached explain p50 "
                  f"{entry['batched']['explain_cached_p50_ms']} ms (target <= 20 ms)", flush=True)
            results["models"][backbone] = entry
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
