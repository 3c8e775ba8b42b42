"""Declarative augmentation policies: YAML lists of steps, each applied with its own probability.

A policy file looks like::

    name: xray
    description: chest X-rays have an up and a left-right convention that is not symmetric
    steps:
      - {op: rotate, p: 0.5, degrees: 7}
      - {op: resized_crop, p: 0.5, scale: [0.85, 1.0]}
      - {op: brightness, p: 0.5, amount: 0.1}

Steps run in order, each applied to each sample with its own probability and its own random draw;
``transforms.engine`` runs a policy over a batch in as few passes over the pixels as its steps allow
(geometric steps compose into one resampling, brightness/contrast/blur at the end into one pass).
``mixup`` and ``cutmix`` are batch steps: with probability ``p`` a training batch is mixed (after
normalisation, with soft targets); at most one of them per batch. A policy may also recommend
preprocessing (``preprocess: {normalize: percentile}``, ``preprocess: {patches: {enabled: true}}``); a
run uses it unless its own config sets that key.

Presets ship as plain YAML files users can copy and edit: ``natural-photo``, ``xray`` (no vertical
flip, no hue, mild rotation, percentile normalisation), ``thin-section`` (any rotation, both flips: a
thin section has no up; patch sampling on), ``microscopy``.

A geometric step that is an exact mirror or turn may carry a *label map*: ``{op: hflip, p: 0.5, labels:
{cw: ccw, ccw: cw}}`` says that mirroring an image turns a clockwise sample into an anticlockwise one.
When the step fires for a sample, its label goes through the map (a permutation of the names it lists;
other classes keep theirs); maps of the steps that fire compose in order, so ``hflip`` then ``vflip``
(a half turn) gives back the label. On ``rotate`` with ``degrees: right_angles`` the map is one quarter
turn's (anticlockwise on screen), applied once per quarter turn drawn. Maps are checked here (only on
``hflip``, ``vflip`` and right-angle ``rotate``; a permutation) and against a run's classes by
:func:`label_permutations`. Images augmented without their labels (cached feature views) cannot use them:
``transforms.augment.PolicyAugmenter`` refuses.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from handlens.core.errors import InputError
from handlens.core.registry import Registry

PRESET_DIR = Path(__file__).parent / "presets"

#: ops that are an exact mirror or turn whenever they fire (``rotate`` only with ``degrees: right_angles``): the
#: only ones a label map (``labels:``) can go with
LABEL_MAP_OPS = ("hflip", "vflip", "rotate")


@dataclass(frozen=True)
class Step:
    op: str
    p: float = 1.0
    params: dict[str, Any] = field(default_factory=dict)
    labels: dict[str, str] = field(default_factory=dict)  # class name -> class name when the step fires


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

    @property
    def has_label_maps(self) -> bool:
        """Whether any step changes labels when it fires (then augmentation must see the labels)."""
        return any(s.labels for s in self.steps)

    def without_label_maps(self) -> Policy:
        """The same steps with no label maps: for what looks at pixels only (a preview)."""
        from dataclasses import replace

        return replace(self, steps=tuple(replace(s, labels={}) for s in self.steps))

    def to_dict(self) -> dict[str, Any]:
        """The YAML mapping :func:`parse_policy` reads back into this policy."""
        data = {"name": self.name, "description": self.description,
                "steps": [{"op": s.op, "p": s.p, **s.params, **({"labels": dict(s.labels)} if s.labels else {})}
                          for s in self.steps]}
        if self.preprocess:
            data["preprocess"] = self.preprocess
        return data


#: steps that mix two samples of a batch (and their labels): run by the training loop, not per image
BATCH_OPS = ("mixup", "cutmix")


#: op name -> function(batch, rng: random.Random, chosen: list[int], **params) -> batch, where batch is
#: (N, 3, H, W) float32 in 0..255 and ``chosen`` the samples the step applies to. Each op draws its
#: own parameters per chosen sample and works on the whole batch at once: geometric ops are exact turns
#: and flips or one ``grid_sample`` with a per-sample affine matrix, pointwise ops broadcast per-sample factors (the
#: identity for samples not chosen). Values are clamped and rounded once, at the end, not per op.
AUGMENT_OPS: Registry[Callable[..., Any]] = Registry("augmentation op")

#: geometric op name -> draw(rng, h, w, **params) -> (3, 3) float64 matrix: one sample's random transform
#: of an h x w image, mapping output to input points in normalised coordinates (-1..1, pixel centres as
#: in ``grid_sample(align_corners=False)``). A run of geometric steps composes into one matrix per sample
#: (``transforms.engine``), so an image is resampled once however many such steps a policy has.
GEOMETRIC_DRAWS: Registry[Callable[..., Any]] = Registry("geometric augmentation op")


def _op(name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    return AUGMENT_OPS.decorator(name)


_SCRATCH = threading.local()


def scratch(name: str, shape: tuple[int, ...], dtype: Any) -> Any:
    """A reusable tensor of this thread for an intermediate that never leaves the engine.

    A fresh large tensor per batch is fresh memory from the system each time (glibc hands big blocks
    back when they are freed), and touching its pages costs about 1 ms per 20 MB here; reusing one
    buffer per intermediate avoids that. Grows to the largest shape asked for, then hands out views.
    """
    import torch

    buffers = _SCRATCH.__dict__.setdefault("buffers", {})
    count = math.prod(shape)
    buffer = buffers.get((name, dtype))
    if buffer is None or buffer.numel() < count:
        buffer = buffers[(name, dtype)] = torch.empty(count, dtype=dtype)
    return buffer[:count].view(shape)


def warp(batch: Any, theta: Any) -> Any:
    """Resample each image through its (2, 3) affine matrix in normalised coordinates (output -> input),
    bilinear, with mirrored borders (no black corners for a texture to learn from)."""
    import torch
    import torch.nn.functional as F

    n, _, h, w = batch.shape
    t = torch.as_tensor(theta).to(batch.dtype)
    # the sampling grid by broadcasting (what F.affine_grid computes, ~50x cheaper here): pixel centres
    # in normalised coordinates, x' = a*x + b*y + c for each output pixel, as an (n, h, w, 2) view
    xs = (torch.arange(w, dtype=batch.dtype) * 2 + 1) / w - 1
    ys = (torch.arange(h, dtype=batch.dtype) * 2 + 1) / h - 1
    rows = t[:, :, 1].reshape(n, 2, 1, 1) * ys.view(1, 1, h, 1) + t[:, :, 2].reshape(n, 2, 1, 1)
    grid = scratch("grid", (n, 2, h, w), batch.dtype).copy_(rows.expand(n, 2, h, w))
    grid = grid.addcmul_(t[:, :, 0].reshape(n, 2, 1, 1), xs.view(1, 1, 1, w)).permute(0, 2, 3, 1)
    return F.grid_sample(batch, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


#: (transpose, flip rows, flip columns): an exact symmetry of the pixel grid
Symmetry = tuple[bool, bool, bool]
IDENTITY: Symmetry = (False, False, False)


def symmetry_of(matrix: Any, square: bool) -> Symmetry | None:
    """The exact grid symmetry a (3, 3) output -> input matrix in normalised coordinates is, or None.

    Output pixel (row v, column u) reads input (row c*u + d*v, column a*u + b*v) for ``[[a, b], [c, d]]``;
    with entries in {-1, 0, 1} and no translation that is a flip and/or a transpose (a transpose only
    keeps the grid on a square image).
    """
    values = [float(matrix[0][0]), float(matrix[0][1]), float(matrix[1][0]), float(matrix[1][1])]
    rounded = [round(v) for v in values]
    if abs(matrix[0][2]) > 1e-6 or abs(matrix[1][2]) > 1e-6 or any(abs(v - r) > 1e-6 for v, r in
                                                                   zip(values, rounded, strict=True)):
        return None
    a, b, c, d = rounded
    if b == 0 and c == 0 and abs(a) == 1 and abs(d) == 1:
        return False, bool(d < 0), bool(a < 0)
    if a == 0 and d == 0 and abs(b) == 1 and abs(c) == 1 and square:
        return True, bool(b < 0), bool(c < 0)
    return None


def symmetric_view(image: Any, symmetry: Symmetry) -> Any:
    """A (..., H, W) tensor seen through a grid symmetry (a flip copies: torch has no negative strides)."""
    transpose, flip_rows, flip_cols = symmetry
    view = image.transpose(-2, -1) if transpose else image
    dims = [d for d, flip in ((-2, flip_rows), (-1, flip_cols)) if flip]
    return view.flip(dims) if dims else view


def apply_matrices(batch: Any, chosen: list[int], matrices: list[Any]) -> Any:
    """The chosen samples of a float batch through their drawn (3, 3) matrices, in place: turns and flips
    exactly, one warp for the others."""
    import numpy as np
    import torch

    h, w = batch.shape[-2:]
    resampled = []
    for i, matrix in zip(chosen, matrices, strict=True):
        symmetry = symmetry_of(matrix, h == w)
        if symmetry is None:
            resampled.append((i, matrix[:2]))
        elif symmetry != IDENTITY:  # exact; a copy, as the view may alias the sample it replaces
            batch[i] = symmetric_view(batch[i], symmetry).clone()
    if resampled:
        index = torch.tensor([i for i, _ in resampled])
        theta = np.stack([matrix for _, matrix in resampled])
        batch.index_copy_(0, index, warp(batch.index_select(0, index), theta))
    return batch


def _geometric(name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register a matrix draw, and as the batch op of the same name (for a geometric step after a colour step):
    the chosen samples' turns and flips applied exactly, one warp for the others."""

    def wrap(draw: Callable[..., Any]) -> Callable[..., Any]:
        GEOMETRIC_DRAWS.register(name, draw)

        def batch_op(batch: Any, rng: Any, chosen: list[int], **params: Any) -> Any:
            h, w = batch.shape[-2:]
            return apply_matrices(batch, chosen, [draw(rng, h, w, **params) for _ in chosen])

        AUGMENT_OPS.register(name, batch_op)
        return draw

    return wrap


