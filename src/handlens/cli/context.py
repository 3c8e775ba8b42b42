"""What every command group reads from the global options: the workspace (created on first use)."""

from __future__ import annotations

from typing import Any

import typer


def workspace(ctx: typer.Context) -> Any:
    """The workspace from ``--workspace``/``--db`` (walks up to the root command's options)."""
    from handlens.core.workspace import Workspace

    root = ctx.find_root()
    options = root.obj or {}
    return Workspace.open(options.get("workspace"), options.get("db"))


def workspace_and_catalog(ctx: typer.Context) -> tuple[Any, Any]:
    """The workspace and its catalog, opened on first use by a command (the caller closes the catalog)."""
    from handlens.data.catalog import open_catalog

    ws = workspace(ctx)
    return ws, open_catalog(ws.db_url)
