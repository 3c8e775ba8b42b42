"""An ensemble bundle: several classifiers that share one preprocessing, averaged in probability space.

``Ensemble.forward`` returns the log of the members' mean class probability, so every consumer that
applies a softmax to a bundle's output (predict, evaluate, serve, explain) gets exactly the averaged
probabilities, and gradients reach every member. Averaging the probabilities of separately trained
models lowers the variance of the prediction (Lakshminarayanan et al., "Simple and Scalable Predictive
Uncertainty Estimation using Deep Ensembles", NeurIPS 2017).

Named layers (``stage4``, ``conv_head``) are those of the first member, the study's winner;
``m1.stage4`` names another member's. An explanation at a named layer therefore shows where the
winner looks as it drives the averaged prediction; input-gradient methods (saliency, integrated
gradients) explain the whole ensemble.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from handlens.core.errors import InputError

MEMBER_KEYS = ("backbone", "weights", "freeze", "head")


class Ensemble(nn.Module):
    def __init__(self, members: list[nn.Module]) -> None:
        super().__init__()
        if len(members) < 2:
            raise InputError("an ensemble needs at least 2 members")
        self.members = nn.ModuleList(members)
        first = members[0]
        self.spec = first.spec
        self.layers = {name: f"members.0.{path}" for name, path in first.layers.items()}
        for index, member in enumerate(members):
            self.layers.update({f"m{index}.{name}": f"members.{index}.{path}" for name, path in member.layers.items()})
        self.default_layer = first.default_layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probs = torch.stack([torch.softmax(member(x).float(), 1) for member in self.members]).mean(0)
        return torch.log(probs.clamp_min(1e-12))

    def layer(self, name: str) -> nn.Module:
        path = self.layers.get(name, name)
        try:
            return self.get_submodule(path)
        except AttributeError:
            raise InputError(f"no layer {name!r} in this ensemble; named layers: {', '.join(self.layers)}") from None


def build_ensemble(manifest: dict[str, Any]) -> Ensemble:
    from handlens.models.bundle import build_from_manifest

    members = [build_from_manifest({**manifest, **member, "ensemble": None})
               for member in manifest["ensemble"]["members"]]
    return Ensemble(members)


def save_ensemble(bundles: list[Path], directory: Path, *, study: dict[str, Any] | None = None) -> Path:
    """One bundle averaging ``bundles`` (which must share classes and preprocessing)."""
    from handlens.models.bundle import load_bundle, save_bundle

    loaded = [load_bundle(path) for path in bundles]
    first = loaded[0]
    for other in loaded[1:]:
        if other.classes != first.classes:
            raise InputError(f"ensemble members disagree on classes: {first.classes} vs {other.classes}")
        if other.manifest["preprocess"] != first.manifest["preprocess"]:
            raise InputError(f"ensemble members {first.path} and {other.path} preprocess differently; "
                             "an ensemble feeds all members one input")
    manifest = {k: v for k, v in first.manifest.items()  # validated as it was loaded
                if k not in ("schema_version", "created_at", "versions", "weights_sha256", "layers", "default_layer")}
    manifest["ensemble"] = {"members": [{k: b.manifest.get(k) for k in MEMBER_KEYS} | {"bundle": str(b.path),
                                         "run_id": b.manifest.get("run_id")} for b in loaded]}
    manifest["run_id"] = f"ensemble:{'+'.join(str(b.manifest.get('run_id')) for b in loaded)}"
    if study is not None:
        manifest["study"] = study
    return save_bundle(directory, Ensemble([b.module for b in loaded]), manifest)
