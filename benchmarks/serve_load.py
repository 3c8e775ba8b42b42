"""Service load: predict throughput and latency at 8 and 32 clients, with and without micro-batching, and
whether predict stays responsive while a burst of expensive explanations runs.

For each model (resnet18 and efficientnet_lite0, small frozen models trained on the embedded textures demo
so the bundles are real), the real service (``handlens serve`` on a free loopback port, reached at
127.0.0.1: the DNS-rebinding guard always accepts an IP literal) is started twice: micro-batching on (the
default settings) and off (``--batch-size 1``). In each service, for ``--seconds`` per phase (20 by default):

1. *predict*: N client threads (``--clients``, 8 and 32 by default) post 224x224 PNG uploads to
   ``/predict`` as fast as answers come back. Reported per N: requests/s, p50/p95/p99 latency, errors
   (non-200 answers and failed connections) and the server's RSS before, at its peak (sampled every 0.2 s
   from /proc/PID/status) and after.
2. *explain burst*: 8 predict clients (``--burst-predict-clients``) as in 1, while K clients
   (``--explain-clients``, 4) post explanations with ``method=integrated_gradients`` and
   ``params={"steps": 32}`` (a multipart field holding JSON), each of a new random image, so that the
   explanation cache never answers. Reported: predict p50/p95/p99 during the burst next to the same figures
   without it (phase 1 at the same client count, same service), the explanations' latencies, and a
   verdict: *responsive* when predict p95 during the burst is below 1 s, else *starved*. The claim under
   test: explanations run in their own thread pool on their own copy of the model, so predict keeps up.
3. (micro-batching on only) one Grad-CAM explanation, then the same one 200 times: the cached p50
   (target <= 20 ms).

Reported too: the micro-batching speedup (requests/s on vs off) per client count. A default run takes
about 6 minutes on 2 cores. Loopback only, bounded in time. Run one benchmark at a time.

``--runtimes torch,onnx`` compares prediction runtimes instead of batching on/off: one service per runtime
(``handlens serve --runtime R``, micro-batching on), the same phases in each, and the onnxruntime speedup
(requests/s, onnx vs torch; target >= 1.5x) and p50 ratio per client count, written to
``results/serve_load_onnx.json`` unless ``--out`` says otherwise. The first request to the onnx service
exports the model (into the workspace's cache) before anything is measured. ``--no-burst`` skips phases 2
and 3 (predict only).

    .venv/bin/python benchmarks/serve_load.py                 # 20 s per phase
    .venv/bin/python benchmarks/serve_load.py --seconds 3     # a smoke run
    .venv/bin/python benchmarks/serve_load.py --runtimes torch,onnx --clients 8 --no-burst --seconds 10
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from frozen_speed import handlens_exe, machine, write_result

ROOT = Path(__file__).resolve().parent
DEFAULT_OUT = ROOT / "results" / "serve_load.json"
RUNTIMES_OUT = ROOT / "results" / "serve_load_onnx.json"
MODES = (("batched", []), ("unbatched", ["--batch-size", "1"]))  # the default settings, then batching off
RUNTIMES = ("torch", "onnx")
EXPLAIN_METHOD = "integrated_gradients"
EXPLAIN_PARAMS = {"steps": 32}
RESPONSIVE_P95_S = 1.0
OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: never through a proxy


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mb(pid: int) -> float:
    """The process's resident set size in MB (0 once it is gone)."""
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError:
        return 0.0
    for line in lines:
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


class RssSampler:
    """The server's RSS before a phase, its peak (sampled every 0.2 s while the phase runs) and after."""

    def __init__(self, pid: int, every_s: float = 0.2) -> None:
        self.pid, self.every_s = pid, every_s
        self.before = self.peak = self.after = 0.0
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._done.wait(self.every_s):
            self.peak = max(self.peak, rss_mb(self.pid))

    def __enter__(self) -> RssSampler:
        self.before = self.peak = rss_mb(self.pid)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join()
        self.after = rss_mb(self.pid)
        self.peak = max(self.peak, self.after)

    def figures(self) -> dict[str, float]:
        return {"rss_before_mb": round(self.before, 1), "rss_peak_mb": round(self.peak, 1),
                "rss_after_mb": round(self.after, 1)}


