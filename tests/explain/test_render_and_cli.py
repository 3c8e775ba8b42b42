import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from handlens.cli.main import app
from handlens.explain.render import colormap, grid, normalise, overlay
from handlens.train.run import train
from tests.conftest import tiny_config

runner = CliRunner()


def test_colormap_and_normalise():
    ramp = colormap(np.array([0.0, 0.5, 1.0]))
    assert ramp.shape == (3, 3) and ramp.dtype == np.uint8
    assert ramp[0, 2] > ramp[0, 0] and ramp[2, 0] > ramp[2, 2]  # blue at 0, red at 1
    m = np.zeros((100, 100))
    m[0, 0] = 1000.0  # one hot pixel
    m[50:, :] = 1.0
    assert normalise(m).max() == 1.0 and normalise(m)[70, 70] == 1.0  # the percentile keeps the region visible
    assert normalise(np.zeros((4, 4))).max() == 0.0
    assert normalise(np.array([[-2.0, 1.0]]), signed=True).min() < 0


def test_signed_overlay_is_green_for_positive_and_red_for_negative():
    image = np.full((4, 4, 3), 100, dtype=np.uint8)
    heat = np.zeros((4, 4))
    heat[0, 0], heat[3, 3] = 1.0, -1.0
    out = overlay(image, heat, opacity=1.0, signed=True)
    assert tuple(out[0, 0]) == (0, 255, 0) and tuple(out[3, 3]) == (255, 0, 0)
    assert tuple(out[1, 1]) == (100, 100, 100)  # no evidence: the image shows through


def test_overlay_resizes_the_map_and_opacity_zero_shows_the_image():
    image = np.random.default_rng(0).integers(0, 255, (20, 30, 3), dtype=np.uint8)
    assert np.array_equal(overlay(image, np.ones((5, 5)), opacity=0.0), image)
    assert overlay(image, np.ones((5, 5))).shape == (20, 30, 3)
    assert grid([image, image, image], ["a", "b", "c"]).size[0] < 4 * 34


@pytest.fixture
def bundle_path(trained_workspace):
    return train(tiny_config(), trained_workspace).bundle


def test_bundle_explain_api(bundle_path, tmp_path):
    import handlens

    bundle = handlens.load_bundle(bundle_path)
    image = next((tmp_path / "colours" / "red").iterdir())
    result = bundle.explain([image, image], method="gradcam", layer="stage2", target="red")
    assert result.maps.shape == (2, 32, 32) and result.target_names == ["red", "red"]
    every = bundle.explain(image, method="layercam", target="all")
    assert every.maps.shape == (1, 3, 32, 32) and every.layer == bundle.layer_names[0]
    signed = bundle.explain(image, method="integrated_gradients", steps=8, baseline="blur")
    assert signed.signed and len(signed.extras["convergence_delta"]) == 1


def test_cli_explain_writes_overlays_maps_and_an_index(trained_workspace, bundle_path, tmp_path):
    images = sorted((tmp_path / "colours" / "green").iterdir())[:2]
    out = tmp_path / "maps"
    result = runner.invoke(app, ["--workspace", str(trained_workspace.root), "explain", str(bundle_path),
                                 *map(str, images), "--method", "gradcam++", "--target", "all", "--out", str(out),
                                 "--json"])
    assert result.exit_code == 0, result.output
    index = json.loads(result.stdout)
    assert index["method"] == "gradcam++" and len(index["images"]) == 2
    first = index["images"][0]
    assert np.load(first["map"]).shape == (3, 32, 32)  # all classes
    assert (out / "index.json").is_file() and first["overlay"].endswith(".png") and first["all_classes"]
    with_params = runner.invoke(app, ["--workspace", str(trained_workspace.root), "explain", str(bundle_path),
                                      str(images[0]), "--method", "occlusion", "--param", "window=8",
                                      "--param", "stride=8", "--out", str(out)])
    assert with_params.exit_code == 0, with_params.output
    assert first["shortcuts"]["verdict"] in ("shortcut warning", "no shortcut sign", "empty map")
    # each image's line is followed by where its map's energy sits, in the same words
    assert any(word in with_params.output for word in ("shortcut warning ·", "no shortcut sign ·", "empty map ·"))
    bad = runner.invoke(app, ["--workspace", str(trained_workspace.root), "explain", str(bundle_path),
                              str(images[0]), "--method", "magic"])
    assert bad.exit_code == 2 and "choose one of" in bad.output
    bad_layer = runner.invoke(app, ["--workspace", str(trained_workspace.root), "explain", str(bundle_path),
                                    str(images[0]), "--layer", "stage9"])
    assert bad_layer.exit_code == 2 and "named layers" in bad_layer.output


