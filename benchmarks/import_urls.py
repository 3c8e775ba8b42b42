"""import-urls throughput: images/s downloading from a loopback server, ``import_urls`` vs a plain ``urllib`` loop.

A ``ThreadingHTTPServer`` on 127.0.0.1 serves N distinct small JPEGs (deterministic, fixed seed), sleeping a
fixed latency before each answer to stand in for a remote host (nothing leaves the machine). Measured:

* ``import_urls``: ``handlens.data.urls.import_urls`` with ``--concurrency`` downloads at once and as many per
  host (one host here), into a fresh workspace: download, full validation (``probe_image``), SHA-256
  dedup, content-addressed rename, catalog import (which validates again), ledger writes, ATTRIBUTION.csv;
* ``import_urls_sequential``: the same with one download at a time, to separate what concurrency buys
  from what the validation and bookkeeping cost;
* ``baseline_urllib_sequential``: what a user writes by hand, one process, one at a time:
  ``urllib.request`` (no proxies) ``.read()`` then ``write_bytes`` per URL; no validation, no catalog.

Usage::

    python benchmarks/import_urls.py                       # 200 images, 20 ms latency
    python benchmarks/import_urls.py --images 50 --quick   # a smoke run
    python benchmarks/import_urls.py --repeats 3 --out /tmp/import_urls.json

Every figure goes to the JSON file (``--out``, default ``benchmarks/results/import_urls.json``); a summary
is printed. Temporary files are removed at the end.
"""

from __future__ import annotations

import argparse
import datetime as dt
import io
import json
import os
import platform
import shutil
import sys
import tempfile
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from handlens.core.workspace import Workspace
from handlens.data.urls import UrlImportConfig, import_urls

SEED = 20240611
SIZE = (128, 96)  # width, height
JPEG_QUALITY = 85
CLASSES = ("basalt", "granite", "limestone", "sandstone")
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "import_urls.json"


