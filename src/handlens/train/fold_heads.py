"""Heads for every fold of a cross-validation at once, on cached features: what makes a frozen study cheap.

A frozen study fits one head per fold per trial: tens of thousands of optimizer steps of a head so small
that each step is all per-call overhead (measured: ~0.7 ms per step, 71k steps for 30 trials, 50 s of a
study's 84). Here the K folds' heads are one set of stacked parameters (``(K, F, C)`` weights), trained
together: each step gathers every fold's own batch into one ``(K, B, F)`` tensor, runs one batched
matmul per layer, sums the folds' losses and takes one (elementwise, so per-fold) AdamW or SGD step.
The gradient of the sum with respect to fold k's slice is fold k's own gradient, so each fold trains as
:func:`~handlens.train.head.fit_head` would train it alone: same initial weights (the seeded head),
same per-fold shuffles (a generator seeded with ``train.seed`` per fold), same loss with the fold's own
class weights, same schedule, the same epoch kept and the same early stopping per fold. What differs:
dropout masks are drawn for all folds at once, by NumPy (other random masks, the same distribution), float
summation order, and a fold whose epoch has a step fewer than the longest fold's sits that step out
(its weights are put back; its AdamW moments still decay once).

A logistic head's C is chosen on the study's own folds (:func:`logistic_c_path`): one warm-started
L-BFGS path over the C grid per fold, scored on that fold's held-out images, instead of a nested
5-fold search inside every fold (36 fits per fold, 5x the work). C is then a hyperparameter chosen like
a gradient head's epoch count: on the folds, and the refit uses it.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from handlens.train.head import (
    C_GRID,
    HeadFit,
    NonFiniteLossError,
    _fit_quietly,
    _full_probs,
    _logistic,
    _record,
    _rows,
    _stage_metrics,
    _standardise,
    balance_mode,
    better,
    build_optimizer,
    build_scheduler,
    check_logistic,
    epoch_pool,
    fit_head,
    resolve_head,
    row_weights,
    threadpool_limits,
)
from handlens.train.losses import build_loss, stacked_cross_entropy


@dataclass
class FoldData:
    """One fold: rows of the shared feature table to train on and to validate on, and its class weights."""

    train_rows: np.ndarray
    val_rows: np.ndarray
    class_weights: list[float] | None = None


def fit_fold_heads(x: torch.Tensor, y: np.ndarray, folds: list[FoldData], *, plain: torch.Tensor, n_classes: int,
                   model_cfg: Any, train_cfg: Any, data_cfg: Any = None, classes: list[str] | None = None,
                   after_fold: Callable[[int, HeadFit], None] | None = None, lead: int = 0) -> list[HeadFit]:
    """A head per fold on rows of ``x`` ((N, F), or (N, V, F) augmented views) validated on rows of ``plain``
    ((N, F)), ``y`` the int64 class of every row. Gradient heads train stacked (see the module's docstring);
    a plateau schedule (its learning rate follows each fold's own metric) and a logistic head fit fold by
    fold with :func:`~handlens.train.head.fit_head`. ``after_fold(index, fit)`` is called once per fold, in
    order, when its fit is done (all of them at the end when stacked); whatever it raises propagates.

    ``lead`` > 0 trains the first ``lead`` folds stacked on their own and reports them before the others
    start: a pruner that stops the trial after them (most prune after the first fold) saves the other folds'
    training. Each fold's head is the one a fit of all folds at once gives (the same epochs, padding and
    dropout draws); only the extra per-step cost of a second stacked fit is paid.
    """
    names = list(classes) if classes is not None else [str(i) for i in range(n_classes)]
    kind = resolve_head(model_cfg, train_cfg, on_features=True)
    y = np.asarray(y, dtype=np.int64)
    if kind == "logistic" or train_cfg.schedule == "plateau" or len(folds) < 2:
        fits = []
        for index, fold in enumerate(folds):
            fit = fit_head(x[fold.train_rows], y[fold.train_rows], n_classes=n_classes, model_cfg=model_cfg,
                           train_cfg=train_cfg, class_weights=fold.class_weights, val_x=plain[fold.val_rows],
                           val_y=y[fold.val_rows], data_cfg=data_cfg, classes=names)
            fits.append(fit)
            if after_fold is not None:
                after_fold(index, fit)
        return fits
    stages = [list(range(len(folds)))]
    if 0 < lead < len(folds):
        stages = [list(range(lead)), list(range(lead, len(folds)))]
    fits = []
    for stage in stages:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(train_cfg.seed)  # the seeded head every fold starts from, in every stage
            done = _StackedFit(x, y, folds, plain=plain, kind=kind, names=names, model_cfg=model_cfg,
                               train_cfg=train_cfg, data_cfg=data_cfg, only=stage).run()
        for index, fit in zip(stage, done, strict=True):
            fits.append(fit)
            if after_fold is not None:
                after_fold(index, fit)
    return fits


def _linears(module: nn.Module) -> list[nn.Linear]:
    return [m for m in module.modules() if isinstance(m, nn.Linear)]


class _StackedFit:
    """The training loop of ``_fit_gradient``, over K folds at once."""

    def __init__(self, x: torch.Tensor, y: np.ndarray, folds: list[FoldData], *, plain: torch.Tensor, kind: str,
                 names: list[str], model_cfg: Any, train_cfg: Any, data_cfg: Any,
                 only: list[int] | None = None) -> None:
        """``only``: the folds (consecutive indices into ``folds``) this fit trains. Every fold still shapes the
        epochs (the steps of the longest fold, its padding), the dropout draws and the stacked parameters (the
        others' slices get a zero gradient and are never read), so a fold trains as in a fit of all, to the bit:
        the fused AdamW step vectorises over the whole tensor, and a tensor of another length rounds some
        elements otherwise."""
        from handlens.models.classifier import build_head

        self.x, self.plain, self.kind, self.names, self.cfg = x.float(), plain.float(), kind, names, train_cfg
        self.views = int(x.shape[1]) if x.dim() == 3 else 0
        self.dropout = float(model_cfg.dropout)
        self.rng = np.random.default_rng(train_cfg.seed)
        self.template = build_head(int(x.shape[-1]), len(names), head=kind, hidden=model_cfg.hidden,
                                   dropout=model_cfg.dropout)
        self.only = list(range(len(folds))) if only is None else list(only)
        self.total = len(folds)
        if self.only != list(range(self.only[0], self.only[-1] + 1)):
            raise ValueError(f"a stacked fit trains consecutive folds, got {self.only}")
        self.lo, self.hi = self.only[0], self.only[-1] + 1
        k = self.total
        self.params: list[torch.Tensor] = []
        for linear in _linears(self.template):  # (K, in, out) weights and (K, 1, out) biases, every fold alike
            self.params.append(linear.weight.detach().t().unsqueeze(0).repeat(k, 1, 1).requires_grad_())
            self.params.append(linear.bias.detach().view(1, 1, -1).repeat(k, 1, 1).requires_grad_())
        self.train_rows, self.targets, self.loss_fns, self.val = [], [], [], []
        sampler = balance_mode(data_cfg) == "sampler"
        self.draw_weights: list[torch.Tensor | None] = []
        for fold in folds:
            rows = np.asarray(fold.train_rows, dtype=np.int64)
            order = epoch_pool(y[rows], data_cfg, train_cfg.seed)
            rows = rows[order] if order is not None else rows
            self.train_rows.append(torch.from_numpy(rows))
            self.targets.append(torch.from_numpy(y[rows]))
            weight = torch.tensor(fold.class_weights, dtype=torch.float32) if fold.class_weights else None
            self.loss_fns.append(build_loss(train_cfg.loss, weight, train_cfg.label_smoothing, train_cfg.focal_gamma))
            val_rows = np.asarray(fold.val_rows, dtype=np.int64)
            self.val.append((torch.from_numpy(val_rows), y[val_rows]))
            if sampler:
                from handlens.train.balance import sampler_weights

                self.draw_weights.append(torch.from_numpy(sampler_weights(y[rows])))
            else:
                self.draw_weights.append(None)
        self.generators = [torch.Generator().manual_seed(train_cfg.seed) for _ in folds]
        weights = [fold.class_weights for fold in folds]
        self.class_weights = (torch.tensor([w or [1.0] * len(names) for w in weights], dtype=torch.float32)
                              if any(weights) else None)
        self.all_lengths = [len(rows) for rows in self.train_rows]  # every fold's epoch, trained here or not
        pick = self.only
        self.train_rows, self.targets = [self.train_rows[i] for i in pick], [self.targets[i] for i in pick]
        self.loss_fns, self.val = [self.loss_fns[i] for i in pick], [self.val[i] for i in pick]
        self.draw_weights, self.generators = [self.draw_weights[i] for i in pick], [self.generators[i] for i in pick]
        if self.class_weights is not None:
            self.class_weights = self.class_weights[pick]

    # -- the model
    def forward(self, xb: torch.Tensor, params: list[torch.Tensor], training: bool) -> torch.Tensor:
        """(K, B, F) -> (K, B, C): the head's layers as batched matmuls (dropout where build_head puts it)."""
        h = xb
        layers = len(params) // 2
        if self.kind == "linear":
            h = self._dropout(h, training)
        for i in range(layers):
            h = torch.baddbmm(params[2 * i + 1], h, params[2 * i])
            if i < layers - 1:  # mlp: ReLU, dropout, then the output layer
                h = self._dropout(torch.relu(h), training)
        return h

    def _dropout(self, h: torch.Tensor, training: bool) -> torch.Tensor:
        """Inverted dropout with masks from NumPy's PCG64 (seeded by train.seed): 4x faster than torch's CPU
        Bernoulli draw, which took a third of a stacked linear head's step."""
        if not training or not self.dropout:
            return h
        # drawn for every fold (those of another fit too): the masks a fit of all folds would draw
        draw = self.rng.random((self.total, *h.shape[1:]), dtype=np.float32)
        keep = torch.from_numpy((draw if len(self.only) == self.total else draw[self.only]) >= self.dropout)
        return h * keep * (1.0 / (1.0 - self.dropout))

    def fold_params(self, k: int) -> list[torch.Tensor]:
        """Fold ``only[k]``'s (1, in, out) weight and (1, 1, out) bias slices."""
        return [p[self.lo + k:self.lo + k + 1] for p in self.params]

    def module(self, state: list[torch.Tensor]) -> nn.Module:
        """Fold weights ((1, in, out) slices) as the head module ``build_head`` makes, in eval mode."""
        head = copy.deepcopy(self.template)
        with torch.no_grad():
            for i, linear in enumerate(_linears(head)):
                linear.weight.copy_(state[2 * i][0].t())
                linear.bias.copy_(state[2 * i + 1][0, 0])
        return head.eval()

    # -- one epoch
    def _epoch_plan(self) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, list[int]]:
        """Every fold's shuffled epoch (the draws fit_head makes), padded to the longest: global row indices
        (K, L), view indices (K, L) or None, targets (K, L), and each fold's length."""
        lengths = [len(rows) for rows in self.train_rows]
        longest = max(self.all_lengths)
        index = torch.zeros(len(lengths), longest, dtype=torch.long)
        views = torch.zeros(len(lengths), longest, dtype=torch.long) if self.views else None
        targets = torch.zeros(len(lengths), longest, dtype=torch.long)
        for k, rows in enumerate(self.train_rows):
            n, generator, draw = lengths[k], self.generators[k], self.draw_weights[k]
            order = (torch.multinomial(draw, n, replacement=True, generator=generator) if draw is not None
                     else torch.randperm(n, generator=generator))
            index[k, :n] = rows[order]
            targets[k, :n] = self.targets[k][order]
            if views is not None and self.views > 1:
                views[k, :n] = torch.randint(self.views, (n,), generator=generator)[order]
        return index, views, targets, lengths

    def _loss(self, logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """(K,) the folds' losses on this step's rows (0 for a fold with none)."""
        cfg = self.cfg
        if cfg.loss == "ce":
            return stacked_cross_entropy(logits, targets, self.class_weights, mask, label_smoothing=cfg.label_smoothing)
        # a fold without rows: 0 with a (zero) gradient, so a step no fold of this fit has rows for still steps
        return torch.stack([self.loss_fns[k](logits[k, :n], targets[k, :n]) if n else logits[k, :0].sum()
                            for k, n in enumerate(counts)])

    def train_epoch(self, optimizer: torch.optim.Optimizer, active: list[int], epoch: int) -> list[dict[str, Any]]:
        cfg, k_all = self.cfg, len(self.train_rows)
        index, views, targets, lengths = self._epoch_plan()
        include = torch.zeros(k_all)
        include[active] = 1.0
        steps = max(math.ceil(n / cfg.batch_size) for n in self.all_lengths)
        logits_seen, loss_sum = [], torch.zeros(k_all)
        for step in range(steps):
            lo, hi = step * cfg.batch_size, (step + 1) * cfg.batch_size
            counts = [max(0, min(n, hi) - lo) for n in lengths]
            rows = index[:, lo:hi]
            batch = self.x[rows] if views is None else self.x[rows, views[:, lo:hi]]
            step_targets = targets[:, lo:hi]
            mask = torch.arange(rows.shape[1]).unsqueeze(0) < torch.tensor(counts).unsqueeze(1)
            logits = self.forward(batch, [p[self.lo:self.hi] for p in self.params], training=True)
            losses = self._loss(logits, step_targets, mask, counts)
            total = (losses * include).sum()
            value = total.item()
            if not math.isfinite(value):
                raise NonFiniteLossError(
                    f"the training loss became {value} at epoch {epoch}, step {step}; lower the learning "
                    f"rate (e.g. train.lr={cfg.lr / 10:g}) or check the data")
            sitting_out = [k for k in active if not counts[k]]
            saved = [[p[self.lo + k].detach().clone() for p in self.params] for k in sitting_out]
            optimizer.zero_grad(set_to_none=True)
            total.backward()
            optimizer.step()
            if sitting_out:
                with torch.no_grad():
                    for k, state in zip(sitting_out, saved, strict=True):
                        for p, value_k in zip(self.params, state, strict=True):
                            p[self.lo + k].copy_(value_k)
            logits_seen.append(logits.detach())
            loss_sum += losses.detach() * torch.tensor(counts, dtype=torch.float32)
        seen = torch.cat(logits_seen, 1)
        return [_stage_metrics([torch.softmax(seen[k, :lengths[k]].float(), 1)], targets[k, :lengths[k]],
                               float(loss_sum[k]), self.names) if k in active else {} for k in range(k_all)]

    def evaluate(self, k: int) -> dict[str, Any]:
        rows, y = self.val[k]
        targets, size = torch.from_numpy(y), self.cfg.batch_size
        with torch.no_grad():
            logits = self.forward(self.plain[rows].unsqueeze(0), self.fold_params(k), training=False)[0]
            # summed batch by batch, as fit_head's validation (and the Lightning loop) sums it
            loss = sum(float(self.loss_fns[k](logits[i:i + size], targets[i:i + size])) * len(targets[i:i + size])
                       for i in range(0, len(y), size))
        return _stage_metrics([torch.softmax(logits, 1)], targets, loss, self.names)

    # -- the loop
    def run(self) -> list[HeadFit]:
        cfg, k_all = self.cfg, len(self.train_rows)
        started_fit = time.perf_counter()
        optimizer = build_optimizer(self.params, cfg, cfg.lr)
        scheduler = build_scheduler(optimizer, cfg)
        monitor, patience = cfg.monitor, cfg.early_stopping
        history: list[list[dict[str, Any]]] = [[] for _ in range(k_all)]
        best: list[tuple[float, float] | None] = [None] * k_all
        best_state: list[list[torch.Tensor] | None] = [None] * k_all
        best_epoch, stop_best, waited = [0] * k_all, [None] * k_all, [0] * k_all
        stopped = [False] * k_all
        for epoch in range(1, cfg.epochs + 1):
            active = [k for k in range(k_all) if not stopped[k]]
            if not active:
                break
            started = time.perf_counter()
            train = self.train_epoch(optimizer, active, epoch)
            train_seconds = (time.perf_counter() - started) / len(active)  # each fold's share of the batched epoch
            lr = float(optimizer.param_groups[-1]["lr"])
            for k in active:
                val = self.evaluate(k)
                record = _record(epoch, train[k], val, lr=lr, started=started, train_seconds=train_seconds)
                record["epoch_seconds"] = (time.perf_counter() - started) / len(active)
                history[k].append(record)
                candidate = (record.get(monitor, math.nan), record["val_loss"])
                if better(candidate, best[k], cfg.monitor_mode):
                    best[k] = candidate
                    best_state[k], best_epoch[k] = [p.detach().clone() for p in self.fold_params(k)], epoch
                if patience:
                    value = record.get(monitor)
                    if value is not None and (stop_best[k] is None or (
                            value > stop_best[k] if cfg.monitor_mode == "max" else value < stop_best[k])):
                        stop_best[k], waited[k] = value, 0
                    else:
                        waited[k] += 1
                        stopped[k] = waited[k] >= patience
            if scheduler is not None:
                scheduler.step()
        seconds = (time.perf_counter() - started_fit) / k_all
        fits = []
        for k in range(k_all):
            state = best_state[k] or [p.detach().clone() for p in self.fold_params(k)]
            fits.append(HeadFit(self.module(state), history[k], best_epoch[k] or len(history[k]),
                                {"head": self.kind, "epochs_run": len(history[k]), "stopped_early": stopped[k],
                                 "seconds": seconds, "stacked_folds": k_all}))
        return fits


# ---------------------------------------------------------------------------------------------- logistic C


@dataclass
class CPath:
    """A logistic head fitted at each C of a grid (warm-started), and its held-out probabilities per C."""

    grid: tuple[float, ...]
    val_probs: list[np.ndarray]  # per C: (n_val, n_classes)
    converged: bool


def logistic_c_path(train_x: torch.Tensor, train_y: np.ndarray, val_x: torch.Tensor, *, n_classes: int,
                    train_cfg: Any, data_cfg: Any = None, class_weights: list[float] | None = None,
                    c_grid: tuple[float, ...] = C_GRID) -> CPath:
    """Fit the logistic head of :func:`~handlens.train.head.fit_head` (standardised features, the same sample
    weights, balance and L-BFGS) at every C of ``c_grid``, each warm-started from the previous one, and give
    the probabilities of ``val_x`` at each: a fold's contribution to choosing C on the study's folds."""
    check_logistic(train_cfg)
    y = np.asarray(train_y, dtype=np.int64)
    x = train_x.float()
    order = epoch_pool(y, data_cfg, train_cfg.seed)
    if order is not None:
        x, y = x[torch.from_numpy(order)], y[order]
    rows, row_y, _ = _rows(x, y)
    weights = row_weights(y, row_y, n_classes=n_classes, class_weights=class_weights,
                          balanced=balance_mode(data_cfg) == "sampler")
    held = val_x.float().double().numpy()
    probs, converged = [], True
    with threadpool_limits(limits=1, user_api="blas"):
        mean, std = _standardise(rows)
        standard, held = (rows - mean) / std, (held - mean) / std
        model = _logistic(c_grid[0])
        for c in c_grid:
            model.set_params(C=c)
            converged &= _fit_quietly(model, standard, row_y, weights)
            probs.append(_full_probs(model, held, n_classes))
    return CPath(tuple(float(c) for c in c_grid), probs, bool(converged))
