"""Model bundles: a directory with ``weights.safetensors`` and ``bundle.json``.

The manifest holds everything needed to rebuild and trust the model: architecture and head,
classes and labelset, preprocessing, training config, metrics, split membership by image id,
package versions and a schema version. Bundles are written atomically (a temp dir renamed into
place) and loaded without unpickling anything. This module is on the inference path: it must not
import Lightning or MLflow.

A damaged bundle (``bundle.json`` that is not JSON or has wrongly typed keys, a missing or empty
weights file, weights that do not fit the manifest's classes) raises :class:`DamagedBundleError`
naming the bundle and the reason; :func:`scan_bundles` lists a runs folder's bundles with the
damaged ones marked, so one damaged bundle never hides the others.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import secrets
import shutil
import socket
import tempfile
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from handlens.core.disk import DiskFullError, is_disk_full, raise_if_disk_full  # noqa: F401
from handlens.core.errors import HandlensError, InputError, NotFoundError
from handlens.transforms.preprocess import NormalizeMode, Preprocess, ResizeMode, decode_working, preprocess_image

BUNDLE_SCHEMA_VERSION = 1
WEIGHTS_FILE = "weights.safetensors"
MANIFEST_FILE = "bundle.json"
#: a temp or replaced-bundle folder whose writer cannot be seen alive is removed once this old (seconds)
STALE_TEMP_SECONDS = 30 * 60


class DamagedBundleError(InputError):
    """A model bundle exists but cannot be used: its manifest or weights are damaged (or from a newer handlens).

    ``bundle`` is the bundle directory, ``reason`` what is wrong with it (without the path)."""

    http_status = 409  # the stored bundle conflicts with what handlens can load

    def __init__(self, bundle: Path, reason: str, fix: str = "train the model again or restore the bundle "
                                                              "from a backup", *, name: str | None = None) -> None:
        self.bundle, self.reason = Path(bundle), reason
        what = f"model {name}" if name else f"model bundle {bundle}"  # a service names models by id, not path
        super().__init__(f"{what} is damaged: {reason}; {fix}")


def explainable_layers(layers: dict[str, str]) -> list[str]:
    """The named layers a map can be drawn from: every layer except those on the classifier head, whose output
    has no spatial extent (a CAM of ``head`` is refused). The one rule the API and the viewer's menu use."""
    return [name for name, module in layers.items() if module != "head" and not str(module).startswith("head.")]


