"""Decode and resize each image once: a bounded two-tier cache keyed by file hash and preprocessing.

Tier 1 is an LRU in memory (``HANDLENS_CACHE_MEMORY_MB``, default 2048 MB); tier 2 is ``.npy`` files
under ``<workspace>/cache/decoded/<key>/<sha256[:2]>/<sha256>.npy``, bounded by
``HANDLENS_CACHE_DISK_GB`` (default 20 GB: the least recently used files go first). The key
(:func:`decoded_key`) hashes every preprocessing parameter that changes the pixels
(``Preprocess.key()``) and :data:`DECODER_VERSION`, so changing either never returns stale images.
Images not cached are decoded on every core.

``decode_many`` returns one (N, S, S, 3) uint8 array for whole-image training; ``decode_working_many``
returns the variable-size working images patch sampling cuts from.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from handlens.transforms.preprocess import Preprocess, decode_working, preprocess_image

#: Bumped whenever decoding itself changes, so no cache serves pixels the current code would not make.
#: 2: EXIF orientation applied (``load_rgb``); earlier entries hold sideways phone photos.
DECODER_VERSION = 2


def _env_number(name: str, default: float) -> float:
    try:
        return float(os.environ.get(name, default))
    except ValueError:
        return default


class DecodedCache:
    """Memory LRU (``max_memory`` bytes) over a disk folder (``max_disk`` bytes); either may be absent."""

    def __init__(self, folder: Path | None, max_memory: int, max_disk: int) -> None:
        self.folder = folder
        self.max_memory, self.max_disk = max_memory, max_disk
        self._memory: OrderedDict[tuple[str, str], np.ndarray] = OrderedDict()
        self._memory_bytes = 0
        self._disk_bytes: int | None = None
        self._lock = threading.Lock()
        self.hits = {"memory": 0, "disk": 0, "miss": 0}

    def path(self, key: str, sha256: str) -> Path | None:
        return self.folder / key / sha256[:2] / f"{sha256}.npy" if self.folder is not None else None

    def get(self, key: str, sha256: str) -> np.ndarray | None:
        with self._lock:
            found = self._memory.get((key, sha256))
            if found is not None:
                self._memory.move_to_end((key, sha256))
                self.hits["memory"] += 1
                return found
        path = self.path(key, sha256)
        if path is not None and path.exists():
            try:
                array = np.load(path, allow_pickle=False)
                os.utime(path)  # recency for the disk bound
            except (ValueError, OSError):  # a damaged entry is simply decoded again
                array = None
            if array is not None:
                self.hits["disk"] += 1
                self._remember(key, sha256, array)
                return array
        self.hits["miss"] += 1
        return None

    def put(self, key: str, sha256: str, array: np.ndarray) -> None:
        self._remember(key, sha256, array)
        path = self.path(key, sha256)
        if path is None or self.max_disk <= 0:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.{threading.get_ident()}.tmp")
        with tmp.open("wb") as handle:
            np.save(handle, array, allow_pickle=False)
        os.replace(tmp, path)
        self._account_disk(path.stat().st_size)

    def _remember(self, key: str, sha256: str, array: np.ndarray) -> None:
        if array.nbytes > self.max_memory:
            return
        with self._lock:
            if (key, sha256) in self._memory:
                return
            self._memory[(key, sha256)] = array
            self._memory_bytes += array.nbytes
            while self._memory_bytes > self.max_memory and self._memory:
                _, evicted = self._memory.popitem(last=False)
                self._memory_bytes -= evicted.nbytes

    def _account_disk(self, added: int) -> None:
        assert self.folder is not None
        if self._disk_bytes is None:
            self._disk_bytes = sum(p.stat().st_size for p in self.folder.rglob("*.npy"))
        else:
            self._disk_bytes += added
        if self._disk_bytes <= self.max_disk:
            return
        files = sorted(self.folder.rglob("*.npy"), key=lambda p: p.stat().st_mtime)
        target = int(self.max_disk * 0.9)
        total = sum(p.stat().st_size for p in files)
        for old in files:
            if total <= target:
                break
            size = old.stat().st_size
            old.unlink(missing_ok=True)
            total -= size
        self._disk_bytes = total

    @property
    def memory_bytes(self) -> int:
        return self._memory_bytes


_CACHES: dict[str, DecodedCache] = {}


def get_cache(cache_dir: Path | None) -> DecodedCache:
    """The process-wide cache for a workspace cache folder (its memory tier is shared by every caller)."""
    folder = cache_dir / "decoded" if cache_dir is not None else None
    name = str(folder)
    if name not in _CACHES:
        _CACHES[name] = DecodedCache(folder, int(_env_number("HANDLENS_CACHE_MEMORY_MB", 2048) * 2**20),
                                     int(_env_number("HANDLENS_CACHE_DISK_GB", 20) * 2**30))
    return _CACHES[name]


def _decode_one(args: tuple[str, Preprocess]) -> np.ndarray:
    path, preprocess = args
    return preprocess_image(path, preprocess)


def _decode_working_one(args: tuple[str, int, list[dict[str, Any]]]) -> np.ndarray:
    path, max_side, morphology = args
    return decode_working(path, max_side, morphology)


def _fill(keys: Sequence[str | None], key: str, cache: DecodedCache | None, jobs: Sequence[Any], *,
          decode: Callable[[Any], np.ndarray], workers: int | None, store: Callable[[int, np.ndarray], None]) -> None:
    """Read each item from the cache or decode it (on all cores), then hand it to ``store``."""
    missing = []
    for index, sha in enumerate(keys):
        found = cache.get(key, sha) if cache is not None and sha else None
        if found is not None:
            store(index, found)
        else:
            missing.append(index)
    if not missing:
        return
    workers = max(1, workers or os.cpu_count() or 1)
    todo = [jobs[i] for i in missing]
    if workers == 1 or len(todo) < 16:
        results: Any = map(decode, todo)
        pool = None
    else:
        import multiprocessing

        from handlens.core.procs import worker_init

        context = multiprocessing.get_context()
        parent = os.getpid() if context.get_start_method() in ("fork", "spawn") else None  # see worker_init
        pool = ProcessPoolExecutor(max_workers=workers, mp_context=context, initializer=worker_init,
                                   initargs=(parent,))  # decode workers die with the command that started them
        results = pool.map(decode, todo, chunksize=8)
    try:
        for index, array in zip(missing, results, strict=True):
            store(index, array)
            sha = keys[index]
            if cache is not None and sha:
                cache.put(key, sha, array)
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)


def decode_many(
    paths: Sequence[str],
    preprocess: Preprocess,
    *,
    sha256s: Sequence[str] | None = None,
    cache_dir: Path | None = None,
    workers: int | None = None,
) -> np.ndarray:
    """Decode ``paths`` to one (N, S, S, 3) uint8 array, using and filling the cache when ``cache_dir`` is given."""
    size = preprocess.size
    out = np.empty((len(paths), size, size, 3), dtype=np.uint8)
    cache = get_cache(cache_dir) if cache_dir is not None and sha256s else None

    def store(index: int, array: np.ndarray) -> None:
        out[index] = array

    keys = list(sha256s) if sha256s else [None] * len(paths)
    _fill(keys, decoded_key(preprocess), cache, [(p, preprocess) for p in paths], decode=_decode_one, workers=workers,
          store=store)
    return out


def decoded_key(preprocess: Preprocess) -> str:
    """Cache key of a decoded model input: the preprocessing's pixel key and the decoder version."""
    relevant = {"preprocess": preprocess.key(), "decoder": DECODER_VERSION}
    return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:16]


def working_key(max_side: int, morphology: list[dict[str, Any]]) -> str:
    """Cache key of a working image for patch sampling (changes with every parameter that changes it)."""
    relevant = {"working": max_side, "morphology": morphology, "v": 1, "decoder": DECODER_VERSION}
    return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:16]


def decode_working_many(paths: Sequence[str], max_side: int, morphology: list[dict[str, Any]] | None = None, *,
                        sha256s: Sequence[str] | None = None, cache_dir: Path | None = None,
                        workers: int | None = None) -> list[np.ndarray]:
    """Working images (longer side <= ``max_side``, variable sizes) for patch sampling, cached like decode_many."""
    out: list[np.ndarray] = [np.empty(0, np.uint8)] * len(paths)
    cache = get_cache(cache_dir) if cache_dir is not None and sha256s else None

    def store(index: int, array: np.ndarray) -> None:
        out[index] = array

    keys = list(sha256s) if sha256s else [None] * len(paths)
    steps = list(morphology or [])
    _fill(keys, working_key(max_side, steps), cache, [(p, max_side, steps) for p in paths], decode=_decode_working_one,
          workers=workers, store=store)
    return out
