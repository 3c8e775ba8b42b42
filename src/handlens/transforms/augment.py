"""The augmentation a run config asks for, as one ``images -> batch`` function.

Every kind goes through the augmentation engine (``transforms.engine``): ``basic`` is a policy built from
``augment.crop_scale/hflip/vflip`` (random resized crop, then flips), any other name is a preset or a
policy YAML file. A policy whose steps carry label maps (``labels:``, see ``transforms.policy``) permutes the
targets of the samples its mirrors and turns fire for; the augmenter then takes and returns the labels.
"""

from __future__ import annotations

from typing import Any

from handlens.core.errors import InputError
from handlens.transforms.engine import as_sources, augment_sources, augment_with_labels
from handlens.transforms.policy import Policy, Step, label_permutations, load_policy


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


def recorded_policy(manifest: dict[str, Any]) -> Policy | None:
    """The policy a bundle recorded as it trained (``augment_policy``: its steps, label maps included), or None
    when the bundle is older than that record (then its config's policy name is all there is)."""
    from handlens.transforms.policy import parse_policy

    data = manifest.get("augment_policy")
    return parse_policy(data, str(data.get("name", "recorded"))) if isinstance(data, dict) else None


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


#: why images augmented without their labels cannot use a policy with label maps, and what to do instead
LABELS_DROPPED = ("augmentation policy {name!r} changes class labels when its {ops} steps fire (labels:), but these "
                  "images are augmented without their labels: cached augmented feature views (train.views > 0 on a "
                  "frozen backbone, also in studies) keep each image's own label. Train on the images instead "
                  "(train.views=0 train.feature_cache=off, or a backbone that learns), or remove labels: from the "
                  "policy")


class PolicyAugmenter:
    """``images, generator=None -> batch``: a uint8 batch or a list of sources (``transforms.engine``) in,
    a float32 batch in 0..255 out, ready for ``normalize_batch``.
    A plain object (not a closure) so loader worker processes can receive it under any start method.

    A policy with label maps needs the run's ``classes`` (the maps name classes; the loader's targets are
    indices, translated once here) and is called with ``labels=``: it then returns (batch, permuted labels).
    Called without labels it refuses (:data:`LABELS_DROPPED`) rather than let a mirrored sample keep a label
    that its mirror image contradicts."""

    def __init__(self, policy: Policy, classes: list[str] | None = None) -> None:
        self.policy = policy
        self.permutes_labels = policy.has_label_maps
        self.perms = label_permutations(policy, list(classes)) if self.permutes_labels and classes is not None \
            else None

    def __call__(self, images: Any, generator: Any = None, labels: Any = None) -> Any:
        import torch

        seed = int(torch.randint(2**31, (1,), generator=generator)) if generator is not None else None
        if not self.permutes_labels:
            batch = augment_sources(as_sources(images), self.policy, seed)
            return batch if labels is None else (batch, labels)
        if labels is None:
            ops = "/".join(sorted({s.op for s in self.policy.steps if s.labels}))
            raise InputError(LABELS_DROPPED.format(name=self.policy.name, ops=ops))
        if self.perms is None:
            raise InputError(f"augmentation policy {self.policy.name!r} has label maps (labels:), which name classes: "
                             "build its augmenter with the run's classes (build_augmenter(config, classes=...))")
        return augment_with_labels(as_sources(images), labels, self.policy, perms=self.perms, seed=seed)


def build_augmenter(config: Any, *, classes: list[str] | None = None) -> PolicyAugmenter | None:
    """The augmenter for the config's per-image steps (None when there are none). ``classes``: the run's, in
    index order; needed (and checked against the maps' names) when the policy has label maps."""
    policy = policy_for(config)
    if policy is None or not policy.image_steps:
        return None
    return PolicyAugmenter(policy, classes)
