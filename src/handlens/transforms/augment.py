"""The augmentation a run config asks for, as one ``images -> batch`` function.

Every kind goes through the augmentation engine (``transforms.engine``): ``basic`` is a policy built from
``augment.crop_scale/hflip/vflip`` (random resized crop, then flips), any other name is a preset or a
policy YAML file.
"""

from __future__ import annotations

from typing import Any

from handlens.transforms.engine import as_sources, augment_sources
from handlens.transforms.policy import Policy, Step, load_policy


def basic_policy(hflip: bool = True, vflip: bool = False, crop_scale: float = 0.8) -> Policy:
    """Random resized crop (area share ``crop_scale``..1, aspect 3/4..4/3) and flips, each with p=0.5."""
    steps = []
    if crop_scale < 1.0:
        steps.append(Step("resized_crop", 1.0, {"scale": (crop_scale, 1.0)}))
    if hflip:
        steps.append(Step("hflip", 0.5))
    if vflip:
        steps.append(Step("vflip", 0.5))
    return Policy("basic", tuple(steps), "random resized crop and flips")


def policy_for(config: Any) -> Policy | None:
    """The config's policy (None for ``policy: none``), with ``augment.mixup``/``cutmix`` as batch steps."""
    if config.policy == "none":
        policy = None
    elif config.policy in ("basic", "auto"):  # auto: what a run resolves it to wherever images are augmented
        policy = basic_policy(config.hflip, config.vflip, config.crop_scale)
    else:
        policy = load_policy(config.policy)
    extra = [Step(op, config.mix_p, {"alpha": alpha}) for op, alpha in
             (("mixup", getattr(config, "mixup", 0.0)), ("cutmix", getattr(config, "cutmix", 0.0))) if alpha > 0]
    if extra:
        base = policy or Policy("none", ())
        policy = Policy(base.name, (*base.steps, *extra), base.description, base.preprocess)
    return policy


class PolicyAugmenter:
    """``images, generator=None -> batch``: a uint8 batch or a list of sources (``transforms.engine``) in,
    a float32 batch in 0..255 out, ready for ``normalize_batch``.
    A plain object (not a closure) so loader worker processes can receive it under any start method."""

    def __init__(self, policy: Policy) -> None:
        self.policy = policy

    def __call__(self, images: Any, generator: Any = None) -> Any:
        import torch

        seed = int(torch.randint(2**31, (1,), generator=generator)) if generator is not None else None
        return augment_sources(as_sources(images), self.policy, seed)


def build_augmenter(config: Any) -> PolicyAugmenter | None:
    """The augmenter for the config's per-image steps (None when there are none)."""
    policy = policy_for(config)
    if policy is None or not policy.image_steps:
        return None
    return PolicyAugmenter(policy)
