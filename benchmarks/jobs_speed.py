"""Jobs and scale-out: how long a job waits before a worker starts it, and what a second worker buys.

In a fresh temporary workspace (a learnable 3-class colour tree, 16 images of 64 px per class, imported and
split 0.5/0.25/0.25 as ``tests/conftest.py`` builds it), the feature cache is warmed once (one
``handlens train`` of the default frozen recipe) before anything is timed, so every job below reads cached
features and the arms start alike. Then:

(1) submit-to-start latency: one worker already started and idle (it has run a warm-up job, so its imports
    are paid), then N jobs one at a time, each submitted once the worker is idle again; the latency is the
    time from ``submit_job(...)`` returning to the job's row leaving ``queued`` (the row polled every 10 ms
    with ``get_job``). For the local executor (``python -m handlens.jobs.worker``: it polls the catalog
    every 0.5 s), Celery on RabbitMQ and Celery on Redis. Each job is a tiny frozen train (cached features).

(2) throughput: 20 queued frozen training jobs (the default recipe: ``model.backbone=efficientnet_lite0
    model.weights=packaged model.freeze=frozen``, ``train.seed=1..20`` so they are 20 distinct runs,
    the same 20 in each arm), on one worker (arm A: one after another) and on two worker processes
    (arm B); wall time from the first submit to the last job seen finished, and the ratio B / A. Celery
    workers first (a fresh RabbitMQ vhost per arm; each one ``handlens worker --queues train --concurrency 1``
    as typed, so arm B is two such commands on one host, each with its default node name ``handlens-PID@HOST``:
    ``cli_two_workers_one_host`` records that both were still alive at the end of the arm and both ran jobs),
    then the same with local workers (two of them share the catalog queue). Workers are started and warmed
    (each has run one job) before the clock starts. ``OMP_NUM_THREADS`` is 2 for the one worker, 1 for each of
    two; training takes its torch thread count from it (``handlens.train.run.training_threads``).

The machine's 2 cores are shared with other work: the load average is recorded before and after each arm.

    .venv/bin/python benchmarks/jobs_speed.py            # ~2.5 minutes on 2 cores
    .venv/bin/python benchmarks/jobs_speed.py --quick    # a smoke run (~1 minute): 4 jobs per arm, 2 samples
    .venv/bin/python benchmarks/jobs_speed.py --no-local-throughput --keep --out /tmp/jobs_speed.json
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import random
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from handlens.core.workspace import Workspace
from handlens.data.catalog import open_catalog
from handlens.jobs.api import get_job, list_jobs, submit_job

ROOT = Path(__file__).resolve().parent
DEFAULT_OUT = ROOT / "results" / "jobs_speed.json"
RABBIT_BASE = "amqp://guest:guest@127.0.0.1:5672"
#: the Celery tests flush Redis databases 9-14; this one is the benchmark's own
REDIS_DB = 15
DATASET = "colours"
FROZEN = [f"data.dataset={DATASET}", "model.backbone=efficientnet_lite0", "model.weights=packaged",
          "model.freeze=frozen", "tracking.backend=none", "train.progress=false"]
TERMINAL = ("finished", "failed", "cancelled")
POLL_LATENCY_S = 0.01
POLL_DONE_S = 0.05
#: after a job ends, wait this long before the next latency sample (a Celery worker acks, then fetches)
SETTLE_S = 1.0
#: plus up to this much at random (seeded): the local worker polls every 0.5 s, and a fixed wait would always
#: land at the same point of its cycle
SETTLE_JITTER_S = 0.5
SEED = 20240611
JOB_TIMEOUT_S = 300.0


# --- the dataset, as tests/conftest.py builds it (copied: a benchmark does not import the tests) -------------

def colour_tree(root: Path, per_class: int = 16, size: int = 64) -> Path:
    """A learnable tree: each class has its own dominant colour, with noise."""
    rng = np.random.default_rng(7)
    colours = {"red": (200, 40, 40), "green": (40, 200, 40), "blue": (40, 40, 200)}
    for label, colour in colours.items():
        (root / label).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            base = np.array(colour, dtype=np.float32)[None, None] * rng.uniform(0.7, 1.0)
            noise = rng.normal(0, 25, (size, size, 3))
            Image.fromarray((base + noise).clip(0, 255).astype(np.uint8)).save(root / label / f"{label}_{i:02d}.png")
    return root


def split_workspace(root: Path, tree: Path, *, ratios: str = "0.5,0.25,0.25", seed: int = 0) -> Workspace:
    """A workspace at ``root/ws`` with ``tree`` imported as the colours dataset and split by ``ratios``."""
    from handlens.data.importer import import_path
    from handlens.data.splits import make_split

    ws = Workspace.open(root / "ws")
    catalog = open_catalog(ws.db_url)
    try:
        import_path(catalog, tree, DATASET, workers=1)
        make_split(catalog, DATASET, ratios=ratios, seed=seed)
    finally:
        catalog.close()
    return ws


def job_config(*overrides: str) -> dict[str, Any]:
    """A train job's config: the default frozen recipe on the colours dataset, plus ``overrides``."""
    from handlens.train.config import load_config

    return load_config(None, [*FROZEN, *overrides]).model_dump(mode="json")


