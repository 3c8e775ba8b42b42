"""Fit a classifier head on cached backbone features, without Lightning: frozen-backbone runs and studies.

Two kinds of head:

* ``linear`` / ``mlp``: a plain torch loop doing what :class:`~handlens.train.module.ClassifierModule`
  does on features (same loss with class weights, label smoothing or focal; same optimizer and per-epoch
  schedule; per-epoch train/val metrics; early stopping), seeded by ``train.seed``. The epoch kept is the
  one with the best monitored validation metric, a tie going to the lower validation loss, compared
  exactly (a ``metric - 1e-6 * loss`` score drowns in float32 next to an F1 of 0.9).
* ``logistic``: multinomial logistic regression fitted by L-BFGS (scikit-learn) on standardised features,
  its L2 strength ``C`` chosen by stratified K-fold cross-validation on the training features (scaler
  refitted per fold), with class-balanced sample weights when class weights are on. The standardisation
  is folded into the weights, so the head is a plain ``nn.Linear`` that takes raw features. This is the
  baseline a careful user writes by hand: StandardScaler + LogisticRegression(class_weight="balanced"),
  C picked on held-out data; a gradient-trained head should have to beat it.

No Lightning here: a frozen run trains in seconds and must not pay for a framework's start-up.
"""

from __future__ import annotations

import copy
import math
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from handlens.core.errors import HandlensError, InputError
from handlens.train.losses import build_loss
from handlens.train.metrics import classification_metrics, scalar_metrics

#: the L2 strengths (inverse) cross-validated for ``model.head=logistic``
C_GRID: tuple[float, ...] = tuple(float(c) for c in np.logspace(-4, 2, 7))
CV_FOLDS = 5
LOGISTIC_MAX_ITER = 500


class NonFiniteLossError(HandlensError):
    """Training produced a NaN or infinite loss."""


@dataclass
class HeadFit:
    head: nn.Module  # features -> logits, eval mode, best weights loaded
    history: list[dict[str, Any]]  # per-epoch records: epoch, train_loss, val_loss, val_macro_f1, val_accuracy...
    best_epoch: int  # 1-based epoch whose weights were kept (logistic: 1)
    info: dict[str, Any] = field(default_factory=dict)  # e.g. {"C": 0.1, "cv": {...}} for logistic, timings


def resolve_head(model_cfg: Any, train_cfg: Any, *, on_features: bool) -> str:
    """``model.head=auto`` -> ``logistic`` for a head on cached features trained with plain cross-entropy,
    else ``linear``; any other value is kept."""
    if model_cfg.head != "auto":
        return str(model_cfg.head)
    plain = train_cfg.loss == "ce" and not train_cfg.label_smoothing and not train_cfg.overfit_batches
    return "logistic" if on_features and plain else "linear"


def check_logistic(train_cfg: Any) -> None:
    """Refuse settings a logistic regression cannot honour (it fits plain, unsmoothed cross-entropy)."""
    if train_cfg.loss != "ce" or train_cfg.label_smoothing:
        raise InputError("model.head=logistic fits plain cross-entropy: train.loss=focal and "
                         "train.label_smoothing need a gradient-trained head (model.head=linear)")
    if train_cfg.overfit_batches:
        raise InputError("train.overfit_batches is a sanity check of gradient training: use model.head=linear")


