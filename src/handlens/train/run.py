"""``train(cfg) -> RunResult``: from a catalog split to a model bundle, with metrics and tracking.

A run lives in ``<workspace>/runs/<run id>/``: ``config.yaml`` (enough to repeat it),
``checkpoints/`` (``last.ckpt`` to resume, ``last.prev.ckpt`` its fallback, ``best.ckpt``; each written
atomically), ``history.json``, ``metrics.json``,
confusion-matrix PNGs and ``bundle/``. Images are decoded once (cached across runs); a frozen
backbone's features are computed once per image (also cached) and only the head trains on them, with
:func:`handlens.train.head.fit_head` (no Lightning, no checkpoints: a frozen run takes seconds).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import ValidationError

from handlens.core.errors import BusyError, ConflictError, HandlensError, InputError, NotFoundError
from handlens.core.workspace import Workspace
from handlens.models.bundle import raise_if_disk_full
from handlens.train.config import AugmentConfig, RunConfig, load_config, on_cached_features
from handlens.transforms.augment import build_augmenter

CONFIG_FILE = "config.yaml"


class RunInterrupted(HandlensError):
    """The user stopped a run (Ctrl-C); its last checkpoint is kept for ``--resume``."""

    exit_code = 130


@dataclass
class RunResult:
    run_id: str
    run_dir: Path
    bundle: Path
    epochs: int
    best_epoch: int | None
    metrics: dict[str, Any]
    history: list[dict[str, Any]]
    seconds: float
    timings: dict[str, float] = field(default_factory=dict)
    tracking_uri: str = ""
    resumed: bool = False
    verdict: str = ""  # an --overfit-batches run: "learns: ..." or "does not learn: ..."
    #: a DDP run's process: 0 for the one that writes the run (and a run of one process); a non-zero rank's
    #: result has rank 0's run id, the same history and epochs, no metrics, and the bundle where rank 0 writes it
    rank: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"run_id": self.run_id, "run_dir": str(self.run_dir), "bundle": str(self.bundle),
                "epochs": self.epochs, "best_epoch": self.best_epoch, "metrics": self.metrics,
                "seconds": round(self.seconds, 2), "timings": {k: round(v, 2) for k, v in self.timings.items()},
                "tracking_uri": self.tracking_uri, "resumed": self.resumed, "verdict": self.verdict}


def new_run_id() -> str:
    return f"{datetime.now(UTC):%Y%m%d-%H%M%S}-{secrets.token_hex(3)}"


@dataclass
class Prepared:
    """Everything a training loop needs, built from a config (shared by train and lr-find)."""

    cfg: RunConfig
    data: Any
    model: Any
    module: Any
    preprocess: Any
    train_loader: Any
    val_loader: Any | None
    eval_inputs: dict[str, Any]  # subset -> (inputs, targets), or a GridPatchDataset, for final metrics
    on_features: bool
    timings: dict[str, float]
    weights_info: dict[str, Any]
    #: subset -> (features (N, F) or (N, V, F), targets) on cached features; the train rows before any balancing
    features: dict[str, tuple[Any, np.ndarray]] | None = None
    class_weights: list[float] | None = None
    #: the train images' groups when the split keeps groups together (a logistic head's inner CV keeps them too)
    train_groups: list[str | None] | None = None


def seed_everything(seed: int) -> None:
    """What ``lightning.pytorch.seed_everything(seed, workers=True)`` does, without importing Lightning."""
    import random

    import torch

    os.environ["PL_GLOBAL_SEED"], os.environ["PL_SEED_WORKERS"] = str(seed), "1"
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def training_threads() -> int:
    """Threads torch trains with: ``$OMP_NUM_THREADS`` when set (several job workers sharing a machine each take
    their share), else every core."""
    given = os.environ.get("OMP_NUM_THREADS", "")
    return max(1, int(given)) if given.isdigit() else (os.cpu_count() or 1)


def resolve_policy(cfg: RunConfig) -> str:
    """``augment.policy=auto`` -> ``none`` where nothing would be augmented (a frozen backbone on cached
    features without ``train.views``), else ``basic``; written into ``cfg`` so the saved config pins it."""
    if cfg.augment.policy == "auto":
        cfg.augment.policy = "none" if on_cached_features(cfg) and cfg.train.views == 0 else "basic"
    return cfg.augment.policy


def settle_policy(cfg: RunConfig) -> Any:
    """The run's augmentation policy, settled into ``cfg``: ``auto`` resolved (:func:`resolve_policy`), then the
    policy's recommended preprocessing taken for each key the config does not set (:func:`apply_policy_preprocess`:
    thin-section's patch sampling). Train, a study's trials and its refit decide from the same settled config
    (whether a run is on cached features depends on the patches)."""
    from handlens.transforms.augment import policy_for

    resolve_policy(cfg)
    policy = policy_for(cfg.augment)
    apply_policy_preprocess(cfg, policy.preprocess if policy is not None else {})
    return policy


def feature_key_parts(cfg: RunConfig, spec: Any, preprocess: Any, views: int) -> dict[str, Any]:
    """What identifies a frozen backbone's features in the per-image store (train runs and studies share it)."""
    from handlens.transforms.cache import DECODER_VERSION

    base = {"backbone": spec.name, "weights": _weights_identity(cfg.model.weights),
            "preprocess": preprocess.model_key(), "pool": cfg.model.pool,
            "decoder": DECODER_VERSION}  # features of images decoded before EXIF orientation was applied: stale
    if cfg.model.weights == "none":  # a random backbone is made by the seed: another seed, other features
        base["init_seed"] = cfg.train.seed
    return {**base, "augment": cfg.augment.model_dump(), "seed": cfg.train.seed} if views else base


#: the basic policy's own settings and their defaults (the run config's): they shape ``augment.policy=basic`` and
#: nothing else
BASIC_POLICY_KNOBS = {key: AugmentConfig.model_fields[key].default for key in ("hflip", "vflip", "crop_scale")}


def check_policy_has_effect(cfg: RunConfig, on_features: bool) -> None:
    """An explicit policy on cached features without views would change nothing: say how to make it count. The
    basic policy's settings (augment.hflip, vflip, crop_scale) changed where the basic policy is not the one
    applied (a frozen run without views augments nothing; a preset or ``none`` has steps of its own) would be
    ignored silently: refused the same way. ``cfg.augment.policy`` is the resolved one (:func:`resolve_policy`)."""
    if on_features and cfg.train.views == 0 and cfg.augment.policy not in ("none", "auto"):
        raise InputError(f"augment.policy={cfg.augment.policy} has no effect on a frozen backbone's cached "
                         "features: add train.views=4 to cache 4 augmented views per image, or set "
                         "augment.policy=none")
    tuned = [f"augment.{key}={getattr(cfg.augment, key)}" for key, default in BASIC_POLICY_KNOBS.items()
             if getattr(cfg.augment, key) != default]
    if not tuned or cfg.augment.policy == "basic":
        return
    has = "has" if len(tuned) == 1 else "have"
    if on_features and cfg.train.views == 0:
        raise InputError(f"{', '.join(tuned)} {has} no effect on a frozen backbone's cached features (no image is "
                         "augmented): add train.views=4 augment.policy=basic to cache 4 augmented views per "
                         "image, or drop it")
    raise InputError(f"{', '.join(tuned)} {has} no effect with augment.policy={cfg.augment.policy}: it tunes the basic "
                     "policy only; use augment.policy=basic, or put the step in your own policy file (see "
                     "`handlens augment-preview`), or drop it")


def regroup_subsets(data: Any, subsets: dict[str, list[int]]) -> Any:
    """The split's labelled images regrouped into exactly ``subsets`` (train, optional val and test) by image
    id; class weights from the new train subset."""
    from dataclasses import replace

    from handlens.data.splits import inverse_frequency_weights
    from handlens.train.data import Subset

    unknown = sorted(set(subsets) - {"train", "val", "test"})
    if unknown or "train" not in subsets:
        raise InputError(f"subsets: give train (and optionally val, test) image ids, got {sorted(subsets)}")
    pool: dict[int, tuple[str, str, int]] = {}
    for subset in data.subsets.values():
        for i, image_id in enumerate(subset.ids):
            pool[image_id] = (subset.paths[i], subset.sha256s[i], int(subset.targets[i]))
    placed: dict[int, str] = {}
    regrouped = {}
    for name in ("train", "val", "test"):
        if name not in subsets:
            continue
        ids = [int(i) for i in subsets[name]]
        outside = [i for i in ids if i not in pool]
        if outside:
            raise InputError(f"subsets[{name!r}]: image id(s) {', '.join(map(str, outside[:5]))} are not labelled "
                             f"images of split {data.split!r} (fold {data.fold})")
        for i in ids:
            if i in placed:
                raise InputError(f"subsets: image id {i} is in {placed[i]} and in {name}; give each image once")
            placed[i] = name
        regrouped[name] = Subset(ids=ids, paths=[pool[i][0] for i in ids], sha256s=[pool[i][1] for i in ids],
                                 targets=np.array([pool[i][2] for i in ids], dtype=np.int64))
    counts = np.bincount(regrouped["train"].targets, minlength=len(data.classes))
    weights = inverse_frequency_weights({c: int(n) for c, n in zip(data.classes, counts, strict=True) if n})
    return replace(data, subsets=regrouped, class_weights=weights)


