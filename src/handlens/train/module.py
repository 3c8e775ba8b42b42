"""The LightningModule: one loop for images (fine-tuning) and for cached features (frozen backbones)."""

from __future__ import annotations

import io
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn

from handlens.train.checkpoint_files import previous_checkpoint, write_atomically
from handlens.train.head import NonFiniteLossError, after_step, better, build_scheduler
from handlens.train.losses import build_loss
from handlens.train.metrics import classification_metrics, scalar_metrics
from handlens.transforms.patches import mean_by_image

__all__ = ["AtomicCheckpointIO", "ClassifierModule", "EpochRecorder", "NonFiniteLossError", "StopRequest",
           "TieBreakCheckpoint", "build_scheduler", "gather_outputs", "previous_checkpoint", "unshard",
           "write_atomically"]


class ClassifierModule(pl.LightningModule):
    """Trains ``model`` on uint8 image batches, or (``on_features``) a head on cached feature vectors.

    Per-epoch metrics for train and val are computed from all of the epoch's predictions and kept in
    ``history``; the scalar ones are logged for checkpointing, early stopping and tracking.
    """

    def __init__(self, model: nn.Module, classes: list[str], train_cfg: Any,
                 normalize: Any, *, class_weights: list[float] | None, on_features: bool = False,
                 body_params: list[nn.Parameter] | None = None, mixer: Any = None) -> None:
        super().__init__()
        self.model = model
        self.classes = classes
        self.cfg = train_cfg
        # (batch, in_place=False) -> model input (Preprocess.normalize_batch): uint8 pixels, or float 0..255
        # from the train loader's augmentation, which in_place=True overwrites
        self.normalize = normalize
        self.mixer = mixer  # (x, y) -> (x, soft targets): mixup/cutmix (transforms.policy.batch_mixer)
        self.on_features = on_features
        self.body_param_ids = {id(p) for p in (body_params or [])}
        weight = torch.tensor(class_weights, dtype=torch.float32) if class_weights else None
        self.loss_fn = build_loss(train_cfg.loss, weight, train_cfg.label_smoothing, train_cfg.focal_gamma)
        self.lr = train_cfg.lr
        self.history: list[dict[str, Any]] = []
        self._recorded = False
        self._val_metrics: dict[str, Any] | None = None
        #: called with each epoch's record once it is complete (reporting, tracking, resume state)
        self.epoch_listeners: list[Any] = []
        self._outputs: dict[str, list[tuple[torch.Tensor, ...]]] = {"train": [], "val": []}
        self._loss_sums: dict[str, float] = {"train": 0.0, "val": 0.0}

    def on_train_epoch_start(self) -> None:
        self._epoch_started = time.perf_counter()
        self._train_seconds: float | None = None

    def on_validation_start(self) -> None:
        # fit's own validation (trainer.training is already False here: the stage is validating)
        fitting = self.trainer.state.fn == "fit" and not self.trainer.sanity_checking
        if fitting and getattr(self, "_train_seconds", 0.0) is None:
            self._train_seconds = time.perf_counter() - self._epoch_started

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.on_features:
            x = self.normalize(x)
        return self.model(x)

    def _step(self, batch: Any, stage: str) -> torch.Tensor:
        """One batch: (inputs, targets) or, for grid patches, (inputs, targets, image indices)."""
        x, y = batch[0], batch[1]
        image_index = batch[2] if len(batch) > 2 else None
        if not self.on_features:
            # a float batch is the train loader's own augmented copy: normalised in place, no new tensor
            x = self.normalize(x, in_place=stage == "train" and x.is_floating_point())
        if stage == "train" and not self.on_features and self.mixer is not None:
            mixed, soft = self.mixer(x, y)
            logits = self.model(mixed)
            loss = self.loss_fn(logits, soft)
        else:
            logits = self.model(x)
            loss = self.loss_fn(logits, y)
        if stage == "train" and not torch.isfinite(loss):
            raise NonFiniteLossError(
                f"the training loss became {loss.item()} at epoch {self.current_epoch + 1}, step "
                f"{self.global_step}; lower the learning rate (e.g. train.lr={self.lr / 10:g}) or check the data. "
                "The last good checkpoint is kept"
            )
        output = (torch.softmax(logits.detach().float(), 1).cpu(), y.cpu())
        self._outputs[stage].append(output if image_index is None else (*output, image_index.cpu()))
        self._loss_sums[stage] += float(loss.detach()) * len(y)
        self.log(f"{stage}_loss", loss.detach(), on_step=False, on_epoch=True, prog_bar=stage == "val",
                 batch_size=len(y), sync_dist=self._world_size() > 1)  # DDP: the mean over every process's samples
        return loss

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self._step(batch, "train")

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        """The optimizer's tiny moments flushed every few steps (:func:`~handlens.train.head.after_step`), as for
        a head fitted on features: a weight that rarely gets a gradient (a mostly-zero input channel) would
        otherwise have its AdamW moment decay into denormal floats, ~25x slower on a CPU. ``global_step`` counts
        optimizer steps (a batch of an accumulation that did not step flushes again, which changes nothing)."""
        after_step(self.optimizers(use_pl_optimizer=False), self.trainer.global_step)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._step(batch, "val")

    def _world_size(self) -> int:
        trainer = self._trainer
        return trainer.world_size if trainer is not None and torch.distributed.is_initialized() else 1

    def _epoch_metrics(self, stage: str) -> dict[str, Any]:
        """The epoch's metrics from all of its predictions; under DDP from every process's (the same on all of
        them, so that checkpoints, early stopping and the history agree)."""
        outputs, loss_sum = self._outputs[stage], self._loss_sums[stage]
        self._outputs[stage], self._loss_sums[stage] = [], 0.0
        columns = [torch.cat(column) for column in zip(*outputs, strict=True)]  # probs, targets[, image indices]
        n_losses = len(columns[1]) if columns else 0  # the loss was summed per sample (per patch for grid patches)
        if self._world_size() > 1:  # every process takes part, with or without outputs of its own
            columns, loss_sum, n_losses = gather_outputs(columns, loss_sum, n_losses,
                                                         n_items=self._unpadded_size(stage))
        if not columns or not len(columns[1]):
            return {}
        probs, target = columns[0], columns[1]
        if len(columns) > 2:  # grid patches: metrics of the image-level (mean probability) predictions
            probs, target = image_level(probs, target, columns[2])
        metrics = classification_metrics(probs, target, self.classes)
        metrics["loss"] = loss_sum / max(1, n_losses)
        return metrics

    def _unpadded_size(self, stage: str) -> int | None:
        """The val set's size when its loader is Lightning's DistributedSampler in order (shuffle and drop_last
        off): its shards can then be put back into dataset order and its padding dropped (see
        :func:`unshard`). None otherwise (train: shuffled; a duplicate or two there changes little)."""
        if stage != "val":
            return None
        loaders = self.trainer.val_dataloaders
        loader = loaders[0] if isinstance(loaders, list | tuple) else loaders
        sampler = getattr(loader, "sampler", None)
        if isinstance(sampler, torch.utils.data.DistributedSampler) and not sampler.shuffle and not sampler.drop_last:
            return len(sampler.dataset)  # type: ignore[arg-type]
        return None

    def on_validation_epoch_end(self) -> None:
        metrics = self._epoch_metrics("val")
        if self.trainer.sanity_checking or not metrics:
            return
        self._val_metrics = metrics
        scalars = scalar_metrics(metrics, "val")
        for key, value in scalars.items():
            self.log(key, value, prog_bar=key == "val_macro_f1")

    def on_train_epoch_end(self) -> None:
        if not self._recorded:  # no validation this epoch: record now (the recorder callback ran first)
            self.record_epoch(log_train=True)
        self._recorded = False

    def record_epoch(self, log_train: bool = False) -> None:
        """Append this epoch's record to ``history`` and tell the listeners.

        Called by :class:`EpochRecorder` *before* the checkpoint callbacks save the epoch, so a
        checkpoint always carries the history up to and including its own epoch (see
        ``on_save_checkpoint``): a resumed run neither repeats nor loses epochs in its history.
        """
        train = self._epoch_metrics("train")
        scalars = scalar_metrics(train, "train")
        if log_train:
            for key, value in scalars.items():
                self.log(key, value)
        val = getattr(self, "_val_metrics", None)
        record: dict[str, Any] = {"epoch": self.current_epoch + 1}
        if "loss" in train:
            record["train_loss"] = float(train["loss"])
        record.update(scalars)
        if val:
            record["val_loss"] = float(val["loss"])
            record.update(scalar_metrics(val, "val"))
        now = time.perf_counter()
        record["lr"] = float(self.trainer.optimizers[0].param_groups[-1]["lr"]) if self.trainer.optimizers else None
        record["val"], record["train"] = val, train
        record["epoch_seconds"] = now - self._epoch_started
        record["train_seconds"] = self._train_seconds if self._train_seconds is not None else record["epoch_seconds"]
        self.history.append(record)
        self._val_metrics = None
        self._recorded = True
        for listener in self.epoch_listeners:
            listener(record)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["handlens_history"] = self.history  # plain JSON-like data: loads with weights_only=True

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.history[:] = checkpoint.get("handlens_history", [])

    # ------------------------------------------------------------------ optimisation

    def configure_optimizers(self) -> Any:
        cfg = self.cfg
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        body = [p for p in trainable if id(p) in self.body_param_ids]
        rest = [p for p in trainable if id(p) not in self.body_param_ids]
        groups = [{"params": rest, "lr": self.lr}]
        if body:
            groups.insert(0, {"params": body, "lr": self.lr * cfg.body_lr_mult})
        if cfg.optimizer == "sgd":
            optimizer = torch.optim.SGD(groups, lr=self.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                                        nesterov=True)
        else:
            optimizer = torch.optim.AdamW(groups, lr=self.lr, weight_decay=cfg.weight_decay)
        scheduler = build_scheduler(optimizer, cfg)
        if scheduler is None:
            return optimizer
        if cfg.schedule == "plateau":
            return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "monitor": cfg.monitor,
                                                             "interval": "epoch", "strict": False}}
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}