def fit_head(train_x: torch.Tensor, train_y: np.ndarray, *, n_classes: int, model_cfg: Any, train_cfg: Any,
             class_weights: list[float] | None, val_x: torch.Tensor | None = None, val_y: np.ndarray | None = None,
             epochs: int | None = None, report: Callable[[int, float], None] | None = None,
             data_cfg: Any = None, classes: list[str] | None = None,
             on_epoch: Callable[[dict[str, Any]], None] | None = None,
             c_grid: tuple[float, ...] = C_GRID, cv_folds: int = CV_FOLDS,
             groups: list[str | None] | None = None) -> HeadFit:
    """Train a head on features (N, F), or (N, V, F) cached augmented views (each epoch draws one view
    per sample); ``train_y`` int64 class indices.

    ``epochs`` replaces ``train.epochs`` and turns early stopping off (exactly that many epochs: a
    refit). ``report(epoch, val_macro_f1)`` is called after each epoch when validation data is given;
    whatever it raises (e.g. ``optuna.TrialPruned``) propagates. ``data_cfg`` (``cfg.data``) applies
    ``data.balance`` (oversample, downsample, sampler). ``on_epoch(record)`` gets each history record.
    Without validation data the last epoch is kept. The global torch RNG is left as it was.
    """
    x = train_x.float()
    y = np.asarray(train_y, dtype=np.int64)
    if (val_x is None) != (val_y is None):
        raise ValueError("give both val_x and val_y, or neither")
    if len(y) != len(x) or len(y) == 0:
        raise InputError(f"fit_head needs training features and labels of one length, got {len(x)} and {len(y)}")
    val = (val_x.float(), np.asarray(val_y, dtype=np.int64)) if val_x is not None and len(val_y) else None
    names = list(classes) if classes is not None else [str(i) for i in range(n_classes)]
    kind = resolve_head(model_cfg, train_cfg, on_features=True)
    balance = balance_mode(data_cfg)
    order = epoch_pool(y, data_cfg, train_cfg.seed)
    if order is not None:
        x, y = x[torch.from_numpy(order)], y[order]
        groups = [groups[i] for i in order] if groups is not None else None
    if getattr(model_cfg, "logistic_c", None) is not None:
        c_grid = (float(model_cfg.logistic_c),)  # a C chosen beforehand (a study's folds): no inner CV
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(train_cfg.seed)
        if kind == "logistic":
            check_logistic(train_cfg)
            return _fit_logistic(x, y, n_classes=n_classes, names=names, train_cfg=train_cfg,
                                 class_weights=class_weights, balanced=balance == "sampler", val=val,
                                 report=report, on_epoch=on_epoch, c_grid=c_grid, cv_folds=cv_folds,
                                 groups=groups)
        return _fit_gradient(x, y, kind, n_classes=n_classes, names=names, model_cfg=model_cfg,
                             train_cfg=train_cfg if epochs is None else train_cfg.model_copy(update={"epochs": epochs}),
                             class_weights=class_weights, sampler=balance == "sampler", val=val,
                             early_stopping=epochs is None, report=report, on_epoch=on_epoch)


def balance_mode(data_cfg: Any) -> str:
    return str(getattr(data_cfg, "balance", "none")) if data_cfg is not None else "none"


def epoch_pool(y: np.ndarray, data_cfg: Any, seed: int) -> np.ndarray | None:
    """Indices of the training samples ``data.balance`` oversample/downsample keeps (None: every sample once)."""
    balance = balance_mode(data_cfg)
    if balance not in ("oversample", "downsample"):
        return None
    from handlens.train.balance import balanced_indices

    return balanced_indices(y, balance, data_cfg.per_class, seed)


# ---------------------------------------------------------------------------------------------- gradient heads


def build_optimizer(params: list[nn.Parameter] | list[dict[str, Any]], cfg: Any, lr: float) -> torch.optim.Optimizer:
    """AdamW, or SGD with Nesterov momentum, as ``train.optimizer`` says."""
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, nesterov=True)
    # fused: one kernel for the whole update, ~30% less time per step for a small head on a CPU
    return torch.optim.AdamW(params, lr=lr, weight_decay=cfg.weight_decay, fused=True)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: Any) -> Any:
    """Per-epoch schedule: linear warm-up, then cosine / step / plateau / constant."""
    from torch.optim import lr_scheduler as sched

    warmup = min(cfg.warmup_epochs, max(0, cfg.epochs - 1))
    main_epochs = max(1, cfg.epochs - warmup)
    if cfg.schedule == "plateau":
        return sched.ReduceLROnPlateau(optimizer, mode=cfg.monitor_mode, factor=cfg.gamma, patience=2)
    if cfg.schedule == "cosine":
        main: Any = sched.CosineAnnealingLR(optimizer, T_max=main_epochs)
    elif cfg.schedule == "step":
        main = sched.StepLR(optimizer, step_size=cfg.step_size, gamma=cfg.gamma)
    else:
        main = None
    if warmup == 0:
        return main
    ramp = sched.LinearLR(optimizer, start_factor=0.1, total_iters=warmup)
    if main is None:
        return ramp
    return sched.SequentialLR(optimizer, [ramp, main], milestones=[warmup])