def prepare(cfg: RunConfig, ws: Workspace, catalog: Any, *, subsets: dict[str, list[int]] | None = None,
            for_lightning: bool = True) -> Prepared:
    """Data, model, preprocessing and features for a run. ``subsets``: regroup the split's labelled images by
    id (see :func:`regroup_subsets`). ``for_lightning=False``: a run on cached features gets no
    LightningModule or loaders (``module`` is None; ``features`` holds what :func:`~handlens.train.head.fit_head`
    needs) and nothing imports Lightning. ``model.head=auto`` and ``augment.policy=auto`` are resolved in
    ``cfg``."""
    import torch

    from handlens.models.backbones import BACKBONES
    from handlens.models.classifier import create_classifier
    from handlens.models.freeze import FreezeSpec
    from handlens.train.data import load_split_data
    from handlens.train.head import check_logistic, resolve_head
    from handlens.transforms.policy import batch_mixer

    if not cfg.data.dataset:
        raise InputError("no dataset given: pass --dataset NAME (or data.dataset=NAME)")
    timings: dict[str, float] = {}
    seed_everything(cfg.train.seed)
    torch.set_num_threads(training_threads())
    policy = settle_policy(cfg)
    spec = BACKBONES.get(cfg.model.backbone)
    data = load_split_data(catalog, cfg.data.dataset, cfg.data.labelset, split_name=cfg.data.split,
                           fold=cfg.data.fold)
    if subsets is not None:
        data = regroup_subsets(data, subsets)
    if len(data.subsets["train"]) == 0:
        raise InputError(f"split {data.split!r} has no training images")
    class_weights = _class_weights(cfg, data)

    freeze = FreezeSpec.parse(cfg.model.freeze)
    patches = cfg.preprocess.patches.enabled
    mixing = policy is not None and bool(policy.batch_steps)
    if cfg.train.feature_cache == "on" and (freeze.mode != "frozen" or patches or mixing):
        raise InputError("train.feature_cache=on needs model.freeze=frozen, no patch sampling and no mixup/cutmix: "
                         "a backbone that learns, a new random patch or a mixed batch has no fixed features")
    on_features = on_cached_features(cfg, policy)
    check_policy_has_effect(cfg, on_features)
    if freeze.mode == "frozen" and patches and "patches" in (policy.preprocess if policy is not None else {}):
        print(f"note: augment.policy={cfg.augment.policy} samples random patches (its preprocess.patches): the frozen "
              "backbone's features are computed for every new patch each epoch, not cached once (slower); for the "
              "cached path add preprocess.patches.enabled=false train.views=4", file=sys.stderr, flush=True)
    cfg.model.head = resolve_head(cfg.model, cfg.train, on_features=on_features)  # type: ignore[assignment]
    if cfg.model.head == "logistic":
        if not on_features:
            raise InputError("model.head=logistic is fitted on a frozen backbone's cached features: it needs "
                             "model.freeze=frozen, no patch sampling, no mixup/cutmix and train.feature_cache "
                             "auto or on; use model.head=linear (or mlp) for a backbone that learns")
        check_logistic(cfg.train)
    elif cfg.model.logistic_c is not None:
        raise InputError(f"model.logistic_c has no effect with model.head={cfg.model.head}: it sets a logistic "
                         "head's C; drop it, or use model.head=logistic on a frozen backbone")
    started = time.perf_counter()
    model = create_classifier(cfg.model.backbone, len(data.classes), weights=cfg.model.weights,
                              freeze=cfg.model.freeze, head=cfg.model.head, hidden=cfg.model.hidden,
                              dropout=cfg.model.dropout, freeze_norm=cfg.model.freeze_norm, pool=cfg.model.pool)
    timings["model"] = time.perf_counter() - started
    subsets_ = {name: s for name, s in data.subsets.items() if len(s)}
    preprocess = build_preprocess(cfg, spec)
    generator = torch.Generator().manual_seed(cfg.train.seed)
    augmenter = build_augmenter(cfg.augment, classes=data.classes)
    mixer = batch_mixer(policy.batch_steps, len(data.classes)) if policy is not None else None
    stored = (_stored_features(cfg, ws, spec, preprocess=preprocess, subsets=subsets_)
              if on_features and not patches and cfg.preprocess.normalize != "dataset" else None)
    started = time.perf_counter()
    if stored is not None:  # every image's features are in the store: nothing to decode
        inputs: dict[str, Any] = {}
    elif patches:
        inputs = _patch_inputs(cfg, ws, catalog, subsets_, preprocess=preprocess)
    else:
        inputs = _whole_inputs(cfg, ws, subsets_, preprocess)
    timings["decode"] = time.perf_counter() - started
    if cfg.preprocess.normalize == "dataset":
        from dataclasses import replace

        mean, std = inputs.pop("_stats")
        preprocess = replace(preprocess, mean=mean, std=std)
    inputs.pop("_stats", None)

    if on_features:
        started = time.perf_counter()
        datasets, eval_inputs, features = _feature_datasets(cfg, ws, spec, model, preprocess=preprocess,
                                                            subsets=subsets_, images=inputs, augmenter=augmenter,
                                                            generator=generator, stored=stored)
        timings["features"] = time.perf_counter() - started
        if not for_lightning and not cfg.train.overfit_batches:  # fit_head trains it: no Lightning at all
            return Prepared(cfg, data, model, None, preprocess, None, None, eval_inputs, on_features, timings,
                            {"source": cfg.model.weights}, features, class_weights,
                            _train_groups(catalog, data) if cfg.model.head == "logistic" else None)
        from handlens.train.module import ClassifierModule

        module = ClassifierModule(model.head, data.classes, cfg.train, preprocess.normalize_batch,
                                  class_weights=class_weights, on_features=True)
    else:
        from handlens.train.module import ClassifierModule

        features = None
        datasets, eval_inputs = _image_datasets(cfg, preprocess, subsets_, inputs)
        # the train loader augments (in its workers); the module only normalises and mixes
        module = ClassifierModule(model, data.classes, cfg.train, preprocess.normalize_batch,
                                  class_weights=class_weights, body_params=list(model.backbone.parameters()),
                                  mixer=mixer)

    train_loader = build_train_loader(cfg, datasets["train"], None if on_features else augmenter,
                                      subsets_["train"].targets, generator=generator, on_features=on_features)
    loader_kwargs = {"batch_size": cfg.train.batch_size, "num_workers": 0}
    val_loader = torch.utils.data.DataLoader(datasets["val"], **loader_kwargs) if "val" in datasets else None
    return Prepared(cfg, data, model, module, preprocess, train_loader, val_loader, eval_inputs, on_features,
                    timings, {"source": cfg.model.weights}, features, class_weights)


def loader_workers(cfg: RunConfig, n_samples: int) -> int:
    """Worker processes for the train loader: the config's, else none. Augmentation works on whole
    batches with torch's intra-op threads, which on few cores beats per-process workers (measured in
    benchmarks/loader_speed.py --quick on 2 cores: 2,689 img/s in-process vs 1,494 with 2 workers); on many
    cores, or to overlap augmentation with an accelerator's work, set train.loader_workers."""
    return cfg.train.loader_workers if cfg.train.loader_workers is not None else 0


def build_train_loader(cfg: RunConfig, train_set: Any, augmenter: Any, targets: np.ndarray, *, generator: Any,
                       on_features: bool = False) -> Any:
    """The training DataLoader: shuffled or class-balanced sampling; batches augmented by the loader."""
    import torch

    from handlens.transforms.engine import AugmentingCollate

    workers = 0 if on_features else loader_workers(cfg, len(train_set))
    kwargs: dict[str, Any] = {"batch_size": cfg.train.batch_size, "num_workers": workers,
                              "drop_last": len(train_set) > cfg.train.batch_size and not on_features}
    if not on_features:
        kwargs["collate_fn"] = AugmentingCollate(augmenter)
    if workers:
        kwargs["persistent_workers"] = True
    if cfg.data.balance == "sampler":
        from handlens.train.balance import weighted_sampler

        if cfg.preprocess.patches.enabled:
            targets = np.tile(targets, cfg.preprocess.patches.per_image)
        return torch.utils.data.DataLoader(train_set, sampler=weighted_sampler(targets, generator), **kwargs)
    return torch.utils.data.DataLoader(train_set, shuffle=True, generator=generator, **kwargs)


def apply_policy_preprocess(cfg: RunConfig, recommended: dict[str, Any]) -> None:
    """Take the policy's recommended preprocessing for every key the run config does not set itself
    (key by key, also inside sections: ``preprocess.patches.size=96`` keeps the preset's ``enabled``)."""
    from handlens.train.config import PreprocessConfig

    if not recommended:
        return

    def merge(section: Any, values: dict[str, Any], where: str) -> dict[str, Any]:
        merged = section.model_dump()
        for key, value in values.items():
            if key not in type(section).model_fields:
                raise InputError(f"augmentation policy {cfg.augment.policy!r} recommends unknown setting "
                                 f"{where}{key!r}")
            current = getattr(section, key)
            if isinstance(value, dict) and hasattr(current, "model_fields_set"):
                merged[key] = merge(current, value, f"{where}{key}.")
            elif key not in section.model_fields_set:
                merged[key] = value
        return merged

    try:
        updated = PreprocessConfig.model_validate(merge(cfg.preprocess, recommended, "preprocess."))
    except ValidationError as exc:
        raise InputError(f"augmentation policy {cfg.augment.policy!r}: bad preprocess settings: {exc}") from None
    for key in recommended:
        setattr(cfg.preprocess, key, getattr(updated, key))


def build_preprocess(cfg: RunConfig, spec: Any) -> Any:
    """The Preprocess of a run: the backbone's defaults, with the run config's choices on top."""
    from dataclasses import replace

    from handlens.transforms.patches import PatchSpec

    p = cfg.preprocess
    preprocess = spec.preprocess(p.resize)
    patches = None
    if p.patches.enabled:
        patches = {**PatchSpec(**p.patches.model_dump(exclude={"enabled"})).to_dict(), "roi": p.roi.model_dump()}
    if p.roi.source != "none" and not p.patches.enabled:
        raise InputError("preprocess.roi selects where patches are cut: turn patch sampling on "
                         "(preprocess.patches.enabled=true), or leave roi out; `handlens trust --roi` measures "
                         "explanations on the specimen for any model")
    return replace(preprocess, size=p.size or preprocess.size, normalize=p.normalize,
                   clip_percentiles=tuple(p.clip_percentiles), morphology=list(p.morphology), patches=patches)


