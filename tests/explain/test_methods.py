"""Correctness of the explainers against Captum and against their own definitions."""

import numpy as np
import pytest
import torch

from handlens.core.errors import InputError
from handlens.explain import EXPLAINERS, explain
from handlens.explain.base import resolve_targets
from handlens.models.classifier import create_classifier

CLASSES = ["a", "b", "c", "d"]


@pytest.fixture(scope="module")
def resnet():
    torch.manual_seed(0)
    model = create_classifier("resnet18", 4).eval()
    with torch.no_grad():  # non-trivial BN statistics and a head that separates classes
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.8, 1.2)
    return model


@pytest.fixture(scope="module")
def images():
    return torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(1))


def test_gradcam_equals_captum_layer_gradcam(resnet, images):
    from captum.attr import LayerAttribution, LayerGradCam

    for layer_name in ("stage4", "stage3"):
        ours = explain(resnet, images, CLASSES, "gradcam", layer=layer_name, target="b")
        layer = resnet.layer(layer_name)
        reference = LayerGradCam(resnet, layer).attribute(images, target=1, relu_attributions=True)
        reference = LayerAttribution.interpolate(reference, (64, 64), interpolate_mode="bilinear")[:, 0]
        reference = reference.detach().numpy()
        assert ours.maps.shape == reference.shape == (3, 64, 64)
        assert np.abs(reference).max() > 0
        np.testing.assert_allclose(ours.maps, reference, rtol=1e-4, atol=1e-4 * np.abs(reference).max())


def test_closed_form_cam_equals_gradcam_at_the_final_layer(resnet, images):
    cam = explain(resnet, images, CLASSES, "cam", target="c")
    grad = explain(resnet, images, CLASSES, "gradcam", target="c")
    assert cam.layer == grad.layer == "stage4"
    np.testing.assert_allclose(cam.maps, grad.maps, rtol=1e-4, atol=1e-6)


def test_closed_form_cam_refuses_where_it_does_not_hold(resnet, images):
    with pytest.raises(InputError, match="use gradcam otherwise"):
        explain(resnet, images, CLASSES, "cam", layer="stage3")
    vit = create_classifier("vit_small", 4)
    with pytest.raises(InputError, match="closed-form CAM needs"):
        explain(vit, torch.randn(1, 3, 224, 224), CLASSES, "cam")


@pytest.mark.parametrize(("method", "layer"), [
    ("gradcam", "stage4"),  # linear head after the layer: the closed-form weights, no backward
    ("gradcam", "stage3"),  # batched backward through layer4
    ("layercam", "stage4"),  # batched backward (the shortcut is Grad-CAM's only)
])
def test_all_class_maps_match_single_class_maps(resnet, images, method, layer):
    every = explain(resnet, images, CLASSES, method, layer=layer, target="all", class_chunk=3)  # chunked
    assert every.maps.shape == (3, 4, 64, 64) and every.targets is None
    for c in range(4):
        single = explain(resnet, images, CLASSES, method, layer=layer, target=c)
        np.testing.assert_allclose(every.maps[:, c], single.maps, rtol=1e-4, atol=1e-6 * max(1, single.maps.max()))
    if layer == "stage4" and method == "gradcam":
        closed = explain(resnet, images, CLASSES, "cam", target="all")
        np.testing.assert_allclose(closed.maps, every.maps, rtol=1e-4, atol=1e-6)


