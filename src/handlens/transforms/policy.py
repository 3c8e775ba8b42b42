"""Declarative augmentation policies: YAML lists of steps, each applied with its own probability.

A policy file looks like::

    name: xray
    description: chest X-rays have an up and a left-right convention that is not symmetric
    steps:
      - {op: rotate, p: 0.5, degrees: 7}
      - {op: resized_crop, p: 0.5, scale: [0.85, 1.0]}
      - {op: brightness, p: 0.5, amount: 0.1}

Steps run in order on uint8 tensors, one random draw per sample (torchvision ``transforms.v2``
functional ops). ``mixup`` and ``cutmix`` are batch steps: with probability ``p`` a training batch is
mixed (after normalisation, with soft targets); at most one of them per batch. A policy may also
recommend preprocessing (``preprocess: {normalize: percentile}``, ``preprocess: {patches: {enabled:
true}}``); a run uses it unless its own config sets that key.

Presets ship as plain YAML files users can copy and edit: ``natural-photo``, ``xray`` (no vertical
flip, no hue, mild rotation, percentile normalisation), ``thin-section`` (any rotation, both flips: a
thin section has no up; patch sampling on), ``microscopy``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from handlens.core.errors import InputError
from handlens.core.registry import Registry

PRESET_DIR = Path(__file__).parent / "presets"


@dataclass(frozen=True)
class Step:
    op: str
    p: float = 1.0
    params: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Policy:
    name: str
    steps: tuple[Step, ...]
    description: str = ""
    preprocess: dict[str, Any] = field(default_factory=dict)

    @property
    def image_steps(self) -> tuple[Step, ...]:
        return tuple(s for s in self.steps if s.op not in BATCH_OPS)

    @property
    def batch_steps(self) -> tuple[Step, ...]:
        return tuple(s for s in self.steps if s.op in BATCH_OPS)

    def to_dict(self) -> dict[str, Any]:
        data = {"name": self.name, "description": self.description,
                "steps": [{"op": s.op, "p": s.p, **s.params} for s in self.steps]}
        if self.preprocess:
            data["preprocess"] = self.preprocess
        return data


#: steps that mix two samples of a batch (and their labels): run by the training loop, not per image
BATCH_OPS = ("mixup", "cutmix")


#: op name -> function(batch, rng: random.Random, chosen: list[int], **params) -> batch, where batch is
#: (N, 3, H, W) float32 in 0..255 and ``chosen`` the samples the step applies to. Each op draws its
#: own parameters per chosen sample and works on the whole batch at once: geometric ops are one
#: ``grid_sample`` with a per-sample affine matrix, pointwise ops broadcast per-sample factors (the
#: identity for samples not chosen). Values are clamped and rounded once, at the end, not per op.
AUGMENT_OPS: Registry[Callable[..., Any]] = Registry("augmentation op")


def _op(name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    return AUGMENT_OPS.decorator(name)


def _on_chosen(batch: Any, chosen: list[int], function: Callable[[Any], Any]) -> Any:
    """Apply ``function`` to the chosen samples (the whole batch without copying when all are chosen)."""
    import torch

    if len(chosen) == batch.shape[0]:
        return function(batch)
    index = torch.tensor(chosen)
    batch[index] = function(batch[index])
    return batch


def _warp(batch: Any, theta: Any) -> Any:
    """Resample each image through its (2, 3) affine matrix in normalised coordinates (output -> input),
    bilinear, with mirrored borders (no black corners for a texture to learn from)."""
    import torch
    import torch.nn.functional as F

    n, _, h, w = batch.shape
    t = theta.to(batch.dtype)
    # the sampling grid by broadcasting (what F.affine_grid computes, ~50x cheaper here): pixel centres
    # in normalised coordinates, x' = a*x + b*y + c for each output pixel, as an (n, h, w, 2) view
    xs = (torch.arange(w, dtype=batch.dtype) * 2 + 1) / w - 1
    ys = (torch.arange(h, dtype=batch.dtype) * 2 + 1) / h - 1
    rows = t[:, :, 1].reshape(n, 2, 1, 1) * ys.view(1, 1, h, 1) + t[:, :, 2].reshape(n, 2, 1, 1)
    grid = (t[:, :, 0].reshape(n, 2, 1, 1) * xs.view(1, 1, 1, w) + rows).permute(0, 2, 3, 1)
    return F.grid_sample(batch, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def _per_sample(batch: Any, chosen: list[int], values: list[float], identity: float) -> Any:
    """(N, 1, 1, 1) factors: ``values`` for the chosen samples, ``identity`` for the others."""
    import torch

    out = torch.full((batch.shape[0], 1, 1, 1), identity, dtype=batch.dtype)
    out[torch.tensor(chosen), 0, 0, 0] = torch.tensor(values, dtype=batch.dtype)
    return out


@_op("hflip")
def _hflip(batch: Any, rng: Any, chosen: list[int]) -> Any:
    return _on_chosen(batch, chosen, lambda x: x.flip(-1))


@_op("vflip")
def _vflip(batch: Any, rng: Any, chosen: list[int]) -> Any:
    return _on_chosen(batch, chosen, lambda x: x.flip(-2))


@_op("rotate")
def _rotate(batch: Any, rng: Any, chosen: list[int], degrees: float | str = 15.0) -> Any:
    """``degrees``: a maximum angle (uniform in +-degrees), or ``right_angles`` (0/90/180/270)."""
    import torch

    h, w = batch.shape[-2:]
    if degrees == "right_angles" and h == w:  # exact: one rot90 per group drawing the same number of turns
        draws = {i: rng.randrange(4) for i in chosen}
        for k in (1, 2, 3):
            members = [i for i, turns in draws.items() if turns == k]
            if members:
                index = torch.tensor(members)
                batch[index] = torch.rot90(batch[index], k, dims=(-2, -1))
        return batch
    if degrees == "right_angles":
        angles = [90.0 * rng.randrange(4) for _ in chosen]
    else:
        angles = [rng.uniform(-float(degrees), float(degrees)) for _ in chosen]
    radians = torch.tensor(angles, dtype=torch.float64) * math.pi / 180
    cos, sin = torch.cos(radians), torch.sin(radians)
    theta = torch.zeros(len(chosen), 2, 3, dtype=torch.float64)
    theta[:, 0, 0], theta[:, 0, 1] = cos, -sin * h / w  # rotation in pixels, written in normalised coordinates
    theta[:, 1, 0], theta[:, 1, 1] = sin * w / h, cos
    return _on_chosen(batch, chosen, lambda x: _warp(x, theta))


@_op("resized_crop")
def _resized_crop(batch: Any, rng: Any, chosen: list[int], scale: tuple[float, float] = (0.8, 1.0),
                  ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> Any:
    """A random box of area share ``scale`` and aspect ``ratio``, stretched back to the full size."""
    import torch

    h, w = batch.shape[-2:]
    theta = torch.zeros(len(chosen), 2, 3, dtype=torch.float64)
    for row in range(len(chosen)):
        area = h * w * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        cw = min(w, max(1.0, math.sqrt(area * aspect)))
        ch = min(h, max(1.0, math.sqrt(area / aspect)))
        left, top = rng.uniform(0, w - cw), rng.uniform(0, h - ch)
        theta[row, 0, 0], theta[row, 1, 1] = cw / w, ch / h
        theta[row, 0, 2], theta[row, 1, 2] = (left + cw / 2) / w * 2 - 1, (top + ch / 2) / h * 2 - 1
    return _on_chosen(batch, chosen, lambda x: _warp(x, theta))


@_op("translate")
def _translate(batch: Any, rng: Any, chosen: list[int], fraction: float = 0.1) -> Any:
    import torch

    theta = torch.zeros(len(chosen), 2, 3, dtype=torch.float64)
    theta[:, 0, 0] = theta[:, 1, 1] = 1.0
    for row in range(len(chosen)):
        theta[row, 0, 2] = 2 * rng.uniform(-fraction, fraction)
        theta[row, 1, 2] = 2 * rng.uniform(-fraction, fraction)
    return _on_chosen(batch, chosen, lambda x: _warp(x, theta))


def _gray(x: Any) -> Any:
    """(n, 3, H, W) -> (n, 1, H, W) luminance (ITU-R 601)."""
    return 0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]


@_op("brightness")
def _brightness(batch: Any, rng: Any, chosen: list[int], amount: float = 0.2) -> Any:
    return batch.mul_(_per_sample(batch, chosen, [1 + rng.uniform(-amount, amount) for _ in chosen], 1.0))


@_op("contrast")
def _contrast(batch: Any, rng: Any, chosen: list[int], amount: float = 0.2) -> Any:
    """Scale the distance from each image's mean grey level (as torchvision's adjust_contrast)."""
    import torch

    factor = _per_sample(batch, chosen, [1 + rng.uniform(-amount, amount) for _ in chosen], 1.0)
    channel_means = batch.mean((-2, -1))  # the mean grey level from the channel means: one pass
    mean = (channel_means @ torch.tensor([0.299, 0.587, 0.114], dtype=batch.dtype)).view(-1, 1, 1, 1)
    return batch.mul_(factor).add_(mean * (1 - factor))


@_op("gamma")
def _gamma(batch: Any, rng: Any, chosen: list[int], amount: float = 0.2) -> Any:
    gamma = _per_sample(batch, chosen, [math.exp(rng.uniform(-amount, amount)) for _ in chosen], 1.0)
    return batch.clamp_(0, 255).div_(255.0).pow_(gamma).mul_(255.0)


@_op("saturation")
def _saturation(batch: Any, rng: Any, chosen: list[int], amount: float = 0.2) -> Any:
    factor = _per_sample(batch, chosen, [1 + rng.uniform(-amount, amount) for _ in chosen], 1.0)
    gray = _gray(batch)
    return batch.sub_(gray).mul_(factor).add_(gray)


@_op("hue")
def _hue(batch: Any, rng: Any, chosen: list[int], amount: float = 0.05) -> Any:
    from torchvision.transforms.v2 import functional as F

    for i in chosen:
        batch[i] = F.adjust_hue(batch[i].clamp(0, 255) / 255.0, rng.uniform(-amount, amount)) * 255.0
    return batch


@_op("blur")
def _blur(batch: Any, rng: Any, chosen: list[int], sigma: tuple[float, float] = (0.1, 1.5)) -> Any:
    from torchvision.transforms.v2 import functional as F

    for i in chosen:
        s = rng.uniform(*sigma)
        kernel = int(2 * math.ceil(3 * s) + 1)
        batch[i] = F.gaussian_blur(batch[i], [kernel, kernel], [s, s])
    return batch


@_op("noise")
def _noise(batch: Any, rng: Any, chosen: list[int], std: float = 8.0) -> Any:
    """Gaussian noise with standard deviation ``std`` in 0..255 units."""
    import torch

    generator = torch.Generator().manual_seed(rng.randrange(2**31))
    return _on_chosen(batch, chosen, lambda x: x + torch.randn(x.shape, generator=generator) * std)


@_op("erase")
def _erase(batch: Any, rng: Any, chosen: list[int], scale: tuple[float, float] = (0.02, 0.15)) -> Any:
    """Random erasing (Zhong et al., AAAI 2020): a rectangle filled with the image mean."""
    h, w = batch.shape[-2:]
    for i in chosen:
        side = max(1, round(math.sqrt(h * w * rng.uniform(*scale))))
        eh, ew = min(h, side), min(w, side)
        top, left = rng.randint(0, h - eh), rng.randint(0, w - ew)
        batch[i, :, top:top + eh, left:left + ew] = batch[i].mean((-2, -1), keepdim=True)
    return batch


def parse_policy(data: dict[str, Any], name: str = "custom") -> Policy:
    """A policy from its YAML mapping; unknown ops and bad probabilities are errors naming the step."""
    if not isinstance(data, dict) or not isinstance(data.get("steps"), list):
        raise InputError(f"policy {name!r}: expected a mapping with a 'steps' list")
    steps = []
    for index, raw in enumerate(data["steps"], start=1):
        if not isinstance(raw, dict) or "op" not in raw:
            raise InputError(f"policy {name!r}, step {index}: write it as {{op: NAME, p: PROBABILITY, ...}}")
        params = {k: v for k, v in raw.items() if k not in ("op", "p")}
        op = str(raw["op"])
        if op not in AUGMENT_OPS and op not in BATCH_OPS:
            raise InputError(f"policy {name!r}, step {index}: unknown op {op!r}; ops: "
                             f"{', '.join([*AUGMENT_OPS.names(), *BATCH_OPS])}")
        if op in BATCH_OPS and set(params) - {"alpha"}:
            raise InputError(f"policy {name!r}, step {index}: {op} takes only alpha (e.g. alpha: 0.2)")
        p = float(raw.get("p", 1.0))
        if not 0 <= p <= 1:
            raise InputError(f"policy {name!r}, step {index}: p={p} must be between 0 and 1")
        for key in ("scale", "ratio", "sigma"):
            if key in params:
                params[key] = tuple(params[key])
        steps.append(Step(op, p, params))
    recommended = data.get("preprocess") or {}
    if not isinstance(recommended, dict):
        raise InputError(f"policy {name!r}: 'preprocess' must be a mapping, e.g. {{normalize: percentile}}")
    return Policy(str(data.get("name", name)), tuple(steps), str(data.get("description", "")), recommended)


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def load_policy(name_or_path: str) -> Policy:
    """A preset by name (``xray``, ``thin-section``...) or a policy YAML file."""
    import yaml

    path = Path(name_or_path).expanduser()
    if not path.suffix:
        path = PRESET_DIR / f"{name_or_path}.yaml"
        if not path.is_file():
            raise InputError(f"unknown augmentation preset {name_or_path!r}; presets: {', '.join(preset_names())}, "
                             "or give a policy .yaml file")
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise InputError(f"cannot read augmentation policy {path}: {exc}") from exc
    return parse_policy(data, path.stem)


def augment_float(batch: Any, policy: Policy | None, seed: int | None = None) -> Any:
    """(N, 3, H, W) uint8 -> augmented float32 copy in 0..255, each sample with its own random draws.

    For each step the samples it applies to are drawn (probability ``p`` each), then the op runs once
    over the batch with per-sample parameters. The result feeds ``normalize_batch`` directly: the
    batch is converted to float once, not once per op.
    """
    import random

    import torch

    out = batch.float()
    steps = policy.image_steps if policy is not None else ()
    rng = random.Random(seed if seed is not None else int(torch.randint(2**31, (1,))))
    for step in steps:
        chosen = [i for i in range(out.shape[0]) if rng.random() < step.p]
        if chosen:
            out = AUGMENT_OPS.get(step.op)(out, rng, chosen, **step.params)
    return out.clamp_(0, 255)


def apply_policy(batch: Any, policy: Policy | None, seed: int | None = None) -> Any:
    """(N, 3, H, W) uint8 -> augmented uint8 copy (for previews and tests); see :func:`augment_float`."""
    import torch

    if policy is None or not policy.image_steps:
        return batch
    return augment_float(batch, policy, seed).round_().to(torch.uint8)


def batch_mixer(steps: tuple[Step, ...], num_classes: int) -> Any:
    """``(x float, y int) -> (x, soft targets)`` for mixup/cutmix steps, or None when there are none.

    mixup (Zhang et al., "mixup: Beyond Empirical Risk Minimization", ICLR 2018) and CutMix (Yun et al.,
    "CutMix: Regularization Strategy to Train Strong Classifiers with Localizable Features", ICCV 2019)
    through torchvision ``transforms.v2.MixUp``/``CutMix``; each step is tried in order with its ``p``.
    """
    if not steps:
        return None
    import torch
    from torchvision.transforms import v2

    mixers = [(step.p, (v2.MixUp if step.op == "mixup" else v2.CutMix)(
        alpha=float(step.params.get("alpha", 1.0)), num_classes=num_classes)) for step in steps]

    def mix(x: Any, y: Any) -> tuple[Any, Any]:
        for p, mixer in mixers:
            if float(torch.rand(())) < p:
                return mixer(x, y)
        return x, torch.nn.functional.one_hot(y, num_classes).to(x.dtype)

    return mix


class AugmentingCollate:
    """A DataLoader ``collate_fn`` that stacks (uint8 image, target) samples and augments the batch, so the
    augmentation runs in the loader's worker processes, beside the model rather than before it.

    Returns (images, targets, ...): float32 0..255 in-process, uint8 from a worker process (a quarter of the
    bytes to pass); a picklable object, as worker processes need.
    """

    def __init__(self, augment: Callable[..., Any] | None) -> None:
        self.augment = augment

    def __call__(self, samples: list[tuple[Any, ...]]) -> tuple[Any, ...]:
        import torch

        images = torch.stack([s[0] for s in samples])
        rest = tuple(torch.stack([torch.as_tensor(s[i]) for s in samples]) for i in range(1, len(samples[0])))
        if self.augment is not None:
            images = self.augment(images)
            if torch.utils.data.get_worker_info() is not None:  # uint8: a quarter of the bytes between processes
                images = images.round_().to(torch.uint8)
        return (images, *rest)
