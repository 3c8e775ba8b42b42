"""What a fine-tune run looks at, epoch by epoch: Grad-CAM on a fixed probe set, histograms and the graph.

``tracking.probes=N`` picks N validation images once (evenly spaced through the validation set, so the
classes are all there) and, at the end of each validation epoch of a Lightning run, logs through the
run's tracker:

* ``probes/gradcam``: one grid PNG of their Grad-CAM overlays (Selvaraju et al., ICCV 2017), each map for
  the image's *true* class, so that a map changes only because the model changed, not because its
  prediction flipped;
* ``map_drift``: the mean Spearman rank correlation of each probe's map with its map at the previous
  epoch (from the second epoch on; after a resume, from the checkpoint's maps). Near 1 the model keeps
  looking at the same places; a fall says where in training its evidence moved;
* the model graph, once (TensorBoard).

``tracking.histograms=true`` adds weight and gradient histograms (TensorBoard); the gradients are those
of the epoch's last training batch, taken before its optimiser step (Lightning releases the gradients
before validation, so they cannot be read at the epoch's end).

Grad-CAM is computed here with a forward hook on the model's default explanation layer rather than
through ``handlens.explain``: ``train`` and ``explain`` are sibling layers (``.importlinter``), neither
imports the other. The maths is the one of :mod:`handlens.explain.cam` (``gradcam``) and the drift
uses the convention of :func:`handlens.explain.metrics.spearman` (a flat map correlates 0).
"""

from __future__ import annotations

import math
import sys
import time
import warnings
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from handlens.core.errors import InputError

#: the smallest side a probe panel is drawn at (tiny test images are scaled up to stay readable)
PANEL_SIDE = 128
# The colour ramp of handlens.explain.render (blue -> cyan -> yellow -> red), copied: train cannot import explain.
_STOPS = np.array([[0.0, 0.0, 0.6], [0.0, 0.4, 1.0], [0.0, 0.9, 0.9], [1.0, 1.0, 0.0], [1.0, 0.5, 0.0],
                   [0.85, 0.0, 0.0]])


def probe_callback(tracking: Any, tracker: Any, val_loader: Any, *, classes: list[str]) -> ProbeCallback | None:
    """The callback that ``tracking`` (a :class:`~handlens.train.config.TrackingConfig`) asks for, or None.

    Without validation images (a refit on every non-test image) probes have nothing to look at: that is said
    on stderr and only the histograms, if asked for, are kept."""
    probes = int(tracking.probes)
    if probes and val_loader is None:
        print(f"warning: tracking.probes={probes} has no effect: this run has no validation images to probe "
              "(give the split a val share)", file=sys.stderr, flush=True)
        probes = 0
    if not probes and not tracking.histograms:
        return None
    return ProbeCallback(tracker, val_loader.dataset if probes else None, count=probes, classes=classes,
                         histograms=bool(tracking.histograms))


