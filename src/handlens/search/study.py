"""``run_study(cfg) -> StudyResult``: find the best honest model a small dataset allows.

A study (Optuna, Akiba et al., "Optuna: A Next-generation Hyperparameter Optimization Framework",
KDD 2019) samples run configs from a search space and scores each by K-fold cross-validation over the
split's train+val pool (test images never take part), reporting mean ± std. The winner, by CV mean
(optionally the cheapest config within one standard error of the best, Hastie et al., "The Elements of
Statistical Learning", 7.10), is refitted on all non-test images with the epochs its folds chose, and
that refit is the study's bundle; ``ensemble=K`` averages the top K refits instead.

Storage is Optuna's RDB storage on the workspace's catalog URL (SQLite by default, PostgreSQL for a
team): ``handlens study work NAME`` processes on several machines share one study. Two things Optuna's
docs warn about are designed around: SQLite's "database is locked" under parallel writers (a long busy
timeout on top of the catalog's WAL journal), and the grid sampler handing one point to several
workers (grid points are enqueued once when the study is made, and each is popped by exactly one
worker; a worker that finds the queue empty stops).
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import socket
import sys
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from handlens.core.errors import ConflictError, HandlensError, InputError, NotFoundError
from handlens.core.workspace import Workspace
from handlens.search.config import StudyConfig
from handlens.search.records import (  # noqa: F401  (re-exported: the CLI and tests read them from here)
    COST_ORDER,
    GRACE_SECONDS,
    HEARTBEAT_SECONDS,
    STUDY_TAG,
    StudyResult,
    TrialRow,
    _row,
    choose,
    export_study,
    freeze_cost,
    importances,
    list_studies,
    load_study,
    open_storage,
    scored_trials,
    show_study,
    study_names,
    trial_rows,
    verdict,
)
from handlens.search.space import SearchSpace, load_space, set_key
from handlens.search.trial import effective_key

SAMPLERS = ("grid", "random", "tpe", "gp")
MAX_BUDGET_SKIPS = 20  # consecutive trials skipped for the budget (or copies of earlier ones) before a study stops
#: a new study whose space searches model.freeze over frozen and fine-tuning starts with this many frozen trials
#: (their other keys sampled as usual): they cost seconds, give the study a floor, and give the median pruner the
#: finished trials it judges against (it prunes from the 4th on) before a fine-tuning trial can take the budget.
#: Then comes the cheapest fine-tuning config the space allows (see :func:`_cheap_first`).
FROZEN_FIRST = 4
#: the keys whose lowest value makes a trial cheapest, beside model.freeze (frozen, partial, full: COST_ORDER)
CHEAP_KEYS = ("train.epochs", "preprocess.size")
#: once a trial of a budgeted study has finished, no further trial may take more than this share of the budget
#: (measured on 2 CPU cores: the first fine-tuning trial a sampler drew, 18 epochs x 5 folds, took 36 of 45
#: minutes and left nothing to compare it with)
MAX_TRIAL_SHARE = 0.5
PRUNERS = ("median", "hyperband", "none")




# ----------------------------------------------------------------------------------------------- storage





def _sampler(name: str, seed: int) -> Any:
    import optuna

    if name in ("grid", "random"):  # grid points come from the trial queue; the sampler only fills gaps
        return optuna.samplers.RandomSampler(seed=seed)
    if name == "gp":
        return optuna.samplers.GPSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=STARTUP_TRIALS["tpe"])


#: trials a model-based sampler draws at random before it models the space (Optuna's GPSampler default: 10)
STARTUP_TRIALS = {"tpe": 8, "gp": 10}


def _note_random_start(sampler: str, trials: int | None) -> str | None:
    """A study too short for its sampler to model anything is a random search: say so, not silently."""
    startup = STARTUP_TRIALS.get(sampler)
    if startup is None or trials is None or trials > startup:
        return None
    return (f"--sampler {sampler} draws its first {startup} trials at random: with {trials} trial(s) this study is a "
            f"random search; give --trials {2 * startup + 4} or more for {sampler} to model the space, or say "
            "--sampler random")


#: a fold's report is at step FOLD_STEP + fold index in a study that prunes by epoch too (the first fold's epochs
#: are reported at steps 1, 2, ...): Optuna's pruners judge a trial at its latest step, so folds come after epochs
FOLD_STEP = 100_000
#: the median pruner judges the first fold's epochs from epoch max(PRUNE_WARMUP_EPOCHS, PRUNE_WARMUP_SHARE x the
#: trial's epochs) on: an epoch or two says little, and a slow learner should have a quarter of its epochs
PRUNE_WARMUP_EPOCHS = 3
PRUNE_WARMUP_SHARE = 0.25


def _pruner(name: str, *, by_epoch: bool = True) -> Any:
    import optuna

    if name == "median":
        # by epoch in the first fold (after the warm-up), then by fold: a trial whose best validation score so
        # far, or whose running CV mean, is below the median of the finished trials' at that step stops.
        # A study made before epochs were reported prunes by fold only, from the first fold.
        return optuna.pruners.MedianPruner(n_startup_trials=4, n_warmup_steps=PRUNE_WARMUP_EPOCHS if by_epoch else 0)
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1)
    return optuna.pruners.NopPruner()


class _Finished:
    """The study as a percentile (median) pruner sees it during one trial: its COMPLETE trials as they were when the
    trial started, read once, instead of once per report (a storage read, ~9 ms on SQLite, at every epoch of
    every trial: a second of a 30-trial frozen study). Finished trials do not change, so a study with one
    worker prunes exactly as Optuna's ``trial.should_prune()`` would; with several, a trial is judged against
    those finished when it started. Everything else is the study's own."""

    def __init__(self, study: Any, completed: list[Any]) -> None:
        self._study, self._completed = study, list(completed)

    def get_trials(self, deepcopy: bool = True, states: Any = None) -> list[Any]:
        import optuna

        if states is not None and tuple(states) == (optuna.trial.TrialState.COMPLETE,) and not deepcopy:
            return list(self._completed)
        return self._study.get_trials(deepcopy=deepcopy, states=states)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._study, name)


def should_prune(trial: Any, finished: _Finished | None) -> bool:
    """``trial.should_prune()``, judged against ``finished`` when the study's pruner is a percentile (median)
    pruner (other pruners, Hyperband's brackets, read the study themselves)."""
    import optuna

    if finished is None or type(trial.study.pruner) not in (optuna.pruners.MedianPruner,
                                                              optuna.pruners.PercentilePruner):
        return bool(trial.should_prune())
    pruner = trial.study.pruner
    return bool(pruner.prune(finished, trial._get_latest_trial()))  # the frozen trial should_prune passes


