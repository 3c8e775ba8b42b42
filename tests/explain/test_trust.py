"""trust_report: faithfulness beside a random map and the sanity check, on what the model sees, with ROIs."""

import numpy as np
import pytest
from PIL import Image

from handlens.core.errors import InputError
from handlens.data.annotations import import_annotations
from handlens.data.catalog import open_catalog
from handlens.explain.api import load_bundle
from handlens.explain.trust import TrustReport, expert_masks, input_rois, patch_inputs_and_rois, trust_report
from handlens.train.run import train
from tests.conftest import tiny_config


@pytest.fixture
def bundle_path(trained_workspace):
    return train(tiny_config(), trained_workspace).bundle


def left_half_regions(ws, tmp_path, folder="red"):
    """Expert regions over the left half of every image in ``folder`` of the colour tree."""
    regions = tmp_path / "regions"
    regions.mkdir(exist_ok=True)
    half = np.zeros((40, 40), dtype=np.uint8)
    half[:, :20] = 255
    for image in (tmp_path / "colours" / folder).iterdir():
        Image.fromarray(half).save(regions / f"{image.stem}.png")
    catalog = open_catalog(ws.db_url)
    import_annotations(catalog, "colours", regions)
    catalog.close()


def test_trust_report_measures_whole_images_of_a_folder(trained_workspace, bundle_path, tmp_path):
    folder = tmp_path / "colours" / "blue"
    report = trust_report(bundle_path, [folder], workspace=trained_workspace, steps=4, sanity_steps=2)
    assert isinstance(report, TrustReport)
    assert report.images == sorted(str(p) for p in folder.iterdir())  # the folder expanded
    assert report.inputs == "whole images" and not report.patch_trained and report.n_inputs == 16
    assert report.method == "gradcam" and report.layer == load_bundle(bundle_path).layer_names[0]
    f = report.faithfulness
    assert f["roi"] is False and f["steps"] == 4 and f["baseline"] == "blur" and len(f["images"]) == 16
    assert 0.0 <= f["deletion_auc"] <= 1.0 and 0.0 <= f["random_insertion_auc"] <= 1.0
    assert report.sanity["steps"][0]["randomised_down_to"] == "head"
    assert len(report.sanity["steps"]) == 2
    assert list(report.to_dict()) == ["method", "layer", "images", "inputs", "n_inputs", "verdict", "sanity_verdict",
                                      "shortcuts", "faithfulness", "sanity"]
    # where each map's energy sits, per image and over the images
    assert report.shortcuts["maps"] == 16 and "shortcut" in report.shortcuts["verdict"]
    assert all("border" in row["shortcuts"] for row in f["images"])
    # 16 images: enough for the paired test to decide; the words are one of three, per image too
    assert report.verdict.n == 16 and "too few" not in report.verdict.sentence()
    assert report.verdict.verdict in ("faithful", "not better than random", "worse than random")
    assert {row["verdict"] for row in f["images"]} <= {"faithful", "not better than random", "worse than random"}


def test_a_threshold_roi_restricts_the_curves_to_the_specimen(trained_workspace, bundle_path, tmp_path):
    image = str(sorted((tmp_path / "colours" / "red").iterdir())[0])
    report = trust_report(bundle_path, [image], workspace=trained_workspace, roi="threshold", steps=4,
                          sanity_steps=1, baseline="mean")
    assert report.faithfulness["roi"] is True and report.faithfulness["baseline"] == "mean"
    preprocess = load_bundle(bundle_path).preprocess
    masks = input_rois(preprocess, [image], roi="threshold", workspace=trained_workspace)
    assert masks.shape == (1, preprocess.size, preprocess.size) and masks.dtype == bool
    assert input_rois(preprocess, [image], roi="none", workspace=trained_workspace) is None


def test_expert_regions_come_from_the_catalog(trained_workspace, bundle_path, tmp_path):
    image = str(sorted((tmp_path / "colours" / "red").iterdir())[0])
    with pytest.raises(InputError, match=r"has no expert region in the catalog.*annotate import"):
        trust_report(bundle_path, [image], workspace=trained_workspace, roi="annotations", sanity_steps=1)
    left_half_regions(trained_workspace, tmp_path)
    (mask,) = expert_masks(trained_workspace, [image])
    assert mask.shape == (40, 40) and mask[:, :20].all() and not mask[:, 20:].any()
    report = trust_report(bundle_path, [image], workspace=trained_workspace, roi="annotations", steps=4,
                          sanity_steps=1)
    assert report.faithfulness["roi"] is True
    assert report.faithfulness["images"][0]["roi_share"] == pytest.approx(0.5, abs=0.05)


def test_an_unknown_roi_source_is_refused(trained_workspace, bundle_path, tmp_path):
    image = str(sorted((tmp_path / "colours" / "red").iterdir())[0])
    with pytest.raises(InputError, match="--roi 'specimen': choose none, threshold or annotations"):
        trust_report(bundle_path, [image], workspace=trained_workspace, roi="specimen")


def test_a_patch_trained_model_is_measured_on_its_grid_patches(trained_workspace, tmp_path):
    patches = ["preprocess.patches.enabled=true", "preprocess.patches.size=16", "preprocess.patches.max_side=0",
               "preprocess.patches.grid_max=4", "preprocess.size=16"]
    bundle_path = train(tiny_config(*patches), trained_workspace).bundle
    images = [str(p) for p in sorted((tmp_path / "colours" / "red").iterdir())[:2]]
    inputs, rois = patch_inputs_and_rois(load_bundle(bundle_path), images, roi="threshold",
                                         workspace=trained_workspace)
    assert inputs.shape == (8, 3, 16, 16) and rois.shape == (8, 16, 16)  # 4 grid patches per image
    assert patch_inputs_and_rois(load_bundle(bundle_path), images, roi="none", workspace=trained_workspace)[1] is None
    report = trust_report(bundle_path, images, workspace=trained_workspace, steps=4, sanity_steps=1)
    assert report.patch_trained and report.inputs == "grid patches" and report.n_inputs == 8
    assert len(report.faithfulness["images"]) == 8
