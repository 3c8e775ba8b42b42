"""One trial: a run config scored by cross-validation over the train+val pool.

Frozen backbones on cached features take the fast path: the pool's features are computed once per
(backbone, weights, preprocessing, pooling, views) for the whole study (kept in memory here and in the
workspace's per-image feature store on disk), and each fold only fits a head on rows of them. Any
other config trains one real run per fold (``handlens.train.train`` with the fold as its subsets);
the fold runs keep their config, history and metrics, and their bundles and checkpoints are deleted
(only refitted winners keep a bundle), so a study's disk use stays bounded.
"""

from __future__ import annotations

import shutil
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from handlens.core.errors import InputError
from handlens.search.folds import Fold

#: the metric a fold reports, by objective name
OBJECTIVES = {"val_macro_f1": "macro_f1", "val_accuracy": "accuracy"}


@dataclass
class FoldScore:
    fold: str
    score: float  # at the fold's own best epoch (what pruning sees while the folds run)
    best_epoch: int
    seconds: float
    run_id: str | None = None
    by_epoch: list[float] = field(default_factory=list)  # the validation metric after each epoch


def at_common_epoch(folds: list[FoldScore], epoch: int) -> None:
    """Score every fold at one epoch, the one the refit will train (the folds' median best epoch).

    Each fold picking its own best epoch on its own validation images and reporting that score would be
    optimistic, and more so for heads trained for many epochs than for a logistic regression fitted once.
    A fold that stopped early is scored at its last epoch.
    """
    for fold in folds:
        if fold.by_epoch:
            fold.score = float(fold.by_epoch[min(epoch, len(fold.by_epoch)) - 1])


@dataclass
class TrialScore:
    """Cross-validated score of one config: mean and std over folds (and repeats)."""

    folds: list[FoldScore] = field(default_factory=list)
    kind: str = "frozen"  # frozen (cached features) or train (a run per fold)
    setup_seconds: float = 0.0  # computing features the study had not computed yet (paid once per feature key)
    refit_set: dict[str, Any] = field(default_factory=dict)  # config values the folds chose (a logistic head's C)

    @property
    def mean(self) -> float:
        return float(np.mean([f.score for f in self.folds])) if self.folds else float("nan")

    @property
    def std(self) -> float:
        return float(np.std([f.score for f in self.folds], ddof=1)) if len(self.folds) > 1 else 0.0

    def settle(self) -> TrialScore:
        """Fold scores at the refit epoch (see :func:`at_common_epoch`)."""
        at_common_epoch(self.folds, self.refit_epochs)
        return self

    @property
    def refit_epochs(self) -> int:
        """The epochs the refit trains: the median of the folds' best epochs (at least 1)."""
        return max(1, round(statistics.median(f.best_epoch for f in self.folds))) if self.folds else 1


def on_cached_features(cfg: Any) -> bool:
    """True when ``cfg`` trains only a head on fixed backbone features (the fast, shared path)."""
    from handlens.train.run import check_policy_has_effect, settle_policy
    from handlens.train.run import on_cached_features as cached

    answer = cached(cfg, settle_policy(cfg))  # a policy's patch sampling counts, as in train
    check_policy_has_effect(cfg, answer)  # as train refuses it (the refit would): an augmentation that does nothing
    return answer


