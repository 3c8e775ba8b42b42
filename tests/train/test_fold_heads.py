"""fit_fold_heads: every fold's head trained at once equals each fold trained alone; the logistic C path."""

import numpy as np
import pytest
import torch

from handlens.train.config import load_config
from handlens.train.fold_heads import FoldData, _FusedAdamW, fit_fold_heads, logistic_c_path
from handlens.train.head import NonFiniteLossError, fit_head
from handlens.train.losses import stacked_cross_entropy


def config(*overrides):
    return load_config(None, ["train.batch_size=16", "train.lr=0.05", "train.epochs=5", *overrides])


def five_folds(y, ragged=False):
    """Round-robin folds; ``ragged`` drops rows so that the folds' epochs have different step counts."""
    fold_of = np.arange(len(y)) % 5
    folds = []
    for k in range(5):
        train = np.flatnonzero(fold_of != k)
        if ragged:
            train = train[:len(train) - 9 * k]
        folds.append(FoldData(train, np.flatnonzero(fold_of == k), [1.0, 1.5, 0.8]))
    return folds


def alone(x, y, fold, cfg, *, plain=None):
    plain = x if plain is None else plain
    return fit_head(x[fold.train_rows], y[fold.train_rows], n_classes=3, model_cfg=cfg.model, train_cfg=cfg.train,
                    class_weights=fold.class_weights, val_x=plain[fold.val_rows], val_y=y[fold.val_rows])


@pytest.mark.parametrize("overrides", [
    ("model.head=linear",),
    ("model.head=mlp", "model.hidden=16", "train.early_stopping=2"),
    ("model.head=linear", "train.label_smoothing=0.1", "train.optimizer=sgd", "train.schedule=step",
     "train.step_size=2"),
    ("model.head=mlp", "model.hidden=8", "train.loss=focal", "train.warmup_epochs=1"),
    ("model.head=mlp", "model.hidden=8", "train.label_smoothing=0.2", "train.warmup_epochs=1"),
])
def test_stacked_folds_train_as_each_fold_alone(blobs, overrides):
    x, y = blobs(n_per_class=(40, 40, 40))
    cfg = config(*overrides)
    folds = five_folds(y)
    fits = fit_fold_heads(x, y, folds, plain=x, n_classes=3, model_cfg=cfg.model, train_cfg=cfg.train)
    for fold, fit in zip(folds, fits, strict=True):
        one = alone(x, y, fold, cfg)
        assert fit.best_epoch == one.best_epoch
        assert len(fit.history) == len(one.history)  # early stopping per fold
        assert [r["val_loss"] for r in fit.history] == pytest.approx([r["val_loss"] for r in one.history], abs=1e-5)
        assert [r["train_loss"] for r in fit.history] == pytest.approx([r["train_loss"] for r in one.history],
                                                                       abs=1e-5)
        for mine, theirs in zip(fit.head.state_dict().values(), one.head.state_dict().values(), strict=True):
            assert torch.allclose(mine, theirs, atol=1e-5)
        assert not fit.head.training and fit.info["stacked_folds"] == 5


def test_a_fold_with_fewer_steps_sits_the_extra_step_out(blobs):
    """Folds 44 rows apart: the shortest fold has fewer steps per epoch; its weights stay put in the steps it has
    no batch for (its result is still close to training it alone, not dragged by a zero-gradient step)."""
    x, y = blobs(n_per_class=(40, 40, 40))
    cfg = config("model.head=linear", "train.schedule=none", "train.epochs=1", "train.weight_decay=0")
    folds = five_folds(y, ragged=True)
    steps = {int(np.ceil(len(f.train_rows) / 16)) for f in folds}
    assert len(steps) > 1
    fits = fit_fold_heads(x, y, folds, plain=x, n_classes=3, model_cfg=cfg.model, train_cfg=cfg.train)
    for fold, fit in zip(folds, fits, strict=True):
        one = alone(x, y, fold, cfg)
        assert torch.allclose(fit.head[0].weight, one.head[0].weight, atol=1e-5)


