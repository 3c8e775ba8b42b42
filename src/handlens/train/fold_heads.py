"""Heads for every fold of a cross-validation at once, on cached features: what makes a frozen study cheap.

A frozen study fits one head per fold per trial: tens of thousands of optimizer steps of a head so small
that each step is all per-call overhead (measured: ~0.7 ms per step, 71k steps for 30 trials, 50 s of a
study's 84). Here the K folds' heads are one set of stacked parameters (``(K, F, C)`` weights), trained
together: each step gathers every fold's own batch into one ``(K, B, F)`` tensor, runs one batched
matmul per layer, sums the folds' losses and takes one (elementwise, so per-fold) AdamW or SGD step.
With cross-entropy and AdamW (the defaults) even autograd and the optimizer's bookkeeping are per-call
overhead next to such small tensors: the gradients are then written out (:meth:`_StackedFit._gradients`,
tested against autograd) and AdamW's fused kernel is called on them directly (:class:`_FusedAdamW`).
The gradient of the sum with respect to fold k's slice is fold k's own gradient, so each fold trains as
:func:`~handlens.train.head.fit_head` would train it alone: same initial weights (the seeded head),
same per-fold shuffles (a generator seeded with ``train.seed`` per fold), same loss with the fold's own
class weights, same schedule, the same epoch kept and the same early stopping per fold. What differs:
dropout masks are drawn per fold from NumPy's PCG64 (other random masks, the same distribution), float
summation order, and a fold whose epoch has a step fewer than the longest fold's sits that step out
(its weights are put back; its AdamW moments still decay once).

A fold's training depends on no other fold being trained beside it: its masks come from its own generator
and every fold takes as many steps per epoch as the longest fold of the whole CV needs. So a study can train
its first fold alone (a pruned trial trains no other) and the rest stacked, and get each fold's head as one
fit of all five would give it, to float rounding.

A logistic head's C is chosen on the study's own folds (:func:`logistic_c_path`): one warm-started
L-BFGS path over the C grid per fold, scored on that fold's held-out images, instead of a nested
5-fold search inside every fold (36 fits per fold, 5x the work). C is then a hyperparameter chosen like
a gradient head's epoch count: on the folds, and the refit uses it.
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
import warnings
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
    after_step,
    balance_mode,
    better,
    build_optimizer,
    build_scheduler,
    check_logistic,
    epoch_pool,
    fit_head,
    flush_moments,
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
                   after_fold: Callable[[int, HeadFit], None] | None = None, lead: int = 0,
                   lead_epoch: Callable[[dict[str, Any]], None] | None = None) -> list[HeadFit]:
    """A head per fold on rows of ``x`` ((N, F), or (N, V, F) augmented views) validated on rows of ``plain``
    ((N, F)), ``y`` the int64 class of every row. Gradient heads train stacked (see the module's docstring);
    a plateau schedule (its learning rate follows each fold's own metric) and a logistic head fit fold by
    fold with :func:`~handlens.train.head.fit_head`. ``after_fold(index, fit)`` is called once per fold, in
    order, when its fit is done (all of them at the end when stacked); whatever it raises propagates.

    ``lead`` > 0 trains the first ``lead`` folds stacked on their own and reports them before the others
    start: a pruner that stops the trial after them (most prune after the first fold) saves the other folds'
    training. Each fold's head is the one a fit of all folds at once gives (the same epochs, padding and
    dropout draws; float rounding aside), and the lead stage costs about a fold's share of one stacked fit.
    ``lead_epoch(record)`` is called with the first fold's history record after each of its epochs when that
    fold trains alone (``lead`` = 1); whatever it raises propagates, and no other fold trains.
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
                               train_cfg=train_cfg, data_cfg=data_cfg, only=stage,
                               ).run(after_epoch=lead_epoch if stage == [0] else None)
        for index, fit in zip(stage, done, strict=True):
            fits.append(fit)
            if after_fold is not None:
                after_fold(index, fit)
    return fits