def better(candidate: tuple[float, float], best: tuple[float, float] | None, mode: str) -> bool:
    """Is (metric, loss) better than ``best``: the metric first (``mode`` max or min), a tie on it going to the
    lower loss. Exact float64 comparisons; a NaN metric is never better."""
    metric, loss = float(candidate[0]), float(candidate[1])
    if math.isnan(metric):
        return False
    if best is None:
        return True
    best_metric, best_loss = float(best[0]), float(best[1])
    if metric != best_metric:
        return metric > best_metric if mode == "max" else metric < best_metric
    return not math.isnan(loss) and (math.isnan(best_loss) or loss < best_loss)


def _stage_metrics(probs: list[torch.Tensor], targets: torch.Tensor, loss_sum: float,
                   names: list[str]) -> dict[str, Any]:
    metrics = classification_metrics(torch.cat(probs), targets, names)
    metrics["loss"] = loss_sum / max(1, len(targets))
    return metrics


def _evaluate(head: nn.Module, x: torch.Tensor, y: np.ndarray, loss_fn: nn.Module, *, batch_size: int,
              names: list[str]) -> dict[str, Any]:
    """Validation metrics and mean loss (per sample, batch by batch as the Lightning loop sums it)."""
    head.eval()
    targets = torch.from_numpy(y)
    probs, loss_sum = [], 0.0
    with torch.no_grad():
        for start in range(0, len(x), batch_size):
            logits = head(x[start:start + batch_size])
            batch_y = targets[start:start + batch_size]
            loss_sum += float(loss_fn(logits, batch_y)) * len(batch_y)
            probs.append(torch.softmax(logits.float(), 1))
    return _stage_metrics(probs, targets, loss_sum, names)


def _record(epoch: int, train: dict[str, Any], val: dict[str, Any] | None, *, lr: float | None,
            started: float, train_seconds: float) -> dict[str, Any]:
    """A history record shaped like ClassifierModule's."""
    record: dict[str, Any] = {"epoch": epoch, "train_loss": float(train["loss"]), **scalar_metrics(train, "train")}
    if val:
        record["val_loss"] = float(val["loss"])
        record.update(scalar_metrics(val, "val"))
    record["lr"] = lr
    record["val"], record["train"] = val, train
    record["epoch_seconds"] = time.perf_counter() - started
    record["train_seconds"] = train_seconds
    return record


#: how often (optimizer steps) a head's optimizer moments below TINY_MOMENT are set to zero (see flush_tiny): a
#: first moment (beta1 0.9) every FLUSH_EVERY steps, Adam's second moment (beta2 0.999) every FLUSH_EVERY_SQ
FLUSH_EVERY = 16
FLUSH_EVERY_SQ = 256
TINY_MOMENT = 1e-30


def flush_tiny(tensors: list[torch.Tensor]) -> None:
    """Set to zero, in place, every element of ``tensors`` (an optimizer's moments) smaller than TINY_MOMENT in size.

    Why: about half of a pooled CNN feature table is exact zeros (ReLU), so a first-layer weight whose input
    channel is zero in most images rarely gets a gradient, and AdamW's first moment for it shrinks by beta1 (0.9)
    a step: in ~700 steps it is a denormal float, on which every CPU operation is ~25x slower (measured on the
    lithology features: an MLP head's fused AdamW step on (5, 1280, 256) weights took 2.1 ms against 0.3 ms
    flushed, and a 5-fold MLP trial 14.0 s against 7.8 s, the same CV score; torch's flush-to-zero mode does not
    reach the threads its pool already runs). Flushed every FLUSH_EVERY steps, a first moment cannot fall from
    above 1e-30 into the denormal range (below 1.2e-38) in between (0.9 ** 16 is 0.19), nor a second moment in
    FLUSH_EVERY_SQ steps (0.999 ** 256 is 0.77). What it changes: a weight's update lr * m / (sqrt(v) + eps)
    moves by at most lr * 1e-30 / eps."""
    with torch.no_grad():
        for tensor in tensors:
            tensor.masked_fill_(tensor.abs() < TINY_MOMENT, 0.0)