def _channel_stats(images: Any) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
    """Per-channel mean and std (0..1 units) of uint8 images: (N, 3, H, W) tensor or a list of (H, W, 3) arrays."""
    sums = np.zeros(3)
    squares = np.zeros(3)
    count = 0
    items = [images] if not isinstance(images, list) else images
    for item in items:
        array = item.numpy().transpose(0, 2, 3, 1).reshape(-1, 3) if hasattr(item, "numpy") else item.reshape(-1, 3)
        for start in range(0, len(array), 1 << 22):
            chunk = array[start:start + (1 << 22)].astype(np.float64)
            sums += chunk.sum(0)
            squares += (chunk ** 2).sum(0)
            count += len(chunk)
    mean = sums / max(count, 1)
    std = np.sqrt(np.maximum(squares / max(count, 1) - mean ** 2, 1e-12))
    as3 = lambda v: (float(v[0]) / 255, float(v[1]) / 255, float(v[2]) / 255)  # noqa: E731
    return as3(mean), as3(std)


def _whole_inputs(cfg: RunConfig, ws: Workspace, subsets: dict[str, Any], preprocess: Any) -> dict[str, Any]:
    from handlens.train.data import as_tensor_images
    from handlens.transforms.cache import decode_many

    images: dict[str, Any] = {name: as_tensor_images(decode_many(s.paths, preprocess, sha256s=s.sha256s,
                                                                 cache_dir=ws.cache_dir, workers=cfg.train.workers))
                              for name, s in subsets.items()}
    if cfg.preprocess.normalize == "dataset":
        images["_stats"] = _channel_stats(images["train"])
    return images


def _patch_inputs(cfg: RunConfig, ws: Workspace, catalog: Any, subsets: dict[str, Any], *,
                  preprocess: Any) -> dict[str, Any]:
    """Working images (cached) and their ROI masks per subset, for patch sampling."""
    from handlens.transforms.cache import decode_working_many

    p = cfg.preprocess
    out: dict[str, Any] = {}
    for name, subset in subsets.items():
        images = decode_working_many(subset.paths, p.patches.max_side, list(p.morphology), sha256s=subset.sha256s,
                                     cache_dir=ws.cache_dir, workers=cfg.train.workers)
        out[name] = (images, roi_masks(catalog, subset.ids, images, p.roi.model_dump()))
    if p.normalize == "dataset":
        out["_stats"] = _channel_stats(out["train"][0])
    return out


def roi_masks(catalog: Any, image_ids: list[int], images: list[np.ndarray],
              rule_data: dict[str, Any]) -> list[np.ndarray | None] | None:
    """ROI masks at each working image's resolution: from expert regions or a threshold rule (None: no ROI).

    With ``source: annotations``, images without an expert region have no mask (every patch counts).
    """
    from handlens.transforms.roi import RoiRule, resize_mask, threshold_roi

    rule = RoiRule.from_dict(rule_data)
    if rule.source == "none":
        return None
    if rule.source == "threshold":
        return [threshold_roi(image, rule) for image in images]
    from handlens.data.annotations import annotated_images_by_id, region_mask
    from handlens.data.catalog import Image

    masks: list[np.ndarray | None] = []
    with catalog.session() as session:
        annotations = annotated_images_by_id(session, image_ids)
        for image_id, image in zip(image_ids, images, strict=True):
            found = annotations.get(image_id)
            if not found:
                masks.append(None)
                continue
            row = session.get(Image, image_id)
            mask = region_mask(found, int(row.width), int(row.height))
            masks.append(resize_mask(mask, image.shape[0], image.shape[1]))
    if all(m is None for m in masks):
        raise InputError("preprocess.roi.source=annotations, but no image of this split has an expert region; "
                         "import them with `handlens annotate import` or use roi.source=threshold")
    return masks


def _image_datasets(cfg: RunConfig, preprocess: Any, subsets: dict[str, Any],
                    inputs: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Datasets over decoded images or patches, and what the final metrics evaluate."""
    import torch

    from handlens.train.balance import balanced_indices
    from handlens.train.patch_data import GridPatchDataset, RandomPatchDataset
    from handlens.transforms.patches import PatchSpec

    order = balanced_indices(subsets["train"].targets, cfg.data.balance, cfg.data.per_class, cfg.train.seed)
    datasets: dict[str, Any] = {}
    eval_inputs: dict[str, Any] = {}
    if cfg.preprocess.patches.enabled:
        spec = PatchSpec.from_dict(preprocess.patches)
        for name, subset in subsets.items():
            images, rois = inputs[name]
            if name == "train":
                datasets[name] = RandomPatchDataset(images, subset.targets, spec, preprocess.size, rois=rois,
                                                    order=order, seed=cfg.train.seed)
            else:
                grid = GridPatchDataset(images, subset.targets, spec, preprocess.size, rois=rois)
                datasets[name] = eval_inputs[name] = grid  # patches are cut as they are evaluated
        return datasets, eval_inputs
    for name, subset in subsets.items():
        full = torch.utils.data.TensorDataset(inputs[name], torch.from_numpy(subset.targets))
        if name == "train":
            datasets[name] = full if len(order) == len(subset) and cfg.data.balance == "none" else \
                torch.utils.data.Subset(full, order.tolist())
        else:
            datasets[name] = full
            eval_inputs[name] = (inputs[name], subset.targets)
    return datasets, eval_inputs


def _stored_features(cfg: RunConfig, ws: Workspace, spec: Any, *, preprocess: Any,
                     subsets: dict[str, Any]) -> dict[str, Any] | None:
    """Every subset's features read from the per-image store when it holds all of them (a run repeated with
    another head, a study's refit), else None: the caller decodes and computes."""
    from handlens.train.features import stored_rows

    by_views: dict[int, list[str]] = {}  # subsets of one store are read from it together, the file once
    for name in subsets:
        by_views.setdefault(cfg.train.views if name == "train" else 0, []).append(name)
    found: dict[str, Any] = {}
    for views, names in by_views.items():
        rows = stored_rows([sha for name in names for sha in subsets[name].sha256s], cache_dir=ws.cache_dir,
                           key_parts=feature_key_parts(cfg, spec, preprocess, views), views=views)
        if rows is None:
            return None
        found.update(zip(names, rows.split([len(subsets[name]) for name in names]), strict=True))
    return found


def _feature_datasets(cfg: RunConfig, ws: Workspace, spec: Any, model: Any, *, preprocess: Any,
                      subsets: dict[str, Any], images: dict[str, Any], augmenter: Any, generator: Any,
                      stored: dict[str, Any] | None = None) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """Backbone features per subset (frozen backbones) from the per-image feature store: datasets for a
    Lightning head, what the final metrics evaluate, and subset -> (features, targets) for ``fit_head``.
    ``stored``: the features already read from the store (:func:`_stored_features`; ``images`` is then empty)."""
    import torch

    from handlens.train.balance import balanced_indices
    from handlens.train.features import ViewDataset, feature_rows

    feats: dict[str, Any] = dict(stored or {})
    for name, subset in subsets.items():
        if name in feats:
            continue
        views = cfg.train.views if name == "train" else 0
        parts = feature_key_parts(cfg, spec, preprocess, views)
        feats[name] = feature_rows(model, images[name], subset.sha256s, key_parts=parts, cache_dir=ws.cache_dir,
                                   normalize=preprocess.normalize_batch, views=views,
                                   augment=augmenter if views else None, generator=generator)
    datasets: dict[str, Any] = {name: ViewDataset(feats[name], subsets[name].targets) for name in subsets}
    if cfg.data.balance in ("oversample", "downsample"):
        order = balanced_indices(subsets["train"].targets, cfg.data.balance, cfg.data.per_class, cfg.train.seed)
        datasets["train"] = torch.utils.data.Subset(datasets["train"], order.tolist())
    eval_inputs = {name: (feats[name] if feats[name].dim() == 2 else feats[name][:, 0], subsets[name].targets)
                   for name in subsets if name != "train"}
    return datasets, eval_inputs, {name: (feats[name], subsets[name].targets) for name in subsets}


def _class_weights(cfg: RunConfig, data: Any) -> list[float] | None:
    setting = cfg.train.class_weights
    if setting == "none" or (setting == "auto" and cfg.data.balance != "none"):
        return None  # balanced sampling already evens the classes out: weighting too would overcorrect
    if setting == "auto":
        return [float(data.class_weights.get(c, 1.0)) for c in data.classes]
    if len(setting) != len(data.classes):
        raise InputError(f"train.class_weights has {len(setting)} values for {len(data.classes)} classes "
                         f"({', '.join(data.classes)})")
    return [float(w) for w in setting]


def _weights_identity(source: str) -> str:
    """What identifies the backbone weights in a cache key: the name, or a local file's size and mtime."""
    if source in ("none", "imagenet", "packaged"):
        return source
    path = Path(source).expanduser()
    stat = path.stat() if path.exists() else None
    return f"{path.resolve()}:{stat.st_size if stat else 0}:{stat.st_mtime_ns if stat else 0}"


def _epoch_reporter(tracker: Any, total_epochs: int, run_dir: Path, history: list[dict[str, Any]], *,
                    say: bool = True) -> Any:
    """One line per epoch on stderr (unless ``say`` is false), metrics to the tracker, and the history so far for
    a resume."""

    def report(record: dict[str, Any]) -> None:
        scalars = {k: v for k, v in record.items() if isinstance(v, float) and not k.endswith("_seconds")}
        tracker.log_metrics(scalars, step=record["epoch"])
        shown = "  ".join(f"{k}={v:.4f}" for k, v in scalars.items()
                          if k in ("train_loss", "val_loss", "train_macro_f1", "val_macro_f1", "val_accuracy"))
        if say:
            print(f"epoch {record['epoch']}/{total_epochs}  {shown}", file=sys.stderr, flush=True)
        (run_dir / "history.partial.json").write_text(json.dumps(history, indent=1))  # progress, for people

    return report


def quiet_tracking() -> None:
    """Keep MLflow's and its database migrations' INFO lines off the terminal (no Lightning import)."""
    import logging

    for name in ("mlflow", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)


def quiet_lightning() -> None:
    """Keep Lightning's banners (accelerator info, tips) and a known deprecation notice off the terminal."""
    import logging
    import warnings

    import lightning.pytorch  # noqa: F401  (its import sets its loggers to INFO: set them after it)

    quiet_tracking()
    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=r".*`weights_only` was not set.*")
    warnings.filterwarnings("ignore", message=r".*defined a `validation_step` but have no `val_dataloader`.*")
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")
    warnings.filterwarnings("ignore", message=r".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode at the start of training.*")
    # a resume continues in the run's own checkpoint folder: of course it is not empty
    warnings.filterwarnings("ignore", message=r".*Checkpoint directory .* exists and is not empty.*")
    # DDP: the epoch metrics are computed from every process's predictions (ClassifierModule._epoch_metrics),
    # the same on all processes: there is nothing left to synchronise
    warnings.filterwarnings("ignore", message=r".*when logging on epoch level in distributed setting.*")


