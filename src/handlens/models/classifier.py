"""A classifier = a registry backbone (pooled features) + a small head, with a freezing strategy.

Freezing modes:

* ``frozen``: the backbone is a fixed feature extractor (no gradients, norm layers and dropout in
  eval mode whatever ``.train()`` says); only the head learns.
* ``partial:N``: the last N *units* of the backbone learn (units are its stages or blocks, in order:
  ``layer1..layer4`` for a ResNet, ``blocks.0..6`` + ``conv_head`` for EfficientNet); the rest is
  frozen as above. ``freeze_norm`` also keeps the norm layers of the learning units frozen, which
  helps with small batches.
* ``full``: everything learns.
"""

from __future__ import annotations

import torch
from torch import nn

from handlens.core.errors import InputError
from handlens.models.backbones import BACKBONES, BackboneSpec, build_backbone, default_layer, named_layers
from handlens.models.freeze import FreezeSpec
from handlens.models.weights import load_backbone_weights

NORM_TYPES: tuple[type[nn.Module], ...] = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)
CONTAINER_NAMES = ("blocks", "stages", "features")


POOLS = ("avg", "texture")


def _mean_std(features: torch.Tensor, prefix_tokens: int = 0) -> torch.Tensor:
    """Per-channel mean and standard deviation over space (CNN maps) or over patch tokens (ViT)."""
    if features.dim() == 4:
        return torch.cat([features.mean((2, 3)), features.std((2, 3), correction=0)], 1)
    tokens = features[:, prefix_tokens:]
    return torch.cat([tokens.mean(1), tokens.std(1, correction=0)], 1)


def texture_stage(backbone: nn.Module) -> tuple[int, int]:
    """The stage whose statistics texture pooling adds: the one before the last (index, channels)."""
    info = backbone.feature_info
    entries = info if isinstance(info, list) else info.get_dicts()
    index = max(0, len(entries) - 2)
    return index, int(entries[index]["num_chs"])


class Classifier(nn.Module):
    """``backbone`` (images -> pooled features) then ``head`` (features -> logits).

    ``pool="avg"`` is the backbone's own global average pooling. ``pool="texture"`` describes an image
    by the mean *and standard deviation* of each channel of the final feature map and of the stage
    before it: second-order statistics are what characterise texture (Gatys et al., "Texture
    Synthesis Using Convolutional Neural Networks", NeurIPS 2015; Cimpoi et al., "Deep Filter Banks for
    Texture Recognition and Segmentation", CVPR 2015), and thin sections, X-ray patterns and fungal
    surfaces are textures more than objects.
    """

    def __init__(self, backbone: nn.Module, head: nn.Module, spec: BackboneSpec, pool: str = "avg") -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.spec = spec
        self.pool = pool
        self.texture_index = texture_stage(backbone)[0] if pool == "texture" else -1
        self.layers = {name: f"backbone.{path}" for name, path in named_layers(spec, backbone).items()}
        self.default_layer = default_layer(spec, self.layers)
        self.layers["head"] = "head"
        self.frozen_modules: list[str] = []  # kept in eval mode by .train()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The pooled feature vector the head sees."""
        if self.pool == "avg":
            return self.backbone(x)
        final, (middle,) = self.backbone.forward_intermediates(x, indices=[self.texture_index])
        prefix = int(getattr(self.backbone, "num_prefix_tokens", 0))
        return torch.cat([_mean_std(final, prefix), _mean_std(middle)], 1)

    def train(self, mode: bool = True) -> Classifier:
        super().train(mode)
        if mode:
            for name in self.frozen_modules:
                self.get_submodule(name).eval()
        return self

    def layer(self, name: str) -> nn.Module:
        """A named explanation layer (``stage4``, ``conv_head``...) or any module path."""
        path = self.layers.get(name, name)
        try:
            return self.get_submodule(path)
        except AttributeError:
            known = ", ".join(self.layers)
            raise InputError(f"no layer {name!r} in {self.spec.name}; named layers: {known} "
                             "(or give a module path)") from None


def channels_last(model: nn.Module) -> nn.Module:
    """``model`` with its convolution weights in channels-last (NHWC) strides: the same values and outputs (to
    float rounding), on the layout oneDNN's CPU convolutions run on without converting every layer's input.
    Measured on 2 cores, EfficientNet-Lite0 at 224 px, a batch of 16: inference 0.314 -> 0.138 s, a training
    step (forward, backward, SGD) 1.61 -> 0.78 s. A contiguous NCHW input is converted by the first
    convolution; saved weights are made contiguous (bundles), so files and other runtimes see the usual layout."""
    return model.to(memory_format=torch.channels_last)


