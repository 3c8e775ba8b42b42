"""fit_head: gradient heads on features (best epoch, ties, reporting, refits) and the logistic probe."""

import copy
import subprocess
import sys

import numpy as np
import pytest
import torch

import handlens.train.head as head_module
from handlens.core.errors import InputError
from handlens.train.config import load_config
from handlens.train.head import C_GRID, after_step, better, fit_head, flush_tiny, resolve_head


def config(*overrides):
    return load_config(None, ["train.batch_size=16", "train.lr=0.05", "train.epochs=6", *overrides])


def test_a_linear_head_trains_keeps_its_best_epoch_and_reports_every_epoch(blobs):
    x, y = blobs()
    vx, vy = blobs(n_per_class=(10, 10, 10), seed=0)
    cfg = config("model.head=linear")
    seen = []
    fit = fit_head(x, y, n_classes=3, model_cfg=cfg.model, train_cfg=cfg.train, class_weights=None,
                   val_x=vx, val_y=vy, report=lambda epoch, f1: seen.append((epoch, f1)))
    assert [h["epoch"] for h in fit.history] == list(range(1, 7))
    assert [e for e, _ in seen] == list(range(1, 7))
    assert {"train_loss", "val_loss", "val_macro_f1", "val_accuracy", "lr"} <= set(fit.history[0])
    best = max(fit.history, key=lambda h: (h["val_macro_f1"], -h["val_loss"]))
    assert fit.best_epoch == best["epoch"] and not fit.head.training
    with torch.no_grad():
        accuracy = float((fit.head(vx).argmax(1).numpy() == vy).mean())
    assert accuracy == pytest.approx(best["val_accuracy"], abs=1e-6)  # the kept weights are that epoch's
    assert best["val_macro_f1"] > 0.8


def test_tied_epochs_go_to_the_lowest_loss_and_the_kept_weights_are_that_epochs(monkeypatch, blobs):
    losses = iter([0.50, 0.31, 0.30, 0.30, 0.32, 0.40])
    states = []

    def fake_evaluate(head, x, y, loss_fn, *, batch_size, names):
        states.append(copy.deepcopy(head.state_dict()))
        return {"n": len(y), "accuracy": 0.9, "macro_f1": 0.9, "roc_auc": None, "loss": next(losses)}

    monkeypatch.setattr(head_module, "_evaluate", fake_evaluate)
    x, y = blobs()
    cfg = config("model.head=linear")
    fit = fit_head(x, y, n_classes=3, model_cfg=cfg.model, train_cfg=cfg.train, class_weights=None,
                   val_x=x[:9], val_y=y[:9])
    assert fit.best_epoch == 3
    for key, value in fit.head.state_dict().items():
        assert torch.equal(value, states[2][key]), key


def test_a_pruning_exception_from_report_propagates(blobs):
    class Pruned(Exception):
        pass

    def report(epoch, f1):
        if epoch == 2:
            raise Pruned

    x, y = blobs()
    cfg = config("model.head=mlp", "model.hidden=16")
    with pytest.raises(Pruned):
        fit_head(x, y, n_classes=3, model_cfg=cfg.model, train_cfg=cfg.train, class_weights=None,
                 val_x=x, val_y=y, report=report)


def test_a_refit_runs_exactly_its_epochs_and_keeps_the_last(blobs):
    x, y = blobs()
    cfg = config("model.head=linear", "train.early_stopping=1", "train.schedule=step", "train.step_size=1")
    fit = fit_head(x, y, n_classes=3, model_cfg=cfg.model, train_cfg=cfg.train, class_weights=[1.0, 2.0, 1.0],
                   epochs=4)
    assert len(fit.history) == 4 and fit.best_epoch == 4
    assert fit.history[-1]["lr"] < fit.history[0]["lr"]  # the schedule spans the refit's own epochs


def test_early_stopping_on_validation(blobs):
    x, y = blobs()
    cfg = config("model.head=linear", "train.early_stopping=1", "train.epochs=30", "train.lr=0.5")
    fit = fit_head(x, y, n_classes=3, model_cfg=cfg.model, train_cfg=cfg.train, class_weights=None,
                   val_x=x[:6], val_y=y[:6])
    assert len(fit.history) < 30 and fit.info["stopped_early"]