SUBSETS_FILE = "subsets.json"


def _reopen_run(ws: Workspace, run_id: str, subsets: dict[str, list[int]] | None) -> tuple[
        str, Path, RunConfig, Path | None, dict[str, list[int]] | None]:
    """A run to resume: its config, the checkpoint to continue from and its subsets; refused when finished."""
    run_dir = ws.runs_dir / run_id
    if not (run_dir / CONFIG_FILE).is_file():
        raise NotFoundError(f"no run {run_id!r} in {ws.runs_dir}; see the run ids printed by `handlens train`")
    cfg = load_config(run_dir / CONFIG_FILE)
    if run_finished(run_dir):
        reconcile_quietly(ws, [run_id])  # a final catalog write lost to a locked database: fix the row now
        raise ConflictError(f"run {run_id} already finished; its bundle is {run_dir / 'bundle'}. "
                            "Start a new run to train more")
    ckpt_path = resume_checkpoint(run_dir, run_id)
    if (run_dir / SUBSETS_FILE).is_file():
        subsets = json.loads((run_dir / SUBSETS_FILE).read_text())
    return run_id, run_dir, cfg, ckpt_path, subsets


def _new_run(ws: Workspace, cfg: RunConfig, subsets: dict[str, list[int]] | None, *,
             run_id: str | None = None) -> str:
    """A new run's folder with its config (and given subsets); its id."""
    run_id = run_id or new_run_id()
    run_dir = ws.runs_dir / run_id
    try:
        run_dir.mkdir(parents=True)
        (run_dir / CONFIG_FILE).write_text(cfg.to_yaml())
        if subsets is not None:
            (run_dir / SUBSETS_FILE).write_text(json.dumps({k: [int(i) for i in v] for k, v in subsets.items()}))
    except OSError as exc:
        shutil.rmtree(run_dir, ignore_errors=True)
        raise_if_disk_full(exc, what="a new run's config", where=ws.runs_dir, then="start the run again")
        raise
    return run_id


def train(cfg: RunConfig, workspace: Workspace | None = None, resume: str | None = None,
          progress: bool | None = None, *, subsets: dict[str, list[int]] | None = None,
          epoch_hook: Any = None, run_id: str | None = None, should_stop: Any = None) -> RunResult:
    """Train a classifier as ``cfg`` says (or resume run ``resume`` from its last checkpoint).

    ``epoch_hook(record)`` is called with each epoch's history record; an exception it raises stops the run
    (a study uses it to stop a fold that no longer fits its budget).

    ``run_id``: the id a new run takes (a job fixes it up front, so that a redelivered job resumes the same
    run); a run of that id that exists is resumed. ``should_stop()`` is asked after each epoch, once that
    epoch's checkpoint is written: a reason it returns stops the run as :class:`RunInterrupted`, resumable
    (a job's cancel).

    ``subsets``: regroup the split's labelled images into exactly these subsets by image id (``train``,
    optional ``val`` and ``test``), e.g. a cross-validation fold or a refit on every non-test image; the
    bundle's ``split_membership`` records them and a resume reuses them.

    A frozen backbone on cached features (the default recipe) trains its head with
    :func:`handlens.train.head.fit_head`: no Lightning, no checkpoints, seconds once the features are
    cached. Resuming such a run that did not finish simply trains its head again.

    ``train.devices`` x ``train.nodes`` > 1 trains with DDP (:func:`detect_world`). Rank 0 is this call as
    described: it starts this machine's other processes itself (unless torchrun or srun started them), hands
    them its run id, resolved config, subsets and checkpoint, and it alone writes the run's files, catalog rows
    and tracker run. On another rank this call trains along, writes nothing and returns a result whose
    ``rank`` is set.
    """
    ws = workspace or Workspace.open()
    if resume is None and run_id is not None and (ws.runs_dir / run_id / CONFIG_FILE).is_file():
        resume = run_id
    world = detect_world(_run_settings(cfg, ws, resume))
    if world is None:
        return _train(cfg, ws, resume, progress, subsets=subsets, epoch_hook=epoch_hook, run_id=run_id,
                      should_stop=should_stop)
    with world.running():
        if world.rank:
            return _train_worker(world, ws)
        return _train(cfg, ws, resume, progress, subsets=subsets, epoch_hook=epoch_hook, run_id=run_id,
                      should_stop=should_stop, world=world)


def _run_settings(cfg: RunConfig | None, ws: Workspace, resume: str | None) -> Any:
    """The train section that says how many processes a run takes: a resumed run's saved one, else ``cfg``'s."""
    from handlens.train.config import TrainConfig

    saved = ws.runs_dir / resume / CONFIG_FILE if resume else None
    if saved is not None and saved.is_file():
        with contextlib.suppress(InputError):  # unreadable: reopening the run says so
            return load_config(saved).train
    return cfg.train if cfg is not None else TrainConfig()


def _train(cfg: RunConfig, ws: Workspace, resume: str | None, progress: bool | None, *,
           subsets: dict[str, list[int]] | None, epoch_hook: Any, run_id: str | None, should_stop: Any,
           world: World | None = None) -> RunResult:
    """:func:`train` in the process that writes the run (the only one, or a DDP run's rank 0)."""
    started = time.perf_counter()
    quiet_tracking()
    if resume:
        run_id, run_dir, cfg, ckpt_path, subsets = _reopen_run(ws, resume, subsets)
    else:
        run_id, ckpt_path = _new_run(ws, cfg, subsets, run_id=run_id), None
        run_dir = ws.runs_dir / run_id

    catalog = open_catalog_for(ws)
    try:
        _reconcile_on(catalog, ws.runs_dir)
        prepared = prepare(cfg, ws, catalog, subsets=subsets, for_lightning=False)
        data = prepared.data
        if not resume:  # pin what "default"/"auto" resolved to, so a resume or repeat uses the same split and size
            cfg.data.split, cfg.data.labelset = data.split, data.labelset
            cfg.preprocess.size = prepared.preprocess.size
            (run_dir / CONFIG_FILE).write_text(cfg.to_yaml())
        _record_run_start(catalog, cfg, run_id, data)
        if progress is not False:  # said now (a study's folds stay quiet): after a kill, the user knows the id
            print(f"run {run_id} {'resumed' if resume else 'started'}: if it stops, `handlens train --resume "
                  f"{run_id}` continues it", file=sys.stderr, flush=True)
    except BaseException as exc:
        catalog.close()
        if not resume:  # nothing was trained: leave no empty run behind
            shutil.rmtree(run_dir, ignore_errors=True)
        raise_if_disk_full(exc, what="the image and feature caches or the run's files", where=ws.root,
                           then=f"continue with `handlens train --resume {run_id}`" if resume else "train again")
        raise

    from handlens.models.bundle import save_bundle
    from handlens.track import create_tracker, flatten

    tracker = create_tracker(cfg.tracking.backend, ws.runs_dir, cfg.tracking.experiment)
    tracker.start(run_id, {**flatten(cfg.model_dump(mode="json")), "data.split_resolved": data.split,
                           "data.classes": ",".join(data.classes)},
                  started_at=time.time() - (time.perf_counter() - started))  # its duration counts the features
    status = "failed"
    try:
        fit_started = time.perf_counter()
        if prepared.module is None:
            best_epoch, history, epochs, head_fit = _fit_on_features(
                prepared, tracker, run_dir, _stopping_hook(epoch_hook, should_stop, run_id),
                say_epochs=progress is not False)  # a study's refit of a head: seconds, not 25 lines
        else:
            if world is not None:  # the other processes start now that the run's config is resolved
                world.start(ws, {"run_id": run_id, "config": cfg.to_yaml(), "subsets": subsets,
                                 "checkpoint": str(ckpt_path) if ckpt_path else None, "resumed": bool(resume)})
            best_epoch, history, epochs = _fit_lightning(prepared, tracker, run_dir, run_id=run_id, ckpt_path=ckpt_path,
                                                         progress=progress, epoch_hook=epoch_hook,
                                                         should_stop=should_stop, world=world)
            head_fit = None
        prepared.timings["fit"] = time.perf_counter() - fit_started
        (run_dir / "history.json").write_text(json.dumps(history, indent=1))
        (run_dir / "history.partial.json").unlink(missing_ok=True)
        metrics = _final_metrics(prepared, run_dir)
        metrics["best_epoch"] = best_epoch
        if head_fit is not None:
            metrics["head_fit"] = head_fit
        (run_dir / "metrics.json").write_text(json.dumps(_jsonable(metrics), indent=1))
        # the bundle's rename is the moment the run finishes: nothing after it can make the run fail
        manifest = {**_manifest(cfg, prepared, metrics, run_id),
                    # where this run's curves are: evaluate adds its test metrics to the same tracker run
                    "tracking": {"backend": cfg.tracking.backend, "run_id": getattr(tracker, "run_id", None)}}
        bundle = save_bundle(run_dir / "bundle", prepared.model, manifest)
        status = "finished"
        timings = {f"seconds_{k}": v for k, v in prepared.timings.items()}  # decode and features included
        _best_effort(lambda: tracker.log_metrics({**timings, "seconds_total": time.perf_counter() - started},
                                                 step=epochs), f"run {run_id} finished, but logging its timings")
        _best_effort(lambda: _log_outputs(tracker, run_dir, bundle), f"run {run_id} finished, but logging its "
                     f"bundle and confusion matrices to the {cfg.tracking.backend} tracker")
        _best_effort(lambda: _drop_previous_checkpoint(run_dir), f"run {run_id} finished, but removing its "
                     "previous checkpoint")
    except (KeyboardInterrupt, RunInterrupted):
        if status != "finished":
            status = "interrupted"
        raise
    except Exception as exc:
        raise_if_disk_full(exc, what=f"run {run_id}'s checkpoints, metrics and bundle", where=run_dir,
                           then=f"continue it with `handlens train --resume {run_id}`")
        raise
    finally:
        _best_effort(lambda: tracker.finish(status), f"closing run {run_id} in the {cfg.tracking.backend} tracker")
        _record_run_end(catalog, cfg, run_id, status=status, tracker=tracker,
                        bundle=bundle if status == "finished" else None,
                        metrics=metrics if status == "finished" else None)
        catalog.close()
    from handlens.train.sanity import history_verdict

    return RunResult(run_id=run_id, run_dir=run_dir, bundle=bundle, epochs=epochs,
                     best_epoch=best_epoch, metrics=metrics, history=history,
                     seconds=time.perf_counter() - started, timings=prepared.timings, tracking_uri=tracker.uri,
                     resumed=bool(resume), verdict=history_verdict(history) if cfg.train.overfit_batches else "")


