"""Test-time augmentation: the views come from the training policy's flips and turns, and the bundle averages
its probabilities over exactly those views (per grid patch for a patch-trained model)."""

import numpy as np
import pytest
import torch

from handlens.models.backbones import BACKBONES
from handlens.models.bundle import Bundle
from handlens.models.classifier import create_classifier
from handlens.models.tta import tta_plan


def _manifest(policy="basic", hflip=True, vflip=False, freeze="full", **train):
    return {"backbone": "tiny_cnn", "classes": ["a", "b", "c"], "freeze": freeze,
            "preprocess": BACKBONES.get("tiny_cnn").preprocess().to_dict(),
            "config": {"augment": {"policy": policy, "hflip": hflip, "vflip": vflip, "crop_scale": 0.8},
                       "train": train, "model": {"freeze": freeze}}}


@pytest.mark.parametrize(("manifest", "views"), [
    (_manifest(), ["identity", "hflip"]),
    (_manifest(vflip=True), ["identity", "hflip", "vflip", "rot180"]),
    (_manifest(hflip=False, vflip=True), ["identity", "vflip"]),
    (_manifest("thin-section"), ["identity", "hflip", "vflip", "rot180", "rot90", "rot270", "transpose",
                                 "antitranspose"]),
    (_manifest("microscopy"), ["identity", "hflip", "vflip", "rot180", "rot90", "rot270", "transpose",
                               "antitranspose"]),
    (_manifest("natural-photo"), ["identity", "hflip"]),  # its 15-degree rotations are no right angle
    (_manifest("auto"), ["identity", "hflip"]),  # auto on a learning backbone is basic
    (_manifest("auto", freeze="frozen", views=2), ["identity", "hflip"]),  # augmented cached views
])
def test_views_are_the_group_of_the_policy_flips_and_turns(manifest, views):
    plan = tta_plan(manifest)
    assert list(plan.names) == views and len(plan.views) == len(views) and plan.warning is None
    assert len(set(plan.views)) == len(views)


@pytest.mark.parametrize(("manifest", "why"), [
    (_manifest("none"), "without augmentation"),
    (_manifest(hflip=False), "no flip or right-angle turn"),
    (_manifest("xray"), "'xray' has no flip"),
    (_manifest("auto", freeze="frozen"), "frozen backbone's cached features"),
    (_manifest("/nowhere/policy.yaml"), "cannot be read"),
    ({"classes": ["a"]}, "records no training augmentation"),
])
def test_a_model_without_flips_gets_one_view_and_a_warning(manifest, why):
    plan = tta_plan(manifest)
    assert plan.to_dict()["tta_views"] == 1 and plan.names == ("identity",)
    assert why in plan.warning and "1 view" in plan.warning


def _bundle(tmp_path, manifest):
    torch.manual_seed(0)
    model = create_classifier("tiny_cnn", 3, weights="none", freeze="full").eval()
    return Bundle(tmp_path, manifest, model)


def test_tta_averages_the_probabilities_of_the_flipped_inputs(tmp_path):
    bundle = _bundle(tmp_path, _manifest(vflip=True))
    arrays = np.random.default_rng(0).integers(0, 255, (5, 32, 32, 3), dtype=np.uint8)
    plain = bundle.predict_arrays(arrays)
    views = [arrays, arrays[:, :, ::-1], arrays[:, ::-1], arrays[:, ::-1, ::-1]]
    expected = np.mean([bundle.predict_arrays(np.ascontiguousarray(v)) for v in views], axis=0)
    assert np.allclose(bundle.predict_arrays(arrays, tta=True), expected, atol=1e-6)
    assert not np.allclose(plain, expected, atol=1e-4)  # the views do change the answer of this random model
    images = list(arrays)
    assert np.allclose(bundle.predict_proba(images, tta=True), expected, atol=1e-5)
    assert np.allclose(bundle.predict_proba(images), plain, atol=1e-5)
    top = bundle.predict(images[:1], top_k=1, tta=True)[0]
    assert top.probabilities[top.top[0][0]] == pytest.approx(float(expected[0].max()), abs=1e-5)


def test_no_views_means_the_same_answer_as_without_tta(tmp_path):
    bundle = _bundle(tmp_path, _manifest("xray"))
    arrays = np.random.default_rng(1).integers(0, 255, (3, 32, 32, 3), dtype=np.uint8)
    assert np.array_equal(bundle.predict_arrays(arrays, tta=True), bundle.predict_arrays(arrays))


def test_a_patch_model_gets_the_views_on_each_grid_patch(tmp_path):
    manifest = _manifest()
    manifest["preprocess"] = {**manifest["preprocess"], "patches": {"size": 32, "scale": [1.0, 1.0]}}
    bundle = _bundle(tmp_path, manifest)
    working = [np.random.default_rng(i).integers(0, 255, (48, 80, 3), dtype=np.uint8) for i in range(2)]
    batch, owners, _ = bundle.grid_patches(working)
    assert len(owners) > 2  # several patches per image
    patches = batch.permute(0, 2, 3, 1).numpy()
    per_patch = (bundle.predict_arrays(patches) + bundle.predict_arrays(np.ascontiguousarray(patches[:, :, ::-1]))) / 2
    owners_np = np.array(owners)
    expected = np.stack([per_patch[owners_np == i].mean(0) for i in range(2)])
    assert np.allclose(bundle.predict_working(working, tta=True), expected, atol=1e-6)
