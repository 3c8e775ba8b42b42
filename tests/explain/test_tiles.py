"""Tiled prediction and explanation of images larger than the model's input."""

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from handlens.cli.main import app
from handlens.explain.api import load_bundle
from handlens.explain.tiles import tile_origins, tiled_explain
from handlens.train.run import train
from tests.conftest import tiny_config


@pytest.mark.parametrize(("length", "tile", "overlap"), [(100, 32, 0.25), (97, 32, 0.5), (32, 32, 0.0), (20, 32, 0.3)])
def test_tiles_cover_the_image_and_stay_inside(length, tile, overlap):
    origins = tile_origins(length, tile, overlap)
    covered = np.zeros(length, dtype=bool)
    for start in origins:
        assert start >= 0 and start + min(tile, length) <= length
        covered[start:start + tile] = True
    assert covered.all() and origins == sorted(set(origins))


@pytest.fixture
def bundle(trained_workspace):
    return load_bundle(train(tiny_config(), trained_workspace).bundle)


def test_one_tile_equals_the_plain_explanation(bundle):
    image = np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)
    tiled = tiled_explain(bundle, image, tile=32)
    plain = bundle.explain(image, method="gradcam", target=int(tiled.target))
    assert len(tiled.tiles) == 1
    np.testing.assert_allclose(tiled.heatmap, plain.maps[0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(tiled.probabilities, plain.probabilities[0], rtol=1e-5)


def test_a_large_image_is_stitched_at_full_resolution(bundle):
    image = np.zeros((90, 130, 3), dtype=np.uint8)
    image[:, :65] = (220, 30, 30)  # red left half, blue right half
    image[:, 65:] = (30, 30, 220)
    result = tiled_explain(bundle, image, tile=32, overlap=0.5, batch_size=4)
    assert result.heatmap.shape == (90, 130) and result.probability_map.shape == (3, 90, 130)
    assert np.isfinite(result.heatmap).all() and len(result.tiles) == len(tile_origins(90, 32, 0.5)) * len(
        tile_origins(130, 32, 0.5))
    np.testing.assert_allclose(result.probabilities, result.tile_probabilities.mean(0), rtol=1e-6)
    np.testing.assert_allclose(result.probability_map.astype(np.float32).sum(0), 1.0, atol=2e-3)
    red, blue = bundle.classes.index("red"), bundle.classes.index("blue")
    left, right = result.probability_map[:, :, :20].mean((1, 2)), result.probability_map[:, :, -20:].mean((1, 2))
    assert left[red] - left[blue] > right[red] - right[blue]  # the map follows the content


def test_cli_tiled_explain(trained_workspace, tmp_path):
    from PIL import Image

    bundle_path = train(tiny_config(), trained_workspace).bundle
    big = tmp_path / "section.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (70, 100, 3), dtype=np.uint8)).save(big)
    out = tmp_path / "tiled"
    result = CliRunner().invoke(app, ["--workspace", str(trained_workspace.root), "explain", str(bundle_path),
                                      str(big), "--tile", "32", "--overlap", "0.25", "--out", str(out), "--json"])
    assert result.exit_code == 0, result.output
    entry = json.loads(result.stdout)["images"][0]
    assert np.load(entry["map"]).shape == (70, 100) and entry["tiles"] == 12
    assert torch.tensor(np.load(entry["probability_map"]).astype(np.float32)).shape == (3, 70, 100)


def test_overlapping_tiles_blend_without_seams(bundle, monkeypatch):
    """Tiles whose maps disagree completely (each tile's map is its own constant) cross-fade: between
    neighbouring pixels the stitched map changes by a fraction of the jump between tiles, never all of it."""
    import types

    import handlens.explain.api as api

    counter = iter(range(1000))

    def constant_maps(model, inputs, classes, method, *, layer, target, mean, std, **params):
        values = [float(next(counter) % 2) for _ in range(len(inputs))]  # 0, 1, 0, 1...: neighbours differ
        maps = np.stack([np.full(inputs.shape[-2:], v, dtype=np.float32) for v in values])
        return types.SimpleNamespace(maps=maps, layer="stage2", signed=False)

    monkeypatch.setattr(api, "explain", constant_maps)
    result = tiled_explain(bundle, np.zeros((32, 96, 3), dtype=np.uint8), tile=32, overlap=0.25, batch_size=8)
    assert len(result.tiles) == 4
    row = result.heatmap[16]
    assert row.max() > 0.6 and row.min() < 0.4  # the tiles' values show through
    assert np.abs(np.diff(row)).max() < 0.2  # but no seam: a step of 1 would be one
