"""The backbone registry: timm architectures by the names users know, plus a tiny CNN for tests.

Each entry knows its input size, normalisation and interpolation. Its named explanation layers
(``stage1..stageN`` from timm's ``feature_info``, plus ``conv_head`` where the network has one) are
read off the built model, so users pick "stage4" rather than a module path.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from handlens.core.registry import Registry
from handlens.transforms.preprocess import IMAGENET_MEAN, IMAGENET_STD, Preprocess


@dataclass(frozen=True)
class BackboneSpec:
    name: str
    timm_name: str
    description: str
    input_size: int = 224
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    interpolation: str = "bicubic"
    #: extra named layers: name -> module path in the backbone (e.g. the final conv before pooling)
    extra_layers: dict[str, str] = field(default_factory=dict)
    #: which named layer explanations use by default (None: the last stage)
    default_layer: str | None = None
    #: the first feature_info entries that are the stem, not a stage (a ResNet's act1): named "stem"
    stem_entries: int = 0
    #: what the feature_info entries are called: "stage" (stage1..N) or "block" for transformers
    stage_prefix: str = "stage"
    #: the default layer is pooled by global *average* pooling straight into the head, so closed-form
    #: CAM applies there (not for ViT's class token, ConvNeXt's post-pool norm or VGG's MLP)
    closed_form_cam: bool = False
    #: offline ImageNet weights ship in a package (``--weights packaged``; the files are in models.weights)
    packaged_weights: bool = False
    builder: Callable[[], Any] | None = None

    def preprocess(self, resize: str = "shorter-crop") -> Preprocess:
        return Preprocess(size=self.input_size, resize=resize, interpolation=self.interpolation,  # type: ignore[arg-type]
                          mean=self.mean, std=self.std)


BACKBONES: Registry[BackboneSpec] = Registry("backbone")

_HALF = (0.5, 0.5, 0.5)
for spec in (
    BackboneSpec("resnet18", "resnet18", "ResNet-18 (11 M parameters)", stem_entries=1, closed_form_cam=True),
    BackboneSpec("resnet50", "resnet50", "ResNet-50 (25 M)", stem_entries=1, closed_form_cam=True),
    BackboneSpec("vgg11", "vgg11", "VGG-11 (133 M; slow on CPU)", interpolation="bilinear"),
    BackboneSpec("vgg19", "vgg19", "VGG-19 (143 M; slow on CPU)", interpolation="bilinear"),
    BackboneSpec("mobilenetv2", "mobilenetv2_100",
                 "MobileNetV2 1.0 (3.5 M); offline ImageNet weights (torchvision's) with --weights packaged",
                 extra_layers={"conv_head": "bn2"}, default_layer="conv_head", packaged_weights=True,
                 closed_form_cam=True),
    BackboneSpec("efficientnet_lite0", "efficientnet_lite0",
                 "EfficientNet-Lite0 (4.7 M); offline ImageNet weights with --weights packaged",
                 extra_layers={"conv_head": "bn2"}, default_layer="conv_head", packaged_weights=True,
                 closed_form_cam=True),
    # Lite1/2 are timm's TF-faithful variants ("same" padding, BN eps 1e-3) with TF's inception-style
    # normalisation: their packaged weights are converted from TF's checkpoints, and only these reproduce the
    # reference model's logits exactly (timm's efficientnet_lite1/2 differ by up to ~4 logits and have no
    # pretrained weights of their own, so --weights imagenet would have nothing to download)
    BackboneSpec("efficientnet_lite1", "tf_efficientnet_lite1",
                 "EfficientNet-Lite1 (5.4 M; 240x240 input); offline ImageNet weights with --weights packaged",
                 input_size=240, mean=_HALF, std=_HALF, extra_layers={"conv_head": "bn2"}, default_layer="conv_head",
                 packaged_weights=True, closed_form_cam=True),
    BackboneSpec("efficientnet_lite2", "tf_efficientnet_lite2",
                 "EfficientNet-Lite2 (6.1 M; 260x260 input); offline ImageNet weights with --weights packaged",
                 input_size=260, mean=_HALF, std=_HALF, extra_layers={"conv_head": "bn2"}, default_layer="conv_head",
                 packaged_weights=True, closed_form_cam=True),
    BackboneSpec("inception_v3", "inception_v3", "Inception v3 (24 M; 299x299 input)", input_size=299,
                 mean=_HALF, std=_HALF, closed_form_cam=True),
    BackboneSpec("convnext", "convnext_atto", "ConvNeXt-Atto (3.7 M), the smallest ConvNeXt"),
    BackboneSpec("vit_small", "vit_small_patch16_224", "ViT-S/16 (22 M), a Vision Transformer",
                 mean=_HALF, std=_HALF, stage_prefix="block"),
):
    BACKBONES.register(spec.name, spec)


def _tiny_cnn() -> Any:
    """Three conv stages and global pooling: a few thousand parameters, for tests and smoke runs."""
    from torch import nn

    class TinyCNN(nn.Module):
        def __init__(self) -> None:
            super().__init__()

            def stage(cin: int, cout: int) -> nn.Sequential:
                return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout),
                                     nn.ReLU(inplace=True), nn.MaxPool2d(2))

            self.stages = nn.Sequential(stage(3, 8), stage(8, 16), stage(16, 32))
            self.global_pool = nn.AdaptiveAvgPool2d(1)
            self.num_features = 32
            self.feature_info = [{"module": f"stages.{i}", "num_chs": c, "reduction": 2 ** (i + 1)}
                                 for i, c in enumerate((8, 16, 32))]

        def forward(self, x: Any) -> Any:
            return self.global_pool(self.stages(x)).flatten(1)

        def forward_intermediates(self, x: Any, indices: list[int]) -> tuple[Any, list[Any]]:
            """timm's interface: the final feature map and the outputs of the given stages."""
            kept = []
            for index, stage in enumerate(self.stages):
                x = stage(x)
                if index in indices:
                    kept.append(x)
            return x, kept

    return TinyCNN()


BACKBONES.register("tiny_cnn", BackboneSpec("tiny_cnn", "", "a tiny 3-stage CNN for tests (random weights)",
                                            input_size=32, mean=_HALF, std=_HALF, interpolation="bilinear",
                                            builder=_tiny_cnn, closed_form_cam=True))


def build_backbone(spec: BackboneSpec) -> Any:
    """The architecture with random weights, returning pooled features (no classifier)."""
    if spec.builder is not None:
        return spec.builder()
    import timm

    return timm.create_model(spec.timm_name, pretrained=False, num_classes=0)


def named_layers(spec: BackboneSpec, backbone: Any) -> dict[str, str]:
    """``stem``, ``stage1..stageN`` (from ``feature_info``) and extra layers -> module paths in the backbone."""
    info = backbone.feature_info
    entries = info if isinstance(info, list) else info.get_dicts()
    layers = {"stem": entries[spec.stem_entries - 1]["module"]} if spec.stem_entries else {}
    stages = entries[spec.stem_entries:]
    layers.update({f"{spec.stage_prefix}{i + 1}": entry["module"] for i, entry in enumerate(stages)})
    layers.update(spec.extra_layers)
    return layers


def default_layer(spec: BackboneSpec, layers: dict[str, str]) -> str:
    return spec.default_layer or list(layers)[-1]