def flush_moments(steps: int, first: list[torch.Tensor], second: list[torch.Tensor]) -> None:
    """After an optimizer's ``steps``-th step: its first moments (and momentum buffers) flushed every FLUSH_EVERY
    steps, its second moments every FLUSH_EVERY_SQ (:func:`flush_tiny`)."""
    if steps % FLUSH_EVERY == 0:
        flush_tiny(first + (second if steps % FLUSH_EVERY_SQ == 0 else []))


def after_step(optimizer: torch.optim.Optimizer, steps: int) -> None:
    """What follows ``optimizer``'s ``steps``-th step: its tiny moments flushed (:func:`flush_moments`)."""
    if steps % FLUSH_EVERY:
        return
    moments = [(key, value) for state in optimizer.state.values() for key, value in state.items()
               if isinstance(value, torch.Tensor) and value.is_floating_point() and value.dim() > 0]
    flush_moments(steps, [v for key, v in moments if key != "exp_avg_sq"],
                  [v for key, v in moments if key == "exp_avg_sq"])


def _fit_gradient(x: torch.Tensor, y: np.ndarray, kind: str, *, n_classes: int, names: list[str], model_cfg: Any,
                  train_cfg: Any, class_weights: list[float] | None, sampler: bool,
                  val: tuple[torch.Tensor, np.ndarray] | None, early_stopping: bool,
                  report: Callable[[int, float], None] | None,
                  on_epoch: Callable[[dict[str, Any]], None] | None) -> HeadFit:
    from handlens.models.classifier import build_head

    cfg = train_cfg
    started_fit = time.perf_counter()
    head = build_head(int(x.shape[-1]), n_classes, head=kind, hidden=model_cfg.hidden, dropout=model_cfg.dropout)
    weight = torch.tensor(class_weights, dtype=torch.float32) if class_weights else None
    loss_fn = build_loss(cfg.loss, weight, cfg.label_smoothing, cfg.focal_gamma)
    optimizer = build_optimizer(list(head.parameters()), cfg, cfg.lr)
    scheduler = build_scheduler(optimizer, cfg)
    generator = torch.Generator().manual_seed(cfg.seed)
    targets = torch.from_numpy(y)
    views = int(x.shape[1]) if x.dim() == 3 else 0
    draw_weights = None
    if sampler:
        from handlens.train.balance import sampler_weights

        draw_weights = torch.from_numpy(sampler_weights(y))
    monitor = cfg.monitor if val is not None else cfg.monitor.replace("val_", "train_", 1)
    patience = cfg.early_stopping if early_stopping else 0
    history: list[dict[str, Any]] = []
    best: tuple[float, float] | None = None
    best_state, best_epoch = None, 0
    stop_best: float | None = None
    waited, stopped, steps_done = 0, False, 0
    for epoch in range(1, cfg.epochs + 1):
        started = time.perf_counter()
        head.train()
        order = (torch.multinomial(draw_weights, len(y), replacement=True, generator=generator)
                 if draw_weights is not None else torch.randperm(len(y), generator=generator))
        view = torch.randint(views, (len(y),), generator=generator) if views > 1 else None
        probs, loss_sum = [], 0.0
        for step, start in enumerate(range(0, len(order), cfg.batch_size)):
            index = order[start:start + cfg.batch_size]
            batch = x[index] if views == 0 else x[index, view[index] if view is not None else 0]
            batch_y = targets[index]
            logits = head(batch)
            loss = loss_fn(logits, batch_y)
            value = loss.item()
            if not math.isfinite(value):
                raise NonFiniteLossError(
                    f"the training loss became {value} at epoch {epoch}, step {step}; lower the learning "
                    f"rate (e.g. train.lr={cfg.lr / 10:g}) or check the data")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            steps_done += 1
            after_step(optimizer, steps_done)
            probs.append(logits.detach())
            loss_sum += value * len(batch_y)
        train_seconds = time.perf_counter() - started
        train = _stage_metrics([torch.softmax(torch.cat(probs).float(), 1)], targets[order], loss_sum, names)
        val_metrics = (_evaluate(head, val[0], val[1], loss_fn, batch_size=cfg.batch_size, names=names)
                       if val is not None else None)
        record = _record(epoch, train, val_metrics, lr=float(optimizer.param_groups[-1]["lr"]), started=started,
                         train_seconds=train_seconds)
        history.append(record)
        if scheduler is not None:
            if cfg.schedule == "plateau":
                if cfg.monitor in record:
                    scheduler.step(record[cfg.monitor])
            else:
                scheduler.step()
        if val is not None and better((record.get(monitor, math.nan), record["val_loss"]), best,
                                      cfg.monitor_mode):
            best = (record.get(monitor, math.nan), record["val_loss"])
            best_state, best_epoch = copy.deepcopy(head.state_dict()), epoch
        if on_epoch is not None:
            on_epoch(record)
        if report is not None and val is not None:
            report(epoch, float(record.get("val_macro_f1", math.nan)))
        if patience:
            value = record.get(monitor)
            if value is not None and (stop_best is None or (value > stop_best if cfg.monitor_mode == "max"
                                                            else value < stop_best)):
                stop_best, waited = value, 0
            else:
                waited += 1
                if waited >= patience:
                    stopped = True
                    break
    if best_state is not None:
        head.load_state_dict(best_state)
    else:
        best_epoch = len(history)
    head.eval()
    return HeadFit(head, history, best_epoch, {"head": kind, "epochs_run": len(history), "stopped_early": stopped,
                                               "seconds": time.perf_counter() - started_fit})


