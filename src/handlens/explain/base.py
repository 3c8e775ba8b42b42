"""Shared pieces of every explainer: the result type, targets, hooks and model-state guards.

Computing a map is kept apart from drawing it (see ``render``): an :class:`Explanation` holds raw
float maps at the input's resolution, and nothing else.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from handlens.core.errors import InputError


@dataclass
class Explanation:
    """Maps for a batch of images: (N, H, W), or (N, C, H, W) for ``target="all"``.

    ``signed`` maps (Integrated Gradients, GradientSHAP, occlusion) keep their sign: positive evidence
    for the target, negative against it. CAM maps are non-negative.
    """

    maps: np.ndarray
    method: str
    layer: str | None
    targets: list[int] | None  # one class index per image; None for target="all"
    classes: list[str]
    probabilities: np.ndarray  # (N, C)
    params: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    signed: bool = False
    extras: dict[str, Any] = field(default_factory=dict)  # e.g. IG convergence deltas

    @property
    def target_names(self) -> list[str] | None:
        return [self.classes[t] for t in self.targets] if self.targets is not None else None

    def map_for(self, index: int, target: int | None = None) -> np.ndarray:
        """One image's (H, W) map; with an all-class explanation, the map of class ``target``."""
        if self.maps.ndim == 4:
            if target is None:
                target = int(self.probabilities[index].argmax())
            return self.maps[index, target]
        return self.maps[index]

    def summary(self) -> dict[str, Any]:
        return {"method": self.method, "layer": self.layer, "shape": list(self.maps.shape),
                "targets": self.target_names, "signed": self.signed, "params": self.params,
                "timings": {k: round(v, 4) for k, v in self.timings.items()},
                **{k: v for k, v in self.extras.items() if isinstance(v, (int, float, str, list))}}


def resolve_targets(target: Any, classes: list[str], logits: torch.Tensor) -> list[int] | None:
    """``"pred"``/None -> argmax per image; a class name or index (or one per image); ``"all"`` -> None."""
    n = logits.shape[0]
    if target is None or target == "pred":
        return logits.argmax(1).tolist()
    if target == "all":
        return None
    items = list(target) if isinstance(target, (list, tuple)) else [target] * n
    if len(items) != n:
        raise InputError(f"{len(items)} targets for {n} images; give one target, or one per image")
    out = []
    for row, item in enumerate(items):
        if item is None or item == "pred":
            out.append(int(logits[row].argmax()))
        elif isinstance(item, (int, np.integer)) and 0 <= int(item) < len(classes):
            out.append(int(item))
        elif isinstance(item, str) and item in classes:
            out.append(classes.index(item))
        elif isinstance(item, str) and item.isdigit() and int(item) < len(classes):
            out.append(int(item))
        else:
            raise InputError(f"target {item!r}: use pred, all, or one of the classes: {', '.join(classes)}")
    return out


@contextlib.contextmanager
def explaining(model: nn.Module) -> Iterator[nn.Module]:
    """Eval mode and gradients on for the block; the model's train/eval state is restored afterwards."""
    modes = {name: module.training for name, module in model.named_modules()}
    model.eval()
    try:
        with torch.enable_grad():
            yield model
    finally:
        for name, module in model.named_modules():
            module.training = modes.get(name, module.training)


@contextlib.contextmanager
def capture_activation(layer: nn.Module) -> Iterator[dict[str, torch.Tensor]]:
    """Keep the layer's output of the next forward pass; the hook is removed even on error."""
    store: dict[str, torch.Tensor] = {}

    def hook(_module: nn.Module, _inputs: Any, output: Any) -> None:
        store["activation"] = output[0] if isinstance(output, (tuple, list)) else output

    handle = layer.register_forward_hook(hook)
    try:
        yield store
    finally:
        handle.remove()


def as_spatial(tensor: torch.Tensor, prefix_tokens: int = 0) -> torch.Tensor:
    """A layer output as (N, K, h, w): CNN maps unchanged, ViT tokens (N, T, D) reshaped to the patch grid."""
    if tensor.dim() == 4:
        return tensor
    if tensor.dim() == 3:
        tokens = tensor[:, prefix_tokens:]
        side = math.isqrt(tokens.shape[1])
        if side * side != tokens.shape[1]:
            raise InputError(f"cannot lay {tokens.shape[1]} tokens on a square grid; pick another layer")
        return tokens.transpose(1, 2).reshape(tensor.shape[0], tensor.shape[2], side, side)
    raise InputError(f"layer output has shape {tuple(tensor.shape)}; explain a convolutional or token layer")


@functools.lru_cache(maxsize=32)
def _linear_weights(out: int, inp: int) -> torch.Tensor:
    """(out, inp) matrix of 1-D linear interpolation weights, taken from ``F.interpolate`` itself."""
    return F.interpolate(torch.eye(inp)[None], size=out, mode="linear", align_corners=False)[0].T.contiguous()


def upsample(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(..., h, w) -> (..., H, W), bilinear, align_corners=False (as Captum's ``LayerAttribution.interpolate``).

    Bilinear interpolation is separable, so it is computed as ``U_h @ M @ U_w^T`` with the 1-D weight
    matrices: the same numbers as ``F.interpolate`` (to float rounding), faster for the 1,000 maps of an
    all-class explanation.
    """
    if tuple(maps.shape[-2:]) == tuple(size):
        return maps.clone()
    rows = _linear_weights(size[0], maps.shape[-2]).to(maps.dtype)
    cols = _linear_weights(size[1], maps.shape[-1]).to(maps.dtype)
    return rows @ maps @ cols.T


def prefix_tokens(model: nn.Module) -> int:
    backbone = getattr(model, "backbone", model)
    return int(getattr(backbone, "num_prefix_tokens", 0))


ExplainFn = Callable[..., Explanation]
