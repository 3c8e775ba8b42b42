"""Loaded models kept warm (LRU by memory), micro-batched prediction, and an explanation cache.

Micro-batching: concurrent predict requests for one model wait up to ``max_wait_ms`` for each other
and go through the network in one forward pass of at most ``batch_size`` images. Every use of a model
(a predict batch, an explanation) holds that model's lock: explanation hooks must never see another
request's forward pass.

Runtimes: with ``runtime="onnx"`` each model's predictions (micro-batched predict, background scoring) run on
onnxruntime (:class:`~handlens.export.runtime.OnnxPredictor`, exported on first load into ``onnx_cache_dir``),
with the bundle's own preprocessing; explanations need gradients and hooks, so they always run on torch. A
model that cannot be exported is served by torch, with a warning in the log and the reason in its
``runtime`` (``GET /api/v1/models/{id}``): one unusual model never makes the service fail.

Detectors (bundles of ``kind: detector``) share the pool and its memory budget, loaded by
:meth:`ModelPool.get_detector` for ``POST .../detect``; each use holds the detector's lock. A detector's id where
a classifier is needed (predict, explain, browse), or a classifier's where a detector is, is a 422 naming the
route that fits, never a 500.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import re
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from handlens.core.errors import InputError, NotFoundError
from handlens.core.workspace import resolve_inside
from handlens.models.bundle import (
    MANIFEST_FILE,
    BundleEntry,
    DamagedBundleError,
    check_weights_file,
    read_bundle_manifest,
    read_manifest,
    scan_bundles,
)

LOG = logging.getLogger("handlens.serve")
RUNTIMES = ("torch", "onnx")
MODEL_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


def bundle_dir(runs_dir: Path, model_id: str) -> Path:
    """The bundle of run ``model_id``; ids are names, never paths (no traversal out of the runs folder)."""
    if not MODEL_ID.match(model_id) or ".." in model_id:
        raise NotFoundError(f"no model {model_id!r}: model ids are run ids, see GET /api/v1/models")
    path = resolve_inside(runs_dir, Path(model_id) / "bundle")
    if not (path / MANIFEST_FILE).is_file():
        raise NotFoundError(f"no model {model_id!r}; see GET /api/v1/models")
    return path


def read_model_manifest(runs_dir: Path, model_id: str, *, kind: str | None = "classifier") -> dict[str, Any]:
    """Model ``model_id``'s validated manifest (the dict in its ``bundle.json``); its weights file must be
    there. :class:`NotFoundError` for no such model, :class:`DamagedBundleError` for a damaged one, and
    :class:`WrongKindError` when it is not of ``kind`` (None: either kind)."""
    path = bundle_dir(runs_dir, model_id)
    with named_model(model_id):
        manifest = read_manifest(path, kind=None)
        check_weights_file(path)
    check_kind(model_id, model_kind(manifest), kind)
    return manifest


def model_kind(manifest: dict[str, Any]) -> str:
    """``classifier`` or ``detector``: what a bundle's manifest says it is (older bundles: classifiers)."""
    return str(manifest.get("kind") or "classifier")


class WrongKindError(InputError):
    """A detector's id where a classifier is needed, or a classifier's where a detector is."""


def check_kind(model_id: str, kind: str, wanted: str | None) -> None:
    """Refuse model ``model_id`` of ``kind`` where a ``wanted`` one is needed, naming the route that fits."""
    if wanted is None or kind == wanted:
        return
    if kind == "detector":
        raise WrongKindError(f"model {model_id!r} is a detector: it finds boxes, it does not classify an image; "
                             f"send the image to POST /api/v1/models/{model_id}/detect (with ?classifier= to label "
                             "each box), or pick a classifier (GET /api/v1/models shows each model's kind)")
    raise WrongKindError(f"model {model_id!r} is a classifier, not a detector: /detect needs a detector bundle "
                         "(handlens detect train); give this classifier as ?classifier= to label each box, "
                         "or send the image to its own /predict or /explain")


@contextlib.contextmanager
def named_model(model_id: str) -> Iterator[None]:
    """A damaged bundle's error names the model (its id), not the folder every bundle is called."""
    try:
        yield
    except DamagedBundleError as exc:
        raise DamagedBundleError(exc.bundle, exc.reason, fix="train it again or restore its bundle from a backup",
                                 name=model_id) from None


