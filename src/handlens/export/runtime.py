"""A CPU predictor on onnxruntime: the bundle's predictions, with its own preprocessing, on an ONNX session.

``OnnxPredictor(bundle)`` has the bundle's prediction methods with their contracts: ``predict_arrays``
(preprocessed (N, S, S, 3) uint8 arrays), ``predict_working`` (a patch-trained model's working images),
``predict_proba`` (paths, PIL images or arrays) and ``predict`` (top-k). It runs the bundle's own code for
them (decoding, resizing, patch grids, normalisation, test-time views, the patch mean: see
:class:`~handlens.models.bundle.Bundle`) on a shallow copy of the bundle whose ``module`` is the ONNX
session, so the two runtimes cannot drift apart: only the network's forward pass changes hands.

Where the ``.onnx`` comes from: exported on first use (a logits-only model with a dynamic batch) into a
cache keyed by the bundle's weights hash and the export settings, never into the bundle's folder (it may be
read-only, and a bundle is what its checksum says). The cache is ``cache_dir`` when given (the service
passes its workspace's ``cache/onnx``); else ``<workspace>/cache/onnx`` for a bundle inside a workspace
(``<ws>/runs/<run>/bundle``); else ``$XDG_CACHE_HOME/handlens/onnx`` (``~/.cache/handlens/onnx``). A cache
that cannot be written is not an error: the model is exported in memory for this process. A cached file
that onnxruntime cannot load is exported again.

The session is made for a small CPU: as many intra-op threads as the process may use (2 on the target
machine), one inter-op thread and sequential execution (a classifier's graph is a chain: parallel branches
only add scheduling), all graph optimisations, no spin-waiting (:func:`session_options`).
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from handlens.export.onnx import DEFAULT_OPSET, EXPORT_FORMAT_VERSION, INPUT_NAME

CACHE_ENV = "XDG_CACHE_HOME"


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask, not the machine's count)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # no affinity call on this platform
        return max(1, os.cpu_count() or 1)


def session_options(threads: int | None = None, *, spin: bool = False) -> Any:
    """onnxruntime options for a small CPU: ``threads`` intra-op threads (default: the cores this process may
    use), one inter-op thread, sequential execution, every graph optimisation, and threads that sleep rather
    than spin between runs unless ``spin``: on 2 cores shared with torch's own threads (normalisation, softmax)
    and the service's, spinning threads steal the cores the next step needs (EfficientNet-Lite0, one image per
    call: 6.6 ms spinning off against 9.8 ms on, torch 10.4 ms; 16 images per call: 4.4 against 3.9, torch 10.9)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = int(threads or available_cores())
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
    return options


def weights_digest(bundle: Any) -> str:
    """The bundle's weights SHA-256 (from its manifest, else hashed from its weights file)."""
    digest = bundle.manifest.get("weights_sha256")
    if digest:
        return str(digest)
    from handlens.models.bundle import WEIGHTS_FILE

    return hashlib.sha256((Path(bundle.path) / WEIGHTS_FILE).read_bytes()).hexdigest()


def cache_key(bundle: Any, *, opset: int) -> str:
    """The file name of a bundle's cached model: its weights hash and everything else that shapes the graph
    (architecture, head, ensemble, opset, export format, torch version)."""
    import torch

    manifest = bundle.manifest
    settings = {"backbone": manifest.get("backbone"), "head": manifest.get("head"), "freeze": manifest.get("freeze"),
                "ensemble": manifest.get("ensemble"), "classes": len(bundle.classes), "opset": opset,
                "format": EXPORT_FORMAT_VERSION, "outputs": "logits", "batch": "dynamic", "torch": torch.__version__}
    extra = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:12]
    return f"{weights_digest(bundle)[:24]}-{extra}.onnx"


def default_cache_dir(bundle_path: Path) -> Path:
    """``<ws>/cache/onnx`` for a bundle at ``<ws>/runs/<run>/bundle``; else the user's cache folder."""
    path = Path(bundle_path)
    if len(path.parents) >= 3 and path.parents[1].name == "runs" and (path.parents[2] / "cache").is_dir():
        return path.parents[2] / "cache" / "onnx"
    base = os.environ.get(CACHE_ENV) or str(Path.home() / ".cache")
    return Path(base).expanduser() / "handlens" / "onnx"


