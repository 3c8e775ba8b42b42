"""Model bundles: a directory with ``weights.safetensors`` and ``bundle.json``.

The manifest holds everything needed to rebuild and trust the model: architecture and head,
classes and labelset, preprocessing, training config, metrics, split membership by image id,
package versions and a schema version. Bundles are written atomically (a temp dir renamed into
place) and loaded without unpickling anything. This module is on the inference path: it must not
import Lightning or MLflow.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from handlens.core.errors import InputError, NotFoundError
from handlens.transforms.preprocess import Preprocess, decode_working, preprocess_image

BUNDLE_SCHEMA_VERSION = 1
WEIGHTS_FILE = "weights.safetensors"
MANIFEST_FILE = "bundle.json"


def package_versions() -> dict[str, str]:
    versions = {}
    for name in ("handlens", "torch", "torchvision", "timm", "safetensors", "numpy", "pillow"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[name] = metadata.version(name)
    return versions


def save_bundle(directory: Path, model: Any, manifest: dict[str, Any]) -> Path:
    """Write the model's weights and ``manifest`` to ``directory`` atomically; returns the directory."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
        save_file(state, str(tmp / WEIGHTS_FILE))
        digest = hashlib.sha256((tmp / WEIGHTS_FILE).read_bytes()).hexdigest()
        full = {
            "schema_version": BUNDLE_SCHEMA_VERSION,
            "created_at": datetime.now(UTC).isoformat(),
            "versions": package_versions(),
            "weights_sha256": digest,
            "layers": model.layers,
            "default_layer": model.default_layer,
            **manifest,
        }
        (tmp / MANIFEST_FILE).write_text(json.dumps(full, indent=2, default=_jsonable))
        _share_like_other_files(tmp)
        if directory.exists():
            old = directory.with_name(f".{directory.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(directory, old)
            os.replace(tmp, directory)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def _share_like_other_files(directory: Path) -> None:
    """mkdtemp makes a private (0700) directory: give the bundle the permissions the umask gives any file,
    so colleagues sharing the disk can load it."""
    umask = os.umask(0)
    os.umask(umask)
    directory.chmod(0o777 & ~umask)
    for item in directory.iterdir():
        item.chmod(0o666 & ~umask)


def _jsonable(value: Any) -> Any:
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


@dataclass
class Prediction:
    source: str
    top: list[tuple[str, float]]
    probabilities: dict[str, float]

    def to_dict(self) -> dict[str, Any]:
        return {"source": self.source, "label": self.top[0][0], "confidence": self.top[0][1],
                "top": [{"class": c, "probability": p} for c, p in self.top], "probabilities": self.probabilities}


class Bundle:
    """A loaded model bundle: the model in eval mode plus what is needed to feed it."""

    def __init__(self, path: Path, manifest: dict[str, Any], module: Any) -> None:
        self.path = path
        self.manifest = manifest
        self.module = module
        self.classes: list[str] = list(manifest["classes"])
        self.preprocess = Preprocess.from_dict(manifest["preprocess"])
        self.layer_names: list[str] = [manifest.get("default_layer", "")] + [
            n for n in manifest.get("layers", {}) if n != manifest.get("default_layer")]
        self.layer_names = [n for n in self.layer_names if n]

    def __repr__(self) -> str:
        return (f"Bundle({self.path}, backbone={self.manifest['backbone']}, freeze={self.manifest.get('freeze')}, "
                f"classes={self.classes})")

    @property
    def backbone(self) -> str:
        return str(self.manifest["backbone"])

    def layer(self, name: str) -> Any:
        return self.module.layer(name)

    def transform(self, image: Any) -> Any:
        """A path, PIL image or array -> the normalised (3, S, S) float tensor the module takes."""
        import torch

        array = preprocess_image(image, self.preprocess)
        batch = torch.from_numpy(array).permute(2, 0, 1).unsqueeze(0)
        return self.preprocess.normalize_batch(batch)[0]

    def transform_many(self, images: Sequence[Any]) -> Any:
        import torch

        arrays = np.stack([preprocess_image(image, self.preprocess) for image in images])
        batch = torch.from_numpy(arrays).permute(0, 3, 1, 2)
        return self.preprocess.normalize_batch(batch)

    def predict_arrays(self, arrays: np.ndarray, batch_size: int = 16, *, tta: bool = False) -> np.ndarray:
        """Probabilities for already preprocessed (N, S, S, 3) uint8 arrays (e.g. from the decode cache);
        ``tta``: averaged over the views its training policy allows (``models.tta``). Batches of 16 in
        channels-last layout: about 3x faster on a CPU than batches of 64 (train.features.FEATURE_BATCH)."""
        import torch

        from handlens.models.tta import tta_plan, view_probabilities

        views = tta_plan(self.manifest).views if tta else None
        outputs = []
        with torch.inference_mode():
            for start in range(0, len(arrays), batch_size):
                batch = torch.from_numpy(np.ascontiguousarray(arrays[start:start + batch_size])).permute(0, 3, 1, 2)
                inputs = self.preprocess.normalize_batch(batch).contiguous(memory_format=torch.channels_last)
                outputs.append(view_probabilities(self.module, inputs, views).numpy())
        return np.concatenate(outputs) if outputs else np.zeros((0, len(self.classes)), dtype=np.float32)

    @property
    def patch_trained(self) -> bool:
        """True for a model trained on patches: it predicts an image as the mean over its grid patches."""
        return bool(self.preprocess.patches)

    def grid_patches(self, images: Sequence[np.ndarray]) -> tuple[Any, list[int], list[tuple[int, int, int]]]:
        """A patch-trained model's inputs for working images (``decode_working``): the (P, 3, S, S) uint8 grid
        patches it predicts from (ROI-aware with a threshold ROI rule), each patch's image index and box."""
        import torch

        from handlens.transforms.patches import PatchSpec, RoiIntegral, crop_resize, grid_boxes
        from handlens.transforms.roi import RoiRule, threshold_roi

        settings = dict(self.preprocess.patches or {})
        spec, rule = PatchSpec.from_dict(settings), RoiRule.from_dict(settings.get("roi"))
        patches, owners, boxes = [], [], []
        for index, image in enumerate(images):
            roi = RoiIntegral(threshold_roi(image, rule)) if rule.source == "threshold" else None
            for box in grid_boxes(image.shape[0], image.shape[1], spec, roi):
                patches.append(crop_resize(image, box, self.preprocess.size))
                owners.append(index)
                boxes.append(box)
        size = self.preprocess.size
        batch = torch.stack(patches) if patches else torch.zeros((0, 3, size, size), dtype=torch.uint8)
        return batch, owners, boxes

    def predict_working(self, images: Sequence[np.ndarray], batch_size: int = 32, *, tta: bool = False) -> np.ndarray:
        """Image-level probabilities of a patch-trained model from working images (``decode_working``):
        the mean class probability of each image's grid patches (:meth:`grid_patches`); ``tta``: each
        patch's probabilities averaged over the views its training policy allows (``models.tta``)."""
        import torch

        from handlens.models.tta import tta_plan, view_probabilities
        from handlens.transforms.patches import mean_by_image

        views = tta_plan(self.manifest).views if tta else None
        batch, owners, _ = self.grid_patches(images)
        if not owners:
            return np.zeros((0, len(self.classes)), dtype=np.float32)
        probs = []
        with torch.inference_mode():
            for start in range(0, len(batch), batch_size):
                x = self.preprocess.normalize_batch(batch[start:start + batch_size])
                probs.append(view_probabilities(self.module, x, views))
        return mean_by_image(torch.cat(probs), torch.tensor(owners), len(images)).numpy()

    def predict_proba(self, images: Sequence[Any], batch_size: int = 32, *, tta: bool = False) -> np.ndarray:
        """Class probabilities, (N, classes); ``tta``: averaged over the views its training policy allows."""
        import torch

        from handlens.models.tta import tta_plan, view_probabilities

        if self.patch_trained:
            working = [decode_working(image, self.preprocess.working_side, self.preprocess.morphology)
                       for image in images]
            return self.predict_working(working, batch_size, tta=tta)
        views = tta_plan(self.manifest).views if tta else None
        outputs = []
        with torch.inference_mode():
            for start in range(0, len(images), batch_size):
                outputs.append(view_probabilities(self.module, self.transform_many(images[start:start + batch_size]),
                                                  views).numpy())
        return np.concatenate(outputs) if outputs else np.zeros((0, len(self.classes)), dtype=np.float32)

    def predict(self, images: Any, top_k: int = 3, batch_size: int = 32, *, tta: bool = False) -> list[Prediction]:
        """Top-k classes per image; ``images`` is one or several paths, PIL images or arrays; ``tta``: see
        :meth:`predict_proba`."""
        items = list(images) if isinstance(images, (list, tuple)) else [images]
        probs = self.predict_proba(items, batch_size, tta=tta)
        k = max(1, min(top_k, len(self.classes)))
        predictions = []
        for item, row in zip(items, probs, strict=True):
            order = np.argsort(-row)[:k]
            predictions.append(Prediction(
                source=str(item) if isinstance(item, (str, Path)) else type(item).__name__,
                top=[(self.classes[i], round(float(row[i]), 6)) for i in order],
                probabilities={c: round(float(p), 6) for c, p in zip(self.classes, row, strict=True)},
            ))
        return predictions


def read_manifest(path: Path) -> dict[str, Any]:
    path = Path(path)
    manifest_file = path / MANIFEST_FILE
    if not manifest_file.is_file():
        raise NotFoundError(f"{path} is not a model bundle (no {MANIFEST_FILE}); give a bundle directory or run id")
    manifest = json.loads(manifest_file.read_text())
    version = manifest.get("schema_version")
    if version != BUNDLE_SCHEMA_VERSION:
        raise InputError(f"bundle {path} has schema version {version}; this handlens reads version "
                         f"{BUNDLE_SCHEMA_VERSION}")
    return manifest


def build_from_manifest(manifest: dict[str, Any]) -> Any:
    from handlens.models.classifier import create_classifier

    if manifest.get("ensemble"):  # several members averaged (handlens.models.ensemble)
        from handlens.models.ensemble import build_ensemble

        return build_ensemble(manifest)
    head = manifest.get("head", {})
    return create_classifier(manifest["backbone"], len(manifest["classes"]), weights="none",
                             freeze=manifest.get("freeze", "full"), head=head.get("type", "linear"),
                             hidden=head.get("hidden", 256), dropout=head.get("dropout", 0.0),
                             pool=head.get("pool", "avg"))


def load_bundle(path: str | Path, bundle_class: type[Bundle] = Bundle) -> Bundle:
    """Load a bundle directory: weights from safetensors (never pickle), model in eval mode.

    ``bundle_class`` lets a higher layer (``handlens.explain``) return its richer bundle without this
    module importing it.
    """
    import torch
    from safetensors.torch import load_file

    path = Path(path).expanduser().resolve()
    manifest = read_manifest(path)
    weights = path / WEIGHTS_FILE
    digest = hashlib.sha256(weights.read_bytes()).hexdigest()
    if manifest.get("weights_sha256") not in (None, digest):
        raise InputError(f"{weights} does not match the checksum in {MANIFEST_FILE}: the bundle is damaged")
    model = build_from_manifest(manifest)
    model.load_state_dict(load_file(str(weights)), strict=True)
    model.eval()
    torch.set_grad_enabled(True)  # explanations need gradients; inference uses inference_mode
    return bundle_class(path, manifest, model)


def iter_images(paths: Iterable[str | Path]) -> list[str]:
    """Expand folders into their image files (sorted); keep files as given."""
    from handlens.data.imaging import IMAGE_EXTENSIONS

    out: list[str] = []
    for item in paths:
        p = Path(item)
        if p.is_dir():
            out += sorted(str(f) for f in p.rglob("*") if f.suffix.lower() in IMAGE_EXTENSIONS)
        else:
            out.append(str(p))
    return out
