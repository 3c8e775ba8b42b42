"""Worker processes that never outlive the command that started them."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time


def worker_init(parent: int | None) -> None:
    """In each worker process (import probes, decode pools): leave Ctrl-C and SIGTERM to the parent, and die
    with it. ``parent``: the parent's pid when the pool was made (``os.getpid()`` there).

    Without this, a SIGKILLed import leaves its workers blocked on their task pipe forever.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent stops the pool cleanly
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a forked worker inherited the parent's handler
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            import ctypes

            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    ppid = os.getppid()
    if parent is not None and ppid != parent:  # the parent died before we got here
        os._exit(1)
    threading.Thread(target=exit_when_orphaned, args=(ppid,), name="handlens-parent-watch", daemon=True).start()


def exit_when_orphaned(ppid: int, interval: float = 0.5) -> None:
    """The portable fallback: once our parent process is gone (we are re-parented), exit."""
    while os.getppid() == ppid:
        time.sleep(interval)
    os._exit(1)
