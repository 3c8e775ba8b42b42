"""``explain(model, inputs, ...)`` and the explanation-capable bundle that ``handlens.load_bundle`` returns."""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from handlens.explain.base import Explanation
from handlens.explain.registry import EXPLAINERS
from handlens.models.bundle import Bundle
from handlens.models.bundle import load_bundle as _load_bundle


def explain(model: Any, inputs: torch.Tensor, classes: list[str], method: str = "gradcam", layer: str | None = None,
            target: Any = "pred", mean: tuple[float, ...] = (0.5, 0.5, 0.5), std: tuple[float, ...] = (0.5, 0.5, 0.5),
            **params: Any) -> Explanation:
    """Explain ``inputs`` (N, 3, H, W), normalised, with a registered method (see ``EXPLAINERS``)."""
    spec = EXPLAINERS.get(method)
    started = time.perf_counter()
    layer_name = None
    module = None
    if spec.uses_layer:
        layer_name = layer or getattr(model, "default_layer", None)
        module = model.layer(layer_name) if hasattr(model, "layer") else model.get_submodule(layer_name)
    if not spec.uses_layer:
        params = {**params, "mean": mean, "std": std}
    result = spec.run(model, inputs, classes, module, layer_name, target, **params)
    result.timings["total"] = time.perf_counter() - started
    result.signed = spec.signed
    return result


class ExplainableBundle(Bundle):
    """A bundle that can also explain its predictions."""

    def explain(self, images: Any, method: str = "gradcam", layer: str | None = None, target: Any = "pred",
                **params: Any) -> Explanation:
        """Maps at the model's input resolution for one or several paths, PIL images or arrays, each resized
        whole to the input. A patch-trained model sees patches: explain it with
        :func:`handlens.explain.tiles.tiled_explain`, tile by tile at its patch scale."""
        items: Sequence[Any] = list(images) if isinstance(images, (list, tuple)) else [images]
        inputs = self.transform_many(items)
        mean, std = self.preprocess.affine()
        return explain(self.module, inputs, self.classes, method, layer, target, mean, std, **params)


def load_bundle(path: str | Path) -> ExplainableBundle:
    bundle = _load_bundle(path, ExplainableBundle)
    assert isinstance(bundle, ExplainableBundle)
    return bundle
