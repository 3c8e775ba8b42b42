"""The LightningModule in a Lightning loop of its own, outside a whole run."""

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from tests.conftest import tiny_config


class _PlantTiny(pl.Callback):
    """Before step ``at``: the first moment of weight[:, 0] (its input channel is always zero, so its gradient is
    exactly zero and AdamW only decays the moment) set to a denormal 1e-35. ``after[n]``: the moments as the
    next batch finds them after n steps (the module's own batch-end hooks run after the callbacks')."""

    def __init__(self, at: int) -> None:
        self.at, self.after = at, {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        state = trainer.optimizers[0].state.get(pl_module.model.weight)
        if state:
            self.after[trainer.global_step] = state["exp_avg"].clone()
        if trainer.global_step == self.at:
            state["exp_avg"][:, 0] = 1e-35


def test_a_lightning_fit_flushes_its_optimizers_tiny_moments():
    """A Lightning fit (fine-tuning's loop) flushes AdamW's tiny moments every FLUSH_EVERY steps, as fit_head does
    for a head on features: a moment planted at 1e-35 decays (x0.9) until the flush step, then is exactly zero,
    while moments of weights with gradients are untouched."""
    from handlens.train.head import FLUSH_EVERY
    from handlens.train.module import ClassifierModule

    torch.manual_seed(0)
    x = torch.randn(64, 3)
    x[:, 0] = 0.0
    y = (x[:, 1] > 0).long()
    cfg = tiny_config("train.optimizer=adamw", "train.schedule=none", "train.epochs=3").train
    module = ClassifierModule(torch.nn.Linear(3, 2), ["a", "b"], cfg, lambda batch, **_: batch,
                              class_weights=None, on_features=True)
    plant = _PlantTiny(at=FLUSH_EVERY - 3)
    trainer = pl.Trainer(max_steps=FLUSH_EVERY + 2, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False, limit_val_batches=0,
                         accelerator="cpu", devices=1, callbacks=[plant])
    trainer.fit(module, train_dataloaders=DataLoader(TensorDataset(x, y), batch_size=8))
    before_flush = plant.after[FLUSH_EVERY - 1][:, 0]
    assert torch.all((before_flush > 0) & (before_flush < 1e-30))  # decaying, not yet flushed
    assert torch.all(plant.after[FLUSH_EVERY][:, 0] == 0)  # the flush at step FLUSH_EVERY
    assert torch.all(plant.after[FLUSH_EVERY][:, 1:].abs() > 1e-30)  # weights with gradients keep their moments
