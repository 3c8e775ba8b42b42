"""Detector construction: packaged ImageNet bodies load whole, freezing is what it says, batch norms keep their
ImageNet statistics while training."""

from __future__ import annotations

import pytest
import torch

from handlens.core.errors import InputError
from handlens.detect.model import apply_freeze, body_units, build_detector, load_body_weights


@pytest.mark.parametrize("backbone", ["efficientnet_lite0", "mobilenetv2", "efficientnet_lite1"])
def test_packaged_bodies_load_every_tensor(backbone: str) -> None:
    net = build_detector("fcos", backbone, classes=2, tile=128, channels=32)
    loaded = load_body_weights(net, backbone, "packaged")
    body = net.body.body.state_dict()
    assert loaded["tensors"] == len(body)  # every tensor of the body, running statistics included


def test_freeze_modes() -> None:
    net = build_detector("fcos", "efficientnet_lite0", classes=1, tile=128, channels=32)
    units = body_units(net)

    def learning(module: torch.nn.Module) -> bool:
        return any(p.requires_grad for p in module.parameters())

    apply_freeze(net, "frozen")
    assert not any(learning(u) for u in units) and learning(net.body.fpn) and learning(net.detector.head)
    apply_freeze(net, "partial:2")
    assert [learning(u) for u in units] == [False] * (len(units) - 2) + [True, True]
    apply_freeze(net, "full")
    assert all(learning(u) for u in units)
    with pytest.raises(InputError, match="partial:1"):
        apply_freeze(net, f"partial:{len(units) + 1}")


def test_body_batch_norms_stay_in_eval_mode_while_training() -> None:
    net = build_detector("fasterrcnn", "tiny_cnn", classes=1, tile=64, channels=16)
    net.train()
    norms = [m for m in net.body.body.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert norms and not any(m.training for m in norms) and net.detector.training
