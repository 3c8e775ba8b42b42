"""Decode and resize each image once: a per-image cache keyed by file hash and preprocessing.

``decode_many`` returns one (N, S, S, 3) uint8 array. Images already in the cache are read back
(a few hundred microseconds each); the rest are decoded on every core and written to the cache.
Cached files live under ``<workspace>/cache/decoded/<preprocess key>/<sha256[:2]>/<sha256>.npy``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from handlens.transforms.preprocess import Preprocess, preprocess_image


def _decode_one(args: tuple[str, Preprocess]) -> np.ndarray:
    path, preprocess = args
    return preprocess_image(path, preprocess)


def decode_many(
    paths: Sequence[str],
    preprocess: Preprocess,
    sha256s: Sequence[str] | None = None,
    cache_dir: Path | None = None,
    workers: int | None = None,
) -> np.ndarray:
    """Decode ``paths`` to one uint8 array, using and filling the cache when ``cache_dir`` is given."""
    size = preprocess.size
    out = np.empty((len(paths), size, size, 3), dtype=np.uint8)
    missing: list[int] = []
    cached_files: list[Path | None] = []
    folder = cache_dir / "decoded" / preprocess.key() if cache_dir is not None else None
    for index in range(len(paths)):
        cached = folder / sha256s[index][:2] / f"{sha256s[index]}.npy" if folder is not None and sha256s else None
        cached_files.append(cached)
        if cached is not None and cached.exists():
            try:
                out[index] = np.load(cached, allow_pickle=False)
                continue
            except (ValueError, OSError):  # a damaged cache entry is simply decoded again
                pass
        missing.append(index)
    if missing:
        workers = max(1, workers or os.cpu_count() or 1)
        jobs = [(paths[i], preprocess) for i in missing]
        if workers == 1 or len(jobs) < 16:
            decoded = map(_decode_one, jobs)
            for index, array in zip(missing, decoded, strict=True):
                out[index] = array
        else:
            with ProcessPoolExecutor(max_workers=workers) as pool:
                for index, array in zip(missing, pool.map(_decode_one, jobs, chunksize=8), strict=True):
                    out[index] = array
        for index in missing:
            target = cached_files[index]
            if target is not None:
                target.parent.mkdir(parents=True, exist_ok=True)
                tmp = target.with_suffix(f".{os.getpid()}.tmp")
                with tmp.open("wb") as handle:
                    np.save(handle, out[index], allow_pickle=False)
                os.replace(tmp, target)
    return out