# ---------------------------------------------------------------------------------------------- logistic


def stratified_folds(y: np.ndarray, k: int, seed: int) -> np.ndarray:
    """A fold number per sample, each class dealt round-robin over the ``k`` folds after a seeded shuffle."""
    rng = np.random.default_rng(seed)
    fold = np.empty(len(y), dtype=np.int64)
    offset = 0
    for c in np.unique(y):
        members = rng.permutation(np.flatnonzero(y == c))
        fold[members] = (np.arange(len(members)) + offset) % k
        offset += len(members)
    return fold


def image_folds(y: np.ndarray, k: int, seed: int, groups: list[str | None] | None = None) -> tuple[np.ndarray, int]:
    """A fold number per image and the number of folds: stratified, and grouped when ``groups`` is given (every
    image of a group in one fold; an image without a group is its own), as few folds as the rarest class's
    groups allow."""
    if groups is None:
        return stratified_folds(y, k, seed), k
    from sklearn.model_selection import StratifiedGroupKFold

    labels = np.array([g if g is not None else f"__image{i}" for i, g in enumerate(groups)])
    fewest = min(len(set(labels[y == c])) for c in np.unique(y))
    k = min(k, fewest)
    if k < 2:
        return np.zeros(len(y), dtype=np.int64), 1
    fold = np.empty(len(y), dtype=np.int64)
    splitter = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
    for index, (_, held) in enumerate(splitter.split(np.zeros(len(y)), y, groups=labels)):
        fold[held] = index
    return fold, k


