"""Can an explanation be trusted? Faithfulness, sanity and agreement with experts.

* Deletion / insertion (Petsiuk et al., "RISE", BMVC 2018): remove the most relevant pixels first
  (deletion) or reveal them first on a baseline (insertion) and follow the target's probability. A
  faithful map makes deletion fall fast (low AUC) and insertion rise fast (high AUC). The same curves
  for a random map are always computed beside them: a map is only worth its gap to random.
* Model-parameter randomisation (Adebayo et al., "Sanity Checks for Saliency Maps", NeurIPS 2018):
  re-initialise the network from the head downwards, block by block, and compare each map with the
  trained model's by Spearman rank correlation. A method whose maps hardly change explains the
  input, not the model, and fails.
* Agreement with expert regions: the pointing game (Zhang et al., ECCV 2016: does the map's peak fall
  in the region?), energy inside the region (relevance mass: the share of positive relevance inside),
  and the IoU of the map's top-k% pixels with the region.
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import torch
from torch import nn

from handlens.core.errors import InputError


def _auc(curve: np.ndarray) -> float:
    x = np.linspace(0.0, 1.0, len(curve))
    return float(np.sum((curve[1:] + curve[:-1]) / 2 * np.diff(x)))


def _baseline(inputs: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "mean":  # the mean colour of each image (0 in normalised space is the dataset mean)
        return inputs.mean(dim=(-2, -1), keepdim=True).expand_as(inputs)
    if kind == "blur":
        from torchvision.transforms.v2 import functional as F

        sigma = max(1.0, inputs.shape[-1] / 16)
        kernel = int(2 * round(3 * sigma) + 1)
        return F.gaussian_blur(inputs, [kernel, kernel], [sigma, sigma])
    raise InputError(f"baseline {kind!r}: choose blur or mean")


def _probabilities(model: nn.Module, batch: torch.Tensor, *, target: int, batch_size: int) -> np.ndarray:
    """The target's probability for each image of ``batch``, in channels-last batches of ``batch_size`` (16:
    about 3x the throughput of 64 in the default layout on a CPU, as Bundle.predict_arrays measured)."""
    probs = [torch.softmax(model(batch[i:i + batch_size].contiguous(memory_format=torch.channels_last)).float(),
                           1)[:, target] for i in range(0, len(batch), batch_size)]
    return torch.cat(probs).numpy() if probs else np.zeros(0, dtype=np.float32)


@torch.no_grad()
def _curves(model: nn.Module, image: torch.Tensor, base: torch.Tensor, heatmap: np.ndarray, *, target: int,
            steps: int, batch_size: int, roi: np.ndarray | None = None,
            ends: tuple[float, float] | None = None) -> tuple[np.ndarray, np.ndarray, tuple[float, float]]:
    """Deletion and insertion curves (steps + 1 points each) for one image and one map, and their ends.

    With a ``roi`` (boolean, same shape as the map) only its pixels are ranked, removed and inserted;
    background pixels stay as they are in the image on both curves, so the score measures the map
    on the specimen alone. Both curves start or end at the same two images whatever the map: the image
    itself and the image with every candidate pixel replaced. ``ends`` (their probabilities, as returned by
    an earlier call for the same image) skips scoring them again: a trust check scores 4 fewer images of
    its map's and 6 fewer of the random map's.
    """
    h, w = heatmap.shape
    flat = heatmap.reshape(-1)
    candidates = np.flatnonzero(roi.reshape(-1)) if roi is not None else np.arange(h * w)
    order = candidates[np.argsort(-flat[candidates], kind="stable")]
    counts = np.linspace(0, len(order), steps + 1).round().astype(int)
    masks = np.zeros((steps + 1, h * w), dtype=np.float32)
    for i, count in enumerate(counts):
        masks[i, order[:count]] = 1.0
    m = torch.from_numpy(masks).view(steps + 1, 1, h, w)
    deleted = image[None] * (1 - m) + base[None] * m
    inserted = base[None] * (1 - m) + image[None] * m
    if roi is not None:
        inside = torch.from_numpy(roi.astype(np.float32)).view(1, 1, h, w)
        inserted = inserted * inside + image[None] * (1 - inside)
    interior = _probabilities(model, torch.cat([deleted[1:steps], inserted[1:steps]]), target=target,
                              batch_size=batch_size)
    if ends is None:  # the image, and the image with every candidate replaced (= deleted[-1] = inserted[0])
        first, replaced = _probabilities(model, torch.stack([image, deleted[steps]]), target=target,
                                         batch_size=batch_size)
        ends = (float(first), float(replaced))
    original, replaced_p = np.float32(ends[0]), np.float32(ends[1])
    deletion = np.concatenate([[original], interior[:steps - 1], [replaced_p]]).astype(np.float32)
    insertion = np.concatenate([[replaced_p], interior[steps - 1:], [original]]).astype(np.float32)
    return deletion, insertion, ends


def deletion_insertion(model: nn.Module, inputs: torch.Tensor, maps: np.ndarray, targets: list[int], *,
                       baseline: str = "blur", steps: int = 20, batch_size: int = 16, seed: int = 0,
                       rois: np.ndarray | None = None) -> dict[str, Any]:
    """Deletion and insertion AUCs of ``maps`` (N, H, W) for ``targets``, beside those of random maps.

    Deletion/insertion after Petsiuk et al., "RISE: Randomized Input Sampling for Explanation of
    Black-box Models", BMVC 2018. ``rois`` (N, H, W) booleans restrict both curves to the foreground
    (see ``_curves``); an image whose ROI is empty is measured over all its pixels.
    """
    if maps.shape[0] != inputs.shape[0] or maps.shape[-2:] != tuple(inputs.shape[-2:]):
        raise InputError(f"maps {maps.shape} do not match inputs {tuple(inputs.shape)}")
    if rois is not None and rois.shape != maps.shape:
        raise InputError(f"ROI masks {rois.shape} do not match the maps {maps.shape}")
    rng = np.random.default_rng(seed)
    was_training = model.training
    model.eval()
    try:
        base = _baseline(inputs, baseline)
        rows = []
        for i in range(inputs.shape[0]):
            roi = rois[i] if rois is not None and rois[i].any() else None
            deletion, insertion, ends = _curves(model, inputs[i], base[i], maps[i], target=targets[i], steps=steps,
                                                batch_size=batch_size, roi=roi)
            random_map = rng.random(maps[i].shape)
            r_deletion, r_insertion, _ = _curves(model, inputs[i], base[i], random_map, target=targets[i],
                                                 steps=steps, batch_size=batch_size, roi=roi, ends=ends)
            rows.append({"deletion_auc": _auc(deletion), "insertion_auc": _auc(insertion),
                         "random_deletion_auc": _auc(r_deletion), "random_insertion_auc": _auc(r_insertion),
                         "roi_share": float(roi.mean()) if roi is not None else 1.0,
                         "deletion": deletion.round(5).tolist(), "insertion": insertion.round(5).tolist()})
    finally:
        model.train(was_training)
    summary = {key: float(np.mean([r[key] for r in rows])) for key in
               ("deletion_auc", "insertion_auc", "random_deletion_auc", "random_insertion_auc")}
    return {"baseline": baseline, "steps": steps, "roi": rois is not None, **summary, "images": rows}


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation of two maps (ties get average ranks)."""
    from scipy.stats import spearmanr

    if np.ptp(a) == 0 or np.ptp(b) == 0:
        return 0.0
    return float(spearmanr(a.reshape(-1), b.reshape(-1)).statistic)


