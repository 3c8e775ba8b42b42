"""Embedded demo datasets, built offline from photographs that scikit-image ships.

``textures``: patches of the brick, grass and gravel photographs (512x512 each). Every photo is cut
into a 3x3 grid of tiles and each patch comes from one tile, at a random scale, rotation and flip;
the tile is recorded as the patch's *group*. Patches from one tile overlap, so a grouped split
(``--group-by group``) keeps them on one side and validation stays honest. Deterministic from a seed.
"""

from __future__ import annotations

import csv
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from handlens.core.registry import Registry

TEXTURE_CLASSES = ("brick", "grass", "gravel")
GRID = 3


@dataclass(frozen=True)
class DemoDataset:
    """A demo dataset: how to build its folder tree and manifest, and how to split it."""

    name: str
    description: str
    build: Callable[..., Path]
    group_by: str | None = None


DEMO_DATASETS: Registry[DemoDataset] = Registry("demo dataset")


def build_textures(out_dir: Path, per_class: int = 60, patch: int = 128, seed: int = 0) -> Path:
    """Write ``out_dir/<class>/*.png`` and ``out_dir/manifest.csv`` (path,label,group); returns the manifest."""
    import numpy as np
    import skimage.data
    from PIL import Image

    rng = np.random.default_rng(seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows: list[tuple[str, str, str]] = []
    for label in TEXTURE_CLASSES:
        photo = Image.fromarray(getattr(skimage.data, label)())
        tile = photo.width // GRID
        (out_dir / label).mkdir(exist_ok=True)
        for index in range(per_class):
            tile_row, tile_col = divmod(index % (GRID * GRID), GRID)
            side = int(rng.integers(tile // 2, tile + 1))
            left = tile_col * tile + int(rng.integers(0, tile - side + 1))
            top = tile_row * tile + int(rng.integers(0, tile - side + 1))
            crop = photo.crop((left, top, left + side, top + side)).resize((patch, patch), Image.BICUBIC)
            crop = crop.rotate(90 * int(rng.integers(0, 4)))
            if rng.random() < 0.5:
                crop = crop.transpose(Image.FLIP_LEFT_RIGHT)
            rel = f"{label}/{label}_{index:03d}.png"
            crop.save(out_dir / rel)
            rows.append((rel, label, f"{label}-tile{tile_row}{tile_col}"))
    manifest = out_dir / "manifest.csv"
    with manifest.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "label", "group"])
        writer.writerows(rows)
    return manifest


DEMO_DATASETS.register(
    "textures",
    DemoDataset(
        name="textures",
        description="brick / grass / gravel patches cut from scikit-image's photographs (3 classes)",
        build=build_textures,
        group_by="group",
    ),
)