def _store(path: Path, data: bytes) -> bool:
    """Write ``data`` to ``path`` atomically; False (nothing written) where the folder cannot be written."""
    import tempfile

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError:
        return False
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(tmp, path)
    except OSError:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        return False
    return True


class OnnxPredictor:
    """``bundle``'s predictions on onnxruntime (see the module docstring). ``cache_dir``: where the exported
    model is kept (default: see :func:`default_cache_dir`); ``threads``: intra-op threads (default: the cores
    this process may use). ``source`` says where the model came from: ``cache``, ``exported`` (now, into the
    cache) or ``memory`` (exported now; the cache could not be written)."""

    def __init__(self, bundle: Any, *, cache_dir: str | Path | None = None, threads: int | None = None,
                 opset: int = DEFAULT_OPSET) -> None:
        self.bundle = bundle
        self.opset = opset
        self.threads = int(threads or available_cores())
        folder = Path(cache_dir) if cache_dir is not None else default_cache_dir(Path(bundle.path))
        self.model_path: Path | None = folder / cache_key(bundle, opset=opset)
        self.source = "cache"
        self.session = self._open()
        self._view = copy.copy(bundle)  # the bundle's own prediction code, with the session as its network
        self._view.module = self.logits

    def _open(self) -> Any:
        import onnxruntime as ort

        options = session_options(self.threads)
        path = self.model_path
        if path is not None and path.is_file():
            try:
                return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
            except Exception:  # a damaged cache file (a full disk, a foreign write): export it again
                with contextlib.suppress(OSError):
                    path.unlink()
        from handlens.export.onnx import to_onnx

        data = to_onnx(self.bundle, opset=self.opset, dynamic_batch=True, logits_only=True).data
        if path is not None and _store(path, data):
            self.source = "exported"
            return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.source, self.model_path = "memory", None
        return ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])

    def __repr__(self) -> str:
        return f"OnnxPredictor({self.bundle.path}, source={self.source}, threads={self.threads})"

    @property
    def classes(self) -> list[str]:
        return list(self.bundle.classes)

    @property
    def patch_trained(self) -> bool:
        return bool(self.bundle.patch_trained)

    def logits(self, inputs: Any) -> Any:
        """Logits (N, classes) for a normalised (N, 3, S, S) float tensor, by onnxruntime, as a torch tensor (the
        bundle's module contract, so the bundle's prediction code can call it)."""
        import torch

        array = np.ascontiguousarray(inputs.detach().cpu().numpy(), dtype=np.float32)
        if not len(array):
            return torch.zeros((0, len(self.bundle.classes)), dtype=torch.float32)
        (out,) = self.session.run(["logits"], {INPUT_NAME: array})
        return torch.from_numpy(out)

    def predict_arrays(self, arrays: np.ndarray, batch_size: int = 16, *, tta: bool = False) -> np.ndarray:
        """:meth:`Bundle.predict_arrays <handlens.models.bundle.Bundle.predict_arrays>` on onnxruntime:
        probabilities (N, classes) for preprocessed (N, S, S, 3) uint8 arrays."""
        return self._view.predict_arrays(arrays, batch_size, tta=tta)

    def predict_working(self, images: Sequence[np.ndarray], batch_size: int = 32, *, tta: bool = False) -> np.ndarray:
        """:meth:`Bundle.predict_working <handlens.models.bundle.Bundle.predict_working>` on onnxruntime: a
        patch-trained model's image probabilities from working images, the mean over their grid patches."""
        return self._view.predict_working(images, batch_size, tta=tta)

    def predict_proba(self, images: Sequence[Any], batch_size: int = 32, *, tta: bool = False) -> np.ndarray:
        """:meth:`Bundle.predict_proba <handlens.models.bundle.Bundle.predict_proba>` on onnxruntime: class
        probabilities (N, classes) for paths, PIL images or arrays (patch grids for a patch-trained model)."""
        return self._view.predict_proba(images, batch_size, tta=tta)

    def predict(self, images: Any, top_k: int = 3, batch_size: int = 32, *, tta: bool = False) -> list[Any]:
        """:meth:`Bundle.predict <handlens.models.bundle.Bundle.predict>` on onnxruntime: top-k per image."""
        return self._view.predict(images, top_k, batch_size, tta=tta)
