"""``explain(model, inputs, ...)`` and the explanation-capable bundle that ``handlens.load_bundle`` returns."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from handlens.core.errors import InputError
from handlens.explain.base import Explanation
from handlens.explain.registry import ExplainParams, explainer
from handlens.models.bundle import Bundle
from handlens.models.bundle import load_bundle as _load_bundle


def method_params(method: str, params: Mapping[str, Any] | ExplainParams | None = None,
                  keywords: Mapping[str, Any] | None = None) -> ExplainParams:
    """The parameters of a library call, given as ``params=`` (a dict or the method's model) and/or as
    keywords, validated against the method's model: a typo is an :class:`InputError`, not a default."""
    if not keywords:
        return explainer(method).validate_params(params)
    given = params.model_dump(exclude_unset=True) if isinstance(params, ExplainParams) else dict(params or {})
    twice = sorted(set(given) & set(keywords))
    if twice:
        raise InputError(f"{', '.join(twice)} given both in params= and as a keyword; give each once")
    return explainer(method).validate_params({**given, **keywords})


def explain(model: Any, inputs: torch.Tensor, classes: list[str], method: str = "gradcam", *, layer: str | None = None,
            target: Any = "pred", mean: tuple[float, ...] = (0.5, 0.5, 0.5), std: tuple[float, ...] = (0.5, 0.5, 0.5),
            params: Mapping[str, Any] | ExplainParams | None = None, **keywords: Any) -> Explanation:
    """Explain ``inputs`` (N, 3, H, W), normalised, with a registered method (see ``EXPLAINERS``).

    The method's parameters come as ``params=`` (a dict, or its model from
    :func:`~handlens.explain.registry.parse_params`) or as keywords (``steps=32``); unknown names and
    values out of bounds raise :class:`InputError` before any work is done.
    """
    spec = explainer(method)
    chosen = method_params(method, params, keywords)
    started = time.perf_counter()
    layer_name = None
    module = None
    if spec.uses_layer:
        layer_name = layer or getattr(model, "default_layer", None)
        module = model.layer(layer_name) if hasattr(model, "layer") else model.get_submodule(layer_name)
    result = spec.run(model, inputs, classes, module, layer_name=layer_name, target=target, params=chosen,
                      mean=mean, std=std)
    result.timings["total"] = time.perf_counter() - started
    result.signed = spec.signed
    return result


class ExplainableBundle(Bundle):
    """A bundle that can also explain its predictions."""

    def explain(self, images: Any, method: str = "gradcam", layer: str | None = None, target: Any = "pred", *,
                params: Mapping[str, Any] | ExplainParams | None = None, **keywords: Any) -> Explanation:
        """Maps at the model's input resolution for one or several paths, PIL images or arrays, each resized
        whole to the input. A patch-trained model sees patches: explain it with
        :func:`handlens.explain.tiles.tiled_explain`, tile by tile at its patch scale. Parameters as in
        :func:`explain`; they are checked before any image is read."""
        chosen = method_params(method, params, keywords)
        items: Sequence[Any] = list(images) if isinstance(images, (list, tuple)) else [images]
        inputs = self.transform_many(items)
        mean, std = self.preprocess.affine()
        return explain(self.module, inputs, self.classes, method, layer=layer, target=target, mean=mean, std=std,
                       params=chosen)


def load_bundle(path: str | Path) -> ExplainableBundle:
    bundle = _load_bundle(path, ExplainableBundle)
    assert isinstance(bundle, ExplainableBundle)
    return bundle