def pick_probes(dataset: Any, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``count`` items evenly spaced through ``dataset`` -> (uint8 images (N, 3, H, W), targets (N,)).

    Items are ``(image, target, ...)`` as the validation datasets give them (whole images, or grid patches)."""
    n = len(dataset)
    if n == 0:
        raise InputError("tracking.probes: the validation set is empty")
    indices = sorted({int(i) for i in np.linspace(0, n - 1, min(count, n)).round()})
    items = [dataset[i] for i in indices]
    images = torch.stack([torch.as_tensor(item[0]) for item in items]).clone()
    targets = torch.tensor([int(item[1]) for item in items], dtype=torch.long)
    return images, targets


def _spatial(activation: torch.Tensor, prefix: int) -> torch.Tensor:
    """A layer output as (N, K, h, w): CNN maps unchanged, ViT tokens (N, T, D) laid on their square grid."""
    if activation.dim() == 4:
        return activation
    tokens = activation[:, prefix:] if activation.dim() == 3 else activation
    side = math.isqrt(tokens.shape[1]) if activation.dim() == 3 else 0
    if side == 0 or side * side != tokens.shape[1]:
        raise InputError(f"tracking.probes: the default layer's output has shape {tuple(activation.shape)}, "
                         "which has no square grid for Grad-CAM")
    return tokens.transpose(1, 2).reshape(activation.shape[0], activation.shape[2], side, side)


def grad_cam(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, *,
             layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """Grad-CAM of ``targets`` at ``layer`` for normalised ``inputs`` -> (maps (N, h, w) at the layer's
    resolution, class probabilities (N, C)).

    The model runs in eval mode with gradients on, even inside Lightning's inference-mode validation; the
    gradient is taken to the activation only (no parameter's ``.grad`` changes); the hook and every
    module's train/eval mode are restored whatever happens."""
    modes = {name: module.training for name, module in model.named_modules()}
    store: dict[str, torch.Tensor] = {}

    def hook(_module: nn.Module, _inputs: Any, output: Any) -> None:
        store["activation"] = output[0] if isinstance(output, (tuple, list)) else output

    handle = layer.register_forward_hook(hook)
    try:
        model.eval()
        with torch.inference_mode(False), torch.enable_grad():
            x = inputs.detach().clone().requires_grad_(True)  # the activation is in the graph even if frozen
            logits = model(x)
            raw = store["activation"]
            selected = logits.gather(1, targets.to(logits.device)[:, None]).sum()
            (grad,) = torch.autograd.grad(selected, raw)
            prefix = int(getattr(getattr(model, "backbone", model), "num_prefix_tokens", 0))
            activation, grads = _spatial(raw.detach(), prefix), _spatial(grad, prefix)
            cam = (grads.mean(dim=(-2, -1), keepdim=True) * activation).sum(-3).clamp(min=0)
            return cam.detach().float().cpu(), torch.softmax(logits.detach().float(), 1).cpu()
    finally:
        handle.remove()
        for name, module in model.named_modules():
            module.training = modes.get(name, module.training)


def upsample(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(N, h, w) -> (N, H, W), bilinear with ``align_corners=False`` (as the explainers' maps)."""
    if tuple(maps.shape[-2:]) == tuple(size):
        return maps.clone()
    return F.interpolate(maps[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation of two maps, ties at average ranks; 0 when either map is flat (the
    convention of :func:`handlens.explain.metrics.spearman`)."""
    from scipy.stats import spearmanr

    if np.ptp(a) == 0 or np.ptp(b) == 0:
        return 0.0
    return float(spearmanr(a.reshape(-1), b.reshape(-1)).statistic)


def map_drift(previous: torch.Tensor, current: torch.Tensor, size: tuple[int, int]) -> float:
    """Mean over probes of the Spearman correlation of each map with its previous map, both at input size."""
    before, after = upsample(previous, size).numpy(), upsample(current, size).numpy()
    return float(np.mean([spearman(b, a) for b, a in zip(before, after, strict=True)]))


def colormap(values: np.ndarray) -> np.ndarray:
    """Values in [0, 1] -> (…, 3) uint8 colours on the explainers' ramp."""
    v = np.clip(values, 0.0, 1.0) * (len(_STOPS) - 1)
    low = np.floor(v).astype(int).clip(0, len(_STOPS) - 2)
    frac = (v - low)[..., None]
    return ((_STOPS[low] * (1 - frac) + _STOPS[low + 1] * frac) * 255).round().astype(np.uint8)


def overlay_grid(images: torch.Tensor, maps: torch.Tensor, titles: list[str], *, opacity: float = 0.5,
                 columns: int = 8) -> np.ndarray:
    """uint8 images (N, 3, H, W) and maps (N, H, W) -> one (H', W', 3) uint8 grid of overlays with titles.

    Each map is scaled by its own maximum (the overlay shows where, not how much); panels are drawn at
    least :data:`PANEL_SIDE` pixels wide."""
    from PIL import Image, ImageDraw

    h, w = images.shape[-2:]
    scale = max(1, -(-PANEL_SIDE // max(h, w)))
    size = (w * scale, h * scale)
    title_h, pad = 14, 4
    columns = max(1, min(columns, len(images)))
    rows = -(-len(images) // columns)
    sheet = Image.new("RGB", (columns * (size[0] + pad) + pad, rows * (size[1] + title_h + pad) + pad), "white")
    draw = ImageDraw.Draw(sheet)
    for i, (image, heat) in enumerate(zip(images, maps, strict=True)):
        top = heat.max()
        values = (heat / top).numpy() if top > 0 else np.zeros(heat.shape, np.float32)
        base = image.permute(1, 2, 0).numpy().astype(np.float32)
        blended = (base * (1 - opacity) + colormap(values).astype(np.float32) * opacity).round().clip(0, 255)
        panel = Image.fromarray(blended.astype(np.uint8)).resize(size, Image.BILINEAR)
        x, y = pad + (i % columns) * (size[0] + pad), pad + (i // columns) * (size[1] + title_h + pad)
        draw.text((x, y), titles[i][: max(4, size[0] // 6)], fill="black")
        sheet.paste(panel, (x, y + title_h))
    return np.asarray(sheet)


class ProbeCallback(pl.Callback):
    """Logs the probes' Grad-CAM grid, the map drift, the graph (once) and, optionally, histograms per epoch.

    It works at the end of each validation epoch (before the checkpoints are written, so a checkpoint carries
    the maps its epoch ends with and a resumed run's drift compares against them), or at the end of the
    training epoch when the epoch had no validation. ``seconds`` keeps what each epoch's probing cost.
    """

    def __init__(self, tracker: Any, dataset: Any, *, count: int, classes: list[str],
                 histograms: bool = False) -> None:
        super().__init__()
        self.tracker = tracker
        self.dataset = dataset
        self.count = count
        self.classes = classes
        self.histograms = histograms
        self.seconds: list[float] = []
        self._probes: tuple[torch.Tensor, torch.Tensor] | None = None
        self._previous: torch.Tensor | None = None
        self._graph_logged = False
        self._done_epoch = -1
        self._pending = 0.0  # seconds spent this epoch before its end (the gradient histograms)

    # ------------------------------------------------------------------ Lightning hooks

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking and trainer.state.fn == "fit":
            self._epoch_end(trainer, pl_module)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._epoch_end(trainer, pl_module)  # an epoch without validation: nothing was logged for it yet

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        if self.histograms and trainer.is_last_batch:
            started = time.perf_counter()
            step = trainer.current_epoch + 1
            for name, param in pl_module.model.named_parameters():
                if param.grad is not None:
                    self.tracker.log_histogram(f"grads/{name}", param.grad.detach().float().cpu().numpy(), step)
            self._pending += time.perf_counter() - started

    def state_dict(self) -> dict[str, Any]:
        return {"previous": self._previous, "graph_logged": self._graph_logged}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._previous = state_dict.get("previous")
        self._graph_logged = bool(state_dict.get("graph_logged", False))

    # ------------------------------------------------------------------ the work

    def _epoch_end(self, trainer: pl.Trainer, pl_module: Any) -> None:
        if self._done_epoch == trainer.current_epoch:
            return
        self._done_epoch = trainer.current_epoch
        started = time.perf_counter()
        step = trainer.current_epoch + 1  # the epoch, as the other metrics' step
        if self.histograms:
            self._log_histograms(pl_module, step)
        if self.count and self.dataset is not None:
            self._log_probes(pl_module, step)
        self.seconds.append(time.perf_counter() - started + self._pending)
        self._pending = 0.0

    def _log_histograms(self, pl_module: Any, step: int) -> None:
        for name, param in pl_module.model.named_parameters():
            self.tracker.log_histogram(f"weights/{name}", param.detach().float().cpu().numpy(), step)

    def _log_probes(self, pl_module: Any, step: int) -> None:
        if getattr(pl_module, "on_features", False):
            raise InputError("tracking.probes needs images: this run trains a head on cached features (set "
                             "model.freeze to partial:N or full, or train.feature_cache=off)")
        model = pl_module.model
        with torch.inference_mode(False):
            if self._probes is None:
                self._probes = pick_probes(self.dataset, self.count)
            images, targets = self._probes
            inputs = pl_module.normalize(images.to(pl_module.device))
        if not self._graph_logged:
            self._log_graph(model, inputs)
        maps, probs = grad_cam(model, inputs, targets, layer=model.layer(model.default_layer))
        size = (int(images.shape[-2]), int(images.shape[-1]))
        titles = [f"{self.classes[t]} p={probs[i, t]:.2f}" for i, t in enumerate(targets.tolist())]
        self.tracker.log_image("probes/gradcam", overlay_grid(images, upsample(maps, size), titles), step)
        if self._previous is not None and self._previous.shape == maps.shape:
            self.tracker.log_metrics({"map_drift": map_drift(self._previous, maps, size)}, step=step)
        self._previous = maps

    def _log_graph(self, model: nn.Module, inputs: torch.Tensor) -> None:
        """The graph once, traced in eval mode on one probe (the tracker notes a model it cannot trace)."""
        self._graph_logged = True
        modes = {name: module.training for name, module in model.named_modules()}
        try:
            model.eval()
            with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore")  # tracer warnings about data-dependent shapes
                self.tracker.log_graph(model, inputs[:1].detach().clone())
        finally:
            for name, module in model.named_modules():
                module.training = modes.get(name, module.training)