class PoolFeatures:
    """Backbone features of the pool's images, computed once per feature key and kept for the study; the
    rows are read from (and written to) the same per-image store ``train`` uses, so refits reuse them."""

    def __init__(self, ws: Any, pool: Any) -> None:
        self.ws = ws
        self.pool = pool  # train.data.Subset of every train+val image
        self._features: dict[str, Any] = {}
        self._images: dict[str, Any] = {}
        self.passes = 0  # feature sets this study computed or loaded (not served from memory)
        self._rates: list[float] = []  # seconds per pixel (image x size^2 x views) of each pass computed here

    def rows(self, cfg: Any, views: int = 0) -> Any:
        """Features of the pool in pool order: (N, F), or (N, V, F) with ``views`` augmented views."""
        import torch

        from handlens.models.classifier import create_classifier
        from handlens.train.features import feature_rows
        from handlens.train.run import seed_everything
        from handlens.transforms.augment import build_augmenter

        key, parts, preprocess = self._key(cfg, views)
        if key in self._features or self._load_stored(key, parts, views):
            return self._features[key]
        started = time.perf_counter()
        images = self._images_for(cfg, preprocess)
        seed_everything(cfg.train.seed)  # as train() does: a random backbone (weights none) is the refit's
        model = create_classifier(cfg.model.backbone, 2, weights=cfg.model.weights, freeze="frozen",
                                  pool=cfg.model.pool)
        self._features[key] = feature_rows(
            model, images, self.pool.sha256s, key_parts=parts, cache_dir=self.ws.cache_dir,
            normalize=preprocess.normalize_batch, views=views, augment=build_augmenter(cfg.augment) if views else None,
            generator=torch.Generator().manual_seed(cfg.train.seed))
        self.passes += 1
        self._rates.append((time.perf_counter() - started) / self._pixels(preprocess, views))
        return self._features[key]

    def missing_seconds(self, cfg: Any) -> float | None:
        """How long the features ``cfg`` trains on would take to compute: 0 when this study has them (in memory
        or in the workspace's store), else this study's passes so far per pixel of every view of every image,
        times this one's pixels (a 288-px pass is ~1.7x a 224-px one); None before any pass to go by. A budget
        that counted only the fold work let a trial with a new input size start a minutes-long pass at the
        budget's end."""
        needed = {cfg.train.views, 0}  # augmented training rows, and the plain rows every trial validates on
        missing = []
        for views in sorted(needed):
            key, parts, preprocess = self._key(cfg, views)
            if key not in self._features and not self._load_stored(key, parts, views):
                missing.append(self._pixels(preprocess, views))
        if not missing:
            return 0.0
        return float(np.median(self._rates)) * sum(missing) if self._rates else None

    def _key(self, cfg: Any, views: int) -> tuple[str, dict[str, Any], Any]:
        import json

        from handlens.models.backbones import BACKBONES
        from handlens.train.run import build_preprocess, feature_key_parts, settle_policy

        settle_policy(cfg)
        if cfg.preprocess.normalize == "dataset":
            raise InputError("studies do not support preprocess.normalize=dataset yet (each fold would need its "
                             "own statistics): use backbone, unit, minmax or percentile")
        preprocess = build_preprocess(cfg, BACKBONES.get(cfg.model.backbone))
        parts = feature_key_parts(cfg, BACKBONES.get(cfg.model.backbone), preprocess, views)
        return json.dumps([parts, views], sort_keys=True, default=str), parts, preprocess

    def _load_stored(self, key: str, parts: dict[str, Any], views: int) -> bool:
        """Every pool image's features are in the store: keep them (no decode, no backbone)."""
        from handlens.train.features import stored_rows

        stored = stored_rows(self.pool.sha256s, key_parts=parts, cache_dir=self.ws.cache_dir, views=views)
        if stored is None:
            return False
        self._features[key] = stored
        self.passes += 1
        return True

    def _pixels(self, preprocess: Any, views: int) -> float:
        return float(len(self.pool.sha256s)) * preprocess.size ** 2 * max(1, views)

    def _images_for(self, cfg: Any, preprocess: Any) -> Any:
        from handlens.train.data import as_tensor_images
        from handlens.transforms.cache import decode_many

        key = preprocess.model_key()
        if key not in self._images:
            self._images.clear()  # one decoded pool at a time: bounded memory
            arrays = decode_many(self.pool.paths, preprocess, sha256s=self.pool.sha256s, cache_dir=self.ws.cache_dir,
                                 workers=cfg.train.workers)
            self._images[key] = as_tensor_images(arrays)
        return self._images[key]


def fold_class_weights(cfg: Any, targets: np.ndarray, classes: list[str]) -> list[float] | None:
    """The class weights a fold's training uses: what ``train`` would use with the fold as its train subset
    (``auto``: inverse frequency of the fold's own train images)."""
    from types import SimpleNamespace

    from handlens.data.splits import inverse_frequency_weights
    from handlens.train.run import _class_weights

    counts = np.bincount(targets, minlength=len(classes))
    weights = inverse_frequency_weights({c: int(n) for c, n in zip(classes, counts, strict=True) if n})
    return _class_weights(cfg, SimpleNamespace(classes=classes, class_weights=weights))


#: run-config keys a logistic head on cached features ignores: trials that differ only in these are one config
LOGISTIC_IGNORES = ("lr", "weight_decay", "optimizer", "momentum", "schedule", "warmup_epochs", "step_size", "gamma",
                    "epochs", "batch_size", "body_lr_mult", "early_stopping")


def effective_key(cfg: Any) -> str:
    """A key equal for configs that train the same model (e.g. a logistic head with another, unused, lr)."""
    import json

    from handlens.train.head import resolve_head

    cached = on_cached_features(cfg)  # settles the policy into cfg first: its preprocessing is part of the key
    data = cfg.model_dump(mode="json")
    head = resolve_head(cfg.model, cfg.train, on_features=cached)
    data["model"]["head"] = head
    if head == "logistic":
        for key in LOGISTIC_IGNORES:
            data["train"].pop(key, None)
        data["model"].pop("hidden", None)
        data["model"].pop("dropout", None)
    data.pop("tracking", None)
    data["train"].pop("progress", None)
    return json.dumps(data, sort_keys=True)


