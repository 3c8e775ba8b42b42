"""The best checkpoint: ties on the monitored metric go to the lower validation loss, exactly."""

from types import SimpleNamespace

import numpy as np
import torch

from handlens.train.head import better
from handlens.train.module import TieBreakCheckpoint
from handlens.train.run import train
from tests.conftest import tiny_config

F1 = 0.9  # float32(0.9) - 1e-6 * loss cannot tell losses 0.01 apart: the old score kept the first tied epoch


def test_an_epsilon_score_cannot_break_this_tie_but_the_exact_comparison_does():
    assert np.float32(F1 - 1e-6 * 0.500) == np.float32(F1 - 1e-6 * 0.490)
    assert better((F1, 0.49), (F1, 0.50), "max") and not better((F1, 0.50), (F1, 0.49), "max")
    assert not better((F1, 0.30), (F1, 0.30), "max")  # a full tie keeps the earlier epoch
    assert better((0.91, 5.0), (F1, 0.1), "max") and better((0.2, 5.0), (0.3, 0.1), "min")
    assert not better((float("nan"), 0.1), (F1, 0.3), "max")


def _drive(callback, epochs, metrics):
    """Feed (epoch, val_macro_f1, val_loss) through the callback's real decision code; returns saved epochs."""
    saved = []
    for epoch, (f1, loss) in zip(epochs, metrics, strict=True):
        trainer = SimpleNamespace(callback_metrics={"val_macro_f1": torch.tensor(f1), "val_loss": torch.tensor(loss)},
                                  strategy=SimpleNamespace(reduce_boolean_decision=lambda decision: decision))
        callback._save_checkpoint = lambda trainer, path, epoch=epoch: saved.append(epoch)
        callback._get_metric_interpolated_filepath_name = lambda *args: "best.ckpt"
        callback._save_monitor_checkpoint(trainer, {"val_macro_f1": torch.tensor(f1), "epoch": epoch, "step": 0})
    return saved


def test_the_callback_keeps_the_lowest_loss_of_tied_epochs_and_remembers_it_across_a_resume(tmp_path):
    sequence = [(F1, 0.50), (F1, 0.31), (F1, 0.30), (F1, 0.30), (F1, 0.32), (0.8, 0.01)]

    def make():
        return TieBreakCheckpoint(dirpath=tmp_path, filename="best", monitor="val_macro_f1", mode="max",
                                  save_top_k=1, enable_version_counter=False, tie_metric="val_loss")

    whole = make()
    saved = _drive(whole, range(1, 7), sequence)
    assert saved == [1, 2, 3]  # epoch 4 ties epoch 3 exactly: the earlier stays; epoch 6 has a lower F1
    assert whole.best_tie_value == np.float32(0.30)
    first = make()
    assert _drive(first, range(1, 3), sequence[:2]) == [1, 2]
    resumed = make()
    resumed.load_state_dict(first.state_dict())  # what a resume restores from last.ckpt
    assert resumed.best_tie_value == first.best_tie_value
    assert _drive(resumed, range(3, 7), sequence[2:]) == [3]


def test_a_run_whose_val_f1_never_changes_keeps_its_lowest_loss_epoch(trained_workspace, monkeypatch):
    import handlens.train.module as module

    real = module.classification_metrics

    def constant_f1(probs, target, classes):
        out = real(probs, target, classes)
        out["macro_f1"] = F1
        return out

    monkeypatch.setattr(module, "classification_metrics", constant_f1)
    result = train(tiny_config("train.epochs=5", "train.lr=0.05"), trained_workspace)
    losses = [h["val_loss"] for h in result.history]
    assert {h["val_macro_f1"] for h in result.history} == {F1}
    assert result.best_epoch == int(np.argmin(losses)) + 1
    best = torch.load(result.run_dir / "checkpoints" / "best.ckpt", map_location="cpu", weights_only=True)
    assert best["epoch"] + 1 == result.best_epoch
