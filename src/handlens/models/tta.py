"""Test-time augmentation: average a model's probabilities over the exact symmetries its training policy allows.

A view is an exact symmetry of the square input grid (a flip, a right-angle turn, or both: no
resampling, so no new pixels). Which views a bundle may use comes from its training policy
(``config.augment`` in the manifest), because the policy is where the user said which changes keep
the label: ``hflip``/``vflip`` steps give those flips; a ``rotate`` step with ``degrees: right_angles``
or a range of at least 90 degrees gives quarter turns. The views are the group those generate (a
label that survives a flip and a turn survives their compositions too): a horizontal flip alone gives
2 views, both flips 4 (with the half turn), quarter turns 4, quarter turns and a flip all 8.
Policies ``none`` and ``auto`` on a frozen backbone's cached features (which trains without
augmentation) give none (``auto`` elsewhere is ``basic``); so does a policy with no flips or turns
(``xray``: left and right differ). TTA is then one view, and :class:`TtaPlan` says why in ``warning``,
never silently. A policy that names flips is taken at its word even where a frozen backbone's cached
features were computed without them (``train.views=0``): the flips are the label's symmetries.

A patch-trained model gets the views on each grid patch, then the patch mean (``Bundle.predict_working``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from handlens.transforms.policy import IDENTITY, Policy, Symmetry, symmetric_view, symmetry_of

#: 2x2 output -> input matrices in normalised coordinates (``transforms.policy`` convention) and their names
_HFLIP = ((-1, 0), (0, 1))
_VFLIP = ((1, 0), (0, -1))
_TURN = ((0, -1), (1, 0))  # a quarter turn, as ``rotate`` draws it for 90 degrees on a square image
_NAMES = {((1, 0), (0, 1)): "identity", _HFLIP: "hflip", _VFLIP: "vflip", ((-1, 0), (0, -1)): "rot180",
          _TURN: "rot90", ((0, 1), (-1, 0)): "rot270", ((0, 1), (1, 0)): "transpose",
          ((0, -1), (-1, 0)): "antitranspose"}
_ORDER = list(_NAMES.values())

Matrix = tuple[tuple[int, int], tuple[int, int]]


@dataclass(frozen=True)
class TtaPlan:
    """The views of one bundle: ``views`` (identity first), their names, the policy they come from, and a
    warning when TTA cannot help (one view)."""

    views: tuple[Symmetry, ...]
    names: tuple[str, ...]
    policy: str
    warning: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"tta_views": len(self.views), "views": list(self.names), "policy": self.policy,
                "warning": self.warning}


def _compose(a: Matrix, b: Matrix) -> Matrix:
    (p, q), (r, s) = a
    (t, u), (v, w) = b
    return ((p * t + q * v, p * u + q * w), (r * t + s * v, r * u + s * w))


def group_of(generators: Sequence[Matrix]) -> list[Matrix]:
    """Every composition of ``generators`` (the identity included), in a fixed order."""
    group = {((1, 0), (0, 1))}
    frontier = list(group)
    while frontier:
        nxt = []
        for element in frontier:
            for generator in generators:
                product = _compose(element, generator)
                if product not in group:
                    group.add(product)
                    nxt.append(product)
        frontier = nxt
    return sorted(group, key=lambda m: _ORDER.index(_NAMES[m]))


def symmetry_generators(policy: Policy | None) -> list[Matrix]:
    """The flips and quarter turns a policy's geometric steps contain (steps with p > 0)."""
    generators: list[Matrix] = []
    for step in policy.image_steps if policy is not None else ():
        if step.p <= 0 or step.labels:  # a step with a label map changes the class: no view to average over
            continue
        if step.op == "hflip":
            generators.append(_HFLIP)
        elif step.op == "vflip":
            generators.append(_VFLIP)
        elif step.op == "rotate":
            degrees = step.params.get("degrees", 15.0)
            if degrees == "right_angles" or (not isinstance(degrees, str) and float(degrees) >= 90):
                generators.append(_TURN)
    return generators


def _policy_of(manifest: dict[str, Any]) -> tuple[str, Policy | None, str | None]:
    """(policy name, the policy or None, why there is none) from a bundle manifest's training config."""
    from handlens.core.errors import InputError
    from handlens.transforms.augment import basic_policy
    from handlens.transforms.policy import load_policy

    augment = (manifest.get("config") or {}).get("augment")
    if not isinstance(augment, dict):
        return "unknown", None, "the bundle records no training augmentation (config.augment)"
    name = str(augment.get("policy", "basic"))
    if name == "none":
        return name, None, "the model trained without augmentation (augment.policy=none)"
    if name == "auto" and _trained_on_cached_features(manifest):
        return name, None, "augment.policy=auto on a frozen backbone's cached features trains without augmentation"
    from handlens.transforms.augment import recorded_policy

    recorded = recorded_policy(manifest)
    if recorded is not None:  # the steps as trained (a policy file may have changed since)
        return name, recorded, None
    if name in ("basic", "auto"):  # auto: basic wherever images are augmented (``transforms.augment.policy_for``)
        return name, basic_policy(bool(augment.get("hflip", True)), bool(augment.get("vflip", False)),
                                  float(augment.get("crop_scale", 0.8))), None
    try:
        return name, load_policy(name), None
    except InputError as exc:
        return name, None, f"the training policy cannot be read here ({exc})"


def _trained_on_cached_features(manifest: dict[str, Any]) -> bool:
    """Whether a run trained its head on cached features of un-augmented images (``train.run.prepare``: a
    frozen backbone, feature cache not off, no augmented views, no patches, no mixup/cutmix)."""
    config = manifest.get("config") or {}
    train, augment = config.get("train") or {}, config.get("augment") or {}
    patches = ((config.get("preprocess") or {}).get("patches") or {}).get("enabled", False)
    mixing = float(augment.get("mixup", 0) or 0) > 0 or float(augment.get("cutmix", 0) or 0) > 0
    return (str(manifest.get("freeze", (config.get("model") or {}).get("freeze", ""))) == "frozen"
            and train.get("feature_cache", "auto") != "off" and not int(train.get("views", 0) or 0)
            and not patches and not mixing)


def tta_plan(manifest: dict[str, Any]) -> TtaPlan:
    """The TTA views a bundle may use (see the module docstring)."""
    name, policy, why = _policy_of(manifest)
    group = group_of(symmetry_generators(policy))
    views = tuple(symmetry_of(np.array([[*m[0], 0], [*m[1], 0], [0, 0, 1]], dtype=float), True) or IDENTITY
                  for m in group)
    warning = None
    if len(views) == 1:
        reason = why or f"its training policy {name!r} has no flip or right-angle turn"
        warning = f"--tta: no test-time views for this model: {reason}; predicting from the image as it is (1 view)"
    return TtaPlan(views, tuple(_NAMES[m] for m in group), name, warning)


def view_probabilities(predict: Callable[[Any], Any], batch: Any, views: Sequence[Symmetry] | None = None) -> Any:
    """Softmax probabilities of ``predict(batch)`` (logits of a normalised (N, 3, S, S) batch), averaged over
    ``views`` (None: the batch as it is)."""
    import torch

    if not views or list(views) == [IDENTITY]:
        return torch.softmax(predict(batch).float(), dim=1)
    total = None
    for view in views:
        x = batch if view == IDENTITY else symmetric_view(batch, view).contiguous()
        probs = torch.softmax(predict(x).float(), dim=1)
        total = probs if total is None else total + probs
    return total / len(views)