def test_views_draw_one_view_per_sample_and_the_seed_repeats_the_fit(blobs):
    x, y = blobs()
    views = torch.stack([x, x + 0.1, x - 0.1], dim=1)
    cfg = config("model.head=linear", "train.seed=4")
    state = torch.get_rng_state()
    one = fit_head(views, y, n_classes=3, model_cfg=cfg.model, train_cfg=cfg.train, class_weights=None)
    two = fit_head(views, y, n_classes=3, model_cfg=cfg.model, train_cfg=cfg.train, class_weights=None)
    assert torch.equal(torch.get_rng_state(), state)  # the caller's RNG is untouched
    assert [h["train_loss"] for h in one.history] == [h["train_loss"] for h in two.history]
    assert one.head(x).shape == (90, 3)


def test_a_non_finite_loss_is_named(blobs):
    x, y = blobs()
    x[0, 0] = float("nan")
    cfg = config("model.head=linear")
    with pytest.raises(head_module.NonFiniteLossError, match="lower the learning rate"):
        fit_head(x, y, n_classes=3, model_cfg=cfg.model, train_cfg=cfg.train, class_weights=None)


# ------------------------------------------------------------------------------------------------ logistic


def sklearn_probs(x, y, c, test, *, class_weight=None):
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    model = make_pipeline(StandardScaler(), LogisticRegression(C=c, class_weight=class_weight, max_iter=500))
    return model.fit(x.double().numpy(), y).predict_proba(test.double().numpy())


def test_the_logistic_probe_is_the_careful_baseline_folded_into_a_plain_linear_layer(blobs):
    x, y = blobs(n_per_class=(40, 12, 20), features=12, seed=3, spread=2.5)
    test, _ = blobs(n_per_class=(5, 5, 5), features=12, seed=3, spread=2.5)
    cfg = config("model.head=logistic")
    counts = np.bincount(y)
    balanced = [float(len(y) / (3 * n)) for n in counts]  # inverse-frequency class weights (train.class_weights=auto)
    seen = []
    fit = fit_head(x, y, n_classes=3, model_cfg=cfg.model, train_cfg=cfg.train, class_weights=balanced,
                   val_x=test, val_y=np.arange(15) % 3, report=lambda e, f1: seen.append(e))
    linear = fit.head[0]
    assert isinstance(linear, torch.nn.Linear) and len(fit.head) == 1
    assert fit.best_epoch == 1 and len(fit.history) == 1 and seen == [1]
    cv = fit.info["cv"]
    assert cv["folds"] == 5 and cv["grid"] == list(C_GRID) and fit.info["C"] in C_GRID
    chosen = max(range(len(C_GRID)), key=lambda i: (cv["oof_macro_f1"][i], -cv["oof_log_loss"][i]))
    assert fit.info["C"] == C_GRID[chosen]
    assert fit.history[0]["logistic_C"] == fit.info["C"]
    with torch.no_grad():
        ours = torch.softmax(fit.head(test).double(), 1).numpy()
    np.testing.assert_allclose(ours, sklearn_probs(x, y, fit.info["C"], test, class_weight="balanced"), atol=2e-4)


def test_binary_views_and_missing_classes(blobs):
    x, y = blobs(n_per_class=(20, 20), features=6, seed=1)
    cfg = config("model.head=logistic")
    fit = fit_head(x, y, n_classes=2, model_cfg=cfg.model, train_cfg=cfg.train, class_weights=None)
    with torch.no_grad():
        ours = torch.softmax(fit.head(x).double(), 1).numpy()
    np.testing.assert_allclose(ours, sklearn_probs(x, y, fit.info["C"], x), atol=2e-4)
    views = torch.stack([x, x * 1.01], dim=1)
    assert fit_head(views, y, n_classes=2, model_cfg=cfg.model, train_cfg=cfg.train,
                    class_weights=None).info["rows"] == 80
    absent = fit_head(x, y, n_classes=3, model_cfg=cfg.model, train_cfg=cfg.train, class_weights=None)
    with torch.no_grad():
        assert float(torch.softmax(absent.head(x), 1)[:, 2].max()) < 1e-6  # a class never seen is never predicted


