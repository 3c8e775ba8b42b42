"""Expert regions: import, rasterise, carry through preprocessing, score agreement end to end."""

import json

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from handlens.cli.main import app
from handlens.data.annotations import import_annotations, region_mask
from handlens.data.catalog import Annotation, open_catalog
from handlens.train.run import train
from handlens.transforms.roi import mask_for_input
from tests.conftest import tiny_config

runner = CliRunner()


def test_region_follows_the_images_resize_and_crop():
    region = np.zeros((40, 80), dtype=bool)
    region[:, :20] = True  # the left quarter of a wide image
    cropped = mask_for_input(region, 40, "shorter-crop")
    assert cropped.shape == (40, 40) and not cropped.any()  # shorter-crop keeps the centre only
    stretched = mask_for_input(region, 40, "stretch")
    assert stretched[:, :10].all() and not stretched[:, 10:].any()


def test_masks_and_polygons_rasterise_in_image_coordinates(tmp_path):
    mask_file = tmp_path / "m.png"
    small = np.zeros((5, 10), dtype=np.uint8)
    small[:, :5] = 200
    Image.fromarray(small).save(mask_file)
    mask = region_mask([Annotation(kind="mask", mask_path=str(mask_file))], 20, 10)  # resized to the image
    assert mask.shape == (10, 20) and mask[:, :10].all() and not mask[:, 10:].any()
    poly = region_mask([Annotation(kind="polygon", polygons=[[[0, 0], [9, 0], [9, 9], [0, 9]]])], 20, 10)
    assert poly[:, :10].all() and not poly[:, 11:].any()


def test_import_matches_by_name_and_reports_the_rest(trained_workspace, tmp_path):
    regions = tmp_path / "regions"
    regions.mkdir()
    full = np.full((40, 40), 255, dtype=np.uint8)
    Image.fromarray(full).save(regions / "red_00.png")
    (regions / "blue_01.json").write_text(json.dumps({"label": "blue", "polygons": [[[0, 0], [20, 0], [20, 20]]]}))
    (regions / "nobody.png").write_bytes((regions / "red_00.png").read_bytes())
    (regions / "green_02.json").write_text('{"polygons": [[[0, 0], [1, 1]]]}')  # two points: invalid
    catalog = open_catalog(trained_workspace.db_url)
    report = import_annotations(catalog, "colours", regions)
    assert report["added"] == 2 and len(report["unmatched"]) == 1 and len(report["invalid"]) == 1
    again = import_annotations(catalog, "colours", regions)  # replaces, does not duplicate
    with catalog.session() as session:
        assert session.query(Annotation).count() == 2 and again["added"] == 2
    catalog.close()


@pytest.fixture
def annotated(trained_workspace, tmp_path):
    """Every red and green image gets a region covering its left half."""
    regions = tmp_path / "regions"
    regions.mkdir()
    half = np.zeros((40, 40), dtype=np.uint8)
    half[:, :20] = 255
    for folder in ("red", "green"):
        for image in (tmp_path / "colours" / folder).iterdir():
            Image.fromarray(half).save(regions / f"{image.stem}.png")
    result = runner.invoke(app, ["--workspace", str(trained_workspace.root), "annotate", "import", "colours",
                                 str(regions), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["added"] == 32
    return trained_workspace


def test_agreement_cli_reports_per_class_and_overall(annotated):
    bundle = train(tiny_config(), annotated).bundle
    result = runner.invoke(app, ["--workspace", str(annotated.root), "agreement", str(bundle), "--method",
                                 "gradcam", "--layer", "stage2", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["overall"]["n"] == 32 and set(report["per_class"]) == {"green", "red"}
    assert report["overall"]["region_share"] == pytest.approx(0.5)
    first = report["images"][0]
    assert first["explained_class"] == first["label"]  # explained for the true class
    assert 0.0 <= first["energy_inside"] <= 1.0 and isinstance(first["pointing_hit"], bool)
    words = ("agrees with the experts", "no better than chance", "looks away from the experts")
    verdict = report["verdict"]
    assert verdict["verdict"] in words and verdict["sentence"].startswith(verdict["verdict"])
    assert set(report["per_class_verdicts"]) == {"green", "red"}
    human = runner.invoke(app, ["--workspace", str(annotated.root), "agreement", str(bundle), "--split", "test"])
    assert human.exit_code == 0 and "pointing hit rate" in human.output
    assert "verdict: " in human.output and any(w in human.output for w in words)


def test_agreement_without_regions_says_how_to_add_them(trained_workspace):
    bundle = train(tiny_config(), trained_workspace).bundle
    result = runner.invoke(app, ["--workspace", str(trained_workspace.root), "agreement", str(bundle)])
    assert result.exit_code == 2 and "handlens annotate import colours" in result.output


def test_trust_and_agreement_measure_a_patch_trained_model_as_it_sees_images(annotated, tmp_path):
    """Trust: the grid patches at its scale, each with its own piece of the expert region; agreement: its
    stitched maps against the regions on the image itself."""
    from handlens.explain.api import load_bundle
    from handlens.explain.trust import patch_inputs_and_rois

    patches = ["preprocess.patches.enabled=true", "preprocess.patches.size=16", "preprocess.patches.max_side=0",
               "preprocess.patches.grid_max=4", "preprocess.size=16"]
    bundle = train(tiny_config(*patches), annotated).bundle
    image = str(sorted((tmp_path / "colours" / "red").iterdir())[0])
    inputs, masks = patch_inputs_and_rois(load_bundle(bundle), [image], roi="annotations", workspace=annotated)
    assert inputs.shape == (4, 3, 16, 16) and masks.shape == (4, 16, 16)
    # 40-px image, 16-px grid thinned to 4 boxes: top-left (inside the left-half region), ..., bottom-right (outside)
    assert masks[0].all() and not masks[-1].any()
    report = json.loads(runner.invoke(app, ["--workspace", str(annotated.root), "agreement", str(bundle),
                                            "--method", "gradcam", "--json"]).stdout)
    assert report["overall"]["n"] == 32 and report["overall"]["region_share"] == pytest.approx(0.5)  # image grid
    assert all(item["explained_class"] == item["label"] for item in report["images"])
    for roi in ("none", "threshold", "annotations"):
        result = runner.invoke(app, ["--workspace", str(annotated.root), "trust", str(bundle), image, "--roi", roi,
                                     "--steps", "4", "--sanity-steps", "1", "--json"])
        assert result.exit_code == 0, result.output
        report = json.loads(result.stdout)
        assert report["inputs"] == "grid patches" and report["n_inputs"] == 4
        assert report["faithfulness"]["roi"] is (roi != "none")