def score_frozen(cfg: Any, folds: list[Fold], *, features: PoolFeatures, pool_index: dict[int, int],
                 pool_targets: np.ndarray, classes: list[str], metric: str,
                 after_fold: Callable[[int, float], None] | None = None,
                 lead_epoch: Callable[[dict[str, Any]], None] | None = None) -> TrialScore:
    """CV on cached features: a head per fold, fitted on rows of the study's shared features. Gradient heads
    of all folds train at once (:func:`~handlens.train.fold_heads.fit_fold_heads`); a logistic head's C is
    chosen on these folds (:func:`score_logistic`). Grouped folds need nothing more here: the groups
    decided the folds, and no head fit holds out images of its own. ``lead_epoch(record)`` is called after
    each epoch of the first fold (trained alone first) and may raise to stop the trial there."""
    from handlens.train.fold_heads import FoldData, fit_fold_heads
    from handlens.train.head import resolve_head

    started = time.perf_counter()
    rows = features.rows(cfg, cfg.train.views)  # training rows: augmented views when train.views > 0
    plain = features.rows(cfg) if cfg.train.views else rows  # validation is never augmented
    score = TrialScore(kind="frozen", setup_seconds=time.perf_counter() - started)
    data = []
    for fold in folds:
        train_rows = np.array([pool_index[i] for i in fold.train_ids], dtype=np.int64)
        data.append(FoldData(train_rows, np.array([pool_index[i] for i in fold.val_ids], dtype=np.int64),
                             fold_class_weights(cfg, pool_targets[train_rows], classes)))
    if resolve_head(cfg.model, cfg.train, on_features=True) == "logistic" and cfg.model.logistic_c is None:
        return score_logistic(cfg, folds, data, rows=rows, plain=plain, pool_targets=pool_targets, classes=classes,
                              metric=metric, score=score, after_fold=after_fold)
    started = time.perf_counter()

    def done(step: int, fit: Any) -> None:
        nonlocal started
        by_epoch = [float(r[f"val_{metric}"]) for r in fit.history if f"val_{metric}" in r]
        value = _fold_metric(fit.head, plain[data[step].val_rows], pool_targets[data[step].val_rows], classes,
                             metric=metric)
        score.folds.append(FoldScore(folds[step].name, value, int(fit.best_epoch),
                                     float(fit.info.get("seconds", time.perf_counter() - started)), by_epoch=by_epoch))
        started = time.perf_counter()
        if after_fold is not None:
            after_fold(step, score.mean)

    fit_fold_heads(rows, pool_targets, data, plain=plain, n_classes=len(classes), model_cfg=cfg.model,
                   train_cfg=cfg.train, data_cfg=cfg.data, classes=classes, after_fold=done, lead_epoch=lead_epoch,
                   lead=1 if after_fold is not None or lead_epoch is not None else 0)  # pruned: no other fold
    return score.settle()


def _fold_metric(head: Any, x: Any, y: np.ndarray, classes: list[str], *, metric: str) -> float:
    import torch

    from handlens.train.metrics import classification_metrics

    with torch.inference_mode():
        probs = torch.softmax(head(x).float(), 1)
    return float(classification_metrics(probs, torch.from_numpy(y), classes)[metric])