def _affine(*, a: float = 1.0, b: float = 0.0, c: float = 0.0, d: float = 1.0, tx: float = 0.0,
            ty: float = 0.0) -> Any:
    import numpy as np

    return np.array([[a, b, tx], [c, d, ty], [0.0, 0.0, 1.0]])


@_geometric("hflip")
def _hflip(rng: Any, h: int, w: int) -> Any:
    return _affine(a=-1.0)


@_geometric("vflip")
def _vflip(rng: Any, h: int, w: int) -> Any:
    return _affine(d=-1.0)


@_geometric("rotate")
def _rotate(rng: Any, h: int, w: int, degrees: float | str = 15.0) -> Any:
    """``degrees``: a maximum angle (uniform in +-degrees), or ``right_angles`` (0/90/180/270, exact)."""
    if degrees == "right_angles":
        turns = rng.randrange(4)
        cos, sin = ((1.0, 0.0), (0.0, 1.0), (-1.0, 0.0), (0.0, -1.0))[turns]
    else:
        radians = rng.uniform(-float(degrees), float(degrees)) * math.pi / 180
        cos, sin = math.cos(radians), math.sin(radians)
    # a rotation in pixels, written in normalised coordinates
    return _affine(a=cos, b=-sin * h / w, c=sin * w / h, d=cos)


