"""Attribution methods through Captum (not re-implemented): pixel-level, signed where the method is.

* Integrated Gradients (Sundararajan et al., ICML 2017), baselines ``black``, ``blur`` or ``noise``;
  the convergence delta (completeness error) is reported per image.
* Saliency (Simonyan et al., 2014): |gradient|, max over colour channels.
* SmoothGrad (Smilkov et al., 2017): saliency averaged over noisy copies (Captum's NoiseTunnel).
* GradientSHAP (Lundberg & Lee, NeurIPS 2017): expected gradients over random baselines.
* Occlusion (Zeiler & Fergus, ECCV 2014): the score drop when a sliding window is blanked.

Pixel attributions (N, 3, H, W) are summed over colour channels into (N, H, W) maps.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import nn

from handlens.core.errors import InputError
from handlens.explain.base import Explanation, explaining, resolve_targets
from handlens.explain.registry import DEFAULT_MEMORY_BUDGET_MB, occlusion_geometry


def backward_bytes_per_sample(model: nn.Module, inputs: torch.Tensor) -> int:
    """Bytes autograd keeps for the backward pass of one sample: the tensors saved for backward, each
    storage counted once (what an IG step batch holds in memory on top of the model)."""
    seen: dict[int, int] = {}
    shared = {p.untyped_storage().data_ptr() for p in model.parameters()}  # weights serve the whole batch

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in shared:
            seen[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model(inputs[:1].detach().clone().requires_grad_(True))
    return sum(seen.values())


def internal_batch_size(model: nn.Module, inputs: torch.Tensor, budget_mb: float) -> int:
    """Samples per IG step batch so that the saved activations, plus their gradients' working set
    (a quarter more), fit the memory budget."""
    per_sample = 1.25 * backward_bytes_per_sample(model, inputs)
    return max(1, int(budget_mb * 1024 * 1024 // max(per_sample, 1)))


def make_baseline(kind: str, inputs: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...], *,
                  seed: int = 0) -> torch.Tensor:
    """A reference input in the model's normalised space: black pixels, a blurred copy, or uniform noise."""
    mean_t = torch.tensor(mean).view(1, -1, 1, 1)
    std_t = torch.tensor(std).view(1, -1, 1, 1)
    if kind == "black":
        return ((torch.zeros_like(inputs) - mean_t) / std_t).expand_as(inputs).contiguous()
    if kind == "blur":
        from torchvision.transforms.v2 import functional as F

        sigma = max(1.0, inputs.shape[-1] / 20)
        kernel = int(2 * round(3 * sigma) + 1)
        return F.gaussian_blur(inputs, [kernel, kernel], [sigma, sigma])
    if kind == "noise":
        generator = torch.Generator().manual_seed(seed)
        pixels = torch.rand(inputs.shape, generator=generator)
        return (pixels - mean_t) / std_t
    raise InputError(f"baseline {kind!r}: choose black, blur or noise")


def _finish(attributions: torch.Tensor, method: str, targets: list[int], classes: list[str], *, logits: torch.Tensor,
            params: dict[str, Any], timings: dict[str, float], signed: bool, extras: dict[str, Any] | None = None,
            reduce: str = "sum") -> Explanation:
    maps = attributions.sum(1) if reduce == "sum" else attributions.abs().amax(1)
    return Explanation(maps=maps.detach().numpy(), method=method, layer=None, targets=targets, classes=classes,
                       probabilities=torch.softmax(logits.detach().float(), 1).numpy(), params=params,
                       timings=timings, signed=signed, extras=extras or {})


def _with_grad(inputs: torch.Tensor) -> torch.Tensor:
    """A copy of the inputs that requires gradients (Captum warns, and mutates, otherwise)."""
    return inputs.detach().clone().requires_grad_(True)


def _targets(model: nn.Module, inputs: torch.Tensor, classes: list[str], target: Any) -> tuple[list[int], Any]:
    with torch.no_grad():
        logits = model(inputs)
    targets = resolve_targets(target, classes, logits)
    if targets is None:
        raise InputError("attribution methods explain one class per image; use a CAM method for target=all")
    return targets, logits