def gather_outputs(columns: list[torch.Tensor], loss_sum: float, n_losses: int, *,
                   n_items: int | None = None) -> tuple[list[torch.Tensor], float, int]:
    """One process's epoch outputs (probabilities, targets[, image indices]) and loss sum -> every process's,
    identical on all of them (a collective call: every process of the group makes it).

    ``n_items``: the dataset's size when each process's outputs are its shard of an in-order DistributedSampler
    (the val loader): the shards are interleaved back into dataset order and the sampler's padding (the first
    samples again, so that every process gets as many) is dropped, so val metrics count each image once. The
    loss sum keeps the padding's few samples (it is summed per process)."""
    import torch.distributed as dist

    parts: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, ([c.cpu() for c in columns], float(loss_sum), int(n_losses)))
    loss_sum, n_losses = sum(p[1] for p in parts), sum(p[2] for p in parts)
    shards = [p[0] for p in parts if p[0]]  # a process without outputs (an empty epoch) adds none
    if not shards:
        return [], loss_sum, n_losses
    in_order = n_items if len(shards) == len(parts) else None
    return [unshard([s[i] for s in shards], in_order) for i in range(len(shards[0]))], loss_sum, n_losses


def unshard(pieces: list[torch.Tensor], n_items: int | None) -> torch.Tensor:
    """Per-process outputs of an in-order DistributedSampler (process ``r`` got samples ``r, r + W, r + 2W...``
    of the dataset padded with its first samples to a multiple of ``W``) -> the dataset's ``n_items`` outputs in
    dataset order; plain concatenation when ``n_items`` is None or the pieces are not such shards."""
    world = len(pieces)
    length = len(pieces[0])
    if n_items is None or any(len(p) != length for p in pieces) or -(-n_items // world) != length:
        return torch.cat(pieces)
    stacked = torch.stack(pieces)  # (W, L, ...): piece r holds samples r, r + W, ...
    return stacked.transpose(0, 1).reshape(world * length, *stacked.shape[2:])[:n_items]


def image_level(probs: torch.Tensor, target: torch.Tensor, image_index: torch.Tensor) -> tuple[torch.Tensor,
                                                                                             torch.Tensor]:
    """Patch probabilities and targets -> one mean-probability prediction and one target per image."""
    n_images = int(image_index.max()) + 1 if len(image_index) else 0
    image_target = torch.zeros(n_images, dtype=target.dtype).index_copy_(0, image_index, target)
    return mean_by_image(probs, image_index, n_images), image_target


class EpochRecorder(pl.Callback):
    """Records the epoch once validation has finished, before Lightning's checkpoint callbacks run."""

    def on_validation_end(self, trainer: pl.Trainer, pl_module: ClassifierModule) -> None:
        if not trainer.sanity_checking and trainer.state.fn == "fit":
            pl_module.record_epoch()


class TieBreakCheckpoint(ModelCheckpoint):
    """Keeps the best epoch by the monitored metric, a tie on it going to the lower ``tie_metric`` (a loss).

    Macro-F1 on a small validation set often ties across epochs (1.0 from epoch 1 on an easy task, or the
    same 0.9 for several epochs); keeping the first tied epoch would keep the least-trained model. The
    comparison is exact, in float64, on (metric, loss): no ``metric - eps * loss`` score, which float32
    cannot resolve next to an F1 of 0.9. The kept epoch's loss is part of the callback's state, so a
    resumed run breaks ties against it too.
    """

    def __init__(self, *args: Any, tie_metric: str = "val_loss", **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.tie_metric = tie_metric
        self.best_tie_value: float | None = None
        self._pending_tie: float | None = None

    def _tie_value(self, trainer: pl.Trainer) -> float:
        value = trainer.callback_metrics.get(self.tie_metric)
        return float(value) if value is not None else float("nan")

    def check_monitor_top_k(self, trainer: pl.Trainer, current: torch.Tensor | None = None) -> bool:
        if current is None:
            return False
        tie = self._tie_value(trainer)
        if self.save_top_k != 1 or not self.best_k_models:
            decision = super().check_monitor_top_k(trainer, current)
        else:
            best = float(self.best_k_models[self.kth_best_model_path])
            decision = better((float(current), tie), (best, self.best_tie_value if self.best_tie_value is not None
                                                      else float("nan")), self.mode)
            decision = trainer.strategy.reduce_boolean_decision(bool(decision))
        self._pending_tie = tie if decision else None
        return decision

    def _update_best_and_save(self, current: torch.Tensor, trainer: pl.Trainer,
                              monitor_candidates: dict[str, torch.Tensor]) -> None:
        if self._pending_tie is not None:
            self.best_tie_value = self._pending_tie
        super()._update_best_and_save(current, trainer, monitor_candidates)

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "best_tie_value": self.best_tie_value, "tie_metric": self.tie_metric}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.best_tie_value = state_dict.get("best_tie_value")


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint writer, made safe for full disks: each checkpoint is serialised in memory, written
    to a temp file in its folder, fsynced and renamed into place (:func:`write_atomically`). Checkpoints whose
    file stem is in ``keep_previous`` (``last``) keep the one they replace as ``<stem>.prev.ckpt``."""

    def __init__(self, keep_previous: tuple[str, ...] = ("last",)) -> None:
        super().__init__()
        self.keep_previous = keep_previous

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError("AtomicCheckpointIO takes no storage_options")
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        write_atomically(target, buffer.getbuffer(), keep_previous=target.stem in self.keep_previous)


class StopRequest(pl.Callback):
    """Stops training gracefully when ``should_stop()`` gives a reason (a job's cancel): asked at the end of each
    training epoch, when the epoch's validation and checkpoints are done (Lightning runs checkpoint callbacks
    after the others), so the last checkpoint is this epoch's and a resume continues from the next."""

    def __init__(self, should_stop: Any = None) -> None:
        self.should_stop = should_stop
        self.reason: str | None = None

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.reason:
            return
        reason = self.should_stop() if self.should_stop is not None else None
        if trainer.world_size > 1:  # DDP: rank 0 is asked (a job's cancel); every process stops at the same epoch
            stopping = trainer.strategy.reduce_boolean_decision(bool(reason), all=False)
            reason = reason or ("rank 0 was asked to stop" if stopping else None)
        if reason:
            self.reason = str(reason)
            trainer.should_stop = True