@_geometric("resized_crop")
def _resized_crop(rng: Any, h: int, w: int, *, scale: tuple[float, float] = (0.8, 1.0),
                  ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> Any:
    """A random box of area share ``scale`` and aspect ``ratio``, stretched back to the full size."""
    area = h * w * rng.uniform(*scale)
    aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
    cw = min(w, max(1.0, math.sqrt(area * aspect)))
    ch = min(h, max(1.0, math.sqrt(area / aspect)))
    left, top = rng.uniform(0, w - cw), rng.uniform(0, h - ch)
    return _affine(a=cw / w, d=ch / h, tx=(left + cw / 2) / w * 2 - 1, ty=(top + ch / 2) / h * 2 - 1)


@_geometric("translate")
def _translate(rng: Any, h: int, w: int, fraction: float = 0.1) -> Any:
    return _affine(tx=2 * rng.uniform(-fraction, fraction), ty=2 * rng.uniform(-fraction, fraction))


def _per_sample(batch: Any, chosen: list[int], values: list[float], identity: float) -> Any:
    """(N, 1, 1, 1) factors: ``values`` for the chosen samples, ``identity`` for the others."""
    import torch

    out = torch.full((batch.shape[0], 1, 1, 1), identity, dtype=batch.dtype)
    out[torch.tensor(chosen), 0, 0, 0] = torch.tensor(values, dtype=batch.dtype)
    return out


def grey_means(batch: Any) -> Any:
    """(N,) mean grey level (ITU-R 601 luminance) of each image, from its channel means: one pass."""
    import torch

    return batch.mean((-2, -1)) @ torch.tensor([0.299, 0.587, 0.114], dtype=batch.dtype)


def _gray(x: Any) -> Any:
    """(n, 3, H, W) -> (n, 1, H, W) luminance (ITU-R 601)."""
    return 0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]