# ----------------------------------------------------------------------------------------------- context

@dataclass
class StudyContext:
    """What every worker of one study shares, rebuilt from the study's stored attributes."""

    name: str
    settings: dict[str, Any]
    space: SearchSpace
    base: dict[str, Any]  # the run config every trial starts from (dict)
    classes: list[str]
    pool_ids: list[int]
    pool_targets: np.ndarray
    test_ids: list[int]
    folds: list[Any]
    user: dict[str, Any] = field(default_factory=dict)  # what the user set (--config, key=value): wins over fixed
    pool_groups: list[str | None] | None = None  # when the split keeps groups together
    deadline: float | None = None
    budget: float | None = None  # the seconds this run of the study was given (deadline - its start)

    def trial_config(self, params: dict[str, Any]) -> Any:
        from handlens.train.config import RunConfig, _explain_error

        data = copy.deepcopy(self.base)
        for key, value in self.space.fixed.items():
            set_key(data, key, value)
        for key, value in flat_keys(self.user).items():
            set_key(data, key, value)
        for key, value in params.items():
            set_key(data, key, value)
        try:
            return RunConfig.model_validate(data)
        except Exception as exc:  # pydantic ValidationError or a freeze spec error
            errors = getattr(exc, "errors", None)
            text = "; ".join(_explain_error(e) for e in errors()) if callable(errors) else str(exc)
            raise InputError(f"invalid trial config: {text}") from None

    @property
    def metric(self) -> str:
        from handlens.search.trial import OBJECTIVES

        return OBJECTIVES[self.settings["objective"]]