def make_images(n: int) -> list[bytes]:
    """N distinct JPEGs: smooth noise (so they compress like photographs, not like static)."""
    rng = np.random.default_rng(SEED)
    images = []
    for _ in range(n):
        coarse = rng.integers(0, 255, size=(SIZE[1] // 8, SIZE[0] // 8, 3), dtype=np.uint8)
        img = Image.fromarray(coarse, "RGB").resize(SIZE, Image.Resampling.BILINEAR)
        buffer = io.BytesIO()
        img.save(buffer, format="JPEG", quality=JPEG_QUALITY)
        images.append(buffer.getvalue())
    return images


class LatencyServer:
    """Serves ``/img/<i>.jpg`` from memory after ``latency`` seconds; counts requests."""

    def __init__(self, images: list[bytes], latency: float) -> None:
        self.requests = 0
        lock = threading.Lock()
        state = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                with lock:
                    state.requests += 1
                time.sleep(latency)
                try:
                    body = images[int(self.path.rsplit("/", 1)[-1].split(".")[0])]
                except (ValueError, IndexError):
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Type", "image/jpeg")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *_args: Any) -> None:
                pass

        class Server(ThreadingHTTPServer):
            daemon_threads = True
            request_queue_size = 128

        self.httpd = Server(("127.0.0.1", 0), Handler)
        self.base = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def run_import_urls(urls: list[str], tmp: Path, *, concurrency: int, tag: str) -> dict[str, Any]:
    manifest = tmp / f"{tag}.csv"
    manifest.write_text("url,label,license,attribution\n" + "".join(
        f"{url},{CLASSES[i % len(CLASSES)]},CC0,bench\n" for i, url in enumerate(urls)), encoding="utf-8")
    ws = Workspace.open(tmp / f"ws-{tag}")
    config = UrlImportConfig(manifest=str(manifest), dataset="bench", concurrency=concurrency, per_host=concurrency,
                             timeout=30)
    t0 = time.perf_counter()
    report = import_urls(config, ws)
    wall = time.perf_counter() - t0
    return {"wall_seconds": wall, "images_per_second": len(urls) / wall, "downloaded": report.downloaded,
            "added": report.added, "counts": report.counts, "report_seconds": report.seconds,
            "bytes": report.bytes, "concurrency": concurrency}


def run_baseline(urls: list[str], out: Path) -> dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: never through a proxy
    t0 = time.perf_counter()
    total = 0
    for i, url in enumerate(urls):
        with opener.open(url, timeout=30) as response:
            data = response.read()
        (out / f"{i:05d}.jpg").write_bytes(data)
        total += len(data)
    wall = time.perf_counter() - t0
    return {"wall_seconds": wall, "images_per_second": len(urls) / wall, "downloaded": len(urls), "bytes": total}


def best(runs: list[dict[str, Any]]) -> dict[str, Any]:
    chosen = dict(min(runs, key=lambda r: r["wall_seconds"]))
    chosen["all_wall_seconds"] = [round(r["wall_seconds"], 3) for r in runs]
    return chosen


def machine_info() -> dict[str, Any]:
    import PIL

    try:
        handlens_version = metadata.version("handlens")
    except metadata.PackageNotFoundError:
        handlens_version = "unknown"
    return {"cpu_count": os.cpu_count(), "python": sys.version.split()[0],
            "implementation": platform.python_implementation(), "platform": platform.platform(),
            "machine": platform.machine(), "pillow": PIL.__version__, "numpy": np.__version__,
            "handlens": handlens_version}


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=200, help="distinct JPEGs served (default 200)")
    parser.add_argument("--latency-ms", type=float, default=20.0, help="server sleep before each answer (default 20)")
    parser.add_argument("--concurrency", type=int, default=8, help="import_urls downloads at once (default 8)")
    parser.add_argument("--repeats", type=int, default=1, help="runs per measurement; best is kept")
    parser.add_argument("--quick", action="store_true", help="smoke run: 40 images")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT,
                        help="JSON results file (default benchmarks/results/import_urls.json)")
    args = parser.parse_args(argv)
    if args.quick:
        args.images = 40
    if args.images < 1 or args.repeats < 1 or args.concurrency < 1 or args.latency_ms < 0:
        parser.error("--images, --repeats and --concurrency must be >= 1, --latency-ms >= 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    info, load_before = machine_info(), load_average()
    print(f"import-urls throughput: {args.images} JPEGs {SIZE[0]}x{SIZE[1]}, {args.latency_ms:g} ms latency, "
          f"concurrency {args.concurrency}, repeats {args.repeats}, cpu_count={info['cpu_count']}, "
          f"load before={load_before}", flush=True)
    images = make_images(args.images)
    server = LatencyServer(images, args.latency_ms / 1000)
    urls = [f"{server.base}/img/{i}.jpg" for i in range(args.images)]
    tmp = Path(tempfile.mkdtemp(prefix="handlens-import-urls-bench-"))
    problems: list[str] = []
    runs: dict[str, list[dict[str, Any]]] = {"import_urls": [], "import_urls_sequential": [],
                                             "baseline_urllib_sequential": []}
    started = time.perf_counter()
    try:
        for repeat in range(args.repeats):
            print(f"repeat {repeat + 1}: import_urls (concurrency {args.concurrency}) ...", flush=True)
            runs["import_urls"].append(run_import_urls(urls, tmp, concurrency=args.concurrency, tag=f"c{repeat}"))
            print(f"repeat {repeat + 1}: import_urls (concurrency 1) ...", flush=True)
            runs["import_urls_sequential"].append(run_import_urls(urls, tmp, concurrency=1, tag=f"s{repeat}"))
            print(f"repeat {repeat + 1}: urllib loop ...", flush=True)
            runs["baseline_urllib_sequential"].append(run_baseline(urls, tmp / f"plain{repeat}"))
    finally:
        requests = server.requests
        server.close()
        shutil.rmtree(tmp, ignore_errors=True)
    for name, measured in runs.items():
        for run in measured:
            if run["downloaded"] != args.images:
                problems.append(f"{name}: {run['downloaded']} of {args.images} images downloaded")
    results = {name: best(measured) for name, measured in runs.items()}
    ratio = results["import_urls"]["images_per_second"] / results["baseline_urllib_sequential"]["images_per_second"]
    ratio_sequential = results["import_urls_sequential"]["images_per_second"] / \
        results["baseline_urllib_sequential"]["images_per_second"]
    doc = {
        "benchmark": "import_urls",
        "created_utc": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "command": [Path(sys.argv[0]).name, *sys.argv[1:]] if argv is None else argv,
        "machine": {**info, "load_average_before": load_before, "load_average_after": load_average()},
        "settings": {"images": args.images, "size": list(SIZE), "jpeg_quality": JPEG_QUALITY,
                     "latency_ms": args.latency_ms, "concurrency": args.concurrency, "per_host": args.concurrency,
                     "repeats": args.repeats, "seed": SEED,
                     "mean_image_bytes": round(sum(map(len, images)) / len(images))},
        "results": results,
        "ratio_import_urls_vs_baseline": round(ratio, 2),
        "ratio_import_urls_sequential_vs_baseline": round(ratio_sequential, 2),
        "server_requests": requests,
        "problems": problems,
        "total_seconds": time.perf_counter() - started,
        "notes": [
            "images_per_second = images / wall time around the call (import_urls: catalog open, manifest, "
            "downloads, validation, catalog import and ledger; the baseline: the loop only).",
            "The server is on loopback, sleeping latency_ms before each answer to mimic a remote host; its "
            "threads share the machine's cores with the client.",
            "import_urls validates every file twice (probe before the content-addressed rename, then the "
            "importer's own check) and writes the catalog; the baseline neither validates nor catalogues.",
            "Each import_urls run goes into a fresh workspace (a rerun would download nothing).",
            "Best of --repeats is reported; all_wall_seconds lists every run.",
        ],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=2) + "\n")
    print()
    for name, res in results.items():
        print(f"{name:28s} {res['images_per_second']:8.1f} images/s  ({res['wall_seconds']:.2f} s for "
              f"{res['downloaded']} images)")
    print(f"import_urls vs urllib loop: x{ratio:.2f}; import_urls at concurrency 1 vs urllib loop: "
          f"x{ratio_sequential:.2f}")
    if problems:
        print("\nPROBLEMS:")
        for problem in problems:
            print(f"  - {problem}")
    print(f"\nresults written to {args.out}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
