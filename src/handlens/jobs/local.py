"""The embedded executor: one local worker process whose queue is the catalog's ``jobs`` table.

``handlens serve`` with no broker starts it. Jobs run one at a time in a process of their own
(``python -m handlens.jobs.worker``: the service never imports the training code, and no torch or CUDA state
is inherited), which dies with the service. A restarted service's worker requeues the jobs its dead
predecessor left running, and they resume (a train job from its last checkpoint).
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading

from handlens.core.workspace import Workspace


class LocalExecutor:
    """The service's one local worker process (started with the service, stopped with it)."""

    #: a worker that died is started again after this many seconds (it requeues the job it was running)
    RESTART_SECONDS = 2.0

    def __init__(self, ws: Workspace, *, threads: int | None = None) -> None:
        self.ws, self.threads = ws, threads
        self.process: subprocess.Popen[bytes] | None = None
        self._stopping = threading.Event()
        self._watch: threading.Thread | None = None
        self.log_path = ws.root / "jobs" / "local-worker.log"

    def start(self) -> None:
        self._spawn()
        self._watch = threading.Thread(target=self._supervise, name="handlens-local-worker-watch", daemon=True)
        self._watch.start()

    def _spawn(self) -> None:
        env = dict(os.environ)
        if self.threads:
            env["OMP_NUM_THREADS"] = str(self.threads)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:  # the worker's own messages; each job has its own log
            self.process = subprocess.Popen(  # our own module, fixed arguments
                [sys.executable, "-m", "handlens.jobs.worker", str(self.ws.root), self.ws.db_url, str(os.getpid())],
                env=env, stdout=log, stderr=subprocess.STDOUT)

    def _supervise(self) -> None:
        """A worker killed (for memory, by hand) is started again; its job is requeued and resumes."""
        while not self._stopping.wait(self.RESTART_SECONDS):
            if self.process is not None and self.process.poll() is not None and not self._stopping.is_set():
                self._spawn()

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self, timeout: float = 5.0) -> None:
        self._stopping.set()
        if self.process is None:
            return
        self.process.terminate()  # a running job stays "running": the next start requeues and resumes it
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout)
        self.process = None


class Forwarder:
    """With a broker, the service forwards jobs left on the catalog's local queue (a `jobs submit` without
    ``--broker``) to it every few seconds, so that none waits forever for a local worker that does not run."""

    INTERVAL_SECONDS = 3.0

    def __init__(self, ws: Workspace, broker: str) -> None:
        self.ws, self.broker = ws, broker
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="handlens-job-forwarder", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        import contextlib

        from handlens.data.catalog import open_catalog
        from handlens.jobs.api import forward_local_jobs

        catalog = open_catalog(self.ws.db_url)
        try:
            while not self._stopping.wait(self.INTERVAL_SECONDS):
                with contextlib.suppress(Exception):  # the broker or catalog is down: try again next time
                    forward_local_jobs(catalog=catalog, broker=self.broker)
        finally:
            catalog.close()

    def stop(self) -> None:
        self._stopping.set()