# --- brokers -------------------------------------------------------------------------------------------------

def _rabbitmqctl(*args: str) -> bool:
    tool = shutil.which("rabbitmqctl")
    if tool is None:
        return False
    try:
        return subprocess.run([tool, *args], capture_output=True, timeout=60, check=False).returncode == 0
    except subprocess.TimeoutExpired:
        return False


def _purge(url: str) -> None:
    from handlens.jobs.broker import QUEUES, make_app

    app = make_app(url)
    try:
        with app.connection_for_write() as conn:
            for queue in QUEUES:
                with contextlib.suppress(Exception):  # not declared yet
                    conn.default_channel.queue_purge(queue)
    finally:
        app.close()


@contextlib.contextmanager
def rabbitmq(tag: str) -> Iterator[tuple[str, str]]:
    """A RabbitMQ vhost of this arm's own (deleted after), else the default vhost purged: (url, which)."""
    vhost = f"handlens_bench_{tag}_{secrets.token_hex(3)}"
    if _rabbitmqctl("add_vhost", vhost) and _rabbitmqctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*"):
        try:
            yield f"{RABBIT_BASE}/{vhost}", f"fresh vhost {vhost}"
        finally:
            _rabbitmqctl("delete_vhost", vhost)
        return
    url = f"{RABBIT_BASE}//"
    _purge(url)
    yield url, "default vhost, purged"


@contextlib.contextmanager
def redis_db() -> Iterator[str]:
    """Redis database :data:`REDIS_DB`, flushed before and after."""
    import redis

    client = redis.Redis(host="127.0.0.1", port=6379, db=REDIS_DB)
    client.flushdb()
    try:
        yield f"redis://127.0.0.1:6379/{REDIS_DB}"
    finally:
        client.flushdb()
        client.close()


def listening(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(1)
        return sock.connect_ex(("127.0.0.1", port)) == 0


# --- workers -------------------------------------------------------------------------------------------------

def start_workers(ws: Workspace, *, broker: str | None, count: int, threads: int,
                  log_dir: Path) -> list[subprocess.Popen[bytes]]:
    """``count`` worker processes, each in a process group of its own: Celery workers on ``broker`` (the
    ``handlens worker`` command as a user types it, no --hostname: each takes its default node name), else
    local workers (``python -m handlens.jobs.worker``); each with ``OMP_NUM_THREADS=threads``."""
    from handlens.core.workspace import DB_URL_ENV, WORKSPACE_ENV

    env = {**os.environ, "OMP_NUM_THREADS": str(threads), WORKSPACE_ENV: str(ws.root), DB_URL_ENV: ws.db_url}
    log_dir.mkdir(parents=True, exist_ok=True)
    procs = []
    for i in range(count):
        if broker:
            argv = [sys.executable, "-m", "handlens.cli.main", "--workspace", str(ws.root), "--db", ws.db_url,
                    "worker", "--broker", broker, "--queues", "train", "--concurrency", "1", "--loglevel", "WARNING"]
        else:
            argv = [sys.executable, "-m", "handlens.jobs.worker", str(ws.root), ws.db_url, str(os.getpid())]
        with (log_dir / f"worker-{i}.log").open("ab") as log:
            procs.append(subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT,
                                          start_new_session=True))
    return procs


def stop_workers(procs: list[subprocess.Popen[bytes]]) -> None:
    """SIGTERM to each worker's process group; SIGKILL to a group that lingers."""
    for proc in procs:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


def _pid(worker: str | None) -> int | None:
    if not worker or ":" not in worker:
        return None
    with contextlib.suppress(ValueError):
        return int(worker.rsplit(":", 1)[1])
    return None