def score_logistic(cfg: Any, folds: list[Fold], data: list[Any], *, rows: Any, plain: Any, pool_targets: np.ndarray,
                   classes: list[str], metric: str, score: TrialScore,
                   after_fold: Callable[[int, float], None] | None = None) -> TrialScore:
    """A logistic head's C chosen on the study's folds: each fold fits the whole C grid (warm-started) and scores
    each C on its held-out images; the C with the best mean over folds (ties: the lower mean log loss) is the
    trial's, every fold is scored at it, and the refit fits that C (``model.logistic_c``). This replaces a
    nested 5-fold search for C inside each fold, 5x the fits; C is then chosen on the folds as a gradient
    head's epoch count is. While folds run, pruning sees the mean at the C best so far.

    The folds' paths are independent single-threaded L-BFGS fits: up to ``torch.get_num_threads()`` of them run at
    once (measured: 5 folds of the lithology features 3.0 s one by one, 2.1 s two at a time on 2 cores); they are
    scored and reported in fold order, and a pruned trial cancels the folds not begun."""
    from concurrent.futures import ThreadPoolExecutor

    import torch

    from handlens.train.fold_heads import logistic_c_path
    from handlens.train.head import threadpool_limits
    from handlens.train.metrics import classification_metrics

    def fit(fold: Any) -> Any:
        return logistic_c_path(rows[fold.train_rows], pool_targets[fold.train_rows], plain[fold.val_rows],
                               n_classes=len(classes), train_cfg=cfg.train, data_cfg=cfg.data,
                               class_weights=fold.class_weights)

    per_fold: list[tuple[list[float], list[float]]] = []  # (metric per C, log loss per C)
    grid: tuple[float, ...] = ()
    threads = max(1, min(len(data), torch.get_num_threads()))
    # one BLAS thread for all the fits at once: a fit's own limit, undone while another fit runs, would lift it
    with threadpool_limits(limits=1, user_api="blas"), ThreadPoolExecutor(threads) as pool:
        futures = [pool.submit(fit, fold) for fold in data]
        try:
            started = time.perf_counter()
            for step, future in enumerate(futures):
                path = future.result()
                y_val = pool_targets[data[step].val_rows]
                grid = path.grid
                values = [float(classification_metrics(torch.from_numpy(p), torch.from_numpy(y_val), classes)[metric])
                          for p in path.val_probs]
                losses = [float(-np.log(np.clip(p[np.arange(len(y_val)), y_val], 1e-15, 1.0)).mean())
                          for p in path.val_probs]
                per_fold.append((values, losses))
                chosen = _best_c(per_fold)
                score.folds.append(FoldScore(folds[step].name, values[chosen], 1, time.perf_counter() - started))
                started = time.perf_counter()
                for done, (fold_values, _) in zip(score.folds, per_fold, strict=True):
                    done.score = fold_values[chosen]
                if after_fold is not None:
                    after_fold(step, score.mean)
        finally:
            for future in futures:
                future.cancel()  # pruned or failed: the folds not begun never run (a running one finishes)
    score.refit_set = {"model.logistic_c": grid[_best_c(per_fold)]}
    return score


def _best_c(per_fold: list[tuple[list[float], list[float]]]) -> int:
    """The C index with the best mean metric over folds, a tie going to the lower mean log loss."""
    from handlens.train.head import better

    metric = np.mean([v for v, _ in per_fold], axis=0)
    loss = np.mean([lo for _, lo in per_fold], axis=0)
    best: int | None = None
    for i in range(len(metric)):
        if better((metric[i], loss[i]), None if best is None else (metric[best], loss[best]), "max"):
            best = i
    return best if best is not None else 0


def score_training(cfg: Any, folds: list[Fold], *, ws: Any, metric: str,
                   after_fold: Callable[[int, float], None] | None = None,
                   after_epoch: Callable[[int, dict[str, Any]], None] | None = None) -> TrialScore:
    """CV by real runs: one ``train`` per fold on the fold's images (tracking off: the trial is tracked).
    ``after_epoch(fold index, epoch record)`` may raise to stop the trial (e.g. its budget no longer fits)."""
    from handlens.train.run import train

    score = TrialScore(kind="train")
    for step, fold in enumerate(folds):
        fold_cfg = cfg.model_copy(deep=True)
        fold_cfg.tracking.backend = "none"
        fold_cfg.train.progress = False
        started = time.perf_counter()
        hook = (lambda record, step=step: after_epoch(step, record)) if after_epoch is not None else None
        result = train(fold_cfg, ws, subsets={"train": list(fold.train_ids), "val": list(fold.val_ids)},
                       progress=False, epoch_hook=hook)
        val = result.metrics.get("val") or {}
        if metric not in val:
            raise InputError(f"fold {fold.name} reported no validation {metric}")
        best = result.best_epoch or result.epochs or 1
        by_epoch = [float(r[f"val_{metric}"]) for r in result.history if f"val_{metric}" in r]
        score.folds.append(FoldScore(fold.name, float(val[metric]), int(best), time.perf_counter() - started,
                                     result.run_id, by_epoch=by_epoch))
        drop_run_weights(ws, result.run_id)
        if after_fold is not None:
            after_fold(step, score.mean)
    return score.settle()


def drop_run_weights(ws: Any, run_id: str) -> None:
    """Delete a fold run's bundle and checkpoints (its config, history and metrics stay): bounded disk."""
    from handlens.data.catalog import Run, open_catalog

    run_dir = ws.runs_dir / run_id
    shutil.rmtree(run_dir / "bundle", ignore_errors=True)
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    catalog = open_catalog(ws.db_url)
    try:
        with catalog.session() as session:
            row = session.get(Run, run_id)
            if row is not None:
                row.bundle_path = None
    finally:
        catalog.close()