class _FusedAdamW:
    """The update ``torch.optim.AdamW(fused=True).step()`` makes (its CPU kernel, its state, the learning rate and
    weight decay of its one parameter group, which the schedule drives) applied to gradients given here: without
    the optimizer's per-call bookkeeping, 0.4 ms a step, as much as a stacked linear head's whole update."""

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.group = optimizer.param_groups[0]
        self.params = list(self.group["params"])
        self.exp_avgs = [torch.zeros_like(p) for p in self.params]
        self.exp_avg_sqs = [torch.zeros_like(p) for p in self.params]
        self.steps = [torch.tensor(0.0) for _ in self.params]
        self.taken = 0

    @staticmethod
    def usable(optimizer: torch.optim.Optimizer) -> bool:
        group = optimizer.param_groups
        return (isinstance(optimizer, torch.optim.AdamW) and len(group) == 1 and bool(group[0].get("fused"))
                and not group[0]["amsgrad"] and not group[0]["maximize"] and hasattr(torch, "_fused_adamw_"))

    def step(self, grads: list[torch.Tensor]) -> None:
        group = self.group
        beta1, beta2 = group["betas"]
        torch._foreach_add_(self.steps, 1)
        self.taken += 1
        flush_moments(self.taken, self.exp_avgs, self.exp_avg_sqs)
        torch._fused_adamw_(self.params, grads, self.exp_avgs, self.exp_avg_sqs, [], self.steps, amsgrad=False,
                            lr=float(group["lr"]), beta1=float(beta1), beta2=float(beta2),
                            weight_decay=float(group["weight_decay"]), eps=float(group["eps"]), maximize=False,
                            grad_scale=None, found_inf=None)


def _linears(module: nn.Module) -> list[nn.Linear]:
    return [m for m in module.modules() if isinstance(m, nn.Linear)]