class Owners:
    """Which started worker (its index) each job process belongs to: a local worker runs jobs in its own
    process; a Celery worker in a prefork child, replaced after 50 jobs (``--max-jobs-per-child``), so children
    are noted while they live."""

    def __init__(self, procs: list[subprocess.Popen[bytes]]) -> None:
        self.index = {proc.pid: i for i, proc in enumerate(procs)}
        self.last = 0.0

    def scan(self, every: float = 0.25) -> None:
        """Note the workers' children (``/proc``: Linux); at most once per ``every`` seconds."""
        if time.monotonic() - self.last < every:
            return
        self.last = time.monotonic()
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) in self.index:
                continue
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            if ppid in self.index:
                self.index[int(entry.name)] = self.index[ppid]

    def of(self, worker: str | None) -> int | None:
        return self.index.get(_pid(worker) or -1)


def log_tails(log_dir: Path, chars: int = 2000) -> str:
    return "\n".join(f"--- {path.name}\n{path.read_text(errors='replace')[-chars:]}"
                     for path in sorted(log_dir.glob("worker-*.log")))


# --- waiting -------------------------------------------------------------------------------------------------

def wait_done(catalog: Any, ids: list[str], *, log_dir: Path, timeout: float = JOB_TIMEOUT_S,
              owners: Owners | None = None) -> dict[str, Any]:
    """Poll until every job in ``ids`` has ended; returns their records by id (a timeout stops the benchmark)."""
    wanted = set(ids)
    deadline = time.monotonic() + timeout
    while True:
        if owners is not None:
            owners.scan()
        found = {job.id: job for job in list_jobs(catalog=catalog, limit=100_000) if job.id in wanted}
        if len(found) == len(wanted) and all(job.status in TERMINAL for job in found.values()):
            return found
        if time.monotonic() > deadline:
            states = sorted({job.status for job in found.values()})
            raise SystemExit(f"jobs still {states} after {timeout:.0f} s; worker logs:\n{log_tails(log_dir)}")
        time.sleep(POLL_DONE_S)


def warm_workers(ws: Workspace, catalog: Any, owners: Owners, *, broker: str | None,
                 log_dir: Path) -> dict[str, Any]:
    """Each worker runs one job before anything is timed (its imports paid, its broker connection made): as
    many warm-up jobs at once as workers, again (up to 3 rounds) while some worker ran none."""
    count = len(set(owners.index.values()))
    covered: set[int] = set()
    submitted = 0
    start = time.perf_counter()
    for _ in range(3):
        ids = [submit_job("train", job_config(f"train.seed={1000 + submitted + i}"), workspace=ws, catalog=catalog,
                          broker=broker).id for i in range(count)]
        submitted += len(ids)
        for job in wait_done(catalog, ids, log_dir=log_dir, owners=owners).values():
            if job.status != "finished":
                raise SystemExit(f"warm-up job {job.id} {job.status}: {job.error}\n{log_tails(log_dir)}")
            index = owners.of(job.worker)
            if index is not None:
                covered.add(index)
        if len(covered) == count:
            break
    return {"warm_up_jobs": submitted, "workers_warmed": len(covered),
            "warm_up_s": round(time.perf_counter() - start, 2)}


# --- the measurements ----------------------------------------------------------------------------------------

def latency(ws: Workspace, catalog: Any, *, broker: str | None, samples: int, log_dir: Path) -> dict[str, Any]:
    """Submit-to-start latency on one warm, idle worker, ``samples`` jobs one at a time."""
    procs = start_workers(ws, broker=broker, count=1, threads=2, log_dir=log_dir)
    rng = random.Random(SEED)
    try:
        warm = warm_workers(ws, catalog, Owners(procs), broker=broker, log_dir=log_dir)
        waits, submits, polls = [], [], []
        for i in range(samples):
            time.sleep(SETTLE_S + rng.uniform(0.0, SETTLE_JITTER_S))  # no phase lock with a polling worker
            config = job_config(f"train.seed={2000 + i}")
            t0 = time.perf_counter()
            job = submit_job("train", config, workspace=ws, catalog=catalog, broker=broker)
            t1 = time.perf_counter()
            while True:
                before = time.perf_counter()
                status = get_job(job.id, catalog=catalog).status
                seen = time.perf_counter()
                polls.append(seen - before)
                if status != "queued":
                    break
                if seen - t1 > JOB_TIMEOUT_S:
                    raise SystemExit(f"job {job.id} still queued after {JOB_TIMEOUT_S:.0f} s\n{log_tails(log_dir)}")
                time.sleep(POLL_LATENCY_S)
            waits.append(seen - t1)
            submits.append(t1 - t0)
            done = wait_done(catalog, [job.id], log_dir=log_dir)[job.id]
            if done.status != "finished":
                raise SystemExit(f"latency job {job.id} {done.status}: {done.error}\n{log_tails(log_dir)}")
    finally:
        stop_workers(procs)
    return {"samples_s": [round(x, 4) for x in waits], "p50_s": round(statistics.median(waits), 4),
            "max_s": round(max(waits), 4), "submit_call_p50_s": round(statistics.median(submits), 4),
            "submit_call_max_s": round(max(submits), 4), "poll_call_p50_s": round(statistics.median(polls), 5),
            **warm}