def _standardise(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mean = x.mean(0)
    std = x.std(0)
    return mean, np.where(std > 1e-12, std, 1.0)


def _logistic(c: float) -> Any:
    from sklearn.linear_model import LogisticRegression

    return LogisticRegression(C=c, solver="lbfgs", max_iter=LOGISTIC_MAX_ITER, tol=1e-4, warm_start=True)


def _fit_quietly(model: Any, x: np.ndarray, y: np.ndarray, w: np.ndarray) -> bool:
    """Fit on float32 rows (standardised in float64 by the caller); True when L-BFGS converged within its
    iterations. scikit-learn keeps float32 through the loss and gradient (L-BFGS itself steps in float64):
    2.2x faster than float64 on a study's 5-fold C path over lithology features (7.1 -> 3.2 s), with the
    same iterations, the same C and the same fold scores."""
    from sklearn.exceptions import ConvergenceWarning

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        model.fit(np.asarray(x, dtype=np.float32), y, sample_weight=w)
    return not any(issubclass(w.category, ConvergenceWarning) for w in caught)


def _full_probs(model: Any, x: np.ndarray, n_classes: int) -> np.ndarray:
    """(N, n_classes) probabilities; classes the model never saw get 0."""
    out = np.zeros((len(x), n_classes))
    out[:, model.classes_] = model.predict_proba(x)
    return out


def _rows(x: torch.Tensor, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Features as float64 rows (every cached view is a row), their labels, and their image index."""
    if x.dim() == 3:
        n, v, f = x.shape
        return (x.reshape(n * v, f).double().numpy(), np.repeat(y, v), np.repeat(np.arange(n), v))
    return x.double().numpy(), y, np.arange(len(y))


def _choose_c(rows: np.ndarray, row_y: np.ndarray, owner: np.ndarray, weights: np.ndarray, *, y: np.ndarray,
              n_classes: int, c_grid: tuple[float, ...], cv_folds: int, seed: int,
              groups: list[str | None] | None = None) -> tuple[float, dict[str, Any]]:
    """C with the best out-of-fold macro-F1 (ties: the lower out-of-fold log loss), by stratified K-fold over
    images (an image's views stay in one fold; with ``groups``, a group's images too, or images of one sample
    on both sides of a fold would favour too little regularisation); each C warm-starts from the previous one."""
    from sklearn.metrics import f1_score

    counts = np.bincount(y, minlength=n_classes)
    k = min(cv_folds, int(counts[counts > 0].min()))
    image_fold, k = image_folds(y, k, seed, groups) if k >= 2 else (None, k)
    if len(c_grid) == 1:  # model.logistic_c given (a study chose it on its own folds): nothing to choose here
        return float(c_grid[0]), {"folds": 0, "note": "as given (model.logistic_c)"}
    if k < 2 or len(c_grid) < 2:
        chosen = float(c_grid[len(c_grid) // 2]) if len(c_grid) else 1.0
        return chosen, {"folds": 0, "note": "(no cross-validation: a class has fewer than 2 training "
                        "images or groups)"}
    row_fold = image_fold[owner]
    oof = np.zeros((len(c_grid), len(y), n_classes))
    converged = True
    for fold in range(k):
        inside, outside = row_fold != fold, row_fold == fold
        mean, std = _standardise(rows[inside])
        train_rows, held = (rows[inside] - mean) / std, (rows[outside] - mean) / std
        model = _logistic(c_grid[0])
        for i, c in enumerate(c_grid):
            model.set_params(C=c)
            converged &= _fit_quietly(model, train_rows, row_y[inside], weights[inside])
            probs = _full_probs(model, held, n_classes)
            np.add.at(oof[i], owner[outside], probs)  # an image's views: averaged below
    per_image = np.bincount(owner, minlength=len(y)).astype(np.float64)[:, None]
    oof /= per_image[None]
    present = sorted(set(y.tolist()))
    f1 = [float(f1_score(y, p.argmax(1), labels=present, average="macro", zero_division=0)) for p in oof]
    log_loss = [float(-np.log(np.clip(p[np.arange(len(y)), y], 1e-15, 1.0)).mean()) for p in oof]
    best = None
    for i in range(len(c_grid)):
        if better((f1[i], log_loss[i]), None if best is None else (f1[best], log_loss[best]), "max"):
            best = i
    chosen = float(c_grid[best if best is not None else 0])
    return chosen, {"folds": k, "grid": [float(c) for c in c_grid], "oof_macro_f1": f1, "oof_log_loss": log_loss,
                    "converged": bool(converged)}


def fold_standardisation(coef: np.ndarray, intercept: np.ndarray, mean: np.ndarray,
                         std: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Weights on standardised features -> the same logits from raw features:
    W (x - m) / s + b = (W / s) x + (b - W m / s)."""
    weight = coef / std[None]
    return weight, intercept - weight @ mean


def threadpool_limits(**kwargs: Any) -> Any:
    """threadpoolctl's limits, once scikit-learn and SciPy (and so their BLAS) are loaded: a library loaded
    inside the context would escape it."""
    import sklearn.linear_model  # noqa: F401
    from threadpoolctl import threadpool_limits as limits

    return limits(**kwargs)


def row_weights(y: np.ndarray, row_y: np.ndarray, *, n_classes: int, class_weights: list[float] | None,
                balanced: bool) -> np.ndarray:
    """Sample weights of a logistic head's rows: the class weights, or (``data.balance=sampler``) the
    equivalent of drawing every class equally often, or 1; V views of an image weigh as much as one image,
    so C keeps its scale."""
    if class_weights:
        weights = np.asarray(class_weights, dtype=np.float64)[row_y]
    elif balanced:
        counts = np.bincount(y, minlength=n_classes).astype(np.float64)
        present = int((counts > 0).sum())
        weights = (len(y) / (present * np.where(counts > 0, counts, 1.0)))[row_y]
    else:
        weights = np.ones(len(row_y))
    return weights / (len(row_y) / len(y))


def _fit_logistic(x: torch.Tensor, y: np.ndarray, *, n_classes: int, names: list[str], train_cfg: Any,
                  class_weights: list[float] | None, balanced: bool, val: tuple[torch.Tensor, np.ndarray] | None,
                  report: Callable[[int, float], None] | None, on_epoch: Callable[[dict[str, Any]], None] | None,
                  c_grid: tuple[float, ...], cv_folds: int, groups: list[str | None] | None = None) -> HeadFit:
    started = time.perf_counter()
    present = np.unique(y)
    if len(present) < 2:
        raise InputError(f"a logistic head needs training images of at least 2 classes, got only {names[present[0]]}")
    rows, row_y, owner = _rows(x, y)
    weights = row_weights(y, row_y, n_classes=n_classes, class_weights=class_weights, balanced=balanced)
    # One BLAS thread: these products are small, and a multi-threaded BLAS on busy cores was measured 20-30x
    # slower (0.1 s instead of 3 ms per L-BFGS iteration for 850 x 1280 features, 2 shared cores).
    with threadpool_limits(limits=1, user_api="blas"):
        chosen, cv = _choose_c(rows, row_y, owner, weights, y=y, n_classes=n_classes, c_grid=c_grid,
                               cv_folds=cv_folds, seed=train_cfg.seed, groups=groups)
        cv["grouped"] = groups is not None
        cv_seconds = time.perf_counter() - started
        mean, std = _standardise(rows)
        model = _logistic(chosen)
        converged = _fit_quietly(model, (rows - mean) / std, row_y, weights)
    coef, intercept = np.asarray(model.coef_), np.asarray(model.intercept_)
    if len(model.classes_) == 2 and coef.shape[0] == 1:  # binary: softmax([0, z]) is the sigmoid of z
        coef, intercept = np.vstack([np.zeros_like(coef), coef]), np.concatenate([[0.0], intercept])
    weight, bias = fold_standardisation(coef, intercept, mean, std)
    full_w = np.zeros((n_classes, rows.shape[1]))
    full_b = np.full(n_classes, -1e4)  # a class absent from training is never predicted
    full_w[model.classes_], full_b[model.classes_] = weight, bias
    linear = nn.Linear(rows.shape[1], n_classes)
    with torch.no_grad():
        linear.weight.copy_(torch.from_numpy(full_w))
        linear.bias.copy_(torch.from_numpy(full_b))
    head = nn.Sequential(linear).eval()
    fit_seconds = time.perf_counter() - started
    weight_t = torch.tensor(class_weights, dtype=torch.float32) if class_weights else None
    loss_fn = build_loss("ce", weight_t, 0.0, 0.0)
    train_x = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
    train = _evaluate(head, train_x, y if x.dim() == 2 else row_y, loss_fn, batch_size=4096, names=names)
    val_metrics = _evaluate(head, val[0], val[1], loss_fn, batch_size=4096, names=names) if val is not None else None
    record = _record(1, train, val_metrics, lr=None, started=started, train_seconds=fit_seconds)
    record["logistic_C"] = chosen
    record["cv"] = cv
    info = {"head": "logistic", "C": chosen, "cv": cv, "converged": bool(converged), "features": int(rows.shape[1]),
            "rows": len(row_y), "cv_seconds": cv_seconds, "seconds": time.perf_counter() - started}
    if on_epoch is not None:
        on_epoch(record)
    if report is not None and val_metrics is not None:
        report(1, float(record.get("val_macro_f1", math.nan)))
    return HeadFit(head, [record], 1, info)