def cascading_units(model: nn.Module) -> list[tuple[str, list[nn.Module]]]:
    """Blocks to re-initialise, from the output downwards: the head, then the backbone's units in reverse."""
    from handlens.models.classifier import backbone_units

    units = [("head", [model.head])] if hasattr(model, "head") else []
    return units + list(reversed(backbone_units(model.backbone)))


def _reinitialise(modules: list[nn.Module], generator: torch.Generator) -> None:
    with torch.no_grad():
        for module in modules:
            for sub in module.modules():
                for name, param in sub.named_parameters(recurse=False):
                    if "weight" in name and param.dim() > 1:
                        fan_in = param[0].numel()
                        param.copy_(torch.randn(param.shape, generator=generator) / np.sqrt(fan_in))
                    elif "weight" in name:
                        param.fill_(1.0)
                    else:
                        param.zero_()
                if isinstance(sub, nn.modules.batchnorm._BatchNorm):
                    sub.reset_running_stats()


def parameter_randomisation(model: nn.Module, inputs: torch.Tensor, classes: list[str], method: str, *,
                            layer: str | None = None, max_steps: int | None = None, threshold: float = 0.5,
                            seed: int = 0, **params: Any) -> dict[str, Any]:
    """Cascading randomisation: the rank correlation between trained and randomised maps, block by block.

    The original model is not touched (a copy is randomised). ``passed`` means the maps moved away
    from the trained model's: the mean correlation fell below ``threshold`` by the last step.
    """
    from handlens.explain.api import explain

    reference = explain(model, inputs, classes, method, layer=layer, target="pred", **params)
    if reference.maps.ndim != 3:
        raise InputError("the sanity check compares one map per image; use a single target")
    targets = reference.targets
    randomised = copy.deepcopy(model).eval()
    generator = torch.Generator().manual_seed(seed)
    units = cascading_units(randomised)[: max_steps or None]
    steps = []
    for name, modules in units:
        _reinitialise(modules, generator)
        maps = explain(randomised, inputs, classes, method, layer=layer, target=targets, **params).maps
        rho = [spearman(reference.maps[i], maps[i]) for i in range(len(inputs))]
        steps.append({"randomised_down_to": name, "spearman": float(np.mean(rho)), "per_image": rho})
    final = steps[-1]["spearman"] if steps else 1.0
    return {"method": method, "layer": reference.layer, "threshold": threshold, "steps": steps,
            "final_spearman": final, "passed": bool(final < threshold)}


