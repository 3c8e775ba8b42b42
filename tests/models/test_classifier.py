"""Freezing modes change exactly the parameters they should; named layers resolve."""

import pytest
import torch

from handlens.core.errors import InputError, NotFoundError
from handlens.models.backbones import BACKBONES
from handlens.models.classifier import FreezeSpec, backbone_units, create_classifier, trainable_parameters

REQUIRED = {"resnet18", "resnet50", "vgg11", "vgg19", "mobilenetv2", "efficientnet_lite0", "inception_v3",
            "convnext", "vit_small", "tiny_cnn"}


def test_registry_has_the_promised_backbones():
    assert set(BACKBONES.names()) >= REQUIRED
    assert BACKBONES.get("inception_v3").input_size == 299


def test_unknown_backbone_lists_choices():
    with pytest.raises(NotFoundError, match=r"choose one of: .*resnet18"):
        create_classifier("alexnet", 3)


@pytest.mark.parametrize("text", ["frozen", "full", "partial:2"])
def test_freeze_spec_round_trips(text):
    assert str(FreezeSpec.parse(text)) == text


@pytest.mark.parametrize("bad", ["partial", "partial:0", "partial:x", "half"])
def test_bad_freeze_spec(bad):
    with pytest.raises(InputError, match="frozen, full, or partial:N"):
        FreezeSpec.parse(bad)


def _changed_after_step(model: torch.nn.Module, size: int) -> set[str]:
    """Names of parameters and buffers that one optimiser step in train mode changes."""
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    model.train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    x = torch.randn(4, 3, size, size)
    loss = torch.nn.functional.cross_entropy(model(x), torch.tensor([0, 1, 2, 0]))
    loss.backward()
    opt.step()
    return {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}


def test_frozen_trains_only_the_head_and_keeps_batchnorm_statistics():
    model = create_classifier("tiny_cnn", 3, freeze="frozen")
    assert trainable_parameters(model) == ["head.0.weight", "head.0.bias"]
    changed = _changed_after_step(model, 32)
    assert changed == {"head.0.weight", "head.0.bias"}  # no running_mean/var moved either
    assert not model.backbone.training and model.head.training


def test_partial_trains_the_last_blocks_and_head():
    model = create_classifier("tiny_cnn", 3, freeze="partial:1")
    changed = _changed_after_step(model, 32)
    assert changed, "something must learn"
    assert all(k.startswith(("backbone.stages.2.", "head.")) for k in changed), changed
    assert any(k.startswith("backbone.stages.2.1.running_mean") for k in changed)  # its BN still adapts
    assert not model.backbone.stages[0].training and model.backbone.stages[2].training


def test_partial_with_frozen_norm_keeps_norm_statistics():
    model = create_classifier("tiny_cnn", 3, freeze="partial:1", freeze_norm=True)
    changed = _changed_after_step(model, 32)
    assert "backbone.stages.2.0.weight" in changed
    assert not any(".1." in k for k in changed if k.startswith("backbone"))  # BN params and stats fixed


def test_full_trains_everything():
    model = create_classifier("tiny_cnn", 3, freeze="full")
    changed = _changed_after_step(model, 32)
    assert {k for k in model.state_dict() if not k.endswith("num_batches_tracked")} <= changed


def test_partial_on_a_real_backbone_and_too_many_blocks():
    model = create_classifier("resnet18", 3, freeze="partial:1")
    assert {n.split(".")[1] for n in trainable_parameters(model) if n.startswith("backbone")} == {"layer4"}
    assert [n for n, _ in backbone_units(model.backbone)] == ["conv1", "layer1", "layer2", "layer3", "layer4"]
    with pytest.raises(InputError, match="more blocks than resnet18 has"):
        create_classifier("resnet18", 3, freeze="partial:9")


def test_vit_partial_freezes_position_embedding():
    model = create_classifier("vit_small", 3, freeze="partial:2")
    names = trainable_parameters(model)
    assert "backbone.pos_embed" not in names and "backbone.cls_token" not in names
    assert any(n.startswith("backbone.blocks.11.") for n in names)
    assert not any(n.startswith("backbone.blocks.9.") for n in names)


def test_named_layers_and_mlp_head():
    model = create_classifier("resnet18", 4, head="mlp", hidden=32, dropout=0.2)
    assert model.default_layer == "stage4"
    assert model.layer("stage4") is model.backbone.layer4
    assert model.layer("backbone.layer3") is model.backbone.layer3
    with pytest.raises(InputError, match="named layers: stem, stage1"):
        model.layer("stage9")
    assert model(torch.randn(2, 3, 64, 64)).shape == (2, 4)
    lite = create_classifier("efficientnet_lite0", 2)
    assert lite.default_layer == "conv_head" and lite.layer("conv_head") is lite.backbone.bn2