def flat_keys(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"train": {"lr": 0.1}}`` -> ``{"train.lr": 0.1}``."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict) and value:
            out.update(flat_keys(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _base_config(cfg: StudyConfig, data: Any) -> dict[str, Any]:
    from handlens.train.config import load_config

    run = load_config(Path(cfg.config) if cfg.config else None, cfg.overrides,
                      base={"data": {"dataset": data.dataset, "labelset": data.labelset, "split": data.split},
                            "tracking": {"backend": cfg.tracking}})
    run.train.progress = False
    run.tracking.experiment = f"study-{cfg.name}"
    base = run.model_dump(mode="json")  # every default pinned: a worker of another version trains the same trials
    # ... but of preprocess only the keys set: a trial's config then knows what it leaves to its policy (a
    # preset's recommended preprocessing, thin-section's patches or xray's normalisation, applies as in `train`)
    base["preprocess"] = run.preprocess.model_dump(mode="json", exclude_unset=True)
    return base


def _user_settings(cfg: StudyConfig, space: SearchSpace) -> dict[str, Any]:
    """The run-config keys the user set for every trial (``--config`` file, then ``key=value``); a key the space
    searches is refused (it would be silently overwritten by each trial's value)."""
    import yaml

    from handlens.train.config import apply_overrides

    data: dict[str, Any] = {}
    if cfg.config:
        data = yaml.safe_load(Path(cfg.config).read_text()) or {}
    apply_overrides(data, list(cfg.overrides))
    searched = sorted(set(flat_keys(data)) & set(space.keys))
    if searched:
        raise InputError(f"{', '.join(searched)} is searched by the study's space; drop it from --config / the "
                         "key=value overrides, or from the space")
    return data


def _pool_groups(catalog: Any, split_name: str, dataset: str, ids: list[int]) -> list[str | None] | None:
    """Each pool image's group when the split keeps groups together (so folds must too), else None."""
    from handlens.data.queries import find_dataset
    from handlens.data.splits import split_groups

    with catalog.session() as session:
        return split_groups(session, find_dataset(session, dataset).id, split_name, ids)


def _check_buildable(ctx: StudyContext) -> None:
    """Every backbone a trial can get is a known one, with the weights it is given, and augmentation settings
    take effect (:func:`~handlens.train.run.check_policy_has_effect`): one clear error before any
    trial runs (otherwise every trial with it failed, and a grid study half of whose points could not be built
    still ended with a winner). Run-config values are checked by :func:`~handlens.search.space.check_space`;
    this is the one check that needs the model registry, over the searched backbones and weights."""
    import itertools

    from handlens.models.backbones import BACKBONES
    from handlens.search.trial import on_cached_features

    searched = {p.key: list(p.choices) for p in ctx.space.params if p.key in ("model.backbone", "model.weights")}
    base = {p.key: p.samples()[0] for p in ctx.space.params}
    # with the freeze, views, cache or augmentation searched, whether an augmentation setting counts depends on
    # the point: such a trial fails on its own, with the same message, and the others run
    mixed = any(p.key.startswith(("augment.", "preprocess.patches.")) or
                p.key in ("model.freeze", "train.views", "train.feature_cache") for p in ctx.space.params)
    for values in itertools.product(*searched.values()):
        point = {**base, **dict(zip(searched, values, strict=True))}
        cfg = ctx.trial_config(point)
        if not mixed:  # an augmentation setting that would change nothing: refused as train refuses it
            on_cached_features(cfg)
        where = (f"search space key 'model.backbone' = {cfg.model.backbone!r}" if "model.backbone" in searched
                 else f"model.backbone={cfg.model.backbone}")
        try:
            spec = BACKBONES.get(cfg.model.backbone)
        except NotFoundError as exc:
            raise InputError(f"{where}: {exc}") from None
        if cfg.model.weights == "packaged" and not spec.packaged_weights:
            from handlens.models.weights import packaged_backbones

            raise InputError(f"{where} with model.weights=packaged: no packaged weights ship for {spec.name} "
                             f"(they exist for {', '.join(packaged_backbones())}); set model.weights=imagenet "
                             "(needs internet) or a weights file, in the space's fixed: section or as an "
                             "override, or search packaged backbones only")


def _create_context(cfg: StudyConfig, ws: Workspace, catalog: Any, space: SearchSpace) -> StudyContext:
    from handlens.search.folds import cv_folds
    from handlens.train.data import load_split_data

    data = load_split_data(catalog, cfg.dataset, cfg.labelset, split_name=cfg.split)
    pool_ids = [*data.subsets["train"].ids, *data.subsets["val"].ids]
    targets = np.concatenate([data.subsets["train"].targets, data.subsets["val"].targets])
    if not pool_ids:
        raise InputError(f"split {data.split!r} has no train or val images to cross-validate on")
    groups = _pool_groups(catalog, data.split, data.dataset, pool_ids)
    folds = cv_folds(pool_ids, targets, k=cfg.cv, repeats=cfg.repeats, seed=cfg.seed, groups=groups,
                     classes=data.classes)
    settings = cfg.model_dump(mode="json")
    settings.update(dataset=data.dataset, labelset=data.labelset, split=data.split, grouped=groups is not None,
                    prune_epochs=cfg.pruner == "median")  # a study made before this reports folds only
    return StudyContext(name=str(cfg.name), settings=settings, space=space, base=_base_config(cfg, data),
                        classes=data.classes, pool_ids=pool_ids, pool_targets=targets,
                        test_ids=list(data.subsets["test"].ids), folds=folds, user=_user_settings(cfg, space),
                        pool_groups=groups)


def _store_context(study: Any, ctx: StudyContext) -> None:
    study.set_user_attr(STUDY_TAG, True)
    study.set_user_attr("settings", ctx.settings)
    study.set_user_attr("space", ctx.space.to_dict())
    study.set_user_attr("base_config", ctx.base)
    study.set_user_attr("user_config", ctx.user)
    study.set_user_attr("classes", ctx.classes)
    study.set_user_attr("pool", {"ids": ctx.pool_ids, "targets": [int(t) for t in ctx.pool_targets],
                                 "groups": ctx.pool_groups})
    study.set_user_attr("test_ids", ctx.test_ids)
    study.set_user_attr("folds", [[f.repeat, f.index, list(f.train_ids), list(f.val_ids)] for f in ctx.folds])
    study.set_user_attr("created_at", datetime.now(UTC).isoformat())


def _load_context(study: Any) -> StudyContext:
    from handlens.search.folds import Fold

    attrs = study.user_attrs
    if not attrs.get(STUDY_TAG):
        raise NotFoundError(f"study {study.study_name!r} was not made by handlens")
    folds = [Fold(r, i, tuple(tr), tuple(va)) for r, i, tr, va in attrs["folds"]]
    return StudyContext(name=study.study_name, settings=attrs["settings"],
                        space=SearchSpace.from_dict(attrs["space"]), base=attrs["base_config"],
                        classes=attrs["classes"], pool_ids=list(attrs["pool"]["ids"]),
                        pool_targets=np.asarray(attrs["pool"]["targets"], dtype=np.int64),
                        test_ids=list(attrs["test_ids"]), folds=folds, user=attrs.get("user_config") or {},
                        pool_groups=attrs["pool"].get("groups"))






# ----------------------------------------------------------------------------------------------- trials





def _same_params(trial: Any, params: dict[str, Any]) -> bool:
    return dict(trial.params) == params


class _Objective:
    """Scores one trial; records it as a run (config.yaml, cv.json, catalog row, tracker)."""

    def __init__(self, ctx: StudyContext, ws: Workspace) -> None:
        from handlens.search.trial import PoolFeatures

        self.ctx, self.ws = ctx, ws
        self.features: PoolFeatures | None = None
        self.grid = ctx.settings["sampler"] == "grid"
        self.prune_epochs = bool(ctx.settings.get("prune_epochs"))
        self.pool_index = {image_id: row for row, image_id in enumerate(ctx.pool_ids)}
        self.finished: _Finished | None = None  # the running trial's view of the finished ones (should_prune)
        self.training = False  # a trial's training runs (Ctrl-C then stops it at once: _deferred_interrupts)

    def _pool_features(self) -> Any:
        from handlens.data.catalog import Image, open_catalog
        from handlens.search.trial import PoolFeatures
        from handlens.train.data import Subset

        if self.features is None:
            catalog = open_catalog(self.ws.db_url)
            try:
                with catalog.session() as session:
                    rows = {r.id: r for r in session.query(Image).filter(Image.id.in_(self.ctx.pool_ids))}
            finally:
                catalog.close()
            pool = Subset(ids=self.ctx.pool_ids, paths=[rows[i].path for i in self.ctx.pool_ids],
                                sha256s=[rows[i].sha256 for i in self.ctx.pool_ids], targets=self.ctx.pool_targets)
            self.features = PoolFeatures(self.ws, pool)
        return self.features

    def __call__(self, trial: Any) -> float:
        import optuna

        trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
        if self.grid and not trial.study._storage.get_trial_system_attrs(trial._trial_id).get("fixed_params"):
            trial.set_user_attr("skipped", "the grid is done: every point was taken by a worker")
            trial.study.stop()
            raise optuna.TrialPruned()
        params = {p.key: p.suggest(trial) for p in self.ctx.space.params}
        try:
            cfg = self.ctx.trial_config(params)
            key = effective_key(cfg)
        except Exception as exc:
            trial.set_user_attr("error", f"{type(exc).__name__}: {exc}"[:2000])
            raise
        trial.set_user_attr("config_key", key)
        trials = trial.study.get_trials(deepcopy=False)
        self.finished = _Finished(trial.study, [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE])
        for other in trials:
            if other.number == trial.number:
                continue
            same = _same_params(other, params) or other.user_attrs.get("config_key") == key
            if same and other.state == optuna.trial.TrialState.COMPLETE:
                # a sampler may repeat a point, or vary a key this config ignores (lr of a logistic head)
                trial.set_user_attr("duplicate_of", other.number)
                for key in ("cv_mean", "cv_std", "fold_scores", "refit_epochs", "refit_set", "kind", "run_id"):
                    if key in other.user_attrs:
                        trial.set_user_attr(key, other.user_attrs[key])
                trial.set_user_attr("seconds", 0.0)
                return float(other.value)
            if same and other.state == optuna.trial.TrialState.RUNNING and self.grid:
                trial.set_user_attr("skipped", f"grid point already running as trial {other.number}")
                raise optuna.TrialPruned()
        from handlens.train.run import RunInterrupted

        self.training = True
        try:
            return self._score(trial, cfg, params)
        except optuna.TrialPruned:
            raise
        except KeyboardInterrupt:  # Ctrl-C while a frozen trial's heads trained: the study stops
            trial.set_user_attr("error", "interrupted: Ctrl-C")
            raise
        except RunInterrupted:  # Ctrl-C inside a fold's training: stop the study, not just this trial
            import signal

            signal.signal(signal.SIGINT, signal.default_int_handler)  # Lightning leaves SIGINT ignored
            trial.set_user_attr("error", "interrupted: Ctrl-C")
            raise KeyboardInterrupt from None
        except Exception as exc:
            trial.set_user_attr("error", f"{type(exc).__name__}: {exc}"[:2000])
            raise
        finally:
            self.training = False

    def _score(self, trial: Any, cfg: Any, params: dict[str, Any]) -> float:
        import optuna

        from handlens.search.trial import on_cached_features, score_frozen, score_training

        kind = "frozen" if on_cached_features(cfg) else "train"
        trial.set_user_attr("kind", kind)
        self._check_budget(trial, kind, params, cfg)
        started = time.perf_counter()

        def after_fold(step: int, running_mean: float) -> None:
            trial.report(running_mean, FOLD_STEP + step if self.prune_epochs else step)
            if step + 1 < len(self.ctx.folds):
                if self.ctx.deadline is not None and time.time() > self.ctx.deadline:
                    trial.set_user_attr("pruned_by", "budget spent between folds")
                    raise optuna.TrialPruned()
                if should_prune(trial, self.finished):
                    trial.set_user_attr("pruned_by", f"median pruner at fold {step + 1}")
                    raise optuna.TrialPruned()

        record = _TrialRecord(self.ws, self.ctx, trial, cfg)
        status = "failed"
        try:
            if kind == "frozen":
                score = score_frozen(cfg, self.ctx.folds, features=self._pool_features(), pool_index=self.pool_index,
                                     pool_targets=self.ctx.pool_targets, classes=self.ctx.classes,
                                     metric=self.ctx.metric, after_fold=after_fold,
                                     lead_epoch=self._epoch_pruner(trial, cfg) if self.prune_epochs else None)
            else:
                score = score_training(cfg, self.ctx.folds, ws=self.ws, metric=self.ctx.metric,
                                       after_fold=after_fold, after_epoch=self._epoch_guard(trial, cfg))
            seconds = time.perf_counter() - started
            trial.set_user_attr("cv_mean", score.mean)
            trial.set_user_attr("cv_std", score.std)
            trial.set_user_attr("fold_scores", [f.score for f in score.folds])
            trial.set_user_attr("fold_runs", [f.run_id for f in score.folds if f.run_id])
            trial.set_user_attr("refit_epochs", score.refit_epochs)
            trial.set_user_attr("refit_set", score.refit_set)
            trial.set_user_attr("seconds", seconds)
            trial.set_user_attr("setup_seconds", score.setup_seconds)
            status = "finished"
            record.finish("finished", score, seconds)
            return score.mean
        except optuna.TrialPruned:
            status = "pruned"
            raise
        finally:
            if status != "finished":
                record.finish(status, None, time.perf_counter() - started)

    def _epoch_pruner(self, trial: Any, cfg: Any) -> Any:
        """After each epoch of the first fold: report the fold's best validation score so far at step ``epoch``
        and, from the warm-up epoch on (:data:`PRUNE_WARMUP_SHARE`), stop the trial (pruned) when the median
        pruner says so. A head below the median of the finished trials at the same epoch of the same fold stops
        there, not after all its epochs."""
        import optuna

        key, best = f"val_{self.ctx.metric}", [-math.inf]
        warmup = max(PRUNE_WARMUP_EPOCHS, math.ceil(PRUNE_WARMUP_SHARE * cfg.train.epochs))

        def report(record: dict[str, Any]) -> None:
            if key not in record:
                return
            best[0] = max(best[0], float(record[key]))
            epoch = int(record["epoch"])
            trial.report(best[0], epoch)
            if epoch >= warmup and should_prune(trial, self.finished):
                trial.set_user_attr("pruned_by", f"median pruner at epoch {epoch} of fold 1")
                raise optuna.TrialPruned()

        return report

    def _epoch_guard(self, trial: Any, cfg: Any) -> Any:
        """After each epoch of a fold: record the epoch's time, and stop the trial (pruned) once what it still
        has to train (this fold's epochs left, then every further fold) no longer fits in the budget. In a study
        that prunes by epoch, the first fold's epochs also go to :meth:`_epoch_pruner`."""
        import optuna

        folds, epochs = len(self.ctx.folds), cfg.train.epochs
        times: list[float] = []
        pruner = self._epoch_pruner(trial, cfg) if self.prune_epochs else None
        started, cap = time.time(), self._trial_cap(trial)

        def guard(step: int, record: dict[str, Any]) -> None:
            if step == 0 and pruner is not None:
                pruner(record)
            times.append(float(record.get("epoch_seconds") or 0.0))
            per_epoch = float(np.median(times))
            trial.set_user_attr("epoch_seconds", per_epoch)
            if self.ctx.deadline is None:
                return
            left_epochs = (epochs - int(record["epoch"])) + epochs * (folds - step - 1)
            now = time.time()
            needed, left = per_epoch * left_epochs, self.ctx.deadline - now
            if cap is not None and now - started + needed > cap and cap - (now - started) < left:
                trial.set_user_attr("pruned_by", f"budget: this trial would take ~{_minutes(now - started + needed)},"
                                                 f" more than {MAX_TRIAL_SHARE:.0%} of the study's "
                                                 f"{_minutes(self.ctx.budget)}")
                raise optuna.TrialPruned()
            if needed > left:
                trial.set_user_attr("pruned_by", f"budget: {left_epochs} more epochs take ~{_minutes(needed)}, "
                                                 f"{_minutes(max(left, 0))} left")
                raise optuna.TrialPruned()

        return guard

    def _trial_cap(self, trial: Any) -> float | None:
        """The most one trial may take (:data:`MAX_TRIAL_SHARE` of the budget) once another trial has finished;
        None before (a first trial may use what fits) and without a budget."""
        import optuna

        if self.ctx.budget is None or not trial.study.get_trials(deepcopy=False,
                                                                 states=(optuna.trial.TrialState.COMPLETE,)):
            return None
        return MAX_TRIAL_SHARE * self.ctx.budget

    def _check_budget(self, trial: Any, kind: str, params: dict[str, Any], cfg: Any) -> None:
        """Do not start a trial whose kind's typical duration, with the feature pass a frozen trial would compute
        first (features of an input size, pool or backbone not seen yet), no longer fits in the budget."""
        import optuna

        if self.ctx.deadline is None:
            return
        left = self.ctx.deadline - time.time() - refit_reserve(trial.study, len(self.ctx.folds))
        # the fold work of this kind of trial; features a trial computed first are paid once, not by every trial
        same = [t.user_attrs["seconds"] - t.user_attrs.get("setup_seconds", 0.0)
                for t in trial.study.get_trials(deepcopy=False)
                if t.state == optuna.trial.TrialState.COMPLETE and t.user_attrs.get("kind") == kind
                and t.user_attrs.get("seconds")]
        expected = float(np.median(same)) if same else None
        if kind == "train":  # a fine-tuning trial: epochs x folds at the epoch time seen for its freeze and size
            cfg = self.ctx.trial_config(params)
            shape = (cfg.model.freeze, cfg.preprocess.size, cfg.model.backbone)
            seen = [t.user_attrs["epoch_seconds"] for t in trial.study.get_trials(deepcopy=False)
                    if t.user_attrs.get("epoch_seconds") and t.user_attrs.get("shape") == list(shape)]
            trial.set_user_attr("shape", list(shape))
            if seen:
                expected = float(np.median(seen)) * cfg.train.epochs * len(self.ctx.folds)
        what = f"a {kind} trial"
        if kind == "frozen":
            missing = self._pool_features().missing_seconds(cfg)
            if missing:
                expected, what = (expected or 0.0) + missing, "a frozen trial with features not computed yet"
        cap = self._trial_cap(trial) if kind == "train" else None
        if left <= 0 or (expected is not None and expected > min(left, cap or left)):
            limit = (f"{_minutes(max(left, 0))} left" if cap is None or left <= cap else
                     f"more than {MAX_TRIAL_SHARE:.0%} of the study's {_minutes(self.ctx.budget)}")
            trial.set_user_attr("skipped", f"budget: {what} takes ~{_minutes(expected)}, {limit}")
            if self.grid:  # keep the point for a resumed study
                trial.study.enqueue_trial(params, skip_if_exists=False)
            raise optuna.TrialPruned()


def refit_reserve(study: Any, folds: int) -> float:
    """Budget kept for the refit: the best trial's time for one fold, a quarter more (it sees all the pool)."""
    import optuna

    complete = [t for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
                if t.user_attrs.get("seconds") and t.value is not None]
    if not complete:
        return 0.0
    best = max(complete, key=lambda t: t.value)
    return 1.25 * (best.user_attrs["seconds"] - best.user_attrs.get("setup_seconds", 0.0)) / max(folds, 1)


def _minutes(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    return f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.0f} s"


class _TrialRecord:
    """A trial as a real run: ``runs/<id>/config.yaml`` and ``cv.json``, a catalog row, a tracker record."""

    def __init__(self, ws: Workspace, ctx: StudyContext, trial: Any, cfg: Any) -> None:
        from handlens.data.catalog import Dataset, Run, open_catalog
        from handlens.track import create_tracker, flatten
        from handlens.train.run import CONFIG_FILE, new_run_id

        self.ws, self.ctx, self.trial, self.cfg = ws, ctx, trial, cfg
        self.run_id = new_run_id()
        self.run_dir = ws.runs_dir / self.run_id
        self.run_dir.mkdir(parents=True)
        (self.run_dir / CONFIG_FILE).write_text(cfg.to_yaml())
        trial.set_user_attr("run_id", self.run_id)
        catalog = open_catalog(ws.db_url)
        try:
            with catalog.session() as session:
                dataset_id = session.query(Dataset.id).filter(Dataset.name == ctx.settings["dataset"]).scalar()
                session.add(Run(id=self.run_id, dataset_id=dataset_id, split_name=ctx.settings["split"],
                                status="running", config=cfg.model_dump(mode="json"),
                                metrics={"study": ctx.name, "trial": trial.number}))
        finally:
            catalog.close()
        self.tracker = create_tracker(cfg.tracking.backend, ws.runs_dir, f"study-{ctx.name}")
        self.tracker.start(self.run_id, {**flatten(cfg.model_dump(mode="json")), "study": ctx.name,
                                         "study.trial": trial.number})

    def finish(self, status: str, score: Any, seconds: float) -> None:
        from handlens.data.catalog import Run, open_catalog

        metrics: dict[str, Any] = {"study": self.ctx.name, "trial": self.trial.number, "seconds": round(seconds, 2)}
        if score is not None:
            metrics.update(cv_mean=score.mean, cv_std=score.std, refit_epochs=score.refit_epochs,
                           refit_set=score.refit_set, kind=score.kind,
                           folds=[{"fold": f.fold, "score": f.score, "best_epoch": f.best_epoch,
                                   "seconds": round(f.seconds, 2), "run_id": f.run_id} for f in score.folds])
            self.tracker.log_metrics({"cv_mean": score.mean, "cv_std": score.std}, step=0)
            for step, fold in enumerate(score.folds):
                self.tracker.log_metrics({"fold_score": fold.score}, step=step)
        (self.run_dir / "cv.json").write_text(json.dumps(metrics, indent=1))
        self.tracker.finish(status)
        catalog = open_catalog(self.ws.db_url)
        try:
            with catalog.session() as session:
                row = session.get(Run, self.run_id)
                row.status, row.metrics, row.finished_at = status, metrics, datetime.now(UTC)
                row.tracking = {"backend": self.cfg.tracking.backend, "uri": self.tracker.uri,
                                "run_id": getattr(self.tracker, "run_id", None)}
        finally:
            catalog.close()


# ----------------------------------------------------------------------------------------------- running

def _stop_when_done(ctx: StudyContext, trials_wanted: int | None) -> Any:
    """After each trial: stop at the wanted trial count, an empty grid queue, or a budget that no longer fits."""
    import optuna

    finished_states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED,
                       optuna.trial.TrialState.FAIL)

    def callback(study: Any, trial: Any) -> None:
        trials = study.get_trials(deepcopy=False)
        done = [t for t in trials if t.state in finished_states and not t.user_attrs.get("skipped")]
        # --trials N counts configs scored: a copy of an earlier trial's effect ("same as trial N", a logistic
        # head drawn with another learning rate it does not use) costs nothing and is not one of the N
        scored = [t for t in done if "duplicate_of" not in t.user_attrs]
        if trials_wanted is not None and len(scored) >= trials_wanted:
            study.stop()
        if len(done) >= MAX_BUDGET_SKIPS and all("duplicate_of" in t.user_attrs for t in done[-MAX_BUDGET_SKIPS:]):
            study.stop()  # the sampler keeps proposing what was scored: the space has no new config left
        if ctx.settings["sampler"] == "grid" and not any(
                t.state == optuna.trial.TrialState.WAITING for t in trials):
            study.stop()
        # a skipped kind (a fine-tuning trial that no longer fits) leaves the budget to cheaper trials; stop when
        # the sampler keeps proposing only what cannot fit
        recent = trials[-MAX_BUDGET_SKIPS:]
        if len(recent) == MAX_BUDGET_SKIPS and all(
                str(t.user_attrs.get("skipped", "")).startswith("budget") for t in recent):
            study.stop()
        if ctx.deadline is not None:
            left = ctx.deadline - time.time() - refit_reserve(study, len(ctx.folds))
            durations = [t.user_attrs["seconds"] - t.user_attrs.get("setup_seconds", 0.0) for t in done
                         if t.user_attrs.get("seconds")]
            if left <= 0 or (durations and min(durations) > left):
                study.stop()

    return callback


def _progress(study: Any, trial: Any) -> None:
    """One line per finished trial on stderr (stdout is kept for the result)."""
    row = _row(trial)
    what = f"CV {row.cv_mean:.3f} ± {row.cv_std:.3f}" if row.cv_mean is not None else row.note
    took = f", {row.seconds:.1f}s" if row.seconds is not None else ""
    print(f"trial {row.number} {row.status}: {what} [{params_line(row.params)}]{took}", file=sys.stderr, flush=True)


def params_line(params: dict[str, Any]) -> str:
    return ", ".join(f"{k}={f'{v:.3g}' if isinstance(v, float) else v}" for k, v in params.items())


#: a running trial that no worker has claimed (its "worker" attribute, written the moment a trial begins) this many
#: seconds after it was made was left by a process stopped between making it and beginning it
UNCLAIMED_AFTER_S = 60.0


def _interrupted_trials(storage: Any, study: Any) -> int:
    """Mark as failed this machine's trials whose worker process is gone (a killed ``study run``), and trials no
    worker claimed within UNCLAIMED_AFTER_S of being made (a process killed in between)."""
    import optuna

    host = socket.gethostname()
    count = 0
    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        worker = str(trial.user_attrs.get("worker", ""))
        name, _, pid = worker.rpartition(":")
        started = trial.datetime_start.timestamp() if trial.datetime_start else time.time()
        if not worker and time.time() - started > UNCLAIMED_AFTER_S:
            storage.set_trial_user_attr(trial._trial_id, "error", "interrupted: its process was stopped before "
                                                                  "the trial began")
        elif name == host and pid.isdigit() and not _alive(int(pid)):
            storage.set_trial_user_attr(trial._trial_id, "error", "interrupted: its worker process was stopped")
        else:
            continue
        storage.set_trial_state_values(trial._trial_id, state=optuna.trial.TrialState.FAIL)
        if study.user_attrs.get("settings", {}).get("sampler") == "grid" and trial.params:
            study.enqueue_trial(dict(trial.params))  # the point still has to run
        count += 1
    return count


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _work(ctx: StudyContext, ws: Workspace, storage: Any, trials_wanted: int | None, *,
          worker_index: int | None = None) -> _Objective:
    import optuna

    # a sampler seeded anew for each worker and each resume (the same seed would repeat the same draws)
    existing = len(storage.get_all_trials(storage.get_study_id_from_name(ctx.name), deepcopy=False))
    seed = ctx.settings["seed"] + existing + (0 if worker_index is None else 1000 * (worker_index + 1))
    study = optuna.load_study(study_name=ctx.name, storage=storage, sampler=_sampler(ctx.settings["sampler"], seed),
                              pruner=_pruner(ctx.settings["pruner"], by_epoch=bool(ctx.settings.get("prune_epochs"))))
    objective = _Objective(ctx, ws)
    trials = study.get_trials(deepcopy=False)
    finished = [t for t in trials if t.state.is_finished() and not t.user_attrs.get("skipped")]
    if ctx.settings["sampler"] == "grid" and not any(t.state == optuna.trial.TrialState.WAITING for t in trials):
        return objective
    if (trials_wanted is not None and len(finished) >= trials_wanted) or (
            ctx.deadline is not None and time.time() >= ctx.deadline):
        return objective  # optimize would run one trial before its callback can stop it
    try:
        with _deferred_interrupts(study, objective):
            study.optimize(objective, catch=(Exception,), callbacks=[_progress, _stop_when_done(ctx, trials_wanted)],
                           gc_after_trial=False)
    except KeyboardInterrupt:
        kept = sum(1 for t in study.get_trials(deepcopy=False)
                   if t.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED))
        raise StudyInterrupted(f"study {ctx.name} interrupted (Ctrl-C): its {kept} finished trial(s) are kept; "
                               f"continue it with `handlens study run --resume {ctx.name}`") from None
    return objective