def _stopping_hook(epoch_hook: Any, should_stop: Any, run_id: str) -> Any:
    """``epoch_hook`` followed by the stop request check (a head on cached features has no checkpoint to keep)."""
    if should_stop is None:
        return epoch_hook

    def hook(record: dict[str, Any]) -> None:
        if epoch_hook is not None:
            epoch_hook(record)
        reason = should_stop()
        if reason:
            raise RunInterrupted(f"run {run_id} stopped after epoch {record.get('epoch')}: {reason}")

    return hook


def _drop_previous_checkpoint(run_dir: Path) -> None:
    """A finished run is never resumed: the fallback checkpoint kept for a resume only takes disk space."""
    from handlens.train.checkpoint_files import previous_checkpoint

    previous_checkpoint(run_dir / "checkpoints" / LAST_CHECKPOINT).unlink(missing_ok=True)


def _log_outputs(tracker: Any, run_dir: Path, bundle: Path) -> None:
    for png in sorted(run_dir.glob("confusion_*.png")):
        tracker.log_artifact(png)
    tracker.log_artifact(bundle)


def _best_effort(step: Any, what: str) -> None:
    """Run ``step``; if it fails, say so on stderr and go on (bookkeeping after a run's outcome is decided must
    neither change that outcome nor hide the error that decided it)."""
    try:
        step()
    except Exception as exc:
        print(f"warning: {what} failed: {_reason(exc)}", file=sys.stderr, flush=True)


def _reason(exc: BaseException) -> str:
    text = str(getattr(exc, "orig", None) or exc).strip()
    return (text.splitlines() or [type(exc).__name__])[0][:300]


# ------------------------------------------------------------------------------------ resume checkpoints

LAST_CHECKPOINT = "last.ckpt"


def checkpoint_problem(path: Path) -> str | None:
    """Why the checkpoint ``path`` cannot be resumed from (empty, truncated, corrupt), or None when it reads
    whole. Checks the zip archive ``torch.save`` writes and every member's CRC: nothing is unpickled."""
    import zipfile

    try:
        if path.stat().st_size == 0:
            return "it is empty (0 bytes)"
        with zipfile.ZipFile(path) as archive:
            broken = archive.testzip()
    except (OSError, zipfile.BadZipFile, EOFError, ValueError) as exc:
        return f"it is truncated or not a checkpoint ({_reason(exc)})"
    return f"its member {broken} is corrupt" if broken else None


def resume_checkpoint(run_dir: Path, run_id: str) -> Path | None:
    """The checkpoint a resume continues from: ``last.ckpt``, or, when it cannot be read (a full disk under an
    older handlens truncated it), the one before it (``last.prev.ckpt``) with a warning; the unreadable one
    is removed so the next save keeps the good one as previous. None: no checkpoint (the run trains anew)."""
    from handlens.train.checkpoint_files import previous_checkpoint

    folder = run_dir / "checkpoints"
    for leftover in folder.glob(".*.tmp"):  # a write killed before its rename
        leftover.unlink(missing_ok=True)
    last = folder / LAST_CHECKPOINT
    candidates = [path for path in (last, previous_checkpoint(last)) if path.is_file()]
    problems: list[str] = []
    for path in candidates:
        problem = checkpoint_problem(path)
        if problem is None:
            if problems:
                for broken in candidates[:len(problems)]:
                    broken.unlink(missing_ok=True)
                print(f"warning: run {run_id}: {'; '.join(problems)}; resuming from {path.name}, the checkpoint "
                      "before it (the epoch after it is trained again); the unreadable one was removed",
                      file=sys.stderr, flush=True)
            return path
        problems.append(f"checkpoints/{path.name} cannot be read: {problem}")
    if problems:
        raise InputError(f"run {run_id} cannot be resumed: {'; '.join(problems)}. Delete {folder} to train the "
                         f"run again from its first epoch, or start a new run")
    return None


# ------------------------------------------------------------------------------------ the catalog's run rows

#: seconds to wait between tries of a catalog write that found the database locked (about 4 s in all, on top
#: of SQLite's own busy timeout per try)
CATALOG_RETRY_DELAYS = (0.1, 0.3, 1.0, 2.5)


def run_finished(run_dir: Path) -> bool:
    """A run's files say it finished: its bundle and its history are written (whatever the catalog says)."""
    return (run_dir / "bundle" / "bundle.json").is_file() and (run_dir / "history.json").is_file()


def with_retries(write: Any, delays: tuple[float, ...] | None = None) -> Any:
    """``write()``, tried again after each of ``delays`` (:data:`CATALOG_RETRY_DELAYS`) while the database
    answers an OperationalError (SQLite's "database is locked" while another process writes); the last
    failure propagates."""
    from sqlalchemy.exc import OperationalError

    for delay in CATALOG_RETRY_DELAYS if delays is None else delays:
        try:
            return write()
        except OperationalError:
            time.sleep(delay)
    return write()


def open_catalog_for(ws: Workspace) -> Any:
    from handlens.data.catalog import open_catalog

    return open_catalog(ws.db_url)


def reconcile_runs(catalog: Any, runs_dir: Path, run_ids: list[str] | None = None) -> list[str]:
    """Mark finished every run the catalog does not say finished although its files do (:func:`run_finished`):
    its final catalog write was lost (a locked database, a kill just after the bundle). Its bundle path,
    metrics (``metrics.json``) and end time come from the run directory. Returns the run ids fixed."""
    from handlens.data.catalog import Run

    fixed: list[str] = []
    with catalog.session() as session:
        query = session.query(Run).filter(Run.status != "finished")
        if run_ids is not None:
            query = query.filter(Run.id.in_(run_ids))
        for row in query:
            run_dir = runs_dir / row.id
            if not run_finished(run_dir):
                continue
            metrics_file = run_dir / "metrics.json"
            try:
                metrics = json.loads(metrics_file.read_text()) if metrics_file.is_file() else row.metrics
            except (OSError, ValueError):
                metrics = row.metrics
            row.status, row.bundle_path, row.metrics = "finished", str(run_dir / "bundle"), metrics
            row.finished_at = datetime.fromtimestamp((run_dir / "bundle").stat().st_mtime, UTC)
            fixed.append(row.id)
    return fixed


def _reconcile_on(catalog: Any, runs_dir: Path) -> None:
    from sqlalchemy.exc import SQLAlchemyError

    with contextlib.suppress(SQLAlchemyError):  # locked now: the next command reconciles
        reconcile_runs(catalog, runs_dir)


def reconcile_quietly(ws: Workspace, run_ids: list[str] | None = None) -> list[str]:
    """:func:`reconcile_runs` on the workspace's catalog, skipped (with nothing said) while it is unreachable or
    locked: it is bookkeeping that the next command can do."""
    from sqlalchemy.exc import SQLAlchemyError

    try:
        catalog = open_catalog_for(ws)
    except (HandlensError, SQLAlchemyError):
        return []
    try:
        return reconcile_runs(catalog, ws.runs_dir, run_ids)
    except SQLAlchemyError:
        return []
    finally:
        catalog.close()


