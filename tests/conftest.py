"""Shared fixtures: tiny synthetic image trees made in a temp dir, and an empty catalog."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from handlens.data.catalog import Catalog, open_catalog


def textured(seed: int, size: tuple[int, int] = (48, 40), mode: str = "RGB") -> Image.Image:
    """A small image with some structure (not flat), distinct per seed."""
    rng = np.random.default_rng(seed)
    w, h = size
    base = rng.integers(0, 255, size=(h, w, 3), dtype=np.uint8)
    img = Image.fromarray(base, "RGB")
    return img if mode == "RGB" else img.convert(mode)


def write_image(path: Path, seed: int, size: tuple[int, int] = (48, 40), mode: str = "RGB",
                fmt: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    textured(seed, size, mode).save(path, format=fmt)
    return path


@pytest.fixture
def make_tree(tmp_path: Path) -> Callable[..., Path]:
    """Build ``root/<class>/img_<i>.png`` with ``counts`` images per class (distinct contents)."""

    def build(counts: dict[str, int], root_name: str = "tree", size: tuple[int, int] = (48, 40),
              sizes: dict[str, tuple[int, int]] | None = None) -> Path:
        root = tmp_path / root_name
        seed = 0
        for label, n in counts.items():
            for i in range(n):
                seed += 1
                write_image(root / label / f"img_{i:03d}.png", seed, (sizes or {}).get(label, size))
        return root

    return build


@pytest.fixture
def catalog(tmp_path: Path) -> Catalog:
    cat = open_catalog(f"sqlite:///{tmp_path / 'catalog.db'}")
    yield cat
    cat.close()