class _StackedFit:
    """The training loop of ``_fit_gradient``, over K folds at once."""

    def __init__(self, x: torch.Tensor, y: np.ndarray, folds: list[FoldData], *, plain: torch.Tensor, kind: str,
                 names: list[str], model_cfg: Any, train_cfg: Any, data_cfg: Any,
                 only: list[int] | None = None) -> None:
        """``only``: the folds (indices into ``folds``) this fit trains, with parameters of their own
        ((len(only), in, out) weights). Every fold still shapes the epochs (the steps of the longest fold, its
        padding), so a fold trains as in a fit of all (float rounding aside: the fused AdamW step vectorises
        over a tensor of another length)."""
        from handlens.models.classifier import build_head

        self.x, self.plain, self.kind, self.names, self.cfg = x.float(), plain.float(), kind, names, train_cfg
        self.views = int(x.shape[1]) if x.dim() == 3 else 0
        self.dropout = float(model_cfg.dropout)
        self.template = build_head(int(x.shape[-1]), len(names), head=kind, hidden=model_cfg.hidden,
                                   dropout=model_cfg.dropout)
        self.only = list(range(len(folds))) if only is None else list(only)
        self.steps_done = 0  # optimizer steps taken by the autograd path (see after_step)
        k = len(self.only)
        # a dropout generator per fold, seeded by (train.seed, fold): a fold's masks do not depend on its stage
        self.drop_rngs = [np.random.default_rng([train_cfg.seed, index]) for index in self.only]
        self.params: list[torch.Tensor] = []
        for linear in _linears(self.template):  # (K, in, out) weights and (K, 1, out) biases, every fold alike
            self.params.append(linear.weight.detach().t().unsqueeze(0).repeat(k, 1, 1).requires_grad_())
            self.params.append(linear.bias.detach().view(1, 1, -1).repeat(k, 1, 1).requires_grad_())
        # the weights' gradients of the closed-form path, written in place each step (AdamW's kernel has read the
        # last ones): see _gradients
        self._weight_grads = [torch.empty_like(p) for p in self.params[::2]]
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
        return self._forward(xb, params, training)[0]

    def _forward(self, xb: torch.Tensor, params: list[torch.Tensor], training: bool,
                 ) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
        """The logits, each layer's input and the multiplier between layers (ReLU's 0/1 times dropout's mask):
        what :meth:`_gradients` needs."""
        h, inputs, gates = xb, [], []
        layers = len(params) // 2
        if self.kind == "linear":
            h = self._dropout(h, training)
        for i in range(layers):
            inputs.append(h)
            h = torch.baddbmm(params[2 * i + 1], h, params[2 * i])
            if i < layers - 1:  # mlp: ReLU, dropout, then the output layer
                gate = (h > 0).to(h.dtype)
                mask = self._mask(h.shape) if training else None
                gate = gate if mask is None else gate * mask
                gates.append(gate)
                h = h * gate
        return h, inputs, gates

    def _dropout(self, h: torch.Tensor, training: bool) -> torch.Tensor:
        mask = self._mask(h.shape) if training else None
        return h if mask is None else h * mask

    def _mask(self, shape: torch.Size) -> torch.Tensor | None:
        """Inverted dropout's multiplier, from each fold's own PCG64 generator as raw 16-bit draws: an element is kept
        when its draw is at least round(p * 65536), and kept elements are scaled by 1 / (1 - that threshold / 65536),
        so the expectation is exact and the rate within 1e-5 of p. The generator's raw 64-bit output, read as four
        16-bit draws, is 4x cheaper than uniform floats (measured: 38 us against 165 us for a 32 x 1280 mask), which
        were in turn 4x cheaper than torch's CPU Bernoulli draw (then a third of a linear head's step)."""
        if not self.dropout:
            return None
        cut = min(65535, round(self.dropout * 65536))
        scale = np.float32(65536.0 / (65536 - cut))
        size = int(np.prod(shape[1:]))
        words = -(-size // 4)  # four 16-bit draws per raw 64-bit output
        masks = [rng.bit_generator.random_raw(words).view(np.uint16)[:size] >= cut for rng in self.drop_rngs]
        keep = np.stack(masks).reshape(tuple(shape)).astype(np.float32)
        keep *= scale
        return torch.from_numpy(keep)

    def _gradients(self, logits: torch.Tensor, inputs: list[torch.Tensor], gates: list[torch.Tensor], *,
                   targets: torch.Tensor, mask: torch.Tensor, include: torch.Tensor) -> list[torch.Tensor]:
        """The gradient of the included folds' summed losses (:func:`stacked_cross_entropy`) with respect to every
        stacked parameter, in closed form: for a logit z_ic of row i, (1 - e) w_yi (p_ic - [c = y_i]) +
        (e / C) (sum_c' w_c' p_ic - w_c), over the fold's sum of w_yi (e: label smoothing, w: class weights),
        then back through the layers by the chain rule. What autograd computes, without its per-step engine
        start (a fifth of a stacked head's step)."""
        cfg, classes = self.cfg, logits.shape[-1]
        probs = torch.softmax(logits, -1)
        keep = mask.to(probs.dtype)
        weight = self.class_weights
        row_w = (weight.gather(1, targets) if weight is not None else torch.ones_like(keep)) * keep
        scale = include / row_w.sum(1).clamp_min(torch.finfo(probs.dtype).tiny)  # (K,)
        grad = probs.scatter_add(-1, targets.unsqueeze(-1), -torch.ones_like(probs[..., :1]))
        grad = grad * (row_w * (1 - cfg.label_smoothing)).unsqueeze(-1)
        if cfg.label_smoothing:
            total = weight.sum(1).view(-1, 1, 1) if weight is not None else float(classes)
            per_class = weight.unsqueeze(1) if weight is not None else 1.0
            grad = grad + (total * probs - per_class) * keep.unsqueeze(-1) * (cfg.label_smoothing / classes)
        grad = grad * scale.view(-1, 1, 1)
        grads: list[torch.Tensor] = [torch.empty(0)] * len(self.params)
        for i in reversed(range(len(inputs))):
            # into a kept buffer: an MLP's (5, 1280, 256) gradient is 6.5 MB, and a fresh one every step was
            # page faults of newly mapped memory (measured: 2.4 ms against up to 3.7 ms a step)
            grads[2 * i] = torch.bmm(inputs[i].transpose(1, 2), grad, out=self._weight_grads[i])
            grads[2 * i + 1] = grad.sum(1, keepdim=True)
            if i:
                grad = torch.bmm(grad, self.params[2 * i].transpose(1, 2)) * gates[i - 1]
        return grads

    def fold_params(self, k: int) -> list[torch.Tensor]:
        """Fold ``only[k]``'s (1, in, out) weight and (1, 1, out) bias slices."""
        return [p[k:k + 1] for p in self.params]

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

    def _gather(self, rows: torch.Tensor, views: torch.Tensor | None) -> torch.Tensor:
        """(K, B, F) training rows (of view ``views`` when the features hold augmented views): ``x[rows]``, by
        ``index_select`` on the flattened table (measured: 21 us against 52 us for (5, 32, 1280) a step)."""
        width = self.x.shape[-1]
        if views is None:
            return self.x.index_select(0, rows.reshape(-1)).view(*rows.shape, width)
        flat = self.x.reshape(-1, width)  # (N * V, F): row r's view v is row r * V + v
        return flat.index_select(0, (rows * self.views + views).reshape(-1)).view(*rows.shape, width)

    def _loss(self, logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """(K,) the folds' losses on this step's rows (0 for a fold with none)."""
        cfg = self.cfg
        if cfg.loss == "ce":
            return stacked_cross_entropy(logits, targets, self.class_weights, mask, label_smoothing=cfg.label_smoothing)
        # a fold without rows: 0 with a (zero) gradient, so a step no fold of this fit has rows for still steps
        return torch.stack([self.loss_fns[k](logits[k, :n], targets[k, :n]) if n else logits[k, :0].sum()
                            for k, n in enumerate(counts)])

    def train_epoch(self, optimizer: torch.optim.Optimizer, active: list[int], epoch: int,
                    fused: _FusedAdamW | None = None) -> list[dict[str, Any]]:
        """One epoch of every active fold. With ``fused`` (cross-entropy and AdamW) the gradients are computed in
        closed form (:meth:`_gradients`) and the update is AdamW's fused kernel; otherwise autograd and
        ``optimizer``."""
        cfg, k_all = self.cfg, len(self.train_rows)
        index, views, targets, lengths = self._epoch_plan()
        include = torch.zeros(k_all)
        include[active] = 1.0
        steps = max(math.ceil(n / cfg.batch_size) for n in self.all_lengths)
        valid = torch.arange(index.shape[1]).unsqueeze(0) < torch.tensor(lengths).unsqueeze(1)  # (K, L) real rows
        logits_seen, loss_sum = [], torch.zeros(k_all)
        with torch.no_grad() if fused is not None else contextlib.nullcontext():  # no graph: closed-form gradients
            for step in range(steps):
                lo, hi = step * cfg.batch_size, (step + 1) * cfg.batch_size
                counts = [max(0, min(n, hi) - lo) for n in lengths]
                rows, step_targets, mask = index[:, lo:hi], targets[:, lo:hi], valid[:, lo:hi]
                batch = self._gather(rows, None if views is None else views[:, lo:hi])
                logits, inputs, gates = self._forward(batch, self.params, training=True)
                losses = self._loss(logits, step_targets, mask, counts)
                total = (losses * include).sum()
                value = total.item()
                if not math.isfinite(value):
                    raise NonFiniteLossError(
                        f"the training loss became {value} at epoch {epoch}, step {step}; lower the learning "
                        f"rate (e.g. train.lr={cfg.lr / 10:g}) or check the data")
                sitting_out = [k for k in active if not counts[k]]
                saved = [[p[k].detach().clone() for p in self.params] for k in sitting_out]
                if fused is not None:
                    fused.step(self._gradients(logits, inputs, gates, targets=step_targets, mask=mask,
                                               include=include))
                else:
                    optimizer.zero_grad(set_to_none=True)
                    total.backward()
                    optimizer.step()
                    self.steps_done += 1
                    after_step(optimizer, self.steps_done)
                if sitting_out:
                    with torch.no_grad():
                        for k, state in zip(sitting_out, saved, strict=True):
                            for p, value_k in zip(self.params, state, strict=True):
                                p[k].copy_(value_k)
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
    def run(self, after_epoch: Callable[[dict[str, Any]], None] | None = None) -> list[HeadFit]:
        """Train every fold of this fit; ``after_epoch(record)`` gets the first fold's record after each epoch."""
        cfg, k_all = self.cfg, len(self.train_rows)
        started_fit = time.perf_counter()
        optimizer = build_optimizer(self.params, cfg, cfg.lr)
        scheduler = build_scheduler(optimizer, cfg)
        fused = _FusedAdamW(optimizer) if cfg.loss == "ce" and _FusedAdamW.usable(optimizer) else None
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
            train = self.train_epoch(optimizer, active, epoch, fused)
            train_seconds = (time.perf_counter() - started) / len(active)  # each fold's share of the batched epoch
            lr = float(optimizer.param_groups[-1]["lr"])
            for k in active:
                val = self.evaluate(k)
                record = _record(epoch, train[k], val, lr=lr, started=started, train_seconds=train_seconds)
                record["epoch_seconds"] = (time.perf_counter() - started) / len(active)
                history[k].append(record)
                if k == 0 and after_epoch is not None:
                    after_epoch(record)
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
                with warnings.catch_warnings():  # the fused path steps AdamW's kernel, not optimizer.step
                    warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step")
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
