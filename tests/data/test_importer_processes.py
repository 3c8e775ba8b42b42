"""A killed import takes its probe workers with it; SIGTERM stops it like Ctrl-C, keeping what it committed.

Each test runs an import in a child process that pauses (in its progress callback) once its workers
are busy, then signals that child and watches its worker processes through /proc.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from sqlalchemy import func, select

from handlens.data.catalog import Image as ImageRow
from handlens.data.catalog import open_catalog
from tests.conftest import write_image

pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="watches processes through /proc")

#: the child: import ``root`` with 2 workers, write the worker pids once ``pause_at`` files are probed, then wait
CHILD = """
import json, multiprocessing, os, sys, time
from pathlib import Path
from handlens.core.errors import HandlensError
from handlens.data.catalog import open_catalog
from handlens.data.importer import import_path

root, db, pid_file, pause_at = sys.argv[1], sys.argv[2], Path(sys.argv[3]), int(sys.argv[4])

def progress(done, total):
    if done == pause_at:
        pids = [p.pid for p in multiprocessing.active_children()]
        pid_file.with_suffix(".tmp").write_text(json.dumps(pids))
        os.replace(pid_file.with_suffix(".tmp"), pid_file)
        time.sleep(60)

try:
    import_path(open_catalog(f"sqlite:///{db}"), Path(root), "ds", workers=2, progress=progress, batch_size=8)
except HandlensError as exc:
    print(f"error: {exc}", file=sys.stderr)
    sys.exit(exc.exit_code)
print("finished without being stopped")
"""


def _alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie waiting for a reaper counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _wait_gone(pids: list[int], seconds: float) -> list[int]:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not any(_alive(p) for p in pids):
            return []
        time.sleep(0.1)
    return [p for p in pids if _alive(p)]


@pytest.fixture
def paused_import(tmp_path):
    """Start the child over 80 small images; yields (process, worker pids, catalog path) once it paused."""
    root = tmp_path / "tree"
    for i in range(80):
        write_image(root / ("a" if i % 2 else "b") / f"img_{i:03d}.png", i, (20, 20))
    db, pid_file = tmp_path / "catalog.db", tmp_path / "workers.json"
    open_catalog(f"sqlite:///{db}").close()
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path.cwd()), os.environ.get("PYTHONPATH", "")])}
    child = subprocess.Popen([sys.executable, str(script), str(root), str(db), str(pid_file), "20"], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    workers: list[int] = []
    try:
        deadline = time.monotonic() + 60
        while not pid_file.exists():
            assert child.poll() is None, f"the import ended early: {child.communicate()}"
            assert time.monotonic() < deadline, "the import never reached its pause"
            time.sleep(0.05)
        workers = json.loads(pid_file.read_text())
        assert len(workers) == 2 and all(_alive(p) for p in workers)
        yield child, workers, db
    finally:
        for pid in workers:  # never leave a process behind, whatever the outcome (they hold the pipes too)
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
        if child.poll() is None:
            child.kill()
        child.communicate(timeout=30)


def test_sigkill_of_the_import_takes_its_workers_with_it(paused_import):
    child, workers, _ = paused_import
    child.send_signal(signal.SIGKILL)
    child.wait(10)
    assert _wait_gone(workers, 5.0) == [], "probe workers outlived their killed import"


def test_sigterm_stops_the_import_cleanly_and_reports_what_it_committed(paused_import):
    child, workers, db = paused_import
    child.send_signal(signal.SIGTERM)
    child.wait(30)
    assert _wait_gone(workers, 5.0) == []
    _, err = child.communicate(timeout=30)
    assert child.returncode == 130, err
    assert "Traceback" not in err
    assert "interrupted" in err and "run the same import again" in err
    assert "Committed before it stopped: 16 of 80 files" in err  # two batches of 8 before the 20th probe
    catalog = open_catalog(f"sqlite:///{db}")
    with catalog.session() as session:
        assert session.scalar(select(func.count(ImageRow.id))) == 16
    catalog.close()