class StudyInterrupted(HandlensError):
    """The user stopped a study (Ctrl-C): its finished trials are kept for ``--resume``."""

    exit_code = 130


@contextlib.contextmanager
def _deferred_interrupts(study: Any, objective: _Objective) -> Any:
    """Ctrl-C during ``study.optimize``: raised at once while a trial trains (its training stops, the trial is
    recorded as failed), but only asked for while Optuna records a trial or picks the next (a KeyboardInterrupt
    inside its ``tell`` broke its bookkeeping: an UnboundLocalError traceback, seen by a user) — the study is
    then stopped after that step and KeyboardInterrupt raised once ``optimize`` has returned. Outside the main
    thread (no signal handlers there) nothing changes; the previous handler is restored in ``finally``."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    asked: list[int] = []

    def on_sigint(signum: int, frame: Any) -> None:
        asked.append(signum)
        if getattr(objective, "training", False):
            raise KeyboardInterrupt
        study.stop()

    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if asked:
        raise KeyboardInterrupt


def _worker_main(name: str, ws_root: str, db_url: str, trials: int | None, deadline: float | None,  # noqa: PLR0917
                 threads: int, index: int) -> None:  # positional: the target of Process(args=...) in run_study
    """A parallel worker process of ``run_study(workers=N)``."""
    import torch

    torch.set_num_threads(max(1, threads))
    ws = Workspace.open(Path(ws_root), db_url=db_url)
    storage = open_storage(ws.db_url)
    ctx = _load_context(load_study(storage, name))
    ctx.deadline = deadline
    ctx.budget = deadline - time.time() if deadline is not None else None
    try:
        _work(ctx, ws, storage, trials, worker_index=index)
    except StudyInterrupted:  # Ctrl-C reaches every process of the group: the parent says what to do
        return


#: what a resumed study keeps from when it was made (the refit's --ensemble and --one-se may change)
FIXED_ON_RESUME = ("dataset", "labelset", "split", "space", "preset", "sampler", "pruner", "cv", "repeats",
                   "objective", "config", "overrides", "seed", "tracking")


def _refuse_changes_on_resume(cfg: StudyConfig, settings: dict[str, Any]) -> None:
    changed = [key for key in FIXED_ON_RESUME if key in cfg.model_fields_set and getattr(cfg, key) != settings.get(key)]
    if changed:
        raise InputError(f"study {cfg.name} was made with its own {', '.join('--' + k for k in changed)}: a resumed "
                         "study keeps them; start a new study (--name) to change them")


def create_study(cfg: StudyConfig, workspace: Workspace | None = None) -> StudyContext:
    """Make a new study in the catalog's storage (space checked, folds drawn, grid enqueued); no trial runs.
    ``handlens study work NAME`` processes, here or on other machines, can then share it."""
    import optuna

    from handlens.data.catalog import open_catalog

    ws = workspace or Workspace.open()
    storage = open_storage(ws.db_url)
    if not cfg.dataset:
        raise InputError("no dataset given: pass --dataset NAME (or --resume NAME to continue a study)")
    space = load_space(cfg.space, preset=cfg.preset) if (cfg.space or cfg.preset) else load_space(preset="quick")
    if cfg.sampler == "grid":
        space.grid()  # a clear error now for a range a grid cannot enumerate
    cfg = cfg.model_copy(update={"name": cfg.name or _default_name(cfg)})
    if cfg.name in study_names(storage):
        raise ConflictError(f"a study named {cfg.name!r} exists; continue it with `handlens study run --resume "
                            f"{cfg.name}` or choose another --name")
    catalog = open_catalog(ws.db_url)
    try:
        ctx = _create_context(cfg, ws, catalog, space)
    finally:
        catalog.close()
    _check_buildable(ctx)
    study = optuna.create_study(study_name=cfg.name, storage=storage, direction="maximize",
                                sampler=_sampler(cfg.sampler, cfg.seed), pruner=_pruner(cfg.pruner))
    _store_context(study, ctx)
    if cfg.sampler == "grid":
        for point in sorted(space.grid(), key=_cost_key):
            study.enqueue_trial(point)  # the cheapest points first, as below
    else:
        for point in _cheap_first(space, cfg.trials):
            study.enqueue_trial(point)
    return ctx


def _cost_key(params: dict[str, Any]) -> tuple[float, ...]:
    """What orders configs from cheap to dear: the freeze (frozen, partial, full), then epochs, then input size."""
    return (freeze_cost(params), *(float(params.get(key, 0)) for key in CHEAP_KEYS))  # numbers: the run config's check


def _cheap_first(space: SearchSpace, trials: int | None) -> list[dict[str, Any]]:
    """The trials a new study queues first when its space searches ``model.freeze`` over ``frozen`` and fine-tuning
    (none otherwise): :data:`FROZEN_FIRST` frozen trials (at most half of ``trials``), then the cheapest fine-tuning
    config (the cheapest freeze with the lowest epochs and input size the space has; other keys sampled). On a CPU,
    where one fine-tuning trial costs minutes an epoch, the sampler then knows what a fine-tune that fits the budget
    scores; a sampler that has seen only long fine-tunes stopped for the budget learns to avoid fine-tuning."""
    params = {p.key: p for p in space.params}
    freeze = params.get("model.freeze")
    if freeze is None or freeze.kind != "categorical" or "frozen" not in freeze.choices or len(freeze.choices) < 2:
        return []
    count = FROZEN_FIRST if trials is None else min(FROZEN_FIRST, trials // 2)
    queue: list[dict[str, Any]] = [{"model.freeze": "frozen"} for _ in range(count)]
    if trials is not None and trials <= count + 1:
        return queue
    tuned = min((c for c in freeze.choices if c != "frozen"), key=lambda c: freeze_cost({"model.freeze": c}))
    cheapest: dict[str, Any] = {"model.freeze": tuned}
    for key in CHEAP_KEYS:
        param = params.get(key)
        if param is not None:  # both keys are numbers (the run config checked the space's values)
            cheapest[key] = min(param.choices) if param.kind == "categorical" else (
                int(param.low) if param.kind == "int" else float(param.low))
    return [*queue, cheapest]


def run_study(cfg: StudyConfig, workspace: Workspace | None = None) -> StudyResult:
    """Run (or resume) a study, then refit its winner on all non-test images; see the module docstring."""
    import multiprocessing

    started = time.time()
    ws = workspace or Workspace.open()
    storage = open_storage(ws.db_url)
    if cfg.resume:
        if not cfg.name:
            raise InputError("--resume needs the study's name")
        study = load_study(storage, cfg.name)
        ctx = _load_context(study)
        _refuse_changes_on_resume(cfg, ctx.settings)
        failed = _interrupted_trials(storage, study)
        if failed:
            print(f"study {cfg.name}: {failed} trial(s) left running by a stopped process marked failed",
                  file=sys.stderr, flush=True)
    else:
        ctx = create_study(cfg, ws)
    trials_wanted = cfg.trials or ctx.settings.get("trials") or (
        None if ctx.settings["sampler"] == "grid" or cfg.budget else 20)
    ctx.deadline = started + cfg.budget if cfg.budget else None
    ctx.budget = cfg.budget
    note = _note_random_start(ctx.settings["sampler"], trials_wanted)
    if note:
        print(f"warning: {note}", file=sys.stderr, flush=True)
    processes = []
    if cfg.workers > 1:
        spawn = multiprocessing.get_context("spawn")
        threads = max(1, (os.cpu_count() or 1) // cfg.workers)
        for index in range(cfg.workers - 1):
            process = spawn.Process(target=_worker_main, args=(ctx.name, str(ws.root), ws.db_url, trials_wanted,
                                                               ctx.deadline, threads, index))
            process.start()
            processes.append(process)
    before = _finished_count(storage, ctx.name) if cfg.resume else None
    try:
        objective = _work(ctx, ws, storage, trials_wanted)
    finally:
        for process in processes:
            process.join()
    if before is not None and _finished_count(storage, ctx.name) == before:
        print(f"study {ctx.name}: nothing left to run ({before} trial(s) finished; give --trials N above that or "
              "a --budget for more); its winner is refitted again", file=sys.stderr, flush=True)
    given = cfg.model_fields_set
    return finish_study(ctx, ws, storage,
                        one_se=cfg.one_se if "one_se" in given or not cfg.resume else bool(ctx.settings["one_se"]),
                        ensemble=cfg.ensemble if "ensemble" in given or not cfg.resume else ctx.settings["ensemble"],
                        started=started, feature_passes=objective.features.passes if objective.features else 0)


def _finished_count(storage: Any, name: str) -> int:
    return sum(1 for t in load_study(storage, name).get_trials(deepcopy=False) if t.state.is_finished())


def work_study(name: str, workspace: Workspace | None = None, *, budget: float | None = None,
               trials: int | None = None) -> int:
    """``handlens study work NAME``: join an existing study (e.g. on PostgreSQL) and run trials until it is done.
    Returns the number of trials this worker finished."""
    ws = workspace or Workspace.open()
    storage = open_storage(ws.db_url)
    study = load_study(storage, name)
    ctx = _load_context(study)
    ctx.deadline = time.time() + budget if budget else None
    ctx.budget = budget
    wanted = trials or (None if ctx.settings["sampler"] == "grid" else ctx.settings.get("trials") or 20)
    _work(ctx, ws, storage, wanted, worker_index=os.getpid())
    worker = f"{socket.gethostname()}:{os.getpid()}"
    return sum(1 for t in load_study(storage, name).get_trials(deepcopy=False)
               if t.user_attrs.get("worker") == worker and t.state.is_finished() and not t.user_attrs.get("skipped"))


def _default_name(cfg: StudyConfig) -> str:
    source = cfg.preset or (Path(cfg.space).stem if cfg.space else "quick")
    return f"{cfg.dataset}-{source}-{datetime.now(UTC):%Y%m%d-%H%M%S}"


# ----------------------------------------------------------------------------------------------- refit

def finish_study(ctx: StudyContext, ws: Workspace, storage: Any, *, one_se: bool, ensemble: int, started: float,
                 feature_passes: int) -> StudyResult:
    """Pick the winner, refit it (or the top ``ensemble`` trials) on all non-test images, write the bundle."""
    study = load_study(storage, ctx.name)
    rows = trial_rows(study)
    winner = choose(rows, one_se=one_se)
    if winner is None:
        failed = [r for r in rows if r.status == "failed" and r.note]
        if failed:
            first = min(failed, key=lambda r: r.number)
            raise HandlensError(f"study {ctx.name}: every trial failed; the first (trial {first.number}) with: "
                                f"{first.note}")
        raise HandlensError(f"study {ctx.name}: no trial finished (budget too small, or all pruned); give a larger "
                            f"--budget, then continue with `handlens study run --resume {ctx.name}`")
    members = _ensemble_members(ctx, rows, winner, ensemble)
    refits = [refit(ctx, ws, row) for row in members]
    if len(refits) == 1:
        bundle, refit_info = refits[0]
    else:
        from handlens.models.ensemble import save_ensemble

        bundle = save_ensemble([b for b, _ in refits], ws.runs_dir / f"{ctx.name}-ensemble" / "bundle",
                               study=_study_manifest(ctx, winner, members))
        refit_info = {"members": [info for _, info in refits]}
    study.set_user_attr("bundle", str(bundle))
    study.set_user_attr("winner", winner.number)
    # the refit's own choices (a resume may change them): what `study show` and `study list` describe
    study.set_user_attr("settings", {**study.user_attrs["settings"], "one_se": one_se, "ensemble": len(members)})
    return StudyResult(name=ctx.name, bundle=bundle, winner=winner, trials=rows, importances=importances(study),
                       seconds=time.time() - started, feature_passes=feature_passes, refit=refit_info,
                       members=[m.number for m in members], verdict=verdict(winner, rows, one_se=one_se))


def _ensemble_members(ctx: StudyContext, rows: list[TrialRow], winner: TrialRow, k: int) -> list[TrialRow]:
    """The winner and the next best complete trials that share its preprocessing (one input for all)."""
    if k <= 1:
        return [winner]
    key = _preprocess_key(ctx, winner)
    ranked = sorted((r for r in scored_trials(rows) if r.number != winner.number), key=lambda r: -r.cv_mean)
    members = [winner, *[r for r in ranked if _preprocess_key(ctx, r) == key][:k - 1]]
    return members


def _preprocess_key(ctx: StudyContext, row: TrialRow) -> str:
    """The model input a trial's run would build (policy recommendations applied, size resolved)."""
    from handlens.models.backbones import BACKBONES
    from handlens.train.run import build_preprocess, settle_policy

    cfg = ctx.trial_config(row.params)
    settle_policy(cfg)
    return json.dumps(build_preprocess(cfg, BACKBONES.get(cfg.model.backbone)).model_key(), default=str)