class MicroBatcher:
    """Collects concurrent single-image requests into batches for ``predict`` (a list of arrays -> probs)."""

    def __init__(self, predict: Callable[[list[np.ndarray]], np.ndarray], batch_size: int, max_wait_s: float) -> None:
        self.predict, self.batch_size, self.max_wait_s = predict, batch_size, max_wait_s
        self._queue: asyncio.Queue[tuple[np.ndarray, asyncio.Future[np.ndarray]]] | None = None
        self._task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.batches: list[int] = []  # sizes of the batches run (the last 1,000)

    @property
    def depth(self) -> int:
        return self._queue.qsize() if self._queue is not None else 0

    async def submit(self, array: np.ndarray) -> np.ndarray:
        loop = asyncio.get_running_loop()
        if self._queue is None or self._task is None or self._task.done() or self._loop is not loop:
            self._queue = asyncio.Queue()  # bound to this loop (a new loop, e.g. in tests, gets a new queue)
            self._loop = loop
            self._task = loop.create_task(self._run())
        future: asyncio.Future[np.ndarray] = loop.create_future()
        await self._queue.put((array, future))
        return await future

    async def _run(self) -> None:
        assert self._queue is not None
        loop = asyncio.get_running_loop()
        while True:
            items = [await self._queue.get()]
            deadline = loop.time() + self.max_wait_s
            while len(items) < self.batch_size:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    if self._queue.empty():
                        break
                    items.append(self._queue.get_nowait())
                    continue
                try:
                    items.append(await asyncio.wait_for(self._queue.get(), remaining))
                except TimeoutError:
                    break
            self.batches = [*self.batches[-999:], len(items)]
            await self._answer(loop, items)

    async def _answer(self, loop: asyncio.AbstractEventLoop,
                      items: list[tuple[np.ndarray, asyncio.Future[np.ndarray]]]) -> None:
        """Run one batch; if it fails, run its requests one by one so one bad image fails only itself."""
        try:
            probs = await loop.run_in_executor(None, self.predict, [array for array, _ in items])
            if len(probs) != len(items):
                raise RuntimeError(f"the model answered {len(probs)} of {len(items)} images")
        except Exception as exc:
            if len(items) > 1:
                for item in items:
                    await self._answer(loop, [item])
                return
            if not items[0][1].done():
                items[0][1].set_exception(exc)
            return
        for (_, future), row in zip(items, probs, strict=True):
            if not future.done():
                future.set_result(row)


@dataclass
class ModelCopy:
    """One instance of a bundle and the lock every use of it holds (explanation hooks must never see another
    request's forward pass)."""

    bundle: Any  # handlens.explain.api.ExplainableBundle
    lock: threading.Lock = field(default_factory=threading.Lock)


@dataclass
class LoadedModel:
    """A model kept warm: the instance predictions use (micro-batched), and a second one for explanations,
    loaded on the first explanation, so that a slow explanation never holds the lock predictions need. When
    onnxruntime serves predictions (``predictor``), the bundle's torch network runs no predictions, so it is
    the explanation copy itself (with a lock of its own): no second copy is loaded."""

    model_id: str
    bundle: Any  # handlens.explain.api.ExplainableBundle, for predictions
    sha256: str
    nbytes: int
    path: Path | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)
    batcher: MicroBatcher | None = None
    predictor: Any = None  # an OnnxPredictor when onnxruntime serves predictions; None: the bundle (torch)
    runtime: str = "torch"  # what serves predictions, as GET /api/v1/models/{id} shows it
    _explainer: ModelCopy | None = None
    _explainer_lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def predicts(self) -> Any:
        """What predictions run on: the ONNX predictor when there is one, else the bundle (same methods)."""
        return self.predictor or self.bundle

    def predict(self, arrays: list[np.ndarray]) -> np.ndarray:
        with self.lock:
            return self.predicts.predict_proba(arrays, batch_size=max(1, len(arrays)))

    def explainer(self) -> ModelCopy:
        """The explanation copy (loaded once, off the event loop: call it from a worker thread)."""
        with self._explainer_lock:
            if self._explainer is None:
                if self.predictor is not None:  # onnxruntime predicts: the torch network is free to explain
                    self._explainer = ModelCopy(self.bundle)  # its own lock: predictions never wait for it
                elif self.path is None:
                    self._explainer = ModelCopy(self.bundle, self.lock)  # no path to load from: share the one
                else:
                    from handlens.explain.api import load_bundle

                    copy = load_bundle(self.path)
                    self._explainer = ModelCopy(copy)
                    self.nbytes += sum(p.numel() * p.element_size() for p in copy.module.parameters())
            return self._explainer


@dataclass
class LoadedDetector:
    """A detector kept warm (``handlens.detect.infer.Detector``) and the lock every detection on it holds."""

    model_id: str
    detector: Any
    sha256: str
    nbytes: int
    lock: threading.Lock = field(default_factory=threading.Lock)
    runtime: str = "torch"
    batcher: None = None  # detections are not micro-batched: one request's tiles are its own batch


