"""The augmentation a run config asks for, as one ``batch -> batch`` function on uint8 tensors.

Every kind goes through the policy engine (``transforms.policy``): ``basic`` is a policy built from
``augment.crop_scale/hflip/vflip`` (random resized crop, then flips), any other name is a preset or a
policy YAML file.
"""

from __future__ import annotations

from typing import Any

from handlens.transforms.policy import Policy, Step, apply_policy, load_policy


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


def build_augmenter(config: Any) -> Any:
    """``batch, generator=None -> batch`` for the config's policy (None for ``policy: none``)."""
    if config.policy == "none":
        return None
    policy = (basic_policy(config.hflip, config.vflip, config.crop_scale) if config.policy == "basic"
              else load_policy(config.policy))

    def run(batch: Any, generator: Any = None) -> Any:
        import torch

        seed = int(torch.randint(2**31, (1,), generator=generator)) if generator is not None else None
        return apply_policy(batch, policy, seed)

    return run