def test_explain_a_whole_split_resumes_and_draws_the_top_losses(trained_workspace, bundle_path, tmp_path):
    out = tmp_path / "split_maps"
    args = ["--workspace", str(trained_workspace.root), "explain", str(bundle_path), "--split", "test",
            "--method", "gradcam", "--out", str(out), "--json"]
    first = runner.invoke(app, args)
    assert first.exit_code == 0, first.output
    index = json.loads(first.stdout)
    assert len(index["images"]) == 12 and (out / "index.json").is_file()
    maps = sorted(out.glob("*.npy"))
    assert len(maps) == 12
    stamp = {p: p.stat().st_mtime_ns for p in maps}
    maps[0].unlink()  # as if the run had been killed before this one
    again = json.loads(runner.invoke(app, args).stdout)
    assert len(again["images"]) == 12
    assert all(p.stat().st_mtime_ns == stamp[p] for p in maps[1:])  # kept, not recomputed
    assert maps[0].is_file()
    wrong = [e for e in again["images"] if e["predicted"] != Path(e["image"]).parent.name]
    assert (again["gallery"] is not None) == bool(wrong)
    missing = runner.invoke(app, ["--workspace", str(trained_workspace.root), "explain", str(bundle_path)])
    assert missing.exit_code == 2 and "--split" in missing.output


def test_trust_command_reports_faithfulness_beside_random_and_sanity(trained_workspace, bundle_path, tmp_path):
    images = sorted((tmp_path / "colours" / "blue").iterdir())[:2]
    result = runner.invoke(app, ["--workspace", str(trained_workspace.root), "trust", str(bundle_path),
                                 *map(str, images), "--method", "gradcam", "--steps", "8", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert {"deletion_auc", "random_deletion_auc", "insertion_auc", "random_insertion_auc"} <= set(
        report["faithfulness"])
    assert report["sanity"]["steps"][0]["randomised_down_to"] == "head"
    # a verdict in words, the same in JSON and in the table: two images are too few for a paired test
    words = ("faithful", "not better than random", "worse than random")
    assert report["verdict"]["verdict"] in words and report["verdict"]["n"] == 2
    assert "too few to tell" in report["verdict"]["sentence"]
    assert all(row["verdict"] in words for row in report["faithfulness"]["images"])
    assert report["sanity"]["verdict"] in ("passes", "fails") and report["sanity_verdict"].startswith("sanity check")
    human = runner.invoke(app, ["--workspace", str(trained_workspace.root), "trust", str(bundle_path),
                                str(images[0]), "--sanity-steps", "1"])
    assert human.exit_code == 0 and "random map AUC" in human.output and "sanity check" in human.output
    assert "verdict: " in human.output and any(w in human.output for w in words)
    on_roi = runner.invoke(app, ["--workspace", str(trained_workspace.root), "trust", str(bundle_path),
                                 str(images[0]), "--roi", "threshold", "--steps", "4", "--sanity-steps", "1", "--json"])
    assert on_roi.exit_code == 0, on_roi.output
    assert json.loads(on_roi.stdout)["faithfulness"]["roi"] is True
    no_regions = runner.invoke(app, ["--workspace", str(trained_workspace.root), "trust", str(bundle_path),
                                     str(images[0]), "--roi", "annotations", "--sanity-steps", "1"])
    assert no_regions.exit_code == 2 and "annotate import" in no_regions.output


def test_split_resume_never_reuses_maps_of_another_method_or_layer(trained_workspace, bundle_path, tmp_path):
    out = tmp_path / "maps"
    base = ["--workspace", str(trained_workspace.root), "explain", str(bundle_path), "--split", "val",
            "--out", str(out), "--json"]
    runner.invoke(app, [*base, "--method", "gradcam", "--layer", "stage3"])
    first = {p: p.stat().st_mtime_ns for p in out.glob("*.npy")}
    runner.invoke(app, [*base, "--method", "gradcam", "--layer", "stage2"])  # same file names, other layer
    assert all(p.stat().st_mtime_ns != t for p, t in first.items())  # recomputed, not reused
    index = json.loads((out / "index.json").read_text())
    assert index["layer"] == "stage2"