def test_views_and_balance_and_dropout(blobs):
    x, y = blobs(n_per_class=(40, 20, 40))
    views = torch.stack([x, x + 0.01, x - 0.01], 1)  # (N, 3, F)
    cfg = config("model.head=linear", "data.balance=oversample")
    folds = five_folds(y)
    fits = fit_fold_heads(views, y, folds, plain=x, n_classes=3, model_cfg=cfg.model, train_cfg=cfg.train,
                          data_cfg=cfg.data)
    for fold, fit in zip(folds, fits, strict=True):
        one = fit_head(views[fold.train_rows], y[fold.train_rows], n_classes=3, model_cfg=cfg.model,
                       train_cfg=cfg.train, class_weights=fold.class_weights, val_x=x[fold.val_rows],
                       val_y=y[fold.val_rows], data_cfg=cfg.data)
        assert [r["val_loss"] for r in fit.history] == pytest.approx([r["val_loss"] for r in one.history], abs=1e-5)
    dropped = config("model.head=mlp", "model.hidden=16", "model.dropout=0.5")
    first = fit_fold_heads(x, y, folds, plain=x, n_classes=3, model_cfg=dropped.model, train_cfg=dropped.train)
    again = fit_fold_heads(x, y, folds, plain=x, n_classes=3, model_cfg=dropped.model, train_cfg=dropped.train)
    assert [f.history[-1]["val_loss"] for f in first] == [f.history[-1]["val_loss"] for f in again]  # seeded
    assert min(f.history[-1]["val_macro_f1"] for f in first) > 0.7


def test_after_fold_is_called_in_order_and_may_stop(blobs):
    x, y = blobs()
    cfg = config("model.head=linear")
    seen = []

    class Stop(Exception):
        pass

    def after(index, fit):
        seen.append(index)
        if index == 1:
            raise Stop

    with pytest.raises(Stop):
        fit_fold_heads(x, y, five_folds(y), plain=x, n_classes=3, model_cfg=cfg.model, train_cfg=cfg.train,
                       after_fold=after)
    assert seen == [0, 1]


def test_a_non_finite_loss_is_named_when_stacked(blobs):
    x, y = blobs()
    x[3, 0] = float("nan")
    cfg = config("model.head=linear")
    with pytest.raises(NonFiniteLossError, match="lower the learning rate"):
        fit_fold_heads(x, y, five_folds(y), plain=x, n_classes=3, model_cfg=cfg.model, train_cfg=cfg.train)


@pytest.mark.parametrize("overrides", [
    ("model.head=mlp", "model.hidden=16", "model.dropout=0.3", "train.early_stopping=2"),
    ("model.head=linear", "model.dropout=0.2", "data.balance=oversample"),
    ("model.head=linear", "data.balance=sampler", "train.loss=focal"),
])
@pytest.mark.parametrize("ragged", [False, True])
def test_a_lead_fold_trained_first_gives_the_heads_of_one_stacked_fit(blobs, overrides, ragged):
    """The first fold trained alone, then the other four stacked: each fold's history and weights are those of
    the fit of all five (same epochs, padding, dropout masks) to float rounding, so a study's trial values do not
    move."""
    x, y = blobs(n_per_class=(40, 25, 40))
    cfg = config(*overrides)
    folds = five_folds(y, ragged=ragged)
    together = fit_fold_heads(x, y, folds, plain=x, n_classes=3, model_cfg=cfg.model, train_cfg=cfg.train,
                              data_cfg=cfg.data)
    led = fit_fold_heads(x, y, folds, plain=x, n_classes=3, model_cfg=cfg.model, train_cfg=cfg.train,
                         data_cfg=cfg.data, lead=1)
    for one, other in zip(together, led, strict=True):
        assert one.best_epoch == other.best_epoch
        assert [r["val_loss"] for r in one.history] == pytest.approx([r["val_loss"] for r in other.history], abs=1e-6)
        assert [r["train_loss"] for r in one.history] == pytest.approx([r["train_loss"] for r in other.history],
                                                                       abs=1e-6)
        for mine, theirs in zip(one.head.state_dict().values(), other.head.state_dict().values(), strict=True):
            assert torch.allclose(mine, theirs, atol=1e-6)


