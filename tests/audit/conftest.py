"""A dataset with planted problems for the audit: a burned-in bar on one class, exact copies across the split."""

import shutil

import numpy as np
import pytest
from PIL import Image


def planted_tree(root, per_class=20, copies=12):
    """``marked`` images carry a white bar in the bottom-right corner (a burned-in scale bar); ``plain``
    ones do not, and ``copies`` of them are present twice (byte copies under another name)."""
    rng = np.random.default_rng(3)
    for label in ("marked", "plain"):
        (root / label).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            tint = (150, 110, 110) if label == "marked" else (110, 110, 150)
            base = np.array(tint, dtype=np.float32)[None, None] + rng.uniform(-30, 30, (64, 64, 3))
            if label == "marked":
                base[54:58, 34:60] = 255.0
            Image.fromarray(base.clip(0, 255).astype(np.uint8)).save(root / label / f"{label}_{i:02d}.png")
    for i in range(copies):
        shutil.copyfile(root / "plain" / f"plain_{i:02d}.png", root / "plain" / f"copy_{i:02d}.png")
    return root


@pytest.fixture(scope="module")
def planted_bundle(tmp_path_factory):
    """A tiny model trained on the planted dataset: (workspace, bundle path)."""
    from handlens.train.run import train
    from tests.conftest import split_workspace, tiny_config

    tmp = tmp_path_factory.mktemp("audit")
    ws = split_workspace(tmp, planted_tree(tmp / "planted"), "planted", ratios="0.5,0.2,0.3", seed=1)
    result = train(tiny_config("data.dataset=planted", "train.epochs=3"), ws)
    return ws, result.bundle
