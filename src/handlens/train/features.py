"""Feature cache for frozen backbones: run the backbone once per image (and view), train the head on the cache.

A frozen backbone in eval mode is a fixed function, so its features for an image never change;
computing them every epoch is wasted work. Features are stored in ``<workspace>/cache/features/``
keyed by backbone, weights, preprocessing, augmentation views and the images' SHA-256.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch


def features_key(parts: dict[str, Any], sha256s: list[str]) -> str:
    digest = hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode())
    for sha in sha256s:
        digest.update(sha.encode())
    return digest.hexdigest()[:24]


@torch.inference_mode()
def compute_features(model: Any, images: torch.Tensor, normalize: Any, batch_size: int = 64, augment: Any = None,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """``model.features`` of (N, 3, H, W) uint8 images, optionally of one augmented view each."""
    was_training = model.training
    model.eval()
    try:
        out = []
        for start in range(0, len(images), batch_size):
            batch = images[start:start + batch_size]
            if augment is not None:
                batch = augment(batch, generator)
            out.append(model.features(normalize(batch)).float())
        return torch.cat(out) if out else torch.zeros((0, 0))
    finally:
        model.train(was_training)


def cached_features(cache_dir: Path | None, key: str, compute: Any) -> torch.Tensor:
    """Load features for ``key`` from the cache, or ``compute()`` and store them."""
    from safetensors.torch import load_file, save_file

    path = cache_dir / "features" / f"{key}.safetensors" if cache_dir is not None else None
    if path is not None and path.exists():
        try:
            return load_file(str(path))["features"]
        except Exception:  # damaged entry: recompute
            pass
    features = compute()
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        save_file({"features": features.contiguous()}, str(tmp))
        os.replace(tmp, path)
    return features


class ViewDataset(torch.utils.data.Dataset):
    """Cached features (N, V, F): each access returns one of the V views at random (V = 1: the plain image)."""

    def __init__(self, features: torch.Tensor, targets: np.ndarray) -> None:
        self.features = features if features.dim() == 3 else features[:, None]
        self.targets = torch.from_numpy(targets)

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        views = self.features.shape[1]
        view = int(torch.randint(views, (1,))) if views > 1 else 0
        return self.features[index, view], self.targets[index]