def package_versions() -> dict[str, str]:
    versions = {}
    for name in ("handlens", "torch", "torchvision", "timm", "safetensors", "numpy", "pillow"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[name] = metadata.version(name)
    return versions


# ---------------------------------------------------------------------------------------------- manifest

FiniteFloat = Annotated[float, Field(allow_inf_nan=False)]
PositiveFloat = Annotated[float, Field(gt=0, allow_inf_nan=False)]


class _Strict(BaseModel):
    """Types as JSON gives them (no "3" -> 3); keys a newer handlens adds are kept (forward compatibility)."""

    model_config = ConfigDict(strict=True, extra="allow")


class PreprocessManifest(BaseModel):
    """``bundle.json``'s ``preprocess``: what :class:`~handlens.transforms.preprocess.Preprocess` is built from.
    Unknown keys are refused: they would change the pixels, and ignoring them would predict wrongly."""

    model_config = ConfigDict(strict=True, extra="forbid")

    size: int = Field(gt=0)
    mean: list[FiniteFloat] = Field(min_length=3, max_length=3)
    std: list[PositiveFloat] = Field(min_length=3, max_length=3)
    resize: ResizeMode = "shorter-crop"
    interpolation: Literal["bicubic", "bilinear", "nearest"] = "bicubic"
    normalize: NormalizeMode = "backbone"
    clip_percentiles: list[FiniteFloat] = Field([1.0, 99.0], min_length=2, max_length=2)
    morphology: list[dict[str, Any]] = Field(default_factory=list)
    patches: dict[str, Any] | None = None
    extra: dict[str, Any] = Field(default_factory=dict)

    @field_validator("clip_percentiles")
    @classmethod
    def _ordered(cls, value: list[float]) -> list[float]:
        if not 0 <= value[0] < value[1] <= 100:
            raise ValueError(f"must be two percentiles low < high within 0..100, got {value}")
        return value


class HeadManifest(_Strict):
    type: Literal["auto", "linear", "mlp", "logistic"] = "linear"
    hidden: int = 256
    dropout: float = Field(0.0, ge=0, lt=1)
    pool: Literal["avg", "texture"] = "avg"


class EnsembleMember(_Strict):
    backbone: str = Field(min_length=1)
    freeze: str = "full"
    head: HeadManifest | None = None
    weights: str | None = None


class EnsembleManifest(_Strict):
    members: list[EnsembleMember] = Field(min_length=2)


class BundleManifest(_Strict):
    """``bundle.json``, validated: the keys handlens reads, typed; any other key kept as it is."""

    schema_version: int
    kind: Literal["classifier"] = "classifier"
    backbone: str = Field(min_length=1)
    classes: list[str] = Field(min_length=2)
    preprocess: PreprocessManifest
    head: HeadManifest = Field(default_factory=HeadManifest)
    freeze: str = "full"
    weights: str | None = None
    layers: dict[str, str] = Field(default_factory=dict)
    default_layer: str = ""
    run_id: str | None = None
    dataset: str | None = None
    labelset: str | None = None
    split: str | None = None
    fold: int = 0
    metrics: dict[str, Any] = Field(default_factory=dict)
    config: dict[str, Any] = Field(default_factory=dict)
    split_membership: dict[str, list[int]] = Field(default_factory=dict)
    training_sha256: list[str] = Field(default_factory=list)
    weights_sha256: str | None = None
    ensemble: EnsembleManifest | None = None
    study: dict[str, Any] | None = None

    @field_validator("classes")
    @classmethod
    def _named_once(cls, classes: list[str]) -> list[str]:
        if any(not name.strip() for name in classes):
            raise ValueError("class names must not be empty")
        repeated = sorted({name for name in classes if classes.count(name) > 1})
        if repeated:
            raise ValueError(f"class names must be unique; repeated: {', '.join(map(repr, repeated))}")
        return classes


class DetectorInputManifest(_Strict):
    """How a detector sees an image: resized by ``scale`` (working pixels per image pixel), cut into tiles of
    ``tile`` working pixels overlapping by ``overlap``, normalised with ``mean``/``std`` (0..1 pixels)."""

    scale: float = Field(gt=0, le=4)
    tile: int = Field(ge=32, le=4096)
    overlap: float = Field(0.25, ge=0, lt=1)
    mean: list[FiniteFloat] = Field(min_length=3, max_length=3)
    std: list[PositiveFloat] = Field(min_length=3, max_length=3)


class DetectorManifest(_Strict):
    """``bundle.json`` of a detector (``kind: detector``): a torchvision detection head on a registered backbone.
    ``classes`` are the box labels (background excluded); ``architecture`` names the detection head."""

    schema_version: int
    kind: Literal["detector"]
    architecture: str = Field(min_length=1)
    backbone: str = Field(min_length=1)
    classes: list[str] = Field(min_length=1)
    input: DetectorInputManifest
    fpn_channels: int = Field(gt=0)
    score_threshold: float = Field(0.3, ge=0, le=1)
    nms_iou: float = Field(0.5, gt=0, le=1)
    max_detections: int = Field(300, gt=0)
    freeze: str = "full"
    weights: str | None = None
    run_id: str | None = None
    dataset: str | None = None
    labelset: str | None = None
    metrics: dict[str, Any] = Field(default_factory=dict)
    config: dict[str, Any] = Field(default_factory=dict)
    split_membership: dict[str, list[int]] = Field(default_factory=dict)
    training_sha256: list[str] = Field(default_factory=list)
    weights_sha256: str | None = None


class NotAClassifierError(InputError):
    """A detector bundle given where a classifier is needed (predict, evaluate, explain, export)."""

    def __init__(self, path: Path) -> None:
        super().__init__(f"{path} is a detector bundle (kind: detector), not a classifier: it finds boxes, it "
                         "does not name an image's class. Use `handlens detect run DETECTOR IMAGE... --classifier "
                         "BUNDLE`, or give a classifier bundle here")


def _validation_reason(exc: ValidationError, shown: int = 4) -> str:
    errors = exc.errors()
    parts = []
    for error in errors[:shown]:
        where = ".".join(str(p) for p in error["loc"]) or "the top level"
        parts.append(f"{MANIFEST_FILE} {where}: {error['msg']}")
    if len(errors) > shown:
        parts.append(f"and {len(errors) - shown} more problem(s)")
    return "; ".join(parts)


def parse_manifest(path: Path, text: str) -> tuple[dict[str, Any], BundleManifest | DetectorManifest]:
    """The raw manifest dict and its validated model, from the text of bundle ``path``'s ``bundle.json``;
    raises :class:`DamagedBundleError` saying what is wrong."""
    if not text.strip():
        raise DamagedBundleError(path, f"{MANIFEST_FILE} is empty")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DamagedBundleError(path, f"{MANIFEST_FILE} is not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise DamagedBundleError(path, f"{MANIFEST_FILE} holds a JSON {type(data).__name__}, not an object")
    version = data.get("schema_version")
    if version != BUNDLE_SCHEMA_VERSION:
        newer = isinstance(version, int) and not isinstance(version, bool) and version > BUNDLE_SCHEMA_VERSION
        raise DamagedBundleError(path, f"it has schema version {version!r}; this handlens reads version "
                                       f"{BUNDLE_SCHEMA_VERSION}",
                                 "upgrade handlens to load it" if newer else "train the model again")
    kind = data.get("kind", "classifier")
    if kind not in ("classifier", "detector"):
        raise DamagedBundleError(path, f"its kind {kind!r} is not one this handlens knows (classifier, detector)",
                                 "upgrade handlens to load it")
    try:
        return data, (DetectorManifest if kind == "detector" else BundleManifest).model_validate(data)
    except ValidationError as exc:
        raise DamagedBundleError(path, _validation_reason(exc)) from None


def read_manifest(path: Path, *, kind: str | None = "classifier") -> dict[str, Any]:
    """The validated manifest of bundle directory ``path`` (as the dict in the file, extra keys included).
    ``kind``: the kind the caller needs (a detector where a classifier is needed is a clear error); None: any."""
    data, manifest = read_bundle_manifest(path)
    if kind == "classifier" and isinstance(manifest, DetectorManifest):
        raise NotAClassifierError(Path(path))
    if kind == "detector" and not isinstance(manifest, DetectorManifest):
        raise InputError(f"{path} is a classifier bundle, not a detector: `handlens detect run` needs a bundle "
                         "from `handlens detect train` first (give the classifier with --classifier)")
    return data


def read_bundle_manifest(path: Path) -> tuple[dict[str, Any], BundleManifest | DetectorManifest]:
    """(raw dict, validated model) of bundle directory ``path``'s manifest; :class:`NotFoundError` if it is not a
    bundle, :class:`DamagedBundleError` if its manifest is damaged."""
    path = Path(path)
    manifest_file = path / MANIFEST_FILE
    if not manifest_file.is_file():
        raise NotFoundError(f"{path} is not a model bundle (no {MANIFEST_FILE}); give a bundle directory or run id")
    try:
        text = manifest_file.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise DamagedBundleError(path, f"{MANIFEST_FILE} is not UTF-8 text") from None
    except OSError as exc:
        raise DamagedBundleError(path, f"{MANIFEST_FILE} cannot be read ({exc.strerror or exc})") from None
    return parse_manifest(path, text)


def check_weights_file(path: Path) -> Path:
    """Bundle ``path``'s weights file, which must exist and not be empty (else :class:`DamagedBundleError`)."""
    weights = Path(path) / WEIGHTS_FILE
    if not weights.is_file():
        raise DamagedBundleError(path, f"its weights file {WEIGHTS_FILE} is missing")
    if weights.stat().st_size == 0:
        raise DamagedBundleError(path, f"its weights file {WEIGHTS_FILE} is empty (0 bytes)")
    return weights


@dataclass(frozen=True)
class BundleEntry:
    """One run's bundle in a runs folder: usable (``manifest`` set) or ``damaged`` (the reason, no path)."""

    model_id: str
    path: Path
    manifest: BundleManifest | DetectorManifest | None
    damaged: str | None = None

    @property
    def kind(self) -> str:
        return getattr(self.manifest, "kind", "classifier")


def scan_bundles(runs_dir: Path) -> list[BundleEntry]:
    """Every ``<runs_dir>/<run id>/bundle`` holding a ``bundle.json``, sorted by run id, damaged ones included
    and marked (their weights are checked to exist, not read). Stale temp folders of killed bundle writes
    are swept on the way (see :func:`sweep_stale_temp`)."""
    runs_dir = Path(runs_dir)
    entries: list[BundleEntry] = []
    if not runs_dir.is_dir():
        return entries
    for run_dir in sorted(p for p in runs_dir.iterdir() if p.is_dir() and not p.name.startswith(".")):
        bundle = run_dir / "bundle"
        with contextlib.suppress(OSError):  # a read-only workspace: list it all the same
            sweep_stale_temp(bundle)
        if not (bundle / MANIFEST_FILE).is_file():
            continue  # a run without a bundle (yet): not a model
        try:
            _, manifest = read_bundle_manifest(bundle)
            check_weights_file(bundle)
        except DamagedBundleError as exc:
            entries.append(BundleEntry(run_dir.name, bundle, None, exc.reason))
            continue
        entries.append(BundleEntry(run_dir.name, bundle, manifest))
    return entries


# ------------------------------------------------------------------------------------------------- saving

def _host_tag() -> str:
    return re.sub(r"[^A-Za-z0-9]", "", socket.gethostname())[:24] or "host"


_WRITER = re.compile(r"^(?:tmp|old)-(?P<pid>\d+)-(?P<host>[A-Za-z0-9]*)-")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def _newest_mtime(folder: Path) -> float:
    times = [folder.stat().st_mtime]
    with contextlib.suppress(OSError):
        times += [item.stat().st_mtime for item in folder.iterdir()]
    return max(times)


def _is_stale(folder: Path, prefix: str, now: float) -> bool:
    """A temp folder is stale when its writer (pid and host in its name) is a dead process on this host, or,
    for a writer this host cannot check (another host, an older handlens's name), when it is
    :data:`STALE_TEMP_SECONDS` old. A live writer's folder is only removed past that age (a reused pid)."""
    old_enough = now - _newest_mtime(folder) > STALE_TEMP_SECONDS
    writer = _WRITER.match(folder.name[len(prefix):])
    if writer is not None and writer["host"] == _host_tag():
        return old_enough or not _pid_alive(int(writer["pid"]))
    return old_enough


def sweep_stale_temp(directory: Path) -> list[Path]:
    """Remove the temp folders (``.<name>.tmp-*``, ``.<name>.old-*``) that killed writes of bundle ``directory``
    left beside it; folders of a write still running are kept. A replaced bundle (``.old``) is put back
    when ``directory`` itself is missing (a write killed between its two renames). Returns what was removed."""
    directory = Path(directory)
    prefix = f".{directory.name}."
    if not directory.parent.is_dir():
        return []
    now = time.time()
    removed = []
    for folder in sorted(directory.parent.iterdir()):
        if not (folder.name.startswith(prefix) and folder.is_dir()):
            continue
        try:
            if not _is_stale(folder, prefix, now):
                continue
            replaced = folder.name[len(prefix):].startswith("old")
            if replaced and not directory.exists() and (folder / MANIFEST_FILE).is_file():
                os.replace(folder, directory)
                continue
        except OSError:  # another sweep got there first
            continue
        shutil.rmtree(folder, ignore_errors=True)
        removed.append(folder)
    return removed


def save_bundle(directory: Path, model: Any, manifest: dict[str, Any]) -> Path:
    """Write the model's weights and ``manifest`` to ``directory`` atomically; returns the directory.

    The temp folder's name carries the writer's pid and host, so a later write (or :func:`scan_bundles`)
    can sweep what a killed write left without touching one in progress. A full disk raises
    :class:`DiskFullError` and leaves the previous bundle, if any, in place."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(OSError):
        sweep_stale_temp(directory)
    writer = f"{os.getpid()}-{_host_tag()}-"
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp-{writer}", dir=directory.parent))
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
            old = directory.with_name(f".{directory.name}.old-{writer}{secrets.token_hex(4)}")
            os.replace(directory, old)
            os.replace(tmp, directory)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, directory)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise_if_disk_full(exc, what="the model bundle", where=directory.parent)
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


#: entry-point group where packages above this one plug in prediction runtimes (pyproject.toml: onnx)
RUNTIME_GROUP = "handlens.runtimes"


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

    @property
    def patch_tile(self) -> int | None:
        """The tile size a patch-trained model sees images in (its patch size); None: it sees whole images."""
        if not self.preprocess.patches:
            return None
        return int(self.preprocess.patches.get("size", self.preprocess.size))

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

    def runtime(self, name: str) -> Any:
        """The predictor of runtime ``name`` for this bundle (made once). ``torch``: the bundle itself. Other
        runtimes plug in through the ``handlens.runtimes`` entry points (``onnx``: handlens.export's onnxruntime
        predictor), so that this package never imports the packages above it."""
        if name == "torch":
            return self
        made = self.__dict__.setdefault("_runtimes", {})
        if name not in made:
            from importlib.metadata import entry_points

            found = {entry.name: entry for entry in entry_points(group=RUNTIME_GROUP)}
            if name not in found:
                raise InputError(f"unknown runtime {name!r}; choose torch or {', '.join(sorted(found)) or '(none)'}"
                                 " (a runtime missing from the list: reinstall handlens, `pip install -e .`)")
            made[name] = found[name].load()(self)
        return made[name]

    def predict_proba(self, images: Sequence[Any], batch_size: int = 32, *, tta: bool = False,
                      runtime: str = "torch") -> np.ndarray:
        """Class probabilities, (N, classes); ``tta``: averaged over the views its training policy allows;
        ``runtime``: ``torch``, or ``onnx`` (onnxruntime, the model exported on first use: :meth:`runtime`)."""
        import torch

        from handlens.models.tta import tta_plan, view_probabilities

        if runtime != "torch":
            return self.runtime(runtime).predict_proba(images, batch_size, tta=tta)

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

    def predict(self, images: Any, top_k: int = 3, batch_size: int = 32, *, tta: bool = False,
                runtime: str = "torch") -> list[Prediction]:
        """Top-k classes per image; ``images`` is one or several paths, PIL images or arrays; ``tta`` and
        ``runtime``: see :meth:`predict_proba`."""
        items = list(images) if isinstance(images, (list, tuple)) else [images]
        probs = self.predict_proba(items, batch_size, tta=tta, runtime=runtime)
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


def build_from_manifest(manifest: dict[str, Any]) -> Any:
    from handlens.models.classifier import create_classifier

    if manifest.get("ensemble"):  # several members averaged (handlens.models.ensemble)
        from handlens.models.ensemble import build_ensemble

        return build_ensemble(manifest)
    head = manifest.get("head") or {}
    return create_classifier(manifest["backbone"], len(manifest["classes"]), weights="none",
                             freeze=manifest.get("freeze", "full"), head=head.get("type", "linear"),
                             hidden=head.get("hidden", 256), dropout=head.get("dropout", 0.0),
                             pool=head.get("pool", "avg"))


def _read_weights(path: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """The bundle's tensors, checked against the manifest's checksum; never unpickles."""
    from safetensors.torch import load_file

    weights = check_weights_file(path)
    digest = hashlib.sha256(weights.read_bytes()).hexdigest()
    if manifest.get("weights_sha256") not in (None, digest):
        raise DamagedBundleError(path, f"{WEIGHTS_FILE} does not match the checksum in {MANIFEST_FILE}")
    try:
        return load_file(str(weights))
    except Exception as exc:  # safetensors' own error for a truncated or foreign file
        raise DamagedBundleError(path, f"{WEIGHTS_FILE} cannot be read as safetensors ({exc})") from None


def _check_weights_fit(path: Path, model: Any, state: dict[str, Any], classes: list[str]) -> None:
    """The weights must have exactly the tensors, and shapes, of the model ``bundle.json`` describes; a head
    trained for another number of classes is named as such."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    given = {k: tuple(v.shape) for k, v in state.items()}
    wrong = [(k, given[k], shape) for k, shape in expected.items() if k in given and given[k] != shape]
    for _, got, want in wrong:
        if want and got and want[0] == len(classes) and got[0] != len(classes):
            raise DamagedBundleError(path, f"its weights give {got[0]} class outputs but {MANIFEST_FILE} lists "
                                           f"{len(classes)} classes ({', '.join(classes)})")
    missing, unexpected = sorted(expected.keys() - given.keys()), sorted(given.keys() - expected.keys())
    if wrong or missing or unexpected:
        problems = [f"{k} is {got} not {want}" for k, got, want in wrong[:3]]
        problems += [f"missing {', '.join(missing[:3])}"] if missing else []
        problems += [f"unexpected {', '.join(unexpected[:3])}"] if unexpected else []
        backbone = getattr(getattr(model, "spec", None), "name", "?")
        raise DamagedBundleError(path, f"its weights do not fit the model {MANIFEST_FILE} describes "
                                       f"(backbone {backbone}): {'; '.join(problems)}")


def load_bundle(path: str | Path, bundle_class: type[Bundle] = Bundle) -> Bundle:
    """Load a bundle directory: weights from safetensors (never pickle), model in eval mode.

    ``bundle_class`` lets a higher layer (``handlens.explain``) return its richer bundle without this
    module importing it. A damaged bundle raises :class:`DamagedBundleError` saying what is wrong.
    """
    import torch

    path = Path(path).expanduser().resolve()
    manifest = read_manifest(path)
    state = _read_weights(path, manifest)
    try:
        model = build_from_manifest(manifest)
    except HandlensError as exc:  # an unknown backbone, a pool it cannot give...
        raise DamagedBundleError(path, f"its model cannot be built: {exc}", "use the handlens that trained it, "
                                 "or train the model again") from None
    _check_weights_fit(path, model, state, list(manifest["classes"]))
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:  # a dtype or shape detail the check above does not see
        raise DamagedBundleError(path, f"its weights do not load into the model: {exc}") from None
    model.eval()
    torch.set_grad_enabled(True)  # explanations need gradients; inference uses inference_mode
    return bundle_class(path, manifest, model)


def iter_images(paths: Iterable[str | Path]) -> list[str]:
    """Expand folders into their image files (sorted); keep files as given."""
    from handlens.core.formats import IMAGE_EXTENSIONS

    out: list[str] = []
    for item in paths:
        p = Path(item)
        if p.is_dir():
            out += sorted(str(f) for f in p.rglob("*") if f.suffix.lower() in IMAGE_EXTENSIONS)
        else:
            out.append(str(p))
    return out