def _record_run_start(catalog: Any, cfg: RunConfig, run_id: str, data: Any) -> None:
    from sqlalchemy.exc import OperationalError

    try:
        with_retries(lambda: _write_run_start(catalog, cfg, run_id, data))
    except OperationalError as exc:
        raise BusyError(f"the catalog cannot record run {run_id}: {_reason(exc)}. Another handlens process is "
                        "probably writing to it; try again when it is done") from None


def _write_run_start(catalog: Any, cfg: RunConfig, run_id: str, data: Any) -> None:
    from handlens.data.catalog import Dataset, Run

    with catalog.session() as session:
        dataset_id = session.query(Dataset.id).filter(Dataset.name == data.dataset).scalar()
        record = session.get(Run, run_id) or Run(id=run_id, config=cfg.model_dump(mode="json"), status="running")
        record.dataset_id, record.split_name, record.status = dataset_id, data.split, "running"
        session.merge(record)


def _record_run_end(catalog: Any, cfg: RunConfig, run_id: str, *, status: str, tracker: Any, bundle: Path | None,
                    metrics: dict[str, Any] | None) -> None:
    """The run's final catalog row, retried while the database is locked. It never raises: a finished run stays
    finished (its files say so and the next ``handlens train`` reconciles the row, see :func:`reconcile_runs`),
    and a failed run's own error is what the user must see."""
    from sqlalchemy.exc import SQLAlchemyError

    try:
        with_retries(lambda: _write_run_end(catalog, cfg, run_id, status=status, tracker=tracker, bundle=bundle,
                                            metrics=metrics))
    except SQLAlchemyError as exc:
        if status == "finished":
            print(f"warning: run {run_id} finished (its bundle is {bundle}), but the catalog could not record it: "
                  f"{_reason(exc)}. The catalog lists it as running until the next `handlens train` (or "
                  f"`handlens train --resume {run_id}`) records it from the run's files", file=sys.stderr,
                  flush=True)
        else:
            print(f"warning: the catalog could not record run {run_id} as {status}: {_reason(exc)}",
                  file=sys.stderr, flush=True)


def _write_run_end(catalog: Any, cfg: RunConfig, run_id: str, *, status: str, tracker: Any, bundle: Path | None,
                   metrics: dict[str, Any] | None) -> None:
    from handlens.data.catalog import Run

    with catalog.session() as session:
        row = session.get(Run, run_id)
        row.status = status
        row.finished_at = datetime.now(UTC)
        row.tracking = {"backend": cfg.tracking.backend, "uri": tracker.uri,
                        "run_id": getattr(tracker, "run_id", None)}
        if bundle is not None:
            row.bundle_path, row.metrics = str(bundle), _jsonable(metrics)


def _train_groups(catalog: Any, data: Any) -> list[str | None] | None:
    from handlens.data.queries import find_dataset
    from handlens.data.splits import split_groups

    with catalog.session() as session:
        return split_groups(session, find_dataset(session, data.dataset).id, data.split, data.subsets["train"].ids)


def _fit_on_features(prepared: Prepared, tracker: Any, run_dir: Path, epoch_hook: Any = None, *,
                     say_epochs: bool = True) -> tuple[int, list[dict[str, Any]], int, dict[str, Any]]:
    """Train the head on the cached features with fit_head; the fitted head becomes the model's head."""
    from handlens.train.head import fit_head

    cfg = prepared.cfg
    features = prepared.features or {}
    train_x, train_y = features["train"]
    val_x, val_y = features.get("val", (None, None))
    history: list[dict[str, Any]] = []
    logistic = cfg.model.head == "logistic"
    reporter = _epoch_reporter(tracker, 1 if logistic else cfg.train.epochs, run_dir, history, say=say_epochs)

    def on_epoch(record: dict[str, Any]) -> None:
        history.append(record)
        reporter(record)
        if epoch_hook is not None:
            epoch_hook(record)

    fit = fit_head(train_x, train_y, n_classes=len(prepared.data.classes), model_cfg=cfg.model, train_cfg=cfg.train,
                   class_weights=prepared.class_weights, val_x=val_x, val_y=val_y, data_cfg=cfg.data,
                   classes=prepared.data.classes, on_epoch=on_epoch, groups=prepared.train_groups)
    if logistic:
        cv = fit.info["cv"]
        how = (f"chosen by {cv['folds']}-fold cross-validation on the training features" if cv.get("folds")
               else cv.get("note", ""))
        ignored = sorted(cfg.train.model_fields_set & {"epochs", "lr", "optimizer", "schedule", "batch_size",
                                                       "early_stopping", "warmup_epochs", "weight_decay"})
        note = (f"; train.{', train.'.join(ignored)} apply to gradient-trained heads (model.head=linear)"
                if ignored else "")
        print(f"head: logistic regression (L-BFGS), C={fit.info['C']:g} {how}{note}", file=sys.stderr, flush=True)
    prepared.model.head = fit.head
    return fit.best_epoch, fit.history, len(fit.history), fit.info


def _fit_lightning(prepared: Prepared, tracker: Any, run_dir: Path, *, run_id: str, ckpt_path: Path | None,
                   progress: bool | None, epoch_hook: Any = None, should_stop: Any = None,
                   world: World | None = None) -> tuple[int | None, list[dict[str, Any]], int]:
    """Lightning's loop (a backbone that learns, patches, mixing, overfit_batches): checkpoints to resume from,
    the best one kept by the monitored metric with ties to the lower loss.

    ``world``: a DDP run's process (started, see :meth:`World.start`); every process builds the same callbacks
    (checkpoints, early stopping and the stop request decide together), only rank 0 reports, tracks and shows
    progress, and Lightning writes checkpoints from rank 0 alone."""
    import lightning.pytorch as pl
    import rich
    import torch
    from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint, RichProgressBar

    from handlens.train.module import AtomicCheckpointIO, EpochRecorder, StopRequest, TieBreakCheckpoint

    quiet_lightning()
    primary = world is None or world.rank == 0
    if world is not None and world.rank == 0:
        print(f"training on {world.size} processes ({world.devices} per machine x {world.nodes}, DDP over "
              f"{world.backend}); batch size {prepared.cfg.train.batch_size} per process", file=sys.stderr, flush=True)
    cfg, module = prepared.cfg, prepared.module
    has_val = prepared.val_loader is not None
    monitor = cfg.train.monitor if has_val else cfg.train.monitor.replace("val_", "train_", 1)
    checkpoint = TieBreakCheckpoint(dirpath=run_dir / "checkpoints", filename="best", monitor=monitor,
                                    mode=cfg.train.monitor_mode, save_top_k=1, enable_version_counter=False,
                                    tie_metric="val_loss" if has_val else "train_loss")
    # Its own callback: with a monitor, Lightning refreshes save_last only when the metric improves,
    # and a resume would then repeat every epoch after the best one.
    last = ModelCheckpoint(dirpath=run_dir / "checkpoints", filename="last", monitor=None, save_top_k=1,
                           enable_version_counter=False)
    stop = StopRequest(should_stop)
    callbacks: list[Any] = [EpochRecorder(), checkpoint, last, stop]
    if primary:
        module.epoch_listeners.append(_epoch_reporter(tracker, cfg.train.epochs, run_dir, module.history))
    if epoch_hook is not None and primary:
        module.epoch_listeners.append(epoch_hook)
    if cfg.train.early_stopping:
        callbacks.append(EarlyStopping(monitor=monitor, mode=cfg.train.monitor_mode,
                                       patience=cfg.train.early_stopping))
    show_bar = primary and cfg.train.progress and (progress if progress is not None else sys.stderr.isatty())
    if show_bar:
        rich.reconfigure(stderr=True)  # Lightning prints through rich's console: keep stdout for results
        callbacks.append(RichProgressBar(console_kwargs={"stderr": True}))
    if primary and (cfg.tracking.probes or cfg.tracking.histograms):  # Grad-CAM probes, map drift, histograms
        from handlens.train.probes import probe_callback

        probe = probe_callback(cfg.tracking, tracker, prepared.val_loader, classes=prepared.data.classes)
        if probe is not None:
            callbacks.append(probe)
    trainer = pl.Trainer(
        max_epochs=cfg.train.epochs, logger=False, callbacks=callbacks,
        plugins=[AtomicCheckpointIO()],  # a full disk or a kill never leaves a truncated checkpoint
        enable_progress_bar=show_bar, enable_model_summary=False, default_root_dir=str(run_dir),
        num_sanity_val_steps=0, overfit_batches=cfg.train.overfit_batches or 0.0, log_every_n_steps=10,
        **(world.trainer_args() if world is not None else {"accelerator": "auto", "devices": 1}),
    )
    threads = torch.get_num_threads()
    if world is not None and world.backend == "gloo":  # the machine's cores, shared by its processes
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world.devices))
    try:
        trainer.fit(module, prepared.train_loader, prepared.val_loader if has_val else None,
                    ckpt_path=str(ckpt_path) if ckpt_path else None)
    except SystemExit:  # Lightning turns Ctrl-C into sys.exit(1) after a graceful shutdown
        raise RunInterrupted(f"run {run_id} was interrupted; continue it with "
                             f"`handlens train --resume {run_id}`") from None
    except RuntimeError as exc:  # a collective that lost a process: say which one, its own error is above
        if world is not None:
            world.raise_if_a_process_failed(run_id, exc)
        raise
    finally:
        torch.set_num_threads(threads)
    if stop.reason:  # this epoch's checkpoints are written: the run stays resumable
        raise RunInterrupted(f"run {run_id} stopped after epoch {trainer.current_epoch}: {stop.reason}; its "
                             f"checkpoint is kept (`handlens train --resume {run_id}` continues it)")
    if not primary:  # rank 0 picks the best epoch (its checkpoint may be on rank 0's machine only)
        return None, module.history, trainer.current_epoch
    if not has_val:  # nothing held out to choose an epoch on (a refit on all non-test images): keep the last
        return (module.history[-1]["epoch"] if module.history else None), module.history, trainer.current_epoch
    return _load_best(module, checkpoint), module.history, trainer.current_epoch


