"""Freezing strategies as data (no torch here: configs validate them without importing torch)."""

from __future__ import annotations

from dataclasses import dataclass

from handlens.core.errors import InputError


@dataclass(frozen=True)
class FreezeSpec:
    mode: str  # "frozen" | "partial" | "full"
    blocks: int = 0

    @classmethod
    def parse(cls, text: str) -> FreezeSpec:
        if text in ("frozen", "full"):
            return cls(text)
        if text.startswith("partial:"):
            try:
                blocks = int(text.split(":", 1)[1])
            except ValueError:
                blocks = -1
            if blocks >= 1:
                return cls("partial", blocks)
        raise InputError(f"--freeze {text!r}: choose frozen, full, or partial:N (N >= 1 trainable blocks)")

    def __str__(self) -> str:
        return f"partial:{self.blocks}" if self.mode == "partial" else self.mode