def test_integrated_gradients_completeness():
    """Sum of attributions = f(x) - f(baseline) for the target (Sundararajan et al.'s axiom)."""
    torch.manual_seed(0)
    model = create_classifier("tiny_cnn", 3).eval()
    x = torch.randn(2, 3, 32, 32)
    result = explain(model, x, ["a", "b", "c"], "integrated_gradients", target="pred", steps=300,
                     baseline="black", mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    baseline = torch.full_like(x, -1.0)  # black pixels under mean/std 0.5
    with torch.no_grad():
        diff = (model(x) - model(baseline)).gather(1, torch.tensor(result.targets)[:, None])[:, 0].numpy()
    np.testing.assert_allclose(result.maps.reshape(2, -1).sum(1), diff, rtol=2e-2, atol=1e-3)
    assert max(result.extras["convergence_delta"]) < 1e-2
    assert result.signed


@pytest.mark.parametrize("backbone,size", [("resnet18", 64), ("vit_small", 224)])
def test_every_method_gives_finite_maps_of_the_input_size(backbone, size):
    torch.manual_seed(0)
    model = create_classifier(backbone, 3).eval()
    x = torch.randn(1, 3, size, size)
    cheap = {"integrated_gradients": {"steps": 4}, "smoothgrad": {"samples": 2}, "gradient_shap": {"samples": 2},
             "occlusion": {"window": size // 2, "stride": size // 2}, "scorecam": {"max_channels": 4}}
    for name in EXPLAINERS.names():
        if name == "cam" and backbone == "vit_small":
            continue  # not defined for a class-token head (tested above)
        result = explain(model, x, ["a", "b", "c"], name, **cheap.get(name, {}))
        assert result.maps.shape == (1, size, size), name
        assert np.isfinite(result.maps).all(), name
        assert result.method in (name, "cam")


def test_hooks_and_modes_are_restored_even_when_a_method_raises(resnet, images):
    resnet.train()
    layer = resnet.layer("stage4")
    with pytest.raises(InputError, match="target 'zebra'"):
        explain(resnet, images, CLASSES, "gradcam", target="zebra")
    assert len(layer._forward_hooks) == 0 and resnet.training
    assert resnet.backbone.layer1.training
    explain(resnet, images, CLASSES, "gradcam")
    assert len(layer._forward_hooks) == 0 and resnet.training
    resnet.eval()


def test_frozen_model_explains_and_keeps_its_flags():
    model = create_classifier("tiny_cnn", 3, freeze="frozen").eval()
    flags = [p.requires_grad for p in model.parameters()]
    result = explain(model, torch.randn(2, 3, 32, 32), ["a", "b", "c"], "gradcam", layer="stage2")
    assert result.maps.shape == (2, 32, 32)
    assert [p.requires_grad for p in model.parameters()] == flags


def test_targets_by_name_index_pred_and_all():
    logits = torch.tensor([[0.1, 2.0, 0.3], [3.0, 0.0, 0.0]])
    assert resolve_targets("pred", ["x", "y", "z"], logits) == [1, 0]
    assert resolve_targets("z", ["x", "y", "z"], logits) == [2, 2]
    assert resolve_targets(["x", 2], ["x", "y", "z"], logits) == [0, 2]
    assert resolve_targets("all", ["x", "y", "z"], logits) is None
    with pytest.raises(InputError, match="one per image"):
        resolve_targets(["x"], ["x", "y", "z"], logits)


def test_separable_upsample_equals_bilinear_interpolation():
    from handlens.explain.base import upsample

    maps = torch.rand(2, 5, 7, 9)
    reference = torch.nn.functional.interpolate(maps, size=(64, 50), mode="bilinear", align_corners=False)
    np.testing.assert_allclose(upsample(maps, (64, 50)).numpy(), reference.numpy(), atol=1e-6)
    assert upsample(maps[0, 0], (7, 9)).shape == (7, 9)


def test_ig_memory_estimate_counts_activations_per_sample_not_weights():
    from handlens.explain.attribution import backward_bytes_per_sample, internal_batch_size

    x = torch.randn(4, 3, 64, 64)
    small_head = backward_bytes_per_sample(create_classifier("resnet18", 3).eval(), x)
    big_head = backward_bytes_per_sample(create_classifier("resnet18", 1000).eval(), x)
    assert abs(small_head - big_head) / small_head < 0.01  # the 1000-class head's weights are not per sample
    model = create_classifier("resnet18", 3).eval()
    assert internal_batch_size(model, x, 1) == 1
    assert internal_batch_size(model, x, 10_000) > internal_batch_size(model, x, 100) >= 1