def _load_best(module: Any, checkpoint: Any) -> int | None:
    """Put the best checkpoint's weights back into the module (weights only, nothing unpickled)."""
    import torch

    path = checkpoint.best_model_path
    if not path or not Path(path).is_file():
        return module.history[-1]["epoch"] if module.history else None
    state = torch.load(path, map_location="cpu", weights_only=True)
    module.load_state_dict(state["state_dict"])
    return int(state.get("epoch", 0)) + 1


def _final_metrics(prepared: Prepared, run_dir: Path) -> dict[str, Any]:
    """Metrics of the best model on each held-out subset, plus confusion PNGs."""
    import torch

    from handlens.train.metrics import classification_metrics, confusion_png
    from handlens.train.patch_data import GridPatchDataset
    from handlens.transforms.patches import mean_by_image

    module = prepared.module if prepared.module is not None else prepared.model.head  # fit_head: features -> logits
    module.eval()
    out: dict[str, Any] = {}
    with torch.inference_mode():
        for name, inputs in prepared.eval_inputs.items():
            if isinstance(inputs, GridPatchDataset):  # each image's prediction: the mean over its grid patches
                parts, owners = [], []
                for patches, _, image_index in torch.utils.data.DataLoader(inputs, batch_size=64):
                    parts.append(torch.softmax(module(patches).float(), 1))
                    owners.append(image_index)
                targets = inputs.targets.numpy()
                probs = mean_by_image(torch.cat(parts), torch.cat(owners), inputs.n_images)
            else:
                inputs, targets = inputs
                probs = torch.cat([torch.softmax(module(inputs[i:i + 64]).float(), 1)
                                   for i in range(0, len(inputs), 64)])
            metrics = classification_metrics(probs, torch.from_numpy(targets), prepared.data.classes)
            out[name] = metrics
            confusion_png(metrics["confusion"], prepared.data.classes, run_dir / f"confusion_{name}.png",
                          f"{name}: accuracy {metrics['accuracy']:.3f}, macro-F1 {metrics['macro_f1']:.3f}")
    return out


def _manifest(cfg: RunConfig, prepared: Prepared, metrics: dict[str, Any], run_id: str) -> dict[str, Any]:
    data = prepared.data
    return {
        "run_id": run_id,
        "backbone": cfg.model.backbone,
        "weights": cfg.model.weights,
        "freeze": cfg.model.freeze,
        "head": {"type": cfg.model.head, "hidden": cfg.model.hidden, "dropout": cfg.model.dropout,
                 "pool": cfg.model.pool},
        "classes": data.classes,
        "dataset": data.dataset,
        "labelset": data.labelset,
        "split": data.split,
        "fold": data.fold,
        "preprocess": prepared.preprocess.to_dict(),
        "config": cfg.model_dump(mode="json"),
        "augment_policy": _policy_as_trained(cfg),
        "metrics": _jsonable(metrics),
        "split_membership": data.membership(),
        # what the model learnt from, by content: evaluate's leak check when the catalog does not know the ids
        "training_sha256": sorted({sha for name in ("train", "val") if name in data.subsets
                                   for sha in data.subsets[name].sha256s}),
    }


def _policy_as_trained(cfg: RunConfig) -> dict[str, Any] | None:
    """The training policy's steps as they were (label maps included): the file a config names may change or
    move later, and test-time augmentation and ``trust --consistency`` read the policy from the bundle."""
    from handlens.transforms.augment import policy_for

    policy = policy_for(cfg.augment)
    return policy.to_dict() if policy is not None else None


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=lambda v: v.item() if isinstance(v, np.generic) else str(v)))


def lr_find(cfg: RunConfig, workspace: Workspace | None = None, *, min_lr: float = 1e-6, max_lr: float = 1.0,
            steps: int = 100) -> dict[str, Any]:
    """Leslie Smith's LR range test (Smith, "Cyclical Learning Rates for Training Neural Networks", WACV 2017)
    through Lightning's tuner; returns the suggestion and the loss curve."""
    import lightning.pytorch as pl
    from lightning.pytorch.tuner import Tuner

    from handlens.data.catalog import open_catalog

    if cfg.model.head == "logistic":
        raise InputError("the learning-rate finder is for gradient-trained heads; model.head=logistic fits by "
                         "L-BFGS with no learning rate: use model.head=linear (or mlp) to find one")
    if cfg.model.head == "auto":  # a range test trains by gradient: the head auto would give on images
        cfg.model.head = "linear"
    if cfg.train.devices * cfg.train.nodes > 1:
        print(f"warning: the learning-rate finder runs in one process: train.devices={cfg.train.devices} and "
              f"train.nodes={cfg.train.nodes} apply to `handlens train`", file=sys.stderr, flush=True)
    ws = workspace or Workspace.open()
    catalog = open_catalog(ws.db_url)
    try:
        prepared = prepare(cfg, ws, catalog)
    finally:
        catalog.close()
    # epochs enough for ``steps`` batches however small the dataset; no validation during the range test
    trainer = pl.Trainer(max_epochs=steps, limit_val_batches=0, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False, default_root_dir=str(ws.cache_dir),
                         accelerator="auto", devices=1)
    finder = Tuner(trainer).lr_find(prepared.module, train_dataloaders=prepared.train_loader, min_lr=min_lr,
                                    max_lr=max_lr, num_training=steps, update_attr=False)
    if finder is None:
        raise HandlensError("the learning-rate finder did not run")
    suggestion = finder.suggestion()
    return {"suggestion": suggestion, "lr": [float(x) for x in finder.results["lr"]],
            "loss": [float(x) for x in finder.results["loss"]],
            "note": None if suggestion else "no clear minimum: the loss diverged early; try a smaller max_lr"}


# ------------------------------------------------------------------------------------ DDP: several processes

#: the JSON a DDP run's rank 0 gives the processes it starts beside itself: workspace, catalog, devices, nodes
WORKER_ENV = "HANDLENS_DDP_WORKER"
WORKER_COMMAND = "from handlens.train.run import ddp_worker; ddp_worker()"
#: how long a process waits for the others in one step (under torchrun or srun the first is the longest: the
#: other ranks wait for rank 0 to resolve its config and decode its images before it joins)
DDP_TIMEOUT_S = 3600


