"""Printing: one JSON document for ``--json``, readable rich tables otherwise."""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from handlens.core.errors import HandlensError

F = TypeVar("F", bound=Callable[..., Any])

# markup off: messages carry examples in brackets ("write {float: [low, high]}") that rich's markup would eat
stdout = Console(highlight=False, soft_wrap=True, markup=False)
if not stdout.is_terminal:  # piped or captured: do not squeeze tables into 80 columns
    stdout.width = max(stdout.width, 140)
stderr = Console(stderr=True, highlight=False, soft_wrap=True, markup=False)
ERROR = Text("error:", style="bold red")
WARNING = Text("warning:", style="yellow")


def emit_json(document: Any) -> None:
    """Write exactly one JSON document to stdout."""
    sys.stdout.write(json.dumps(document, indent=2, default=str) + "\n")
    sys.stdout.flush()


def handle_errors(command: F) -> F:
    """Turn a HandlensError into a one-line message on stderr and its exit code (no traceback)."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except HandlensError as exc:
            stderr.print(ERROR, str(exc))
            raise typer.Exit(exc.exit_code) from None

    return wrapper  # type: ignore[return-value]


class ProgressBar:
    """A rich progress bar on stderr (only on a terminal) fed by ``(done, total)`` callbacks; ``with`` gives the
    callback, or None when the bar is off (the library then reports no progress)."""

    def __init__(self, label: str, enabled: bool = True) -> None:
        self.label, self.enabled = label, enabled and stderr.is_terminal
        self._bar: Any = None
        self._task: Any = None

    def __enter__(self) -> ProgressBar | None:
        if not self.enabled:
            return None
        from rich.progress import Progress

        self._bar = Progress(console=stderr, transient=True)
        self._bar.start()
        return self

    def __call__(self, done: int, total: int) -> None:
        if self._task is None:
            self._task = self._bar.add_task(self.label, total=total)
        self._bar.update(self._task, completed=done)

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.stop()


def table(title: str, columns: list[str], rows: list[list[Any]], justify_numbers: bool = True) -> Table:
    out = Table(title=title, title_justify="left", show_lines=False)
    for index, column in enumerate(columns):
        # fold, not cut: a study name or a path cut to "lithology-quick-2026…" cannot be typed back
        out.add_column(column, justify="right" if justify_numbers and index > 0 else "left", overflow="fold")
    for row in rows:
        out.add_row(*[fmt(v) for v in row])
    return out


def fmt(value: Any) -> str:
    if isinstance(value, float):
        if value.is_integer() and abs(value) < 1e6:
            return f"{int(value):,}"
        return f"{value:.3f}" if abs(value) < 1000 else f"{value:,.0f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def warn(messages: list[str]) -> None:
    for message in messages:
        stdout.print(WARNING, message)
