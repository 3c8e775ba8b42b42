"""The CAM family: class activation maps on any layer, from one forward and one (batched) backward.

Every method reads the layer's activation A (N, K, h, w) and the gradient of the target logit with
respect to it, g = dy_c/dA, taken with ``torch.autograd.grad`` *to the activation only* (the
backward pass stops at the layer). Then:

* Grad-CAM (Selvaraju et al., ICCV 2017): ReLU(sum_k mean_hw(g_k) A_k).
* Grad-CAM++ (Chattopadhay et al., WACV 2018): channel weights sum_hw(alpha * ReLU(g)) with
  alpha = g^2 / (2 g^2 + sum_hw(A) g^3).
* HiResCAM (Draelos & Carin, 2020): ReLU(sum_k g_k * A_k), element-wise (faithful to the logit for
  heads of the form pool + linear).
* XGradCAM (Fu et al., BMVC 2020): weights sum_hw(g A) / sum_hw(A).
* LayerCAM (Jiang et al., IEEE TIP 2021): ReLU(sum_k ReLU(g_k) * A_k), fine-grained at early layers.
* Score-CAM (Wang et al., CVPRW 2020): gradient-free; each channel, upsampled and scaled to [0, 1],
  masks the input; its weight is the softmax of the target scores of the masked inputs.
* CAM (Zhou et al., CVPR 2016): closed form for a head that is global average pooling + linear:
  sum_k w_ck A_k. Scaled by 1/(h w) and passed through ReLU it equals Grad-CAM exactly.

``target="all"`` computes every class from one forward pass and one *batched* backward
(``is_grads_batched``): the viewer's class selector does not pay one backward per class.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import nn

from handlens.core.errors import InputError
from handlens.explain.base import (
    Explanation,
    as_spatial,
    capture_activation,
    explaining,
    prefix_tokens,
    resolve_targets,
    upsample,
)

GRADIENT_CAMS = ("gradcam", "gradcam++", "hirescam", "xgradcam", "layercam")
EPS = 1e-7


def _combine(method: str, activation: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
    """(…, K, h, w) activation and gradients -> (…, h, w) non-negative map."""
    if method == "gradcam":
        weights = grads.mean(dim=(-2, -1), keepdim=True)
        cam = (weights * activation).sum(-3)
    elif method == "gradcam++":
        g2, g3 = grads.pow(2), grads.pow(3)
        sum_a = activation.sum(dim=(-2, -1), keepdim=True)
        alpha = g2 / (2 * g2 + sum_a * g3 + EPS)
        alpha = torch.where(grads != 0, alpha, torch.zeros_like(alpha))
        weights = (alpha * grads.clamp(min=0)).sum(dim=(-2, -1), keepdim=True)
        cam = (weights * activation).sum(-3)
    elif method == "hirescam":
        cam = (grads * activation).sum(-3)
    elif method == "xgradcam":
        sum_a = activation.sum(dim=(-2, -1), keepdim=True)
        weights = (grads * activation).sum(dim=(-2, -1), keepdim=True) / (sum_a + EPS)
        cam = (weights * activation).sum(-3)
    elif method == "layercam":
        cam = (grads.clamp(min=0) * activation).sum(-3)
    else:  # pragma: no cover - the registry only routes known names here
        raise InputError(f"unknown CAM method {method}")
    return cam.clamp(min=0)


def gradient_cam(model: nn.Module, inputs: torch.Tensor, classes: list[str], layer: nn.Module, *, layer_name: str,
                 method: str = "gradcam", target: Any = "pred", class_chunk: int = 256) -> Explanation:
    """Any of the gradient CAMs (see the module docstring) for ``inputs`` (N, 3, H, W), normalised."""
    timings: dict[str, float] = {}
    started = time.perf_counter()
    prefix = prefix_tokens(model)
    with explaining(model), capture_activation(layer) as store:
        x = inputs.detach().requires_grad_(True)  # so the activation is in the graph even if frozen
        logits = model(x)
        raw = store["activation"]
        timings["forward"] = time.perf_counter() - started
        activation = as_spatial(raw, prefix).detach()
        targets = resolve_targets(target, classes, logits)
        started = time.perf_counter()
        if targets is not None:
            selected = logits.gather(1, torch.tensor(targets)[:, None]).sum()
            (grad_raw,) = torch.autograd.grad(selected, raw)
            grads = as_spatial(grad_raw, prefix)
            cam = _combine(method, activation, grads)  # (N, h, w)
        else:
            head = linear_head(model, layer_name) if method == "gradcam" else None
            if head is not None:  # d logit_c / dA = W_c / (h w) everywhere: no backward pass needed
                hw = activation.shape[-2] * activation.shape[-1]
                cam = (torch.einsum("ck,nkhw->nchw", head, activation) / hw).clamp(min=0)
            else:
                cam = _all_classes(method, logits, raw, activation, prefix=prefix, chunk=class_chunk)  # (N, C, h, w)
        timings["backward"] = time.perf_counter() - started
    started = time.perf_counter()
    maps = upsample(cam.detach(), tuple(inputs.shape[-2:]))
    timings["upsample"] = time.perf_counter() - started
    probs = torch.softmax(logits.detach().float(), 1).numpy()
    return Explanation(maps=maps.numpy(), method=method, layer=layer_name, targets=targets, classes=classes,
                       probabilities=probs, params={"class_chunk": class_chunk} if targets is None else {},
                       timings=timings)


def _all_classes(method: str, logits: torch.Tensor, raw: torch.Tensor, activation: torch.Tensor, *, prefix: int,
                 chunk: int) -> torch.Tensor:
    """Maps for every class: gradients of all logits w.r.t. the activation by batched backward passes."""
    n, c = logits.shape
    out = []
    for start in range(0, c, chunk):
        stop = min(c, start + chunk)
        eye = torch.zeros(stop - start, n, c, dtype=logits.dtype)
        eye[torch.arange(stop - start), :, torch.arange(start, stop)] = 1.0
        (grads,) = torch.autograd.grad(logits, raw, grad_outputs=eye, is_grads_batched=True,
                                       retain_graph=stop < c)
        spatial = torch.stack([as_spatial(g, prefix) for g in grads])  # (chunk, N, K, h, w)
        out.append(_combine(method, activation.unsqueeze(0), spatial))  # (chunk, N, h, w)
    return torch.cat(out).transpose(0, 1)  # (N, C, h, w)


def linear_head(model: nn.Module, layer_name: str | None) -> torch.Tensor | None:
    """The (C, K) weight of the head when ``layer_name``'s map is average-pooled straight into one linear
    layer (declared per backbone), else None. Then logits are linear in the map and closed forms hold."""
    head = getattr(model, "head", None)
    linear = [m for m in head.modules() if isinstance(m, nn.Linear)] if head is not None else []
    spec = getattr(model, "spec", None)
    if (not getattr(spec, "closed_form_cam", False) or getattr(model, "pool", None) != "avg" or len(linear) != 1
            or layer_name != getattr(model, "default_layer", None)):
        return None
    return linear[0].weight.detach()


def closed_form_cam(model: nn.Module, inputs: torch.Tensor, classes: list[str], layer: nn.Module, *,
                    layer_name: str, target: Any = "pred") -> Explanation:
    """CAM from the head's weights: valid where the layer is the map that the head pools and reads linearly."""
    weight = linear_head(model, layer_name)
    if weight is None:
        raise InputError("closed-form CAM needs a backbone whose final feature map is average-pooled straight "
                         "into a linear head (ResNet, EfficientNet, MobileNet, Inception; pool=avg, linear head), "
                         f"explained at that map ({getattr(model, 'default_layer', '?')}); use gradcam otherwise")
    timings: dict[str, float] = {}
    started = time.perf_counter()
    with explaining(model), capture_activation(layer) as store, torch.no_grad():
        logits = model(inputs)
        activation = as_spatial(store["activation"], prefix_tokens(model))
    timings["forward"] = time.perf_counter() - started
    if weight.shape[1] != activation.shape[1]:
        raise InputError(f"the head reads {weight.shape[1]} features but {layer_name} has {activation.shape[1]} "
                         "channels: closed-form CAM does not apply here")
    targets = resolve_targets(target, classes, logits)
    hw = activation.shape[-2] * activation.shape[-1]
    started = time.perf_counter()
    if targets is None:
        cam = torch.einsum("ck,nkhw->nchw", weight, activation) / hw
    else:
        cam = torch.einsum("nk,nkhw->nhw", weight[targets], activation) / hw
    cam = cam.clamp(min=0)
    timings["combine"] = time.perf_counter() - started
    maps = upsample(cam, tuple(inputs.shape[-2:]))
    return Explanation(maps=maps.numpy(), method="cam", layer=layer_name, targets=targets, classes=classes,
                       probabilities=torch.softmax(logits.float(), 1).numpy(), timings=timings)