def test_a_folds_dropout_masks_do_not_depend_on_its_stage():
    """Fold 3's masks are the same whether it trains with all five folds or with folds 1-4; another fold's differ."""
    from handlens.train.fold_heads import _StackedFit

    x, y = torch.randn(60, 8), np.arange(60) % 3
    cfg = config("model.head=linear", "model.dropout=0.4")
    folds = five_folds(y)

    def masks(only):
        fit = _StackedFit(x, y, folds, plain=x, kind="linear", names=["a", "b", "c"], model_cfg=cfg.model,
                          train_cfg=cfg.train, data_cfg=cfg.data, only=only)
        return fit._dropout(torch.ones(len(only), 16, 8), training=True)

    every, later = masks([0, 1, 2, 3, 4]), masks([1, 2, 3, 4])
    assert torch.equal(every[3], later[2]) and not torch.equal(every[3], every[2])
    kept = (every > 0).float().mean().item()
    assert 0.45 < kept < 0.75 and torch.allclose(every[every > 0], torch.tensor(1 / 0.6), atol=1e-4)


def test_a_trial_stopped_after_the_lead_fold_trains_no_other(blobs, stages_trained):
    x, y = blobs(n_per_class=(40, 40, 40))
    cfg = config("model.head=linear")
    trained = stages_trained

    class Stop(Exception):
        pass

    def prune(index, fit):
        raise Stop

    with pytest.raises(Stop):
        fit_fold_heads(x, y, five_folds(y), plain=x, n_classes=3, model_cfg=cfg.model, train_cfg=cfg.train,
                       after_fold=prune, lead=1)
    assert trained == [[0]]
    seen = []
    fit_fold_heads(x, y, five_folds(y), plain=x, n_classes=3, model_cfg=cfg.model, train_cfg=cfg.train,
                   after_fold=lambda index, fit: seen.append(index), lead=1)
    assert trained == [[0], [0], [1, 2, 3, 4]] and seen == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("smoothing", [0.0, 0.2])
@pytest.mark.parametrize("weighted", [False, True])
def test_stacked_cross_entropy_is_pytorchs_per_batch(smoothing, weighted):
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 7, 4, generator=generator)
    target = torch.randint(0, 4, (3, 7), generator=generator)
    weight = torch.rand(3, 4, generator=generator) + 0.5 if weighted else None
    counts = [7, 4, 0]
    mask = torch.arange(7)[None] < torch.tensor(counts)[:, None]
    got = stacked_cross_entropy(logits, target, weight, mask, label_smoothing=smoothing)
    for k, n in enumerate(counts):
        if not n:
            assert got[k] == 0
            continue
        loss = torch.nn.CrossEntropyLoss(weight=weight[k] if weighted else None, label_smoothing=smoothing)
        assert float(got[k]) == pytest.approx(float(loss(logits[k, :n], target[k, :n])), abs=1e-6)


def test_the_logistic_c_path_matches_the_logistic_head_at_each_c(blobs):
    x, y = blobs(n_per_class=(30, 15, 25), features=6, seed=2, spread=2.0)
    vx, _ = blobs(n_per_class=(8, 8, 8), features=6, seed=2, spread=2.0)
    cfg = config("model.head=logistic")
    grid = (0.01, 1.0)
    path = logistic_c_path(x, y, vx, n_classes=3, train_cfg=cfg.train, class_weights=[1.0, 2.0, 1.2], c_grid=grid)
    assert path.grid == grid and len(path.val_probs) == 2
    for c, probs in zip(grid, path.val_probs, strict=True):
        fixed = load_config(None, ["model.head=logistic", f"model.logistic_c={c}"])
        fit = fit_head(x, y, n_classes=3, model_cfg=fixed.model, train_cfg=fixed.train, class_weights=[1.0, 2.0, 1.2])
        assert fit.info["C"] == c and fit.info["cv"]["folds"] == 0  # a fixed C: no inner search
        with torch.no_grad():
            theirs = torch.softmax(fit.head(vx), 1).numpy()
        assert np.abs(theirs - probs).max() < 2e-3  # warm start vs cold start: the same optimum
    assert not np.allclose(path.val_probs[0], path.val_probs[1])