def build_head(in_features: int, num_classes: int, *, head: str = "linear", hidden: int = 256,
               dropout: float = 0.0) -> nn.Module:
    """The head module: ``linear`` (optional dropout first), ``mlp`` (one hidden layer), or ``logistic`` (a plain
    linear layer whose weights a logistic regression on cached features sets; ``auto`` resolves to one of them
    before training and reads as linear here)."""
    if head in ("logistic", "auto"):
        return nn.Sequential(nn.Linear(in_features, num_classes))
    if head == "linear":
        return nn.Sequential(nn.Dropout(dropout), nn.Linear(in_features, num_classes)) if dropout else \
            nn.Sequential(nn.Linear(in_features, num_classes))
    if head == "mlp":
        return nn.Sequential(nn.Linear(in_features, hidden), nn.ReLU(inplace=True), nn.Dropout(dropout),
                             nn.Linear(hidden, num_classes))
    raise InputError(f"head {head!r}: choose linear, mlp or logistic")


def create_classifier(
    name: str,
    num_classes: int,
    *,
    weights: str = "none",
    freeze: str = "full",
    head: str = "linear",
    hidden: int = 256,
    dropout: float = 0.0,
    freeze_norm: bool = False,
    pool: str = "avg",
) -> Classifier:
    """Build a registry backbone with ``weights`` and a fresh head, then apply ``freeze``."""
    if num_classes < 2:
        raise InputError(f"a classifier needs at least 2 classes, got {num_classes}")
    if pool not in POOLS:
        raise InputError(f"pool {pool!r}: choose one of {', '.join(POOLS)}")
    spec = BACKBONES.get(name)
    backbone = build_backbone(spec)
    load_backbone_weights(backbone, spec, weights)
    if pool == "texture" and not hasattr(backbone, "forward_intermediates"):
        raise InputError(f"{name} cannot give intermediate features; use pool=avg")
    in_features = backbone.num_features if pool == "avg" else 2 * (backbone.num_features + texture_stage(backbone)[1])
    model = Classifier(backbone, build_head(in_features, num_classes, head=head, hidden=hidden, dropout=dropout), spec,
                       pool)
    apply_freeze(model, FreezeSpec.parse(freeze), freeze_norm)
    return channels_last(model)


def backbone_units(backbone: nn.Module) -> list[tuple[str, list[nn.Module]]]:
    """The backbone's trainable units in forward order (see module docstring).

    Containers named blocks/stages/features are opened into their children; norm-only modules join
    the unit before them; modules without parameters are left out.
    """
    units: list[tuple[str, list[nn.Module]]] = []
    for name, child in backbone.named_children():
        children = [(f"{name}.{n}", c) for n, c in child.named_children()] \
            if name in CONTAINER_NAMES and isinstance(child, (nn.Sequential, nn.ModuleList)) else [(name, child)]
        for unit_name, module in children:
            if not any(True for _ in module.parameters()):
                continue
            if _norm_only(module) and units:
                units[-1][1].append(module)
            else:
                units.append((unit_name, [module]))
    return units


def _norm_only(module: nn.Module) -> bool:
    """True when every parametrised part of ``module`` is a norm layer (e.g. a final LayerNorm head)."""
    leaves = [m for m in module.modules() if any(True for _ in m.parameters(recurse=False))]
    return bool(leaves) and all(isinstance(m, NORM_TYPES) for m in leaves)


def apply_freeze(model: Classifier, spec: FreezeSpec, freeze_norm: bool = False) -> None:
    """Set ``requires_grad`` and the list of modules that stay in eval mode for ``spec``."""
    for param in model.parameters():
        param.requires_grad = True
    frozen: list[nn.Module] = []
    if spec.mode == "frozen":
        frozen = [model.backbone]
    elif spec.mode == "partial":
        units = backbone_units(model.backbone)
        if spec.blocks > len(units):
            raise InputError(f"partial:{spec.blocks} asks for more blocks than {model.spec.name} has "
                             f"({len(units)}: {', '.join(n for n, _ in units)})")
        trainable = {id(m) for _, modules in units[-spec.blocks:] for m in modules}
        trainable_params = {id(p) for _, modules in units[-spec.blocks:] for m in modules for p in m.parameters()}
        for param in model.backbone.parameters():  # cls tokens, position embeddings... freeze too
            param.requires_grad = id(param) in trainable_params
        frozen = [m for _, modules in units for m in modules if id(m) not in trainable]
    if freeze_norm and spec.mode != "frozen":
        frozen += [m for m in model.backbone.modules() if isinstance(m, NORM_TYPES) and m not in frozen]
    for module in frozen:
        for param in module.parameters():
            param.requires_grad = False
    names = {id(m): n for n, m in model.named_modules()}
    model.frozen_modules = [names[id(m)] for m in frozen]
    model.train(model.training)


def trainable_parameters(model: nn.Module) -> list[str]:
    return [name for name, p in model.named_parameters() if p.requires_grad]