def score_cam(model: nn.Module, inputs: torch.Tensor, classes: list[str], layer: nn.Module, *, layer_name: str,
              target: Any = "pred", batch_size: int = 64, max_channels: int | None = None) -> Explanation:
    """Score-CAM: one masked forward pass per channel (batched); ``max_channels`` keeps the most active."""
    timings: dict[str, float] = {}
    started = time.perf_counter()
    prefix = prefix_tokens(model)
    with explaining(model), capture_activation(layer) as store, torch.no_grad():
        logits = model(inputs)
        activation = as_spatial(store["activation"], prefix)
        store.clear()
        targets = resolve_targets(target, classes, logits)
        if targets is None:
            raise InputError("score-cam explains one class per image; use gradcam or cam for target=all")
        size = tuple(inputs.shape[-2:])
        maps = []
        for i in range(inputs.shape[0]):
            acts = activation[i]  # (K, h, w)
            channels = torch.arange(acts.shape[0])
            if max_channels is not None and max_channels < acts.shape[0]:
                channels = acts.mean((1, 2)).topk(max_channels).indices
            up = upsample(acts[channels], size)  # (K', H, W)
            low = up.flatten(1).min(1).values[:, None, None]
            high = up.flatten(1).max(1).values[:, None, None]
            masks = (up - low) / (high - low + EPS)
            scores = []
            for start in range(0, masks.shape[0], batch_size):
                masked = inputs[i:i + 1] * masks[start:start + batch_size, None]
                scores.append(torch.softmax(model(masked), 1)[:, targets[i]])
            weights = torch.softmax(torch.cat(scores), 0)
            maps.append((weights[:, None, None] * acts[channels]).sum(0).clamp(min=0))
        cam = torch.stack(maps)
    timings["total"] = time.perf_counter() - started
    return Explanation(maps=upsample(cam, size).numpy(), method="scorecam", layer=layer_name, targets=targets,
                       classes=classes, probabilities=torch.softmax(logits.float(), 1).numpy(),
                       params={"batch_size": batch_size, "max_channels": max_channels}, timings=timings)