def draw_factor(rng: Any, amount: float = 0.2) -> float:
    """A brightness or contrast factor, uniform in 1 +- ``amount``."""
    return 1 + rng.uniform(-amount, amount)


@_op("brightness")
def _brightness(batch: Any, rng: Any, chosen: list[int], amount: float = 0.2) -> Any:
    return batch.mul_(_per_sample(batch, chosen, [draw_factor(rng, amount) for _ in chosen], 1.0))


@_op("contrast")
def _contrast(batch: Any, rng: Any, chosen: list[int], amount: float = 0.2) -> Any:
    """Scale the distance from each image's mean grey level (as torchvision's adjust_contrast)."""
    factor = _per_sample(batch, chosen, [draw_factor(rng, amount) for _ in chosen], 1.0)
    mean = grey_means(batch).view(-1, 1, 1, 1)
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


def blur_samples(batch: Any, chosen: list[int], sigmas: list[float]) -> Any:
    """Gaussian blur of the chosen samples, each with its own sigma, in place, all at once: the kernel and
    mirrored borders of torchvision's ``gaussian_blur`` (radius ceil(3 sigma)), separable, as weighted
    sums of shifted views (twice as fast here as a depthwise convolution). A sample with a smaller
    radius than the largest has zero weights beyond its own."""
    import torch
    import torch.nn.functional as F

    n, h, w = len(chosen), batch.shape[-2], batch.shape[-1]
    radii = torch.tensor([math.ceil(3 * s) for s in sigmas], dtype=batch.dtype).view(-1, 1)
    radius = int(radii.max())
    offsets = torch.arange(-radius, radius + 1, dtype=batch.dtype).view(1, -1)
    kernel = torch.exp(-0.5 * (offsets / torch.tensor(sigmas, dtype=batch.dtype).view(-1, 1)) ** 2)
    kernel = kernel * (offsets.abs() <= radii)
    kernel = (kernel / kernel.sum(1, keepdim=True)).view(n, -1, 1, 1, 1)  # tap j of sample i: kernel[i, j]
    index = torch.tensor(chosen)
    padded = F.pad(batch.index_select(0, index), (radius,) * 4, mode="reflect")
    rows = kernel[:, 0] * padded[..., 0:w]
    for j in range(1, 2 * radius + 1):
        rows.addcmul_(kernel[:, j], padded[..., j:j + w])
    out = kernel[:, 0] * rows[..., 0:h, :]
    for j in range(1, 2 * radius + 1):
        out.addcmul_(kernel[:, j], rows[..., j:j + h, :])
    return batch.index_copy_(0, index, out)


def draw_sigma(rng: Any, sigma: tuple[float, float] = (0.1, 1.5)) -> float:
    return rng.uniform(*sigma)


@_op("blur")
def _blur(batch: Any, rng: Any, chosen: list[int], sigma: tuple[float, float] = (0.1, 1.5)) -> Any:
    return blur_samples(batch, chosen, [draw_sigma(rng, sigma) for _ in chosen])


@_op("noise")
def _noise(batch: Any, rng: Any, chosen: list[int], std: float = 8.0) -> Any:
    """Gaussian noise with standard deviation ``std`` in 0..255 units."""
    import torch

    generator = torch.Generator().manual_seed(rng.randrange(2**31))
    index = torch.tensor(chosen)
    noise = torch.randn((len(chosen), *batch.shape[1:]), generator=generator, dtype=batch.dtype)
    return batch.index_add_(0, index, noise.mul_(std))


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
        params = {k: v for k, v in raw.items() if k not in ("op", "p", "labels")}
        op = str(raw["op"])
        if op not in AUGMENT_OPS and op not in BATCH_OPS:
            raise InputError(f"policy {name!r}, step {index}: unknown op {op!r}; ops: "
                             f"{', '.join([*AUGMENT_OPS.names(), *BATCH_OPS])}")
        labels = parse_label_map(raw["labels"], op, params, where=f"policy {name!r}, step {index}") \
            if "labels" in raw else {}
        if op in BATCH_OPS and set(params) - {"alpha"}:
            raise InputError(f"policy {name!r}, step {index}: {op} takes only alpha (e.g. alpha: 0.2)")
        p = float(raw.get("p", 1.0))
        if not 0 <= p <= 1:
            raise InputError(f"policy {name!r}, step {index}: p={p} must be between 0 and 1")
        for key in ("scale", "ratio", "sigma"):
            if key in params:
                params[key] = tuple(params[key])
        steps.append(Step(op, p, params, labels))
    recommended = data.get("preprocess") or {}
    if not isinstance(recommended, dict):
        raise InputError(f"policy {name!r}: 'preprocess' must be a mapping, e.g. {{normalize: percentile}}")
    return Policy(str(data.get("name", name)), tuple(steps), str(data.get("description", "")), recommended)


