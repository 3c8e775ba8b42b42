"""The former home of every command, kept so ``handlens.cli.main:run``, ``python -m handlens.cli.main`` and
``from handlens.cli.main import app`` keep working; the commands live in :mod:`handlens.cli.app`'s groups."""

from __future__ import annotations

from handlens.cli.app import app, run

__all__ = ["app", "run"]


if __name__ == "__main__":
    run()
