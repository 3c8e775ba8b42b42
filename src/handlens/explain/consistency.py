"""Mirror consistency: does the model predict ``swap(predict(x))`` for the mirror image of ``x``?

A class like "winds clockwise" turns into "winds anticlockwise" in a mirror, so a model of such classes
should change its answer exactly as the mirror changes the truth: ``predict(mirror(x)) == swap(predict(x))``.
``swap`` comes from ``--swap cw=ccw`` (each pair both ways), else from the label map that the bundle's
training policy puts on its mirror step (``config.augment.policy``; ``transforms.policy`` label maps).
With neither, the expectation is mirror invariance, ``predict(mirror(x)) == predict(x)``: what training with
plain flips teaches, and what a model of mirror-free classes (colours, textures) should show. The report
says which rule it checked, so the verdict always reads against its expectation.

The verdict (``explain.verdicts``) is ``consistent`` when at least :data:`~handlens.explain.verdicts.
CONSISTENCY_THRESHOLD` (0.95) of the images agree, else ``not consistent``; the images that disagree are
listed. A patch-trained model is checked on what it predicts an image from: the mean over its grid patches
of the working image, and of the mirrored working image.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from handlens.core.errors import InputError
from handlens.explain.verdicts import CONSISTENCY_THRESHOLD, consistency_verdict

#: the mirrors that can be checked: name -> the image axis it reverses (of an (..., H, W) tensor)
MIRRORS = {"hflip": -1, "vflip": -2}
MIRROR_WORDS = {"hflip": "a left-right mirror", "vflip": "an up-down mirror"}


@dataclass(frozen=True)
class ConsistencyReport:
    """What ``handlens trust --consistency`` prints: the rule checked, the agreement, and the disagreements."""

    images: list[str]
    classes: list[str]
    mirror: str  # hflip or vflip
    swap: dict[str, str]  # class -> the class its mirror image should be (classes not listed stay)
    swap_source: str  # where the swap comes from, in words
    n: int
    agreeing: int
    verdict: str  # CONSISTENT or NOT_CONSISTENT
    sentence: str
    threshold: float = CONSISTENCY_THRESHOLD
    disagreements: list[dict[str, Any]] = field(default_factory=list)  # image, pred, mirrored_pred, expected
    inputs: str = "whole images"

    @property
    def agreement(self) -> float:
        return self.agreeing / self.n if self.n else float("nan")

    @property
    def expects(self) -> str:
        if not self.swap:
            return "predict(mirror(x)) == predict(x) (mirror-invariant)"
        pairs = sorted({tuple(sorted(p)) for p in self.swap.items()})
        return f"predict(mirror(x)) == swap(predict(x)), swap {', '.join(f'{a}<->{b}' for a, b in pairs)}"

    def to_dict(self) -> dict[str, Any]:
        return {"check": "consistency", "verdict": self.verdict, "sentence": self.sentence,
                "agreement": self.agreement, "n": self.n, "agreeing": self.agreeing, "threshold": self.threshold,
                "mirror": self.mirror, "expects": self.expects, "swap": self.swap, "swap_source": self.swap_source,
                "inputs": self.inputs, "images": self.images, "disagreements": self.disagreements}


def _check_class(name: str, classes: Sequence[str], where: str) -> None:
    if name not in classes:
        close = difflib.get_close_matches(name, list(classes), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise InputError(f"{where}: {name!r}{hint} is not a class of this model ({', '.join(classes)})")


def parse_swap(pairs: Sequence[str], classes: Sequence[str]) -> dict[str, str]:
    """``["cw=ccw"]`` (or ``"a=b,c=d"`` in one) -> ``{cw: ccw, ccw: cw}``: each pair swaps both ways; names must be
    classes of the model and each may appear in one pair only."""
    swap: dict[str, str] = {}
    for given in pairs:
        for pair in filter(None, (p.strip() for p in given.split(","))):
            a, sep, b = (part.strip() for part in pair.partition("="))
            if not sep or not a or not b or a == b:
                raise InputError(f"--swap {pair!r}: write two different classes as A=B, e.g. --swap cw=ccw")
            for name in (a, b):
                _check_class(name, classes, f"--swap {pair}")
                if name in swap:
                    raise InputError(f"--swap {pair}: {name!r} is already swapped with {swap[name]!r}; give each "
                                     "class in one pair only")
            swap[a], swap[b] = b, a
    return swap


def policy_swap(manifest: dict[str, Any], mirror: str, classes: Sequence[str]) -> tuple[dict[str, str], str]:
    """(swap, where it comes from) from the label map the bundle's training policy puts on its ``mirror`` step;
    an empty swap when the policy has none (a plain flip, or no such step). A policy that cannot be read here is
    an error that says to give ``--swap`` (its name is all a bundle records)."""
    from handlens.transforms.augment import recorded_policy
    from handlens.transforms.policy import load_policy

    augment = (manifest.get("config") or {}).get("augment") or {}
    name = str(augment.get("policy", "basic"))
    policy = recorded_policy(manifest)  # the steps as trained, when the bundle records them
    if policy is None and name in ("none", "auto", "basic"):
        return {}, f"policy {name!r} has no label maps"
    try:
        policy = policy or load_policy(name)
    except InputError as exc:
        raise InputError(f"the bundle's training policy {name!r} cannot be read here ({exc}); give the label map "
                         "with --swap A=B, or put the policy file back where the bundle's config says") from None
    for step in policy.image_steps:
        if step.op == mirror and step.labels:
            swap = {a: b for a, b in step.labels.items() if a != b}
            for label in swap:
                _check_class(label, classes, f"policy {name!r}, {mirror} labels")
            return swap, f"policy {name!r} ({mirror} step's labels)"
    return {}, f"policy {name!r} has no label map on {mirror}"


def mirror_consistency(predict: Callable[[Any], Any], inputs: Any, classes: Sequence[str], *, swap: dict[str, str],
                       mirror: str = "hflip", images: Sequence[str] | None = None, swap_source: str = "--swap",
                       threshold: float = CONSISTENCY_THRESHOLD, batch_size: int = 32) -> ConsistencyReport:
    """The report for a model given as ``predict`` (normalised (N, 3, H, W) batch -> logits or probabilities) on
    ``inputs``: each input's predicted class beside the prediction for its mirror image."""
    import torch

    axis = _axis(mirror)
    preds, mirrored = [], []
    with torch.inference_mode():
        for start in range(0, len(inputs), batch_size):
            x = inputs[start:start + batch_size]
            preds.append(predict(x).argmax(1))
            mirrored.append(predict(x.flip(axis).contiguous()).argmax(1))
    return judge(torch.cat(preds).tolist() if preds else [], torch.cat(mirrored).tolist() if mirrored else [],
                 classes, swap=swap, mirror=mirror, images=images, swap_source=swap_source, threshold=threshold)