def parse_label_map(raw: Any, op: str, params: dict[str, Any], *, where: str) -> dict[str, str]:
    """A step's ``labels:`` map, checked: only on an exact mirror or turn, and a permutation of the names it
    lists (each name it maps from is mapped to exactly once), so that no class is lost or merged."""
    example = "e.g. {op: hflip, p: 0.5, labels: {cw: ccw, ccw: cw}}"
    if op not in LABEL_MAP_OPS:
        raise InputError(f"{where}: labels: on {op} makes no sense: a label map says how an exact mirror or "
                         "turn changes a class, so it goes on hflip, vflip or rotate with degrees: right_angles "
                         f"({example})")
    if op == "rotate" and params.get("degrees", 15.0) != "right_angles":
        raise InputError(f"{where}: labels: on a free-angle rotate (degrees: {params.get('degrees', 15.0)}) makes no "
                         "sense: an arbitrary angle is no exact symmetry; use degrees: right_angles (the map is then "
                         "one quarter turn's), or move the map to a hflip or vflip step")
    if not isinstance(raw, dict) or not raw:
        raise InputError(f"{where}: labels: must map class names to class names ({example})")
    mapping = {str(k): str(v) for k, v in raw.items()}
    targets = list(mapping.values())
    repeated = sorted({t for t in targets if targets.count(t) > 1})
    if repeated:
        raise InputError(f"{where}: labels: is not a permutation: {', '.join(map(repr, repeated))} is the image of "
                         "several classes (two classes would merge); map each name to a different one")
    if set(targets) != set(mapping):
        missing = sorted(set(targets) - set(mapping))
        raise InputError(f"{where}: labels: is not a permutation: {', '.join(map(repr, missing))} is mapped to but "
                         f"not from; list every name it touches both ways ({example})")
    return mapping


def label_permutations(policy: Policy, classes: list[str]) -> tuple[tuple[int, ...] | None, ...]:
    """Each image step's label map as class indices of ``classes`` (None for a step without one): index ``i`` goes
    to ``perm[i]``. A name that is not one of ``classes`` is an error naming it (with the closest class)."""
    import difflib

    index = {c: i for i, c in enumerate(classes)}
    out: list[tuple[int, ...] | None] = []
    for number, step in enumerate(policy.image_steps, start=1):
        if not step.labels:
            out.append(None)
            continue
        for label in step.labels:
            if label not in index:
                close = difflib.get_close_matches(label, classes, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise InputError(f"augmentation policy {policy.name!r}, step {number} ({step.op}): labels: names "
                                 f"{label!r}{hint}, which is not a class of this run ({', '.join(classes)}); "
                                 "fix the name in the policy or train on the labelset it was written for")
        perm = list(range(len(classes)))
        for source, target in step.labels.items():
            perm[index[source]] = index[target]
        out.append(tuple(perm))
    return tuple(out)


def label_power(step: Step, matrix: Any) -> int:
    """How many times a fired step's label map applies for this drawn matrix: once for a flip; the number of
    quarter turns (0..3, as ``_rotate`` draws them) for a right-angle rotate."""
    if step.op != "rotate":
        return 1
    a, c = float(matrix[0][0]), float(matrix[1][0])  # cos and (a positive multiple of) sin of the turn
    return {(1, 0): 0, (0, 1): 1, (-1, 0): 2, (0, -1): 3}[(round(a), int(math.copysign(1, c)) if abs(c) > 0.5 else 0)]


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
