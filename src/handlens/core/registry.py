"""A small named registry: one source of truth for CLI choices and API enums."""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from handlens.core.errors import NotFoundError

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps names to entries; unknown names raise an error that lists the known ones."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, T] = {}

    def register(self, name: str, entry: T) -> T:
        if name in self._entries:
            raise ValueError(f"{self.kind} {name!r} is registered twice")
        self._entries[name] = entry
        return entry

    def decorator(self, name: str) -> Callable[[T], T]:
        """Use as ``@registry.decorator("name")`` on a function or class."""

        def wrap(entry: T) -> T:
            return self.register(name, entry)

        return wrap

    def get(self, name: str) -> T:
        try:
            return self._entries[name]
        except KeyError:
            known = ", ".join(sorted(self._entries)) or "(none)"
            close = difflib.get_close_matches(str(name), list(self._entries), 1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise NotFoundError(f"unknown {self.kind} {name!r}{hint}; choose one of: {known}") from None

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._entries)