def integrated_gradients(model: nn.Module, inputs: torch.Tensor, classes: list[str], target: Any = "pred", *,
                         steps: int = 50, baseline: str = "black", mean: tuple[float, ...] = (0.5, 0.5, 0.5),
                         std: tuple[float, ...] = (0.5, 0.5, 0.5), memory_budget_mb: float = DEFAULT_MEMORY_BUDGET_MB,
                         internal_batch: int | None = None) -> Explanation:
    """Integrated Gradients from a ``black``, ``blur`` or ``noise`` baseline, with the convergence delta
    per image. Parameters are checked by ``IntegratedGradientsParams`` (the registry) before they get here."""
    from captum.attr import IntegratedGradients

    started = time.perf_counter()
    with explaining(model):
        targets, logits = _targets(model, inputs, classes, target)
        batch = internal_batch or internal_batch_size(model, inputs, memory_budget_mb)
        method = IntegratedGradients(model)
        attributions, delta = method.attribute(inputs, baselines=make_baseline(baseline, inputs, mean, std),
                                               target=targets, n_steps=steps, internal_batch_size=batch,
                                               return_convergence_delta=True)
    timings = {"total": time.perf_counter() - started}
    deltas = delta.detach().abs().tolist()
    return _finish(attributions, "integrated_gradients", targets, classes, logits=logits,
                   params={"steps": steps, "baseline": baseline, "internal_batch_size": batch}, timings=timings,
                   signed=True, extras={"convergence_delta": deltas})


def saliency(model: nn.Module, inputs: torch.Tensor, classes: list[str], target: Any = "pred") -> Explanation:
    from captum.attr import Saliency

    started = time.perf_counter()
    with explaining(model):
        targets, logits = _targets(model, inputs, classes, target)
        attributions = Saliency(model).attribute(_with_grad(inputs), target=targets, abs=True)
    return _finish(attributions, "saliency", targets, classes, logits=logits, params={},
                   timings={"total": time.perf_counter() - started}, signed=False, reduce="max")


def smoothgrad(model: nn.Module, inputs: torch.Tensor, classes: list[str], target: Any = "pred", *,
               samples: int = 20, noise: float = 0.15) -> Explanation:
    from captum.attr import NoiseTunnel, Saliency

    started = time.perf_counter()
    with explaining(model):
        targets, logits = _targets(model, inputs, classes, target)
        stdev = float(noise * (inputs.max() - inputs.min()))
        attributions = NoiseTunnel(Saliency(model)).attribute(_with_grad(inputs), nt_type="smoothgrad",
                                                              nt_samples=samples,
                                                              nt_samples_batch_size=min(samples, 10), stdevs=stdev,
                                                              target=targets, abs=True)
    return _finish(attributions, "smoothgrad", targets, classes, logits=logits,
                   params={"samples": samples, "noise": noise}, timings={"total": time.perf_counter() - started},
                   signed=False, reduce="max")


def gradient_shap(model: nn.Module, inputs: torch.Tensor, classes: list[str], target: Any = "pred", *,
                  samples: int = 20, mean: tuple[float, ...] = (0.5, 0.5, 0.5),
                  std: tuple[float, ...] = (0.5, 0.5, 0.5)) -> Explanation:
    from captum.attr import GradientShap

    started = time.perf_counter()
    with explaining(model):
        targets, logits = _targets(model, inputs, classes, target)
        baselines = torch.cat([make_baseline("black", inputs[:1], mean, std),
                               make_baseline("noise", inputs[:1], mean, std)])
        attributions = GradientShap(model).attribute(inputs, baselines=baselines, n_samples=samples, stdevs=0.1,
                                                     target=targets)
    return _finish(attributions, "gradient_shap", targets, classes, logits=logits, params={"samples": samples},
                   timings={"total": time.perf_counter() - started}, signed=True)


def occlusion(model: nn.Module, inputs: torch.Tensor, classes: list[str], target: Any = "pred", *,
              window: int | None = None, stride: int | None = None, batch_size: int = 64) -> Explanation:
    """Occlusion with a ``window``-pixel square every ``stride`` pixels (unset: from the input width, see
    :func:`~handlens.explain.registry.occlusion_geometry`)."""
    from captum.attr import Occlusion

    window, stride = occlusion_geometry(window, stride, height=inputs.shape[-2], width=inputs.shape[-1])
    started = time.perf_counter()
    with explaining(model):
        targets, logits = _targets(model, inputs, classes, target)
        attributions = Occlusion(model).attribute(inputs, sliding_window_shapes=(inputs.shape[1], window, window),
                                                  strides=(inputs.shape[1], stride, stride), baselines=0.0,
                                                  target=targets, perturbations_per_eval=batch_size)
    return _finish(attributions, "occlusion", targets, classes, logits=logits,
                   params={"window": window, "stride": stride}, timings={"total": time.perf_counter() - started},
                   signed=True)