def throughput(ws: Workspace, catalog: Any, *, broker: str | None, workers: int, jobs: int,
               log_dir: Path) -> dict[str, Any]:
    """``jobs`` frozen train jobs queued at once for ``workers`` warm worker processes: first submit to last end."""
    threads = 2 if workers == 1 else 1
    procs = start_workers(ws, broker=broker, count=workers, threads=threads, log_dir=log_dir)
    owners = Owners(procs)
    try:
        warm = warm_workers(ws, catalog, owners, broker=broker, log_dir=log_dir)
        configs = [job_config(f"train.seed={i + 1}") for i in range(jobs)]
        load_before = load_average()
        t0 = time.perf_counter()
        ids = [submit_job("train", config, workspace=ws, catalog=catalog, broker=broker).id for config in configs]
        submitted = time.perf_counter() - t0
        done = wait_done(catalog, ids, log_dir=log_dir, timeout=JOB_TIMEOUT_S * jobs, owners=owners)
        wall = time.perf_counter() - t0
        load_after = load_average()
        exit_codes = [proc.poll() for proc in procs]  # None: still running when the last job ended
    finally:
        stop_workers(procs)
    logs = [(log_dir / f"worker-{i}.log").read_text(errors="replace") for i in range(workers)]
    records = [done[i] for i in ids]
    per_worker: dict[str, int] = {}
    for job in records:
        index = owners.of(job.worker)
        key = "unknown" if index is None else f"worker-{index}"
        per_worker[key] = per_worker.get(key, 0) + 1
    seconds = [float(job.result.get("seconds", 0.0)) for job in records if job.status == "finished"]
    failed = [f"{job.id}: {job.status}: {job.error}" for job in records if job.status != "finished"]
    return {"workers": workers, "omp_num_threads": threads, "jobs": jobs, "wall_s": round(wall, 2),
            "submit_all_s": round(submitted, 3), "finished": jobs - len(failed), "failures": failed[:5],
            "jobs_per_worker": per_worker, "job_processes_seen": len({_pid(job.worker) for job in records}),
            "train_seconds_p50": round(statistics.median(seconds), 2) if seconds else None,
            "train_seconds_sum": round(sum(seconds), 1), "train_seconds": [round(x, 2) for x in seconds],
            "load_average_before": load_before, "load_average_after": load_after,
            "exit_codes_at_end": exit_codes, "resource_locked_in_log": ["RESOURCE_LOCKED" in log for log in logs],
            **warm}


def two_cli_workers(arm: dict[str, Any]) -> dict[str, Any]:
    """The check that two ``handlens worker`` commands on one host both run (their default node names differ):
    read from the two-worker Celery arm. Two workers sharing one node name failed at start (the second hit
    RESOURCE_LOCKED on RabbitMQ), so both alive when the last job ended, and both having run jobs, is the check."""
    alive = [code is None for code in arm["exit_codes_at_end"]]
    ran = sorted(count for key, count in arm["jobs_per_worker"].items() if key != "unknown")
    return {"command": "handlens worker --broker URL --queues train --concurrency 1 --loglevel WARNING (x2, "
                       "no --hostname)", "alive_at_end": alive, "resource_locked_in_log": arm["resource_locked_in_log"],
            "workers_warmed": arm["workers_warmed"], "jobs_per_worker": arm["jobs_per_worker"],
            "both_alive": all(alive) and len(alive) == 2,
            "both_ran_jobs": len(ran) == 2 and ran[0] > 0 and arm["workers_warmed"] == 2}


