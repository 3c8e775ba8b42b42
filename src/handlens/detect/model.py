"""Detector architectures: a torchvision detection head on a feature pyramid over a registered backbone.

Why FCOS by default (Tian et al., "FCOS: Fully Convolutional One-Stage Object Detection", ICCV 2019): it is
anchor-free and one-stage, so it has few settings to get wrong on a new collection, and with the same body and
pyramid on 2 CPU cores it ran sliced inference at 0.10 s per megapixel against Faster R-CNN's 1.06 (Ren et al.,
NeurIPS 2015), with epochs of 66 s against 113 (benchmarks/detect_quality.py). Faster R-CNN localised better
after the same 3 epochs (val mAP@[.5:.95] 0.64 against 0.33), but FCOS's 12 default epochs reach 0.75 and a
held-out mAP@0.5 of 1.00 in under 10 minutes; Faster R-CNN stays available (``architecture: fasterrcnn``).

The body is the backbone's feature stages (timm ``features_only``: the strides 8, 16 and 32), a feature
pyramid (Lin et al., CVPR 2017) of ``fpn_channels`` on them, plus the levels each head expects above
(FCOS: P6 and P7; Faster R-CNN: a max-pooled level). The body's batch norms always run on their ImageNet
statistics: a few tiles per batch are too few to re-estimate them.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from handlens.core.errors import InputError
from handlens.core.registry import Registry
from handlens.models.backbones import BACKBONES, BackboneSpec

#: stride-8, -16 and -32 stages of a timm features_only body
OUT_STRIDES = (8, 16, 32)


class DetectorBody(nn.Module):
    """A backbone's stride 8/16/32 features through a feature pyramid: an OrderedDict of maps, as torchvision's
    detection heads take them (``out_channels`` says their width)."""

    def __init__(self, spec: BackboneSpec, *, channels: int, extra: Any) -> None:
        from torchvision.ops.feature_pyramid_network import FeaturePyramidNetwork

        super().__init__()
        self.body, widths, self.indices = _features(spec)
        self.fpn = FeaturePyramidNetwork(widths, channels, extra_blocks=extra)
        self.out_channels = channels

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        features = self.body(x)
        return self.fpn(OrderedDict((str(n), features[i]) for n, i in enumerate(self.indices)))

    def train(self, mode: bool = True) -> DetectorBody:
        super().train(mode)
        for module in self.body.modules():  # ImageNet statistics, always (see the module docstring)
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()
        return self


class _IntermediateBody(nn.Module):
    """A builder backbone (the tests' tiny CNN) as a features_only body: its stage outputs, via timm's
    ``forward_intermediates`` interface."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.indices = list(range(len(model.feature_info)))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.model.forward_intermediates(x, self.indices)[1]


def _features(spec: BackboneSpec) -> tuple[nn.Module, list[int], list[int]]:
    """(body, widths of the stages the pyramid takes, their indices among the body's outputs). A timm body gives
    every stage (the stride-32 one needs the earlier ones computed anyway); the pyramid takes strides 8-32."""
    if spec.builder is not None:
        model = spec.builder()
        widths = [entry["num_chs"] for entry in model.feature_info]
        return _IntermediateBody(model), widths, list(range(len(widths)))
    import timm

    body = timm.create_model(spec.timm_name, pretrained=False, features_only=True)
    reductions = body.feature_info.reduction()
    indices = [i for i, r in enumerate(reductions) if r in OUT_STRIDES]
    if len(indices) != len(OUT_STRIDES):
        raise InputError(f"backbone {spec.name} has no stride 8/16/32 stages to detect with (its strides: "
                         f"{reductions}); choose a convolutional backbone such as efficientnet_lite0")
    widths = body.feature_info.channels()
    return body, [widths[i] for i in indices], indices


class DetectorNet(nn.Module):
    """The torchvision detector, plus what a bundle records of any model (no explanation layers)."""

    default_layer = ""

    def __init__(self, detector: nn.Module) -> None:
        super().__init__()
        self.detector = detector
        self.layers: dict[str, str] = {}

    @property
    def body(self) -> DetectorBody:
        return self.detector.backbone

    def forward(self, images: list[torch.Tensor], targets: list[dict[str, torch.Tensor]] | None = None) -> Any:
        return self.detector(images, targets)


Builder = Callable[..., nn.Module]
ARCHITECTURES: Registry[Builder] = Registry("detector architecture")


@ARCHITECTURES.decorator("fcos")
def _fcos(body: DetectorBody, *, classes: int, tile: int, mean: list[float], std: list[float]) -> nn.Module:
    from torchvision.models.detection import FCOS
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.fcos import FCOSHead

    levels = len(OUT_STRIDES) + 2  # P3-P5 and the P6, P7 the head adds
    anchors = AnchorGenerator(sizes=tuple((8 * 2 ** i,) for i in range(levels)), aspect_ratios=((1.0,),) * levels)
    model = FCOS(body, num_classes=classes + 1, anchor_generator=anchors, min_size=tile, max_size=tile,
                 image_mean=mean, image_std=std, score_thresh=0.05, nms_thresh=0.6, detections_per_img=300)
    model.head = FCOSHead(body.out_channels, 1, classes + 1, num_convs=2)  # 2 convs a branch, not 4: CPU time
    return model


@ARCHITECTURES.decorator("fasterrcnn")
def _faster_rcnn(body: DetectorBody, *, classes: int, tile: int, mean: list[float], std: list[float]) -> nn.Module:
    from torchvision.models.detection import FasterRCNN
    from torchvision.models.detection.anchor_utils import AnchorGenerator

    levels = len(OUT_STRIDES) + 1
    anchors = AnchorGenerator(sizes=tuple((16 * 2 ** i,) for i in range(levels)),
                              aspect_ratios=((0.5, 1.0, 2.0),) * levels)
    return FasterRCNN(body, num_classes=classes + 1, rpn_anchor_generator=anchors, min_size=tile, max_size=tile,
                      image_mean=mean, image_std=std, box_score_thresh=0.05, box_detections_per_img=300)


def _extra_levels(architecture: str, channels: int) -> Any:
    from torchvision.ops.feature_pyramid_network import LastLevelMaxPool, LastLevelP6P7

    return LastLevelP6P7(channels, channels) if architecture == "fcos" else LastLevelMaxPool()


def build_detector(architecture: str, backbone: str, *, classes: int, tile: int, channels: int) -> DetectorNet:
    """An untrained detector for ``classes`` box labels (background excluded) on tiles of ``tile`` pixels."""
    spec = BACKBONES.get(backbone)
    build = ARCHITECTURES.get(architecture)
    body = DetectorBody(spec, channels=channels, extra=_extra_levels(architecture, channels))
    return DetectorNet(build(body, classes=classes, tile=tile, mean=list(spec.mean), std=list(spec.std)))


def load_body_weights(net: DetectorNet, backbone: str, source: str) -> dict[str, Any]:
    """ImageNet (or a file's) weights into the detector's body, as classifiers load them."""
    from handlens.models.weights import load_backbone_weights

    spec = BACKBONES.get(backbone)
    inner = net.body.body
    target = inner.model if isinstance(inner, _IntermediateBody) else inner
    return load_backbone_weights(target, spec, source)


def body_units(net: DetectorNet) -> list[nn.Module]:
    """The body's modules in order, a stage container's blocks one by one: what ``partial:N`` counts from the
    end (EfficientNet-Lite0: the stem, its batch norm, then its 7 stages)."""
    inner = net.body.body
    root = inner.model if isinstance(inner, _IntermediateBody) else inner
    units: list[nn.Module] = []
    for child in root.children():
        if isinstance(child, nn.Sequential | nn.ModuleList) and len(child) > 1:
            units.extend(child)
        else:
            units.append(child)
    return [u for u in units if any(True for _ in u.parameters())]


def apply_freeze(net: DetectorNet, freeze: str) -> dict[str, int]:
    """Freeze the body as ``freeze`` says (the pyramid and head always learn); returns the parameter counts."""
    units = body_units(net)
    for unit in units:
        unit.requires_grad_(freeze == "full")
    if freeze.startswith("partial:"):
        count = int(freeze.split(":", 1)[1])
        if count > len(units):
            raise InputError(f"freeze {freeze}: the body has {len(units)} stages to train; use partial:1.."
                             f"{len(units)} or full")
        for unit in units[-count:]:
            unit.requires_grad_(True)
    trainable = sum(p.numel() for p in net.parameters() if p.requires_grad)
    return {"trainable": trainable, "total": sum(p.numel() for p in net.parameters())}