class ModelPool:
    """Bundles of the workspace's runs (classifiers and detectors), loaded on first use and kept while they fit
    ``memory_mb`` together (least recently used first out)."""

    def __init__(self, runs_dir: Path, memory_mb: float, batch_size: int, max_wait_ms: float, *,
                 runtime: str = "torch", onnx_cache_dir: Path | None = None) -> None:
        if runtime not in RUNTIMES:
            raise InputError(f"unknown runtime {runtime!r}: use one of {', '.join(RUNTIMES)}")
        self.runs_dir = runs_dir
        self.runtime = runtime
        self.onnx_cache_dir = onnx_cache_dir if onnx_cache_dir is not None else runs_dir.parent / "cache" / "onnx"
        self.memory_bytes = int(memory_mb * 2**20)
        self.batch_size, self.max_wait_s = batch_size, max_wait_ms / 1000
        self._loaded: OrderedDict[str, LoadedModel | LoadedDetector] = OrderedDict()
        self._lock = threading.Lock()

    def manifests(self) -> list[BundleEntry]:
        """Every model of the workspace, sorted by id: usable ones with their validated manifest, damaged ones
        with ``damaged`` saying why (one damaged bundle never hides the others)."""
        return [entry for entry in scan_bundles(self.runs_dir) if MODEL_ID.match(entry.model_id)]

    def manifest(self, model_id: str, *, kind: str | None = "classifier") -> dict[str, Any]:
        """Model ``model_id``'s validated manifest; raises :class:`DamagedBundleError` for a damaged bundle and
        :class:`WrongKindError` for one not of ``kind`` (None: either)."""
        return read_model_manifest(self.runs_dir, model_id, kind=kind)

    def _cached(self, model_id: str, wanted: str) -> LoadedModel | LoadedDetector | None:
        """The loaded model ``model_id`` (now the most recently used), refused if it is not of ``wanted`` kind;
        None when it is not loaded. Call with ``self._lock`` held."""
        found = self._loaded.get(model_id)
        if found is None:
            return None
        check_kind(model_id, "detector" if isinstance(found, LoadedDetector) else "classifier", wanted)
        self._loaded.move_to_end(model_id)
        return found

    def _keep(self, model_id: str, loaded: LoadedModel | LoadedDetector) -> None:
        """Keep ``loaded``; evict the least recently used models while they all exceed the memory budget."""
        self._loaded[model_id] = loaded
        total = sum(m.nbytes for m in self._loaded.values())
        while total > self.memory_bytes and len(self._loaded) > 1:
            _, evicted = self._loaded.popitem(last=False)
            total -= evicted.nbytes

    def get_detector(self, model_id: str) -> LoadedDetector:
        """Detector ``model_id``, loaded on first use (a classifier's id: :class:`WrongKindError`)."""
        path = bundle_dir(self.runs_dir, model_id)
        with self._lock:
            found = self._cached(model_id, "detector")
            if found is not None:
                return found  # type: ignore[return-value]
            manifest = read_model_manifest(self.runs_dir, model_id, kind="detector")
            from handlens.detect.infer import load_detector

            with named_model(model_id):
                detector = load_detector(path)
            nbytes = sum(p.numel() * p.element_size() for p in detector.net.parameters())
            sha = manifest.get("weights_sha256") or hashlib.sha256(
                (path / "weights.safetensors").read_bytes()).hexdigest()
            loaded = LoadedDetector(model_id, detector, str(sha), nbytes)
            self._keep(model_id, loaded)
            return loaded

    def get(self, model_id: str) -> LoadedModel:
        """Classifier ``model_id``, loaded on first use (a detector's id: :class:`WrongKindError`)."""
        path = bundle_dir(self.runs_dir, model_id)
        with self._lock:
            found = self._cached(model_id, "classifier")
            if found is not None:
                return found  # type: ignore[return-value]
            with named_model(model_id):
                _, checked = read_bundle_manifest(path)
            check_kind(model_id, str(getattr(checked, "kind", "classifier")), "classifier")
            from handlens.explain.api import load_bundle

            with named_model(model_id):
                bundle = load_bundle(path)
            nbytes = sum(p.numel() * p.element_size() for p in bundle.module.parameters())
            sha = bundle.manifest.get("weights_sha256") or hashlib.sha256(
                (path / "weights.safetensors").read_bytes()).hexdigest()
            loaded = LoadedModel(model_id, bundle, str(sha), nbytes, path=path)
            if self.runtime == "onnx":
                self._attach_onnx(loaded)
            loaded.batcher = MicroBatcher(loaded.predict, self.batch_size, self.max_wait_s)
            self._keep(model_id, loaded)
            return loaded

    def _attach_onnx(self, loaded: LoadedModel) -> None:
        """Serve ``loaded``'s predictions on onnxruntime (its .onnx counted in its memory); a model that cannot be
        exported (or whose export cannot be run) stays on torch, said in the log and in its ``runtime``."""
        from handlens.export.runtime import OnnxPredictor

        try:
            predictor = OnnxPredictor(loaded.bundle, cache_dir=self.onnx_cache_dir)
        except Exception as exc:  # an ExportError above all; never a failed request for a model torch can serve
            reason = " ".join(str(exc).split())[:300] or type(exc).__name__
            LOG.warning("model %s: onnx export failed, served by torch: %s", loaded.model_id, reason)
            loaded.runtime = f"torch (onnx export failed: {reason})"
            return
        path = predictor.model_path
        loaded.nbytes += path.stat().st_size if path is not None and path.is_file() else loaded.nbytes
        loaded.predictor, loaded.runtime = predictor, "onnx"

    def runtime_of(self, model_id: str) -> str | None:
        """What serves model ``model_id``'s predictions while it is loaded (None: not loaded now)."""
        found = self._loaded.get(model_id)
        return found.runtime if found is not None else None

    @property
    def loaded(self) -> list[str]:
        return list(self._loaded)

    def queue_depth(self) -> int:
        return sum(m.batcher.depth for m in self._loaded.values() if m.batcher is not None)