def warm_cache(ws: Workspace, log: Path) -> dict[str, Any]:
    """One ``handlens train`` of the frozen recipe, so every timed job finds the features cached."""
    argv = [sys.executable, "-m", "handlens.cli.main", "--workspace", str(ws.root), "train", "--dataset", DATASET,
            "--json", *FROZEN[1:], "train.seed=999"]
    start = time.perf_counter()
    with log.open("ab") as err:
        proc = subprocess.run(argv, stdout=subprocess.PIPE, stderr=err, text=True, check=False)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"warming the feature cache failed ({proc.returncode}); see {log}")
    report = json.loads(proc.stdout[proc.stdout.index("{"):])
    return {"wall_s": round(wall, 2), "timings": report.get("timings", {}), "seconds": report.get("seconds")}


# --- reporting -----------------------------------------------------------------------------------------------

def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def machine_info() -> dict[str, Any]:
    def version(name: str) -> str:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return "absent"

    rev = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                         check=False).stdout.strip()
    dirty = bool(subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--", "../src"],
                                capture_output=True, text=True, check=False).stdout.strip())
    rabbit = subprocess.run(["rabbitmqctl", "version"], capture_output=True, text=True,
                            check=False).stdout.strip() if shutil.which("rabbitmqctl") else "unknown"
    return {"cpu_count": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform(),
            "handlens": version("handlens"), "torch": version("torch"), "celery": version("celery"),
            "kombu": version("kombu"), "redis_py": version("redis"), "rabbitmq": rabbit or "unknown",
            "git": rev + (" (src modified)" if dirty else ""), "load_average_at_start": load_average(),
            "when": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "note": "2 CPU cores shared with other sessions' work: absolute times are noisy; compare within a run"}


def ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a and b else None


def summary(result: dict[str, Any]) -> str:
    lines = ["", "submit-to-start latency (warm idle worker)", f"{'executor':<18}{'p50 s':>9}{'max s':>9}"
             f"{'submit p50 s':>14}"]
    for name, row in result["latency"].items():
        if "p50_s" in row:
            lines.append(f"{name:<18}{row['p50_s']:>9.3f}{row['max_s']:>9.3f}{row['submit_call_p50_s']:>14.3f}")
        else:
            lines.append(f"{name:<18}  skipped: {row.get('skipped', '')}")
    lines += ["", f"{result['settings']['jobs']} frozen train jobs",
              f"{'executor':<10}{'1 worker s':>12}{'2 workers s':>13}{'ratio 2/1':>11}{'speed-up':>10}"]
    for name, row in result["throughput"].items():
        if "ratio_two_to_one" in row:
            lines.append(f"{name:<10}{row['one_worker']['wall_s']:>12.1f}{row['two_workers']['wall_s']:>13.1f}"
                         f"{row['ratio_two_to_one']:>11.3f}{row['speed_up']:>10.2f}")
        else:
            lines.append(f"{name:<10}  skipped: {row.get('skipped', '')}")
    pair = result.get("cli_two_workers_one_host")
    if pair:
        lines.append(f"two `handlens worker` on one host: both alive {pair['both_alive']}, "
                     f"both ran jobs {pair['both_ran_jobs']} {pair['jobs_per_worker']}")
    machine = result["machine"]
    lines.append(f"load average at start {machine['load_average_at_start']}, at end "
                 f"{machine.get('load_average_at_end')}")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=20, help="frozen train jobs per throughput arm (default 20)")
    parser.add_argument("--samples", type=int, default=5, help="latency samples per executor (default 5)")
    parser.add_argument("--per-class", type=int, default=16, help="images per class of the colour tree (default 16)")
    parser.add_argument("--image-size", type=int, default=64, help="their side in pixels (default 64)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 4 jobs per arm, 2 latency samples")
    parser.add_argument("--no-local-throughput", action="store_true", help="skip the local workers' arms")
    parser.add_argument("--keep", action="store_true", help="keep the temporary workspace and worker logs")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT,
                        help="JSON results file (default benchmarks/results/jobs_speed.json)")
    args = parser.parse_args(argv)
    if args.quick:
        args.jobs, args.samples = min(args.jobs, 4), min(args.samples, 2)
    return args


