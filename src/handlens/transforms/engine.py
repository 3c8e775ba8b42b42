"""The augmentation engine: a policy run over a batch in as few passes over the pixels as its steps allow.

A batch is a list of sources: an (H, W, 3) uint8 image and, for a patch, the square box to cut from
it and the side to resize it to. A policy's per-image steps split into three runs:

- a leading run of geometric steps (flips, rotations, crops, translations). Each sample's draws
  compose into one affine matrix (``policy.GEOMETRIC_DRAWS``). Where that matrix is a symmetry of the
  image (right-angle turns and flips: the commonest draws for orientation-free images), it is applied
  exactly, as a strided view, while the sample's pixels are copied into the batch: no resampling at
  all. Every other sample is resampled once, by one ``grid_sample`` over all of them, however many
  geometric steps the policy has.
- a trailing run of brightness, contrast and blur. Brightness and contrast compose into one scale and
  offset per sample (a contrast's mean grey level follows from the steps before it); blur is linear
  with weights summing to one, so it commutes with them. The run costs one in-place pass, plus one
  convolution over the samples that are blurred.
- whatever lies between, op by op (``policy.AUGMENT_OPS``).

Values are clamped to 0..255 once, at the end. The random draws are those of running the steps one by
one (same seed, same parameters); the pixels differ near the borders only: a rotation after a crop reads
the image's own pixels beyond the crop instead of mirrored ones (one resampling instead of two), and a
contrast step after a blur step takes the mean grey level from before the blur.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from handlens.transforms.patches import crop_resize
from handlens.transforms.policy import (
    AUGMENT_OPS,
    GEOMETRIC_DRAWS,
    IDENTITY,
    Policy,
    Step,
    Symmetry,
    apply_matrices,
    blur_samples,
    draw_factor,
    draw_sigma,
    grey_means,
    label_power,
    scratch,
    symmetric_view,
    symmetry_of,
    warp,
)

#: steps the trailing photometric run fuses into one pass
FUSED_PHOTOMETRIC = ("brightness", "contrast", "blur")


@dataclass(frozen=True)
class Source:
    """One sample's pixels: an (H, W, 3) uint8 array, and for a patch the square ``box`` (top, left,
    side) to cut from it, resized to ``size``. Without a box the whole array is the sample."""

    pixels: np.ndarray
    box: tuple[int, int, int] | None = None
    size: int | None = None

    @property
    def shape(self) -> tuple[int, int]:
        if self.box is not None:
            side = self.size or self.box[2]
            return side, side
        return int(self.pixels.shape[0]), int(self.pixels.shape[1])


def as_sources(images: Any) -> list[Source]:
    """Sources from a (N, 3, H, W) uint8 tensor, a list of (3, H, W) uint8 tensors, or a list of sources."""
    import torch

    if hasattr(images, "dim"):
        images = list(images)
    sources = []
    for image in images:
        if not isinstance(image, Source):
            if image.dtype != torch.uint8 or image.device.type != "cpu":
                raise TypeError(f"augmentation takes uint8 pixels on the CPU (0..255), got {image.dtype} on "
                                f"{image.device}; augment before normalising and before moving to the GPU")
            image = Source(image.permute(1, 2, 0).numpy())
        sources.append(image)
    return sources


def split_steps(steps: Sequence[Step]) -> tuple[list[Step], list[Step], list[Step]]:
    """(leading geometric run, the steps between, trailing brightness/contrast/blur run)."""
    steps = list(steps)
    start = 0
    while start < len(steps) and steps[start].op in GEOMETRIC_DRAWS:
        start += 1
    end = len(steps)
    while end > start and steps[end - 1].op in FUSED_PHOTOMETRIC:
        end -= 1
    return steps[:start], steps[start:end], steps[end:]


def pixel_batch(sources: Sequence[Source], symmetries: Sequence[Symmetry] | None = None, out: Any = None) -> Any:
    """The (N, 3, H, W) uint8 batch of the sources' pixels: patches cut and resized (antialiased), each
    sample turned or flipped by its symmetry (if given) on the way, at the output size; into ``out``
    (a tensor of that shape) when given."""
    import torch
    from torchvision.transforms.v2 import functional as F

    shapes = {source.shape for source in sources}
    if len(shapes) != 1:
        raise ValueError(f"a batch needs samples of one size, got {sorted(shapes)}")
    h, w = shapes.pop()
    batch = torch.empty((len(sources), 3, h, w), dtype=torch.uint8) if out is None else out
    for i, source in enumerate(sources):
        if source.box is not None:
            image = crop_resize(source.pixels, source.box, h)
        else:
            image = torch.from_numpy(source.pixels).permute(2, 0, 1)
            if image.shape[-2:] != (h, w):
                image = F.resize(image, [h, w], antialias=True)
        batch[i] = image if symmetries is None else symmetric_view(image, symmetries[i])
    return batch


#: a step's label map as class indices (``policy.label_permutations``), None for a step without one
Permutation = tuple[int, ...] | None


def _relabel(labels: list[int], i: int, perm: tuple[int, ...], times: int) -> None:
    """Sample ``i``'s label through a fired step's map, ``times`` times (``policy.label_power``)."""
    for _ in range(times):
        labels[i] = perm[labels[i]]


def _geometric_run(sources: Sequence[Source], steps: Sequence[Step], rng: random.Random, *,
                   labels: list[int] | None = None, perms: Sequence[Permutation] = ()) -> Any:
    """The float batch after the leading geometric steps: symmetries applied while copying, the other
    samples resampled once through their composed matrix. ``labels`` (changed in place) go through the
    ``perms`` of the steps (aligned with them) that fire for each sample."""
    import torch

    n = len(sources)
    h, w = sources[0].shape
    matrices: list[np.ndarray | None] = [None] * n
    for number, step in enumerate(steps):
        draw = GEOMETRIC_DRAWS.get(step.op)
        perm = perms[number] if labels is not None else None
        for i in [i for i in range(n) if rng.random() < step.p]:
            drawn = draw(rng, h, w, **step.params)
            if perm is not None:
                _relabel(labels, i, perm, label_power(step, drawn))  # type: ignore[arg-type]
            previous = matrices[i]
            matrices[i] = drawn if previous is None else previous @ drawn  # output -> input: first step leftmost
    symmetries: list[Symmetry | None] = [IDENTITY if m is None else symmetry_of(m, h == w) for m in matrices]
    pixels = pixel_batch(sources, [s or IDENTITY for s in symmetries], scratch("pixels", (n, 3, h, w), torch.uint8))
    batch = pixels.float()  # the result: fresh memory, handed to the caller
    resampled = [i for i, s in enumerate(symmetries) if s is None]
    if resampled:
        index = torch.tensor(resampled)
        chosen = torch.index_select(pixels, 0, index, out=scratch("chosen", (len(index), 3, h, w), torch.uint8))
        theta = np.stack([matrices[i][:2] for i in resampled])  # type: ignore[index]
        batch.index_copy_(0, index, warp(scratch("warped", chosen.shape, batch.dtype).copy_(chosen), theta))
    return batch


def _photometric_run(batch: Any, steps: Sequence[Step], rng: random.Random) -> Any:
    """The trailing brightness/contrast/blur steps: blurs, then one scale and offset per sample."""
    import torch

    n = batch.shape[0]
    scale, offset = [1.0] * n, [0.0] * n
    blurs: list[tuple[list[int], list[float]]] = []
    means: list[float] | None = None
    for step in steps:
        chosen = [i for i in range(n) if rng.random() < step.p]
        if not chosen:
            continue
        if step.op == "blur":
            blurs.append((chosen, [draw_sigma(rng, **step.params) for _ in chosen]))
            continue
        for i in chosen:
            factor = draw_factor(rng, **step.params)
            if step.op == "contrast":  # towards the mean grey level the earlier steps left
                means = grey_means(batch).tolist() if means is None else means
                mean = scale[i] * means[i] + offset[i]
                scale[i], offset[i] = scale[i] * factor, offset[i] * factor + (1 - factor) * mean
            else:
                scale[i], offset[i] = scale[i] * factor, offset[i] * factor
    for chosen, sigmas in blurs:
        blur_samples(batch, chosen, sigmas)
    if any(s != 1.0 for s in scale) or any(o != 0.0 for o in offset):
        batch.mul_(torch.tensor(scale, dtype=batch.dtype).view(n, 1, 1, 1))
        batch.add_(torch.tensor(offset, dtype=batch.dtype).view(n, 1, 1, 1))
    return batch


def augment_sources(sources: Sequence[Source], policy: Policy | None, seed: int | None = None) -> Any:
    """The augmented (N, 3, H, W) float32 batch in 0..255, each sample with its own random draws."""
    import torch

    rng = random.Random(seed if seed is not None else int(torch.randint(2**31, (1,))))
    geometric, middle, photometric = split_steps(policy.image_steps if policy is not None else ())
    batch = _geometric_run(sources, geometric, rng)
    for step in middle:
        chosen = [i for i in range(batch.shape[0]) if rng.random() < step.p]
        if chosen:
            batch = AUGMENT_OPS.get(step.op)(batch, rng, chosen, **step.params)
    if photometric:
        batch = _photometric_run(batch, photometric, rng)
    return batch.clamp_(0, 255)


def augment_with_labels(sources: Sequence[Source], labels: Any, policy: Policy, *, perms: Sequence[Permutation],
                        seed: int | None = None) -> tuple[Any, Any]:
    """(augmented batch, labels after the label maps of the steps that fired for each sample): the pixels and
    random draws of :func:`augment_sources` with the same seed. ``labels``: (N,) class indices (a tensor or
    a sequence); ``perms``: one per image step of ``policy`` (``policy.label_permutations``)."""
    import torch

    rng = random.Random(seed if seed is not None else int(torch.randint(2**31, (1,))))
    steps = list(policy.image_steps)
    if len(perms) != len(steps):
        raise ValueError(f"{len(perms)} label permutations for {len(steps)} image steps")
    out = [int(v) for v in labels]
    if len(out) != len(sources):
        raise ValueError(f"{len(out)} labels for {len(sources)} samples")
    geometric, middle, photometric = split_steps(steps)
    batch = _geometric_run(sources, geometric, rng, labels=out, perms=perms[:len(geometric)])
    h, w = batch.shape[-2:]
    for step, perm in zip(middle, perms[len(geometric):len(geometric) + len(middle)], strict=True):
        chosen = [i for i in range(batch.shape[0]) if rng.random() < step.p]
        if not chosen:
            continue
        if perm is None:
            batch = AUGMENT_OPS.get(step.op)(batch, rng, chosen, **step.params)
            continue
        matrices = [GEOMETRIC_DRAWS.get(step.op)(rng, h, w, **step.params) for _ in chosen]  # the op's own draws
        batch = apply_matrices(batch, chosen, matrices)
        for i, matrix in zip(chosen, matrices, strict=True):
            _relabel(out, i, perm, label_power(step, matrix))
    if photometric:
        batch = _photometric_run(batch, photometric, rng)
    dtype = labels.dtype if isinstance(labels, torch.Tensor) else torch.int64
    return batch.clamp_(0, 255), torch.tensor(out, dtype=dtype)


def augment_float(batch: Any, policy: Policy | None, seed: int | None = None) -> Any:
    """(N, 3, H, W) uint8 -> augmented float32 copy in 0..255 (see :func:`augment_sources`); it feeds
    ``normalize_batch`` directly."""
    return augment_sources(as_sources(batch), policy, seed)


def apply_policy(batch: Any, policy: Policy | None, seed: int | None = None) -> Any:
    """(N, 3, H, W) uint8 -> augmented uint8 copy (for previews and tests); see :func:`augment_sources`."""
    import torch

    if policy is None or not policy.image_steps:
        return batch
    return augment_float(batch, policy, seed).round_().to(torch.uint8)


class AugmentingCollate:
    """A DataLoader ``collate_fn``: (image, target, ...) samples, where an image is a (3, H, W) uint8
    tensor or a :class:`Source` (a patch still to cut), become one batch, augmented when an augmenter is
    given. It runs in the loader's worker processes when there are any, beside the model.

    Returns (images, targets, ...): float32 0..255 in-process, uint8 from a worker process (a quarter of the
    bytes to pass), uint8 without augmentation; a picklable object, as worker processes need. An augmenter
    whose policy has label maps (``permutes_labels``) is given the targets too, and its permuted targets
    (a mirrored clockwise sample becomes anticlockwise) are the ones returned.
    """

    def __init__(self, augment: Callable[..., Any] | None) -> None:
        self.augment = augment

    def __call__(self, samples: list[tuple[Any, ...]]) -> tuple[Any, ...]:
        import torch

        sources = as_sources([s[0] for s in samples])
        rest = tuple(torch.stack([torch.as_tensor(s[i]) for s in samples]) for i in range(1, len(samples[0])))
        if self.augment is None:
            return (pixel_batch(sources), *rest)
        if getattr(self.augment, "permutes_labels", False) and rest:  # a policy with label maps: targets follow
            images, targets = self.augment(sources, labels=rest[0])
            rest = (targets, *rest[1:])
        else:
            images = self.augment(sources)
        if torch.utils.data.get_worker_info() is not None:  # uint8: a quarter of the bytes between processes
            images = images.round_().to(torch.uint8)
        return (images, *rest)