def test_logistic_refuses_what_it_cannot_honour_and_auto_picks_it_only_for_plain_cross_entropy(blobs):
    x, y = blobs()
    cfg = config("model.head=logistic", "train.loss=focal")
    with pytest.raises(InputError, match="plain cross-entropy"):
        fit_head(x, y, n_classes=3, model_cfg=cfg.model, train_cfg=cfg.train, class_weights=None)
    with pytest.raises(InputError, match="at least 2 classes"):
        fit_head(x[:5], np.zeros(5, dtype=np.int64), n_classes=3, model_cfg=config().model,
                 train_cfg=config().train, class_weights=None)
    auto = config()
    assert resolve_head(auto.model, auto.train, on_features=True) == "logistic"
    assert resolve_head(auto.model, auto.train, on_features=False) == "linear"
    smooth = config("train.label_smoothing=0.1")
    assert resolve_head(smooth.model, smooth.train, on_features=True) == "linear"


def test_ties_compare_metric_then_loss():
    assert better((0.5, 1.0), None, "max")
    assert better((0.5, 0.9), (0.5, 1.0), "min")  # min mode: same tie rule


def test_the_head_module_imports_no_lightning():
    code = ("import sys, numpy as np, torch\n"
            "from handlens.train.head import fit_head\n"
            "from handlens.train.config import load_config\n"
            "import handlens.train.run, handlens.train.features\n"
            "cfg = load_config(None, ['train.epochs=2'])\n"
            "x = torch.randn(20, 4); y = np.arange(20) % 2\n"
            "fit_head(x, y, n_classes=2, model_cfg=cfg.model, train_cfg=cfg.train, class_weights=None)\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'lightning'))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"


def test_grouped_inner_cv_keeps_each_group_in_one_fold():
    from handlens.train.head import image_folds

    y = np.array([0] * 12 + [1] * 12)
    groups = [f"s{i // 3}" for i in range(24)]  # 8 samples of 3 images, 4 per class
    fold, k = image_folds(y, 5, seed=0, groups=groups)
    assert k == 4  # as many folds as the rarest class has groups
    for g in set(groups):
        assert len({int(fold[i]) for i, name in enumerate(groups) if name == g}) == 1
    plain, k_plain = image_folds(y, 5, seed=0)
    assert k_plain == 5 and any(len({int(plain[i]) for i, n in enumerate(groups) if n == g}) > 1 for g in set(groups))


# -- tiny optimizer moments (denormal floats are ~25x slower on a CPU)


def _denormals(tensor: torch.Tensor) -> int:
    return int(((tensor != 0) & (tensor.abs() < torch.finfo(tensor.dtype).tiny)).sum())


def _adamw_on_a_channel_that_goes_quiet(steps: int, *, flush: bool) -> torch.optim.Optimizer:
    """A weight whose gradient is 1e-4 for ten steps and then exactly zero (an input channel that is zero in
    the rest of the images): its first moment decays by beta1 every step."""
    weight = torch.nn.Parameter(torch.zeros(64))
    optimizer = torch.optim.AdamW([weight], lr=1e-3, fused=True)
    for step in range(1, steps + 1):
        weight.grad = torch.full_like(weight, 1e-4 if step <= 10 else 0.0)
        optimizer.step()
        if flush:
            after_step(optimizer, step)
    return optimizer


def test_a_quiet_channels_first_moment_turns_denormal_unless_flushed():
    unflushed = _adamw_on_a_channel_that_goes_quiet(800, flush=False)
    assert _denormals(unflushed.state[unflushed.param_groups[0]["params"][0]]["exp_avg"]) == 64  # what it fixes
    flushed = _adamw_on_a_channel_that_goes_quiet(800, flush=True)
    state = flushed.state[flushed.param_groups[0]["params"][0]]
    assert _denormals(state["exp_avg"]) == 0 and _denormals(state["exp_avg_sq"]) == 0
    assert torch.equal(state["exp_avg"], torch.zeros(64))
    # the weights moved as without the flush, to float rounding
    torch.testing.assert_close(flushed.param_groups[0]["params"][0], unflushed.param_groups[0]["params"][0])


def test_flush_tiny_zeroes_only_what_is_below_the_threshold():
    values = torch.tensor([1e-31, -1e-31, 2e-30, -2e-30, 1e-39, 0.5, -3.0])
    flush_tiny([values])
    assert values.tolist() == pytest.approx([0.0, 0.0, 2e-30, -2e-30, 0.0, 0.5, -3.0], rel=1e-6, abs=0)
