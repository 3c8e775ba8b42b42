"""The job runner's cancel watch: where an interrupt may land."""

from __future__ import annotations

import signal
import sys
import time
from types import SimpleNamespace

import pytest

from handlens.jobs import runner


def _call_from(module: str, handler):
    """Call ``handler(SIGINT, frame)`` from a frame whose module is ``module`` (as if the main thread were there)."""
    namespace = {"__name__": module, "sys": sys, "signal": signal}
    exec("def inside(handler):\n    handler(signal.SIGINT, sys._getframe())", namespace)
    namespace["inside"](handler)


@pytest.fixture
def watch(monkeypatch):
    asked = []
    monkeypatch.setattr(runner, "_thread", SimpleNamespace(interrupt_main=asked.append))
    watch = runner._Watch(None, "job-1", interrupt=True)
    watch.asked = asked
    return watch


def _wait_for_retries(asked, count, timeout=2.0):
    deadline = time.monotonic() + timeout
    while len(asked) < count and time.monotonic() < deadline:
        time.sleep(0.01)
    return len(asked)


@pytest.mark.parametrize("module", ["sqlalchemy.engine.default", "sqlite3.dbapi2", "optuna.storages._rdb.storage",
                                    "importlib._bootstrap"])
def test_a_cancel_does_not_interrupt_database_code_or_an_import_but_asks_again(watch, module):
    """An interrupt inside a SQLite query kept the cursor (and the catalog's lock) alive in the traceback, so the
    job could not be marked cancelled; inside an import it leaves a library half initialised in the worker."""
    watch.cancelled = True
    _call_from(module, watch._on_sigint)  # no KeyboardInterrupt here
    assert _wait_for_retries(watch.asked, 1) == 1 and watch.asked == [signal.SIGINT]
    with pytest.raises(KeyboardInterrupt, match="cancelled by the user"):
        _call_from("handlens.train.fold_heads", watch._on_sigint)  # the retry lands in our own code: now it stops


def test_no_interrupt_without_a_cancel_and_no_retry_after_the_job_ended(watch):
    _call_from("handlens.search.study", watch._on_sigint)  # a stray SIGINT in a worker that ignores it: nothing
    watch.cancelled = True
    watch._done.set()
    _call_from("sqlalchemy.orm.session", watch._on_sigint)
    time.sleep(5 * runner.SAFE_POINT_RETRY_S)
    assert watch.asked == []  # the job ended meanwhile: a late interrupt would hit whatever runs next