def png_bytes(seed: int) -> bytes:
    """A 224x224 PNG of random pixels: a different seed, a different image (and image hash)."""
    import numpy as np
    from PIL import Image

    buffer = io.BytesIO()
    pixels = np.random.default_rng(seed).integers(0, 255, (224, 224, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()


def multipart(png: bytes, fields: dict[str, str] | None = None) -> tuple[bytes, str]:
    """A multipart/form-data body: the image as field ``file`` and string ``fields``; and its content type."""
    boundary = "handlens-benchmark-boundary"
    parts = [f"--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"\r\n\r\n{value}\r\n".encode()
             for name, value in (fields or {}).items()]
    parts.append(f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"x.png\"\r\n"
                 f"Content-Type: image/png\r\n\r\n".encode() + png + b"\r\n")
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def post(url: str, body: bytes, content_type: str) -> tuple[int, bytes]:
    """The answer's status and body; 0 when no answer came (a refused or timed-out connection)."""
    request = urllib.request.Request(url, data=body, headers={"Content-Type": content_type}, method="POST")
    try:
        with OPENER.open(request, timeout=120) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()
    except OSError:
        return 0, b""


def percentile(ordered: list[float], q: float) -> float:
    """The nearest-rank ``q`` quantile of sorted values."""
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


@dataclass
class Tally:
    """What one group of clients saw: latencies of 200 answers, other statuses, and answers' extra counts."""

    latencies: list[float] = field(default_factory=list)
    statuses: list[int] = field(default_factory=list)
    cached: int = 0
    wall_s: float = 0.0
    failure: str | None = None  # a client that crashed (the benchmark stops, rather than report short figures)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def record(self, status: int, elapsed: float, *, cached: bool = False) -> None:
        with self.lock:
            if status == 200:
                self.latencies.append(elapsed)
                self.cached += cached
            else:
                self.statuses.append(status)

    def figures(self) -> dict[str, Any]:
        ordered = sorted(self.latencies)
        ms = {f"p{q}_ms": round(1000 * percentile(ordered, q / 100), 1) if ordered else None for q in (50, 95, 99)}
        return {"requests": len(ordered), "errors": len(self.statuses), "error_statuses": sorted(set(self.statuses)),
                "requests_per_s": round(len(ordered) / self.wall_s, 2) if self.wall_s else 0.0, **ms}


def predict_client(url: str, body: tuple[bytes, str], stop: float, tally: Tally) -> None:
    while time.perf_counter() < stop:
        started = time.perf_counter()
        status, _ = post(url, *body)
        tally.record(status, time.perf_counter() - started)


def explain_client(url: str, index: int, stop: float, tally: Tally) -> None:
    """Explanations of a new image each time (seeded by client and count) so the cache cannot answer."""
    fields = {"method": EXPLAIN_METHOD, "params": json.dumps(EXPLAIN_PARAMS)}
    count = 0
    while time.perf_counter() < stop:
        body = multipart(png_bytes(1_000_000 + 10_000 * index + count), fields)
        count += 1
        started = time.perf_counter()
        status, answer = post(url, *body)
        elapsed = time.perf_counter() - started
        tally.record(status, elapsed, cached=status == 200 and bool(json.loads(answer).get("cached")))


def run_group(target: Any, args_per_client: list[tuple[Any, ...]], tally: Tally) -> list[threading.Thread]:
    """Start one thread per client, ``target(*args, tally)``; join_group waits for them and stops the benchmark
    if one crashed."""
    def guarded(*args: Any) -> None:
        try:
            target(*args, tally)
        except Exception as exc:
            tally.failure = f"{target.__name__}: {type(exc).__name__}: {exc}"

    threads = [threading.Thread(target=guarded, args=a) for a in args_per_client]
    for thread in threads:
        thread.start()
    return threads


def join_group(threads: list[threading.Thread], tally: Tally, started: float) -> None:
    for thread in threads:
        thread.join()
    tally.wall_s = time.perf_counter() - started
    if tally.failure:
        raise SystemExit(f"a benchmark client crashed: {tally.failure}")


def phase(pid: int, predict_url: str, *, clients: int, seconds: float, explain_url: str | None = None,
          explain_clients: int = 0) -> dict[str, Any]:
    """``clients`` predict clients for ``seconds`` (and ``explain_clients`` explaining beside them), with the
    server's RSS sampled throughout. Clients stop starting requests at the deadline and finish the last one."""
    bodies = [multipart(png_bytes(i)) for i in range(clients)]
    predict, explain = Tally(), Tally()
    with RssSampler(pid) as rss:
        started = time.perf_counter()
        stop = started + seconds
        explainers = run_group(explain_client, [(explain_url, i, stop) for i in range(explain_clients)], explain)
        predictors = run_group(predict_client, [(predict_url, bodies[i], stop) for i in range(clients)], predict)
        join_group(predictors, predict, started)
        join_group(explainers, explain, started)
    result: dict[str, Any] = {"clients": clients, **predict.figures(), **rss.figures()}
    if explain_clients:
        result = {"predict": {"clients": clients, **predict.figures()},
                  "explain": {"clients": explain_clients, "method": EXPLAIN_METHOD, "params": EXPLAIN_PARAMS,
                              **explain.figures(), "answered_from_cache": explain.cached},
                  **rss.figures()}
    return result


class Service:
    """``handlens serve`` on a free loopback port, its stderr in ``log``; stopped on leaving the block."""

    def __init__(self, ws_root: Path, extra: list[str], log: Path) -> None:
        self.port = free_port()
        self.log = log
        self._err = log.open("a")
        self.process = subprocess.Popen([handlens_exe(), "--workspace", str(ws_root), "serve", "--port",
                                         str(self.port), *extra], stdout=subprocess.DEVNULL, stderr=self._err)

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> Service:
        deadline = time.perf_counter() + 120
        while time.perf_counter() < deadline and self.process.poll() is None:
            try:
                with OPENER.open(f"{self.base}/livez", timeout=1):
                    return self
            except OSError:
                time.sleep(0.25)
        self.__exit__()
        raise SystemExit(f"the service did not start (exit code {self.process.returncode}); its log ends:\n"
                         f"{self.log.read_text()[-3000:]}")

    def __exit__(self, *exc: object) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self._err.close()


def make_models(ws: Any) -> dict[str, str]:
    """Two small frozen models trained on the embedded textures demo; their run ids by backbone."""
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


def cached_explain(url: str) -> dict[str, Any]:
    """One Grad-CAM explanation of a fresh image, then the same one 200 times (answered from the cache)."""
    body = multipart(png_bytes(7))
    started = time.perf_counter()
    status, _ = post(url, *body)
    first = time.perf_counter() - started
    if status != 200:
        raise SystemExit(f"explain answered {status}: see the service log")
    tally = Tally()
    for _ in range(200):
        started = time.perf_counter()
        status, answer = post(url, *body)
        tally.record(status, time.perf_counter() - started, cached=status == 200 and json.loads(answer)["cached"])
    figures = tally.figures()
    return {"explain_first_ms": round(1000 * first, 1), "explain_cached_p50_ms": figures["p50_ms"],
            "explain_cached_p99_ms": figures["p99_ms"], "answered_from_cache": tally.cached,
            "errors": figures["errors"]}


def verdict(burst_p95_ms: float | None, alone_p95_ms: float | None) -> tuple[str, str]:
    """``responsive`` or ``starved`` (predict p95 during the burst below 1 s or not), and the line saying so."""
    if burst_p95_ms is None or alone_p95_ms is None:
        return "starved", "predict answered nothing during the explain burst: starved"
    word = "responsive" if burst_p95_ms / 1000 < RESPONSIVE_P95_S else "starved"
    ratio = burst_p95_ms / alone_p95_ms if alone_p95_ms else float("inf")
    return word, (f"predict p95 during the explain burst: {burst_p95_ms / 1000:.3g} s vs "
                  f"{alone_p95_ms / 1000:.3g} s without ({ratio:.1f}x): {word}")


def show(label: str, f: dict[str, Any]) -> None:
    print(f"{label:40} {f['requests_per_s']:7.1f} req/s  p50 {f['p50_ms']}  p95 {f['p95_ms']}  p99 {f['p99_ms']} ms"
          f"  errors {f['errors']}", flush=True)


def modes(args: argparse.Namespace) -> list[tuple[str, list[str]]]:
    """The services compared: batching on and off, or (``--runtimes``) one per runtime, batching on."""
    if args.runtimes:
        return [(runtime, ["--runtime", runtime]) for runtime in args.runtimes]
    return [(name, list(extra)) for name, extra in MODES]


def measure_mode(ws_root: Path, run_id: str, *, name: str, extra: list[str], args: argparse.Namespace,
                 log: Path) -> dict[str, Any]:
    """Every phase in one service started with ``extra`` options: predict per client count, then the burst
    (unless ``--no-burst``)."""
    counts = sorted(set(args.clients) | ({args.burst_predict_clients} if args.burst else set()))
    entry: dict[str, Any] = {"serve_options": extra, "predict": {}}
    with Service(ws_root, extra, log) as service:
        url = f"{service.base}/api/v1/models/{run_id}/predict"
        if post(url, *multipart(png_bytes(999)))[0] != 200:  # loads the model before measuring
            raise SystemExit(f"predict failed on {run_id}: see {log}")
        pid = service.process.pid
        for clients in counts:
            entry["predict"][str(clients)] = figures = phase(pid, url, clients=clients, seconds=args.seconds)
            show(f"  {name} predict, {clients} clients", figures)
            print(f"{'':40} RSS {figures['rss_before_mb']} -> peak {figures['rss_peak_mb']} -> "
                  f"{figures['rss_after_mb']} MB", flush=True)
        if args.burst:
            measure_burst(entry, pid, url, name=name, args=args)
    return entry


def measure_burst(entry: dict[str, Any], pid: int, url: str, *, name: str, args: argparse.Namespace) -> None:
    """Phases 2 and 3 in a running service: predict during an explain burst, then cached explanations (in the
    first service compared only)."""
    explain_url = url.replace("/predict", "/explain")
    burst = phase(pid, url, clients=args.burst_predict_clients, seconds=args.seconds, explain_url=explain_url,
                  explain_clients=args.explain_clients)
    alone = entry["predict"][str(args.burst_predict_clients)]
    burst["predict_without_burst"] = {k: alone[k] for k in ("requests_per_s", "p50_ms", "p95_ms", "p99_ms")}
    burst["responsiveness"], burst["verdict"] = verdict(burst["predict"]["p95_ms"], alone["p95_ms"])
    entry["explain_burst"] = burst
    show(f"  {name} predict, {args.burst_predict_clients} + explain burst", burst["predict"])
    show(f"  {name} explain ({args.explain_clients} clients, IG 32)", burst["explain"])
    print(f"{'':40} RSS {burst['rss_before_mb']} -> peak {burst['rss_peak_mb']} -> {burst['rss_after_mb']} MB;"
          f" {burst['explain']['answered_from_cache']} explanations from the cache (should be 0)", flush=True)
    print(f"  {name}: {burst['verdict']}", flush=True)
    if name == modes(args)[0][0]:
        entry["explain_cached"] = cached_explain(explain_url)
        print(f"  {name}: cached explain p50 {entry['explain_cached']['explain_cached_p50_ms']} ms "
              "(target <= 20 ms)", flush=True)


def client_counts(text: str) -> list[int]:
    """``8,32`` as [8, 32]."""
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give client counts separated by commas, e.g. 8,32") from None


def runtime_names(text: str) -> list[str]:
    """``torch,onnx`` as ["torch", "onnx"] (at least two, each one of RUNTIMES)."""
    names = [x.strip() for x in text.split(",") if x.strip()]
    if len(names) < 2 or len(set(names)) != len(names) or set(names) - set(RUNTIMES):
        raise argparse.ArgumentTypeError(f"{text!r}: give two or more of {', '.join(RUNTIMES)} separated by "
                                         "commas, e.g. torch,onnx")
    return names


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=20.0, help="length of each phase (default 20)")
    parser.add_argument("--clients", type=client_counts, default=[8, 32],
                        help="predict client counts, comma-separated (default 8,32)")
    parser.add_argument("--burst-predict-clients", type=int, default=8, help="predict clients during the burst")
    parser.add_argument("--explain-clients", type=int, default=4, help="explaining clients in the burst (default 4)")
    parser.add_argument("--runtimes", type=runtime_names, default=None,
                        help="compare these prediction runtimes (e.g. torch,onnx; batching on) instead of batching "
                        "on/off; results go to results/serve_load_onnx.json unless --out is given")
    parser.add_argument("--no-burst", dest="burst", action="store_false",
                        help="skip the explain burst and the cached-explanation phase (predict only)")
    parser.add_argument("--out", type=Path, default=None, help="where to write the JSON results (default "
                        "results/serve_load.json, or results/serve_load_onnx.json with --runtimes)")
    args = parser.parse_args()
    if args.out is None:
        args.out = RUNTIMES_OUT if args.runtimes else DEFAULT_OUT
    if args.seconds <= 0 or not args.clients or min(args.clients) < 1 or args.burst_predict_clients < 1 \
            or args.explain_clients < 1:
        parser.error("--seconds must be > 0; --clients (e.g. 8,32), --burst-predict-clients and --explain-clients "
                     "must be positive counts")
    return args


def speedup(entry: dict[str, Any], fast: str, slow: str) -> dict[str, float]:
    """Requests/s of service ``fast`` over service ``slow``, per client count."""
    return {c: round(entry[fast]["predict"][c]["requests_per_s"] /
                     max(entry[slow]["predict"][c]["requests_per_s"], 1e-9), 2) for c in entry[fast]["predict"]}


def compare_runtimes(entry: dict[str, Any], runtimes: list[str]) -> None:
    """Each runtime against the first (torch): requests/s speedup and p50 ratio per client count, printed."""
    base = runtimes[0]
    for other in runtimes[1:]:
        entry[f"{other}_speedup"] = speedup(entry, other, base)
        entry[f"{other}_p50_ratio"] = {
            c: round(entry[other]["predict"][c]["p50_ms"] / max(entry[base]["predict"][c]["p50_ms"], 1e-9), 2)
            for c in entry[other]["predict"] if entry[other]["predict"][c]["p50_ms"] is not None
            and entry[base]["predict"][c]["p50_ms"] is not None}
        print(f"  {other} vs {base} requests/s by clients: {entry[f'{other}_speedup']} (target >= 1.5x); "
              f"p50 ratio {entry[f'{other}_p50_ratio']}", flush=True)


def main() -> None:
    args = parse_args()
    from handlens.core.workspace import Workspace
    from handlens.serve.settings import ServeSettings
    from handlens.train.run import quiet_lightning

    quiet_lightning()
    defaults = ServeSettings()
    results: dict[str, Any] = {
        "benchmark": "serve_load", "machine": machine(), "seconds_per_phase": args.seconds,
        "clients": args.clients, "burst_predict_clients": args.burst_predict_clients,
        "explain_clients": args.explain_clients, "explain_method": EXPLAIN_METHOD, "explain_params": EXPLAIN_PARAMS,
        "responsive_if_burst_p95_below_s": RESPONSIVE_P95_S,
        "default_serve_settings": {"batch_size": defaults.batch_size, "max_wait_ms": defaults.max_wait_ms,
                                   "explain_concurrency": defaults.explain_concurrency},
        "runtimes": args.runtimes or ["torch"], "explain_burst": args.burst, "models": {}, "verdicts": []}
    tmp = Path(tempfile.mkdtemp(prefix="handlens-serve-"))
    try:
        ws = Workspace.open(tmp / "ws")
        for backbone, run_id in make_models(ws).items():
            print(f"{backbone} ({run_id})", flush=True)
            entry: dict[str, Any] = {"run_id": run_id}
            for name, extra in modes(args):
                entry[name] = measure_mode(ws.root, run_id, name=name, extra=extra, args=args, log=tmp / "serve.log")
                if args.burst:
                    results["verdicts"].append(f"{backbone} {name}: {entry[name]['explain_burst']['verdict']}")
            if args.runtimes:
                compare_runtimes(entry, args.runtimes)
            else:
                entry["batching_speedup"] = speedup(entry, "batched", "unbatched")
                print(f"  micro-batching speedup by clients: {entry['batching_speedup']} (target >= 1.5x)",
                      flush=True)
            results["models"][backbone] = entry
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    results["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    for line in results["verdicts"]:
        print(line)
    write_result(results, args.out)


if __name__ == "__main__":
    main()
