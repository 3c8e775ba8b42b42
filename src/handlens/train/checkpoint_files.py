"""Checkpoint files written so that a full disk or a kill never leaves a truncated one, and the one a write
replaces kept as the fallback of a resume. No Lightning here: the frozen fast path and ``resume`` read these
names without importing a framework."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path


def previous_checkpoint(path: Path) -> Path:
    """Where the checkpoint ``path`` replaces is kept: ``last.ckpt`` -> ``last.prev.ckpt``."""
    return path.with_name(f"{path.stem}.prev{path.suffix}")


def write_atomically(path: Path, data: bytes | memoryview, *, keep_previous: bool = False) -> None:
    """Write ``data`` to a temp file beside ``path`` (flushed and fsynced), then rename it over ``path``: a full
    disk or a kill leaves the old file whole, never a truncated one. ``keep_previous``: the file replaced is
    kept as :func:`previous_checkpoint` (the fallback of a resume). An ``OSError`` (ENOSPC) propagates."""
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        if keep_previous and path.exists():
            os.replace(path, previous_checkpoint(path))
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    with contextlib.suppress(OSError):  # the renames themselves survive a power cut (POSIX only)
        folder = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(folder)
        finally:
            os.close(folder)