@pytest.mark.parametrize("head", ["linear", "mlp"])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("weighted", [False, True])
def test_closed_form_gradients_are_autograds(head, smoothing, weighted):
    """The fused path's gradients equal autograd's on the same step: padded rows, a fold left out, dropout."""
    from handlens.train.fold_heads import _StackedFit

    torch.manual_seed(0)
    x, y = torch.randn(60, 6), np.arange(60) % 3
    folds = five_folds(y)
    if not weighted:
        folds = [FoldData(f.train_rows, f.val_rows) for f in folds]
    cfg = config(f"model.head={head}", "model.hidden=5", "model.dropout=0.3", f"train.label_smoothing={smoothing}")
    fit = _StackedFit(x, y, folds, plain=x, kind=head, names=["a", "b", "c"], model_cfg=cfg.model, train_cfg=cfg.train,
                      data_cfg=cfg.data)
    with torch.no_grad():
        for param in fit.params:
            param.add_(torch.randn_like(param) * 0.3)
    batch, targets = torch.randn(5, 7, 6), torch.randint(0, 3, (5, 7))
    mask = torch.arange(7).unsqueeze(0) < torch.tensor([7, 7, 3, 0, 7]).unsqueeze(1)
    include = torch.tensor([1.0, 1.0, 1.0, 1.0, 0.0])
    state = [rng.bit_generator.state for rng in fit.drop_rngs]
    logits, inputs, gates = fit._forward(batch, fit.params, training=True)
    losses = stacked_cross_entropy(logits, targets, fit.class_weights, mask, label_smoothing=smoothing)
    (losses * include).sum().backward()
    expected = [param.grad.clone() for param in fit.params]
    for rng, saved in zip(fit.drop_rngs, state, strict=True):
        rng.bit_generator.state = saved
    with torch.no_grad():
        logits, inputs, gates = fit._forward(batch, fit.params, training=True)
        got = fit._gradients(logits, inputs, gates, targets=targets, mask=mask, include=include)
    for mine, theirs in zip(got, expected, strict=True):
        assert torch.allclose(mine, theirs, atol=1e-6)
    assert got[0][4].abs().sum() == 0 and got[0][3].abs().sum() == 0  # left out; no rows


def test_the_lead_folds_epochs_are_reported_and_a_stop_there_trains_no_other_fold(blobs, stages_trained):
    x, y = blobs(n_per_class=(40, 40, 40))
    cfg = config("model.head=linear", "train.epochs=4")
    trained, epochs = stages_trained, []

    class Stop(Exception):
        pass

    def after_epoch(record):
        epochs.append(record["epoch"])
        assert "val_macro_f1" in record
        if record["epoch"] == 2:
            raise Stop

    with pytest.raises(Stop):
        fit_fold_heads(x, y, five_folds(y), plain=x, n_classes=3, model_cfg=cfg.model, train_cfg=cfg.train,
                       lead=1, lead_epoch=after_epoch)
    assert trained == [[0]] and epochs == [1, 2]
    epochs.clear()
    fit_fold_heads(x, y, five_folds(y), plain=x, n_classes=3, model_cfg=cfg.model, train_cfg=cfg.train,
                   lead=1, lead_epoch=lambda record: epochs.append(record["epoch"]))
    assert epochs == [1, 2, 3, 4] and trained[-1] == [1, 2, 3, 4]  # the other folds report no epoch


def test_the_fused_adamw_step_keeps_its_moments_out_of_the_denormal_range():
    """A stacked head's moments are the fused step's own: flushed like fit_head's (denormals are ~25x slower)."""
    ours, theirs = torch.zeros(2, 8, 3, requires_grad=True), torch.zeros(2, 8, 3, requires_grad=True)
    fused = _FusedAdamW(torch.optim.AdamW([ours], lr=1e-3, fused=True))
    reference = torch.optim.AdamW([theirs], lr=1e-3, fused=True)
    for step in range(1, 801):  # a gradient for ten steps, then none: the first moment decays by 0.9 a step
        grad = torch.full((2, 8, 3), 1e-4 if step <= 10 else 0.0)
        fused.step([grad])
        theirs.grad = grad.clone()
        reference.step()
    tiny = torch.finfo(torch.float32).tiny
    assert int(((reference.state[theirs]["exp_avg"].abs() < tiny) & (reference.state[theirs]["exp_avg"] != 0)).sum())
    assert torch.equal(fused.exp_avgs[0], torch.zeros(2, 8, 3))
    torch.testing.assert_close(ours.detach(), theirs.detach())
