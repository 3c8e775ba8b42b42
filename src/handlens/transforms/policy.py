"""Declarative augmentation policies: YAML lists of steps, each applied with its own probability.

A policy file looks like::

    name: xray
    description: chest X-rays have an up and a left-right convention that is not symmetric
    steps:
      - {op: rotate, p: 0.5, degrees: 7}
      - {op: resized_crop, p: 0.5, scale: [0.85, 1.0]}
      - {op: brightness, p: 0.5, amount: 0.1}

Steps run in order on uint8 tensors, one random draw per sample (torchvision ``transforms.v2``
functional ops). Presets ship as plain YAML files users can copy and edit: ``natural-photo``, ``xray``
(no vertical flip, no hue, mild rotation), ``thin-section`` (any rotation, both flips: a thin section
has no up), ``microscopy``.
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

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "description": self.description,
                "steps": [{"op": s.op, "p": s.p, **s.params} for s in self.steps]}


#: op name -> function(img uint8 (3, H, W), rng: random.Random, **params) -> img
AUGMENT_OPS: Registry[Callable[..., Any]] = Registry("augmentation op")


def _op(name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    return AUGMENT_OPS.decorator(name)


@_op("hflip")
def _hflip(img: Any, rng: Any) -> Any:
    from torchvision.transforms.v2 import functional as F

    return F.horizontal_flip(img)


@_op("vflip")
def _vflip(img: Any, rng: Any) -> Any:
    from torchvision.transforms.v2 import functional as F

    return F.vertical_flip(img)


@_op("rotate")
def _rotate(img: Any, rng: Any, degrees: float | str = 15.0) -> Any:
    """``degrees``: a maximum angle (uniform in +-degrees), or ``right_angles`` (0/90/180/270)."""
    import torch
    from torchvision.transforms.v2 import functional as F

    if degrees == "right_angles":
        return torch.rot90(img, rng.randrange(4), dims=(-2, -1))
    angle = rng.uniform(-float(degrees), float(degrees))
    # reflect-pad by rotating a mirrored canvas would need more code; fill with the image mean instead
    fill = [float(v) for v in img.float().mean((-2, -1))]
    return F.rotate(img, angle, interpolation=F.InterpolationMode.BILINEAR, fill=fill)


@_op("resized_crop")
def _resized_crop(img: Any, rng: Any, scale: tuple[float, float] = (0.8, 1.0),
                  ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> Any:
    from torchvision.transforms.v2 import functional as F

    h, w = img.shape[-2:]
    area = h * w * rng.uniform(*scale)
    aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
    cw, ch = min(w, max(1, round(math.sqrt(area * aspect)))), min(h, max(1, round(math.sqrt(area / aspect))))
    top, left = rng.randint(0, h - ch), rng.randint(0, w - cw)
    return F.resized_crop(img, top, left, ch, cw, [h, w], antialias=True)


@_op("translate")
def _translate(img: Any, rng: Any, fraction: float = 0.1) -> Any:
    from torchvision.transforms.v2 import functional as F

    h, w = img.shape[-2:]
    dx, dy = rng.uniform(-fraction, fraction) * w, rng.uniform(-fraction, fraction) * h
    fill = [float(v) for v in img.float().mean((-2, -1))]
    return F.affine(img, angle=0.0, translate=[round(dx), round(dy)], scale=1.0, shear=[0.0, 0.0], fill=fill)


@_op("brightness")
def _brightness(img: Any, rng: Any, amount: float = 0.2) -> Any:
    from torchvision.transforms.v2 import functional as F

    return F.adjust_brightness(img, 1 + rng.uniform(-amount, amount))


@_op("contrast")
def _contrast(img: Any, rng: Any, amount: float = 0.2) -> Any:
    from torchvision.transforms.v2 import functional as F

    return F.adjust_contrast(img, 1 + rng.uniform(-amount, amount))


@_op("gamma")
def _gamma(img: Any, rng: Any, amount: float = 0.2) -> Any:
    from torchvision.transforms.v2 import functional as F

    return F.adjust_gamma(img, math.exp(rng.uniform(-amount, amount)))


@_op("hue")
def _hue(img: Any, rng: Any, amount: float = 0.05) -> Any:
    from torchvision.transforms.v2 import functional as F

    return F.adjust_hue(img, rng.uniform(-amount, amount))


@_op("saturation")
def _saturation(img: Any, rng: Any, amount: float = 0.2) -> Any:
    from torchvision.transforms.v2 import functional as F

    return F.adjust_saturation(img, 1 + rng.uniform(-amount, amount))


@_op("blur")
def _blur(img: Any, rng: Any, sigma: tuple[float, float] = (0.1, 1.5)) -> Any:
    from torchvision.transforms.v2 import functional as F

    s = rng.uniform(*sigma)
    kernel = int(2 * math.ceil(3 * s) + 1)
    return F.gaussian_blur(img, [kernel, kernel], [s, s])


@_op("noise")
def _noise(img: Any, rng: Any, std: float = 8.0) -> Any:
    """Gaussian noise with standard deviation ``std`` in 0..255 units."""
    import torch

    generator = torch.Generator().manual_seed(rng.randrange(2**31))
    noisy = img.float() + torch.randn(img.shape, generator=generator) * std
    return noisy.round().clamp(0, 255).to(img.dtype)


@_op("erase")
def _erase(img: Any, rng: Any, scale: tuple[float, float] = (0.02, 0.15)) -> Any:
    """Random erasing (Zhong et al., AAAI 2020): a rectangle filled with the image mean."""
    h, w = img.shape[-2:]
    area = h * w * rng.uniform(*scale)
    side = max(1, round(math.sqrt(area)))
    eh, ew = min(h, side), min(w, side)
    top, left = rng.randint(0, h - eh), rng.randint(0, w - ew)
    out = img.clone()
    out[:, top:top + eh, left:left + ew] = img.float().mean((-2, -1), keepdim=True).round().to(img.dtype)
    return out


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
        if op not in AUGMENT_OPS:
            raise InputError(f"policy {name!r}, step {index}: unknown op {op!r}; ops: {', '.join(AUGMENT_OPS.names())}")
        p = float(raw.get("p", 1.0))
        if not 0 <= p <= 1:
            raise InputError(f"policy {name!r}, step {index}: p={p} must be between 0 and 1")
        for key in ("scale", "ratio", "sigma"):
            if key in params:
                params[key] = tuple(params[key])
        steps.append(Step(op, p, params))
    return Policy(str(data.get("name", name)), tuple(steps), str(data.get("description", "")))


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


def apply_policy(batch: Any, policy: Policy | None, seed: int | None = None) -> Any:
    """(N, 3, H, W) uint8 -> augmented copy, each sample with its own random draws."""
    import random

    import torch

    if policy is None or not policy.steps:
        return batch
    rng = random.Random(seed if seed is not None else int(torch.randint(2**31, (1,))))
    out = torch.empty_like(batch)
    for i in range(batch.shape[0]):
        img = batch[i]
        for step in policy.steps:
            if rng.random() < step.p:
                img = AUGMENT_OPS.get(step.op)(img, rng, **step.params)
        out[i] = img
    return out
