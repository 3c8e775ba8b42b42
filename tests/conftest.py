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


def write_image(path: Path, seed: int, size: tuple[int, int] = (48, 40), *, mode: str = "RGB",
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


def colour_tree(root: Path, per_class: int = 16, size: int = 40) -> Path:
    """A learnable tree: each class has its own dominant colour, with noise and random shapes."""
    rng = np.random.default_rng(7)
    colours = {"red": (200, 40, 40), "green": (40, 200, 40), "blue": (40, 40, 200)}
    for label, colour in colours.items():
        (root / label).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            base = np.array(colour, dtype=np.float32)[None, None] * rng.uniform(0.7, 1.0)
            noise = rng.normal(0, 25, (size, size, 3))
            Image.fromarray((base + noise).clip(0, 255).astype(np.uint8)).save(root / label / f"{label}_{i:02d}.png")
    return root


def split_workspace(root: Path, tree: Path, dataset: str = "colours", *, ratios: str = "0.5,0.25,0.25",
                    seed: int = 0, db_url: str | None = None):
    """A workspace at ``root/ws`` with ``tree`` imported as ``dataset`` and split by ``ratios``."""
    from handlens.core.workspace import Workspace
    from handlens.data.importer import import_path
    from handlens.data.splits import make_split

    ws = Workspace.open(root / "ws", db_url=db_url) if db_url else Workspace.open(root / "ws")
    catalog = open_catalog(ws.db_url)
    try:
        import_path(catalog, tree, dataset, workers=1)
        make_split(catalog, dataset, ratios=ratios, seed=seed)
    finally:
        catalog.close()
    return ws


@pytest.fixture
def trained_workspace(tmp_path: Path):
    """A workspace with the colour dataset imported as 'colours' and split 50/25/25."""
    return split_workspace(tmp_path, colour_tree(tmp_path / "colours"))


def tiny_config(*overrides: str):
    from handlens.train.config import load_config

    return load_config(None, ["data.dataset=colours", "model.backbone=tiny_cnn", "model.weights=none",
                              "model.freeze=full", "train.epochs=2", "train.batch_size=8", "train.lr=0.01",
                              "tracking.backend=none", "train.progress=false", *overrides])


@pytest.fixture(scope="session")
def postgres_url():
    """A fresh PostgreSQL database for this test session (dropped after), or a skip saying why.

    The CI machine starts PostgreSQL on 127.0.0.1:5432 with trust auth; ``HANDLENS_TEST_PG`` names
    another server (a libpq URL without the database).
    """
    import os
    import secrets

    base = os.environ.get("HANDLENS_TEST_PG", "postgresql://postgres@127.0.0.1:5432")
    try:
        import psycopg

        admin = psycopg.connect(f"{base}/postgres", autocommit=True, connect_timeout=3)
    except Exception as exc:  # no server, no driver
        pytest.skip(f"PostgreSQL not reachable at {base} ({type(exc).__name__}): start it or set HANDLENS_TEST_PG")
    name = f"handlens_test_{secrets.token_hex(4)}"
    admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"{base.replace('postgresql://', 'postgresql+psycopg://', 1)}/{name}"
    finally:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()


@pytest.fixture
def job_ws(tmp_path):
    """A workspace with a small colour dataset imported and split, and its catalog open (the jobs tests)."""
    ws = split_workspace(tmp_path, colour_tree(tmp_path / "colours", per_class=8, size=32))
    catalog = open_catalog(ws.db_url)
    yield ws, catalog
    catalog.close()


def tiny_train(*overrides: str) -> dict:
    """A tiny train job's config: the Lightning path (a learning backbone), so it has checkpoints."""
    return tiny_config(*overrides).model_dump(mode="json")


def tiny_detector_config(dataset: str = "sigma-clasts-3", **overrides):
    """A detector that trains in seconds: the tiny CNN body, small tiles, one epoch (for plumbing, not skill)."""
    from handlens.detect.config import DetectTrainConfig

    values = {"dataset": dataset, "labelset": "detection", "backbone": "tiny_cnn", "weights": "none",
              "freeze": "full", "epochs": 1, "tile": 128, "target_box": 32, "tiles_per_image": 2, "batch_size": 2,
              "fpn_channels": 32} | overrides
    return DetectTrainConfig(**values)


@pytest.fixture(scope="session")
def sigma_workspace(tmp_path_factory):
    """A workspace with the sigma-clast demo (3 images of 480x400, seed 3: scenes with boxes, and crops), a
    tiny detector and a tiny crop classifier trained on it. Shared by a session: tests must not change it."""
    from handlens.core.workspace import Workspace
    from handlens.data.sigma import prepare_sigma_demo
    from handlens.detect.train import train_detector

    root = tmp_path_factory.mktemp("sigma")
    ws = Workspace.open(root)
    demo = prepare_sigma_demo(ws, images=3, seed=3, size=(480, 400))
    detector = train_detector(tiny_detector_config(), ws, progress=False)
    return {"workspace": ws, "demo": demo, "detector": detector.bundle, "detector_run": detector.run_id}


@pytest.fixture(scope="session")
def sigma_classifier(sigma_workspace):
    """A tiny cw/ccw crop classifier (the tiny CNN, 2 epochs) trained in ``sigma_workspace``: its bundle path."""
    from handlens.data.splits import make_split
    from handlens.train.run import train

    ws = sigma_workspace["workspace"]
    catalog = open_catalog(ws.db_url)
    try:
        make_split(catalog, sigma_workspace["demo"].dataset, ratios="0.6,0.4,0", seed=0)
    finally:
        catalog.close()
    return train(tiny_config(f"data.dataset={sigma_workspace['demo'].dataset}"), ws).bundle