def run_all(args: argparse.Namespace, tmp: Path, result: dict[str, Any]) -> None:
    """Everything measured, in order, into ``result``."""
    ws = split_workspace(tmp, colour_tree(tmp / "colours", per_class=args.per_class, size=args.image_size))
    result["feature_cache_warm_up"] = warm_cache(ws, tmp / "warm-cache.log")
    catalog = open_catalog(ws.db_url)
    try:
        lat = result["latency"]
        lat["local"] = latency(ws, catalog, broker=None, samples=args.samples, log_dir=tmp / "lat-local")
        if listening(5672):
            with rabbitmq("lat") as (url, how):
                lat["celery_rabbitmq"] = {"broker": how, **latency(ws, catalog, broker=url, samples=args.samples,
                                                                   log_dir=tmp / "lat-rabbit")}
        else:
            lat["celery_rabbitmq"] = {"skipped": "RabbitMQ not listening on 127.0.0.1:5672"}
        if listening(6379):
            with redis_db() as url:
                lat["celery_redis"] = {"broker": f"db {REDIS_DB}, flushed", **latency(
                    ws, catalog, broker=url, samples=args.samples, log_dir=tmp / "lat-redis")}
        else:
            lat["celery_redis"] = {"skipped": "Redis not listening on 127.0.0.1:6379"}
        thr = result["throughput"]
        if listening(5672):
            arms = {}
            for workers, key in ((1, "one_worker"), (2, "two_workers")):
                with rabbitmq(f"w{workers}") as (url, how):
                    arms[key] = {"broker": how, **throughput(ws, catalog, broker=url, workers=workers, jobs=args.jobs,
                                                             log_dir=tmp / f"thr-celery-{workers}")}
            thr["celery"] = arms
            result["cli_two_workers_one_host"] = two_cli_workers(arms["two_workers"])
        else:
            thr["celery"] = {"skipped": "RabbitMQ not listening on 127.0.0.1:5672"}
        if args.no_local_throughput:
            thr["local"] = {"skipped": "--no-local-throughput"}
        else:
            thr["local"] = {key: throughput(ws, catalog, broker=None, workers=workers, jobs=args.jobs,
                                            log_dir=tmp / f"thr-local-{workers}")
                            for workers, key in ((1, "one_worker"), (2, "two_workers"))}
        for row in thr.values():
            if "two_workers" in row:
                row["ratio_two_to_one"] = ratio(row["two_workers"]["wall_s"], row["one_worker"]["wall_s"])
                row["speed_up"] = ratio(row["one_worker"]["wall_s"], row["two_workers"]["wall_s"])
    finally:
        catalog.close()


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="handlens-jobs-speed-"))
    result: dict[str, Any] = {
        "machine": machine_info(),
        "settings": {
            "dataset": f"3 classes x {args.per_class} images of {args.image_size} px (colour tree), split "
                       "0.5/0.25/0.25 seed 0",
            "recipe": FROZEN, "jobs": args.jobs, "latency_samples": args.samples, "quick": args.quick,
            "distinct_runs": "train.seed=1..N, the same N configs in each arm",
            "latency_poll_s": POLL_LATENCY_S, "done_poll_s": POLL_DONE_S, "settle_between_samples_s": SETTLE_S,
            "feature_cache": "warmed once (one `handlens train` of the recipe) before every timed job; one "
                             "workspace for all arms, so each arm starts with the features cached",
            "workers": "warmed before timing: each worker process ran one job first (its imports paid)",
            "celery_worker": "`python -m handlens.cli.main --workspace WS --db URL worker --broker URL --queues train "
                             "--concurrency 1 --loglevel WARNING` as typed, in the latency run and in both "
                             "throughput arms (arm B: two of them on one host, each with its default node name "
                             "handlens-PID@HOST; see cli_two_workers_one_host). Prefork; a child is replaced "
                             "after 50 jobs (the default --max-jobs-per-child), more than any one worker runs in "
                             "an arm (21 at most), so each keeps one child: job_processes_seen counts them",
            "local_worker": "python -m handlens.jobs.worker ROOT DB_URL PARENT_PID (polls the catalog every 0.5 s)",
            "omp_num_threads": "2 for the one worker (latency and arm A), 1 for each of the two workers (arm B). "
                               "Training sets torch's thread count from it (handlens.train.run.training_threads: "
                               "$OMP_NUM_THREADS when set, else every core), so arm B's two jobs at once take one "
                               "core each instead of both oversubscribing the 2 cores",
        },
        "latency": {}, "throughput": {},
    }
    try:
        run_all(args, tmp, result)
    finally:
        if args.keep:
            print(f"workspace and worker logs kept: {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    result["machine"]["load_average_at_end"] = load_average()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))
    print(summary(result))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