def _study_manifest(ctx: StudyContext, winner: TrialRow, members: list[TrialRow]) -> dict[str, Any]:
    return {"name": ctx.name, "trial": winner.number, "members": [m.number for m in members],
            "objective": ctx.settings["objective"], "cv": ctx.settings["cv"], "repeats": ctx.settings["repeats"],
            "grouped": ctx.settings.get("grouped", False), "cv_mean": winner.cv_mean, "cv_std": winner.cv_std,
            "refitted": True, "images_seen": len(ctx.pool_ids), "test_images_held_out": len(ctx.test_ids)}


def refit(ctx: StudyContext, ws: Workspace, row: TrialRow) -> tuple[Path, dict[str, Any]]:
    """Retrain ``row``'s config on the whole train+val pool with the epochs its folds chose; its bundle
    records the CV estimate, that it was refitted, and which images it saw."""
    from handlens.models.bundle import MANIFEST_FILE
    from handlens.train.run import train

    cfg = ctx.trial_config({**row.params, **row.refit_set})
    cfg.train.epochs = int(row.epochs or cfg.train.epochs)
    cfg.train.early_stopping = 0
    cfg.tracking.experiment = f"study-{ctx.name}"
    result = train(cfg, ws, subsets={"train": list(ctx.pool_ids)}, progress=False)
    manifest_path = result.bundle / MANIFEST_FILE
    manifest = json.loads(manifest_path.read_text())
    manifest["study"] = {**_study_manifest(ctx, row, [row]), "refit_epochs": cfg.train.epochs,
                         "refit_run": result.run_id}
    tmp = manifest_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(manifest, indent=2))
    os.replace(tmp, manifest_path)
    return result.bundle, {"trial": row.number, "run_id": result.run_id, "epochs": cfg.train.epochs,
                           "seconds": round(result.seconds, 2), "bundle": str(result.bundle),
                           "chosen_on_folds": dict(row.refit_set)}  # e.g. a logistic head's C






