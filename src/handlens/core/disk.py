"""A full disk, recognised wherever a write fails (train, import, caches) and told to the user once, clearly."""

from __future__ import annotations

import errno
from pathlib import Path

from handlens.core.errors import DiskFullError

_OUT_OF_SPACE = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}


def is_disk_full(exc: BaseException) -> bool:
    """True for an out-of-space failure, also when a library reports it as its own error (safetensors'
    ``IoError(... StorageFull ...)``, torch's ``RuntimeError``) or as the cause of another exception."""
    seen: BaseException | None = exc
    for _ in range(8):  # the exception, its cause, its context...
        if seen is None:
            return False
        if isinstance(seen, DiskFullError) or (isinstance(seen, OSError) and seen.errno in _OUT_OF_SPACE):
            return True
        text = str(seen)
        if "No space left on device" in text or "StorageFull" in text or "Disk quota exceeded" in text:
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def raise_if_disk_full(exc: BaseException, *, what: str, where: Path | str, then: str = "try again") -> None:
    """Raise a :class:`DiskFullError` (no traceback for the user) when ``exc`` is an out-of-space failure
    while writing ``what`` under ``where``; otherwise return, and the caller re-raises ``exc``. A
    ``DiskFullError`` from deeper down is raised again with this caller's (outer) words."""
    if not is_disk_full(exc):
        return
    raise DiskFullError(f"the disk is full: writing {what} under {where} failed. Free some space there "
                        f"(or move the workspace to a larger disk), then {then}") from None