@dataclass(kw_only=True)
class World:
    """This process's place in a DDP run of ``devices`` processes on each of ``nodes`` machines, and what it
    started and changed to take it (undone by :meth:`close`).

    ``launches``: this process is its machine's local rank 0, started without ``LOCAL_RANK``; it starts the
    machine's other ``devices - 1`` processes itself (:func:`ddp_worker`, not a re-run of ``sys.argv``: a
    library call from a test, a notebook or a job worker would run something else), setting Lightning's
    variables (``MASTER_ADDR``, ``MASTER_PORT``, ``NODE_RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``) for them and, while
    it trains, for itself."""

    devices: int
    nodes: int
    rank: int
    local_rank: int
    environment: Any  # the Lightning ClusterEnvironment the processes were started under
    backend: str  # gloo (CPU processes) or nccl (one GPU per process)
    launches: bool
    own_store: bool = False  # Lightning's variables: handlens's processes meet in a store of their own
    children: list[Any] = field(default_factory=list)
    saved_env: dict[str, str | None] = field(default_factory=dict)
    owns_group: bool = False

    @property
    def size(self) -> int:
        return self.devices * self.nodes

    def trainer_args(self) -> dict[str, Any]:
        """``pl.Trainer`` arguments: DDP over this world, in the process group :meth:`start` made."""
        from datetime import timedelta

        from lightning.pytorch.strategies import DDPStrategy

        return {"accelerator": "cuda" if self.backend == "nccl" else "cpu", "devices": self.devices,
                "num_nodes": self.nodes,
                "strategy": DDPStrategy(cluster_environment=self.environment, process_group_backend=self.backend,
                                        timeout=timedelta(seconds=DDP_TIMEOUT_S))}

    def _set_env(self, values: dict[str, str]) -> None:
        for key, value in values.items():
            self.saved_env.setdefault(key, os.environ.get(key))
            os.environ[key] = value

    def start(self, ws: Workspace, shared: dict[str, Any] | None = None) -> dict[str, Any]:
        """Start this machine's other processes (when it :attr:`launches`), join the process group and share
        rank 0's ``shared`` (run id, resolved config, subsets, checkpoint): what every rank returns."""
        import torch.distributed as dist

        if self.launches and not self.children:
            self._launch(ws)
        if not dist.is_initialized():  # else the caller's own group (a script under torchrun): Lightning's too
            self._connect()
        box = [shared if self.rank == 0 else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def _launch(self, ws: Workspace) -> None:
        self._set_env({"MASTER_ADDR": os.environ.get("MASTER_ADDR", "127.0.0.1"),
                       "MASTER_PORT": os.environ.get("MASTER_PORT") or str(_free_port()),
                       "NODE_RANK": str(self.environment.node_rank()), "WORLD_SIZE": str(self.size),
                       "LOCAL_RANK": "0"})  # set: Lightning starts no processes of its own
        spec = json.dumps({"workspace": str(ws.root), "db_url": ws.db_url, "devices": self.devices,
                           "nodes": self.nodes, "backend": self.backend})
        for local_rank in range(1, self.devices):
            env = {**os.environ, "LOCAL_RANK": str(local_rank), WORKER_ENV: spec}
            self.children.append(subprocess.Popen([sys.executable, "-c", WORKER_COMMAND], env=env,
                                                  stdin=subprocess.DEVNULL))

    def _connect(self) -> None:
        """Join the process group. Under Lightning's variables (every process is handlens's) through a store of
        its own, where each process says it has joined: a process this one started that fails before joining
        (a bad environment, a missing package) is then an error here at once, not a wait of
        :data:`DDP_TIMEOUT_S`. torchrun's and srun's processes rendezvous the usual way (``env://``)."""
        from datetime import timedelta

        import torch
        import torch.distributed as dist

        timeout = timedelta(seconds=DDP_TIMEOUT_S)
        address, port = self.environment.main_address, self.environment.main_port
        self.saved_env.setdefault("WORLD_SIZE", os.environ.get("WORLD_SIZE"))  # Lightning's teardown removes it
        self._set_env({"MASTER_ADDR": address, "MASTER_PORT": str(port)})
        if self.backend == "nccl":
            torch.cuda.set_device(self.local_rank)
        if not self.own_store:
            dist.init_process_group(self.backend, rank=self.rank, world_size=self.size, timeout=timeout)
            self.owns_group = True
            return
        store = dist.TCPStore(address, port, self.size, is_master=self.rank == 0, timeout=timeout,
                              wait_for_workers=False)
        store.set(f"joined/{self.rank}", "1")
        mine = [f"joined/{self.rank + local_rank}" for local_rank in range(1, len(self.children) + 1)]
        deadline = time.monotonic() + DDP_TIMEOUT_S
        while mine and not store.check(mine):
            failed = self._failed_child()
            if failed is not None:
                raise HandlensError(f"training process {failed[0]} (LOCAL_RANK={failed[0]}) {failed[1]} before "
                                    "joining the run")
            if time.monotonic() > deadline:
                raise HandlensError(f"the training processes this one started did not join in {DDP_TIMEOUT_S} s")
            time.sleep(0.1)
        dist.init_process_group(self.backend, store=store, rank=self.rank, world_size=self.size, timeout=timeout)
        self.owns_group = True

    def _failed_child(self) -> tuple[int, str] | None:
        """(local rank, what happened) of a process this one started that has exited with an error."""
        for local_rank, child in enumerate(self.children, start=1):
            if child.poll():
                return local_rank, (f"was killed by signal {-child.returncode}" if child.returncode < 0 else
                                    f"failed with exit code {child.returncode} (its error is printed above)")
        return None

    def raise_if_a_process_failed(self, run_id: str, exc: BaseException) -> None:
        """After an error in training: a process this one started that exited with an error is named (a lost
        process ends its connections as it exits, so it has exited, or all but, when a collective fails here)."""
        deadline = time.monotonic() + 1.0
        for child in self.children:
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.wait(timeout=max(0.0, deadline - time.monotonic()))
        failed = self._failed_child()
        if failed is not None:
            raise HandlensError(f"training process {failed[0]} of run {run_id} (LOCAL_RANK={failed[0]}) {failed[1]}. "
                                f"The run's last checkpoint is kept: `handlens train --resume {run_id}` continues "
                                "it") from exc

    @contextlib.contextmanager
    def running(self) -> Any:
        """:meth:`close` when the block ends; an error in it kills the processes this one started."""
        try:
            yield self
        except BaseException:
            self.close(failed=True)
            raise
        self.close(failed=False)

    def close(self, *, failed: bool) -> None:
        """Leave the process group, wait for (or, after a failure, stop) the processes this one started, and
        put Lightning's variables back as they were (a job worker trains again in the same process)."""
        import torch.distributed as dist

        if failed:  # they have nothing to save (rank 0 writes the checkpoints): stopped at once, without noise
            for child in self.children:
                if child.poll() is None:
                    child.kill()
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()  # the others' pending collectives fail now instead of timing out
            self.owns_group = False
        for local_rank, child in enumerate(self.children, start=1):
            try:
                child.wait(timeout=10 if failed else 300)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
            if child.returncode and not failed:
                print(f"warning: training process {local_rank} (LOCAL_RANK={local_rank}) exited with code "
                      f"{child.returncode} after the run", file=sys.stderr, flush=True)
        self.children.clear()
        for key, value in self.saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        self.saved_env.clear()


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def detect_world(settings: Any, *, backend: str | None = None) -> World | None:
    """Where this process stands in a DDP run of ``settings.devices`` x ``settings.nodes`` processes (a train
    config section), or None for a run of one process.

    The launcher is read from the environment as Lightning reads it: torchrun (``TORCHELASTIC_RUN_ID``,
    ``RANK``, ``WORLD_SIZE``...), SLURM's srun (``SLURM_PROCID``, ``SLURM_NTASKS``...), else Lightning's own
    variables: ``MASTER_ADDR``, ``MASTER_PORT``, ``NODE_RANK`` (and ``WORLD_SIZE``) on each machine, where the
    process started without ``LOCAL_RANK`` starts the machine's other processes itself. A launcher that
    started another number of processes than the config asks for is refused, saying what to set. ``backend``:
    the one the launching process chose (gloo or nccl), for the processes it starts; else GPUs where there are."""
    devices, nodes = settings.devices, settings.nodes
    processes = devices * nodes
    launched = int(os.environ.get("WORLD_SIZE", "1")) if "TORCHELASTIC_RUN_ID" in os.environ else 1
    if processes == 1:
        if launched > 1:
            raise InputError(f"torchrun started {launched} processes, but train.devices=1 and train.nodes=1 train "
                             "in one (each would make a run of its own): set train.devices to torchrun's "
                             "--nproc-per-node and train.nodes to its --nnodes")
        return None
    import torch
    from lightning.fabric.plugins.environments import LightningEnvironment, SLURMEnvironment, TorchElasticEnvironment

    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl" and torch.cuda.device_count() < devices:
            raise InputError(f"train.devices={devices}, but this machine has {torch.cuda.device_count()} GPU(s): "
                             "DDP trains one process per GPU; set train.devices to at most that")
    asked = f"train.devices x train.nodes = {devices} x {nodes} = {processes}"
    for kind, launcher in ((TorchElasticEnvironment, "torchrun"), (SLURMEnvironment, "srun")):
        if kind.detect():
            environment = kind()
            if environment.world_size() != processes:
                raise InputError(f"{launcher} started {environment.world_size()} processes, but {asked}: set "
                                 "train.devices to the processes per machine and train.nodes to the machines")
            return World(devices=devices, nodes=nodes, rank=environment.global_rank(),
                         local_rank=environment.local_rank(), environment=environment, backend=backend,
                         launches=False)
    environment = LightningEnvironment()
    node, local = environment.node_rank(), environment.local_rank()
    if "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) != processes:
        raise InputError(f"WORLD_SIZE={os.environ['WORLD_SIZE']}, but {asked}: set train.devices to the processes "
                         "per machine and train.nodes to the machines (or unset WORLD_SIZE)")
    if node >= nodes or local >= devices:
        raise InputError(f"NODE_RANK={node} and LOCAL_RANK={local} are outside train.nodes={nodes} x "
                         f"train.devices={devices}: number machines 0 to {nodes - 1} and their processes 0 to "
                         f"{devices - 1}")
    if nodes > 1 and not {"MASTER_ADDR", "MASTER_PORT", "NODE_RANK"} <= os.environ.keys():
        raise InputError(f"train.nodes={nodes}: start the same command on every machine with MASTER_ADDR (node 0's "
                         f"address), MASTER_PORT (a free port on it) and NODE_RANK (0 to {nodes - 1}) set, or under "
                         "torchrun or srun")
    return World(devices=devices, nodes=nodes, rank=node * devices + local, local_rank=local,
                 environment=environment, backend=backend, launches="LOCAL_RANK" not in os.environ, own_store=True)


def _train_worker(world: World, ws: Workspace) -> RunResult:
    """A DDP run's non-zero rank: rank 0's run id, resolved config, subsets and checkpoint; its own data from the
    catalog and the image caches; the same training loop. It writes no run folder, catalog row, tracker run,
    checkpoint (Lightning saves from rank 0) or bundle, and prints nothing."""
    import yaml

    started = time.perf_counter()
    quiet_tracking()
    shared = world.start(ws)
    cfg = RunConfig.model_validate(yaml.safe_load(shared["config"]))
    catalog = open_catalog_for(ws)
    try:
        prepared = prepare(cfg, ws, catalog, subsets=shared["subsets"], for_lightning=False)
    finally:
        catalog.close()
    run_id = shared["run_id"]
    run_dir = ws.runs_dir / run_id  # rank 0's (its checkpoint callbacks' folder); nothing is written here
    checkpoint = Path(shared["checkpoint"]) if shared["checkpoint"] else None
    best_epoch, history, epochs = _fit_lightning(prepared, None, run_dir, run_id=run_id, ckpt_path=checkpoint,
                                                 progress=False, world=world)
    return RunResult(run_id=run_id, run_dir=run_dir, bundle=run_dir / "bundle", epochs=epochs, best_epoch=best_epoch,
                     metrics={}, history=history, seconds=time.perf_counter() - started, timings=prepared.timings,
                     resumed=bool(shared["resumed"]), rank=world.rank)


def ddp_worker() -> None:
    """The entry of a process a DDP run's local rank 0 started beside itself (:meth:`World.start`): it joins the
    run as the rank its ``LOCAL_RANK`` and ``NODE_RANK`` give. An error is printed and ends it with code 1 (the
    launching process names it)."""
    from handlens.train.config import TrainConfig

    spec = json.loads(os.environ.pop(WORKER_ENV))
    ws = Workspace.open(spec["workspace"], db_url=spec["db_url"])
    world = detect_world(TrainConfig(devices=spec["devices"], nodes=spec["nodes"]), backend=spec["backend"])
    if world is None or not world.rank:
        raise HandlensError(f"ddp_worker: LOCAL_RANK={os.environ.get('LOCAL_RANK')} is not a worker's rank")
    with world.running():
        _train_worker(world, ws)