# --------------------------------------------------------------------------- agreement with experts


def pointing_game(heatmap: np.ndarray, region: np.ndarray, tolerance: int = 0) -> bool:
    """Is the map's maximum inside the region (grown by ``tolerance`` pixels)?"""
    if not region.any():
        raise InputError("an empty expert region cannot be pointed at")
    y, x = np.unravel_index(int(np.argmax(heatmap)), heatmap.shape)
    if tolerance <= 0:
        return bool(region[y, x])
    y0, y1 = max(0, y - tolerance), y + tolerance + 1
    x0, x1 = max(0, x - tolerance), x + tolerance + 1
    return bool(region[y0:y1, x0:x1].any())


def energy_inside(heatmap: np.ndarray, region: np.ndarray) -> float:
    """Share of the map's positive relevance that lies inside the region (1.0: all of it)."""
    positive = np.clip(heatmap, 0, None)
    total = float(positive.sum())
    return float(positive[region].sum() / total) if total > 0 else 0.0


def top_fraction_iou(heatmap: np.ndarray, region: np.ndarray, fraction: float = 0.2) -> float:
    """IoU between the region and the map's top ``fraction`` of pixels."""
    if not 0 < fraction <= 1:
        raise InputError("top fraction must lie in (0, 1]")
    count = max(1, round(fraction * heatmap.size))
    top = np.zeros(heatmap.size, dtype=bool)
    top[np.argsort(-heatmap.reshape(-1), kind="stable")[:count]] = True
    top = top.reshape(heatmap.shape)
    union = np.logical_or(top, region).sum()
    return float(np.logical_and(top, region).sum() / union) if union else 0.0


def agreement(heatmap: np.ndarray, region: np.ndarray, fraction: float = 0.2, tolerance: int = 0) -> dict[str, Any]:
    if heatmap.shape != region.shape:
        raise InputError(f"map {heatmap.shape} and region {region.shape} differ in size")
    region = region.astype(bool)
    return {"pointing_hit": pointing_game(heatmap, region, tolerance), "energy_inside": energy_inside(heatmap, region),
            "top_iou": top_fraction_iou(heatmap, region, fraction), "region_share": float(region.mean()),
            "empty": not bool((np.asarray(heatmap) > 0).any())}  # no positive relevance: points nowhere