def judge(preds: Sequence[int], mirrored: Sequence[int], classes: Sequence[str], *, swap: dict[str, str],
          mirror: str, images: Sequence[str] | None = None, swap_source: str = "--swap",
          threshold: float = CONSISTENCY_THRESHOLD, inputs: str = "whole images") -> ConsistencyReport:
    """The report from predicted class indices of the images and of their mirror images."""
    if not len(preds):
        raise InputError("no images to check: give image files or folders")
    names = list(images) if images is not None else [str(i) for i in range(len(preds))]
    disagreements = []
    for name, p, m in zip(names, preds, mirrored, strict=True):
        pred, got = classes[int(p)], classes[int(m)]
        expected = swap.get(pred, pred)
        if got != expected:
            disagreements.append({"image": name, "pred": pred, "mirrored_pred": got, "expected": expected})
    n = len(preds)
    agreeing = n - len(disagreements)
    words = consistency_verdict(agreeing, n, mirror=MIRROR_WORDS[mirror], swapped=bool(swap), threshold=threshold)
    return ConsistencyReport(images=names, classes=list(classes), mirror=mirror, swap=dict(swap),
                             swap_source=swap_source, n=n, agreeing=agreeing, verdict=words["verdict"],
                             sentence=words["sentence"], threshold=threshold, disagreements=disagreements,
                             inputs=inputs)


def _axis(mirror: str) -> int:
    if mirror not in MIRRORS:
        raise InputError(f"--mirror {mirror!r}: choose {' or '.join(MIRRORS)}")
    return MIRRORS[mirror]


def consistency_report(bundle_path: str | Path, images: Sequence[str | Path], *, swap: Sequence[str] = (),
                       mirror: str = "hflip", threshold: float = CONSISTENCY_THRESHOLD) -> ConsistencyReport:
    """Mirror consistency of the bundle at ``bundle_path`` on ``images`` (files or folders): ``swap`` pairs
    (``["cw=ccw"]``) or, when none are given, the training policy's label map on ``mirror`` (see the module)."""
    import torch

    from handlens.explain.api import load_bundle
    from handlens.models.bundle import iter_images

    axis = _axis(mirror)
    loaded = load_bundle(bundle_path)
    if swap:
        mapping, source = parse_swap(swap, loaded.classes), "--swap"
    else:
        mapping, source = policy_swap(loaded.manifest, mirror, loaded.classes)
    files = iter_images(images)
    if not files:
        raise InputError("no images to check: give image files or folders")
    if not loaded.patch_trained:
        return mirror_consistency(loaded.module, loaded.transform_many(files), loaded.classes, swap=mapping,
                                  mirror=mirror, images=files, swap_source=source, threshold=threshold)
    from handlens.transforms.preprocess import decode_working

    working = [decode_working(f, loaded.preprocess.working_side, loaded.preprocess.morphology) for f in files]
    flipped = [np.ascontiguousarray(np.flip(w, axis=1 if axis == -1 else 0)) for w in working]
    preds = torch.from_numpy(loaded.predict_working(working)).argmax(1).tolist()
    mirrored = torch.from_numpy(loaded.predict_working(flipped)).argmax(1).tolist()
    return judge(preds, mirrored, loaded.classes, swap=mapping, mirror=mirror, images=files, swap_source=source,
                 threshold=threshold, inputs="grid patches (image mean)")
