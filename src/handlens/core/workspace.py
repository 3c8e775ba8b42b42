"""The workspace: one directory that holds everything a user makes.

Layout: ``handlens.db`` (the catalog, unless a database URL points elsewhere), ``runs/`` (model
bundles, logs, tracking store), ``cache/`` (decoded images, features, heatmaps), ``demo/``
(embedded demo datasets).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from handlens.core.errors import InputError

WORKSPACE_ENV = "HANDLENS_WORKSPACE"
DB_URL_ENV = "HANDLENS_DB_URL"
DEFAULT_WORKSPACE = "handlens-workspace"
CATALOG_FILENAME = "handlens.db"


@dataclass(frozen=True)
class Workspace:
    """Paths inside one workspace directory. Creating it makes the directories."""

    root: Path
    db_url: str

    @classmethod
    def open(cls, root: str | Path | None = None, db_url: str | None = None) -> Workspace:
        """Open (creating if needed) the workspace at ``root``.

        ``root`` defaults to ``$HANDLENS_WORKSPACE``, else ``./handlens-workspace``; ``db_url`` to
        ``$HANDLENS_DB_URL``, else a SQLite file inside the workspace.
        """
        chosen = root if root is not None else os.environ.get(WORKSPACE_ENV) or DEFAULT_WORKSPACE
        path = Path(chosen).expanduser().resolve()
        if path.exists() and not path.is_dir():
            raise InputError(f"workspace {path} exists and is not a directory; pass --workspace DIR")
        for sub in ("", "runs", "cache"):
            (path / sub).mkdir(parents=True, exist_ok=True)
        url = db_url or os.environ.get(DB_URL_ENV) or f"sqlite:///{path / CATALOG_FILENAME}"
        return cls(root=path, db_url=url)

    @property
    def runs_dir(self) -> Path:
        return self.root / "runs"

    @property
    def cache_dir(self) -> Path:
        return self.root / "cache"

    @property
    def demo_dir(self) -> Path:
        """Where embedded demo datasets are built (created when a demo is)."""
        return self.root / "demo"

    def inside(self, relative: str | Path) -> Path:
        """Resolve ``relative`` under the workspace root, refusing any path that escapes it."""
        return resolve_inside(self.root, relative)


def resolve_inside(base: Path, candidate: str | Path) -> Path:
    """Resolve ``candidate`` (relative to ``base`` unless absolute) and require it to stay in ``base``.

    Symlinks are resolved first, so a link pointing out of the tree counts as outside.
    """
    base = Path(base).resolve()
    target = (base / candidate).resolve() if not Path(candidate).is_absolute() else Path(candidate).resolve()
    if not is_within(target, base):
        raise InputError(f"path {candidate!s} resolves to {target}, outside {base}")
    return target


def is_within(path: Path, base: Path) -> bool:
    """True when ``path`` is ``base`` or lies below it (both taken as already resolved)."""
    try:
        path.relative_to(base)
    except ValueError:
        return False
    return True
