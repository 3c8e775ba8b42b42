"""Top regions of a map as GeoJSON polygons on the original image (explain.regions, explain --format geojson)."""

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from handlens.core.errors import InputError
from handlens.explain.output import check_formats
from handlens.explain.regions import Frame, feature_collection, top_mask, top_regions, write_geojson
from handlens.transforms.preprocess import Preprocess, preprocess_image

runner = CliRunner()


def shoelace(ring):
    """Signed area of a closed ring of [x, y] (positive: counter-clockwise), independent of the module's."""
    ring = np.asarray(ring, dtype=float)
    return 0.5 * sum(x0 * y1 - x1 * y0 for (x0, y0), (x1, y1) in itertools.pairwise(ring))


def bounds(ring):
    ring = np.asarray(ring, dtype=float)
    return ring[:, 0].min(), ring[:, 1].min(), ring[:, 0].max(), ring[:, 1].max()


def assert_valid_collection(collection, *, width, height):
    """RFC 7946 structure: closed rings of 4+ positions, exterior counter-clockwise, holes clockwise, on the image."""
    assert collection["type"] == "FeatureCollection"
    for feature in collection["features"]:
        assert feature["type"] == "Feature" and feature["geometry"]["type"] == "Polygon"
        exterior, *holes = feature["geometry"]["coordinates"]
        for ring in (exterior, *holes):
            assert len(ring) >= 4 and ring[0] == ring[-1]
            assert all(len(p) == 2 and 0 <= p[0] <= width and 0 <= p[1] <= height for p in ring)
        assert shoelace(exterior) > 0
        assert all(shoelace(h) < 0 for h in holes)
        props = feature["properties"]
        assert props["objectType"] == "annotation"  # QuPath imports it as an annotation
        assert props["classification"]["name"] == props["class"]
        assert len(props["classification"]["color"]) == 3


def test_a_square_becomes_one_closed_counter_clockwise_polygon_on_its_pixels():
    heat = np.zeros((40, 40))
    heat[5:15, 10:20] = 1.0  # rows 5..14, columns 10..19: x in [10, 20], y in [5, 15]
    regions = top_regions(heat, 0.2)
    assert len(regions) == 1
    square = regions[0]
    assert square.bounds() == pytest.approx((10, 5, 20, 15))
    assert abs(shoelace(square.exterior)) == pytest.approx(100, abs=1)  # marching squares cuts the corners
    assert shoelace(square.exterior) > 0 and np.array_equal(square.exterior[0], square.exterior[-1])
    assert square.energy_share == pytest.approx(1.0) and square.map_pixels == 100 and not square.holes
    assert len(square.exterior) <= 10  # straight runs simplified away: corners only


def test_two_blobs_are_two_regions_ordered_by_their_share_of_the_energy():
    heat = np.zeros((30, 60))
    heat[2:8, 2:8] = 0.5  # 36 pixels of 0.5 = 18
    heat[10:20, 30:50] = 1.0  # 200 pixels of 1.0 = 200
    strong, weak = top_regions(heat, 0.5)
    assert strong.bounds() == pytest.approx((30, 10, 50, 20)) and weak.bounds() == pytest.approx((2, 2, 8, 8))
    assert strong.energy_share == pytest.approx(200 / 218, abs=1e-4)
    assert weak.energy_share == pytest.approx(18 / 218, abs=1e-4)
    assert strong.area == pytest.approx(200, abs=1) and weak.area == pytest.approx(36, abs=1)
    # the top share cuts: 10% of 1,800 pixels is 180, all of them in the strong blob
    (only,) = top_regions(heat, 0.1)
    assert only.map_pixels == 200  # ties at the threshold are all in: a plateau is not cut in raster order
    # at min_pixels=40 the small blob counts as speckle
    assert [r.map_pixels for r in top_regions(heat, 0.5, min_pixels=40)] == [200]


def test_a_ring_keeps_its_hole_as_an_interior_ring():
    heat = np.zeros((40, 40))
    heat[5:25, 5:25] = 1.0
    heat[12:18, 12:18] = 0.0  # a 6 x 6 hole
    (ring,) = top_regions(heat, 0.5)
    assert len(ring.holes) == 1
    (hole,) = ring.holes
    assert shoelace(hole) < 0 < shoelace(ring.exterior)  # RFC 7946: holes clockwise
    assert bounds(hole) == pytest.approx((12, 12, 18, 18), abs=0.5)
    assert ring.area == pytest.approx(400 - 36, abs=1.5)
    assert ring.area == pytest.approx(abs(shoelace(ring.exterior)) - abs(shoelace(hole)))
    # and an island inside the hole is a region of its own
    heat[14:16, 14:16] = 1.0
    assert len(top_regions(heat, 0.5)) == 2


def test_the_top_share_follows_the_maps_values():
    heat = np.tile(np.arange(1, 51, dtype=float), (20, 1))  # brighter to the right
    (right,) = top_regions(heat, 0.2)
    assert right.bounds() == pytest.approx((40, 0, 50, 20))
    assert top_mask(heat, 0.2).sum() == 200
    assert top_regions(np.zeros((10, 10)), 0.2) == []  # no positive relevance: nothing to draw
    negative = -np.ones((10, 10))
    negative[2:5, 2:5] = 1.0
    assert top_mask(negative, 0.5).sum() == 9  # only positive relevance counts, however big the share
    with pytest.raises(InputError, match="top share"):
        top_mask(heat, 0.0)


def test_a_stretched_map_lands_on_a_non_square_image():
    heat = np.zeros((50, 50))
    heat[25:35, 10:20] = 1.0
    frame = Frame.for_input(heat.shape, 300, 100, Preprocess(size=50, resize="stretch"))
    (region,) = top_regions(heat, 0.2, frame=frame)
    assert region.bounds() == pytest.approx((60, 50, 120, 70))  # x * 300/50, y * 100/50
    assert region.area == pytest.approx(100 * 6 * 2, rel=0.02)  # in the image's pixels


def _rectangle_image(width, height, box):
    """A black image with one white rectangle (x0, y0, x1, y1)."""
    pixels = np.zeros((height, width, 3), dtype=np.uint8)
    x0, y0, x1, y1 = box
    pixels[y0:y1, x0:x1] = 255
    return Image.fromarray(pixels)


@pytest.mark.parametrize("resize", ["shorter-crop", "letterbox", "stretch"])
def test_polygons_of_a_model_input_map_land_back_on_the_original_rectangle(resize):
    # the map is the model input itself (resized, centre-cropped or padded): its bright region must come
    # back where the rectangle is on the 300 x 200 original
    box = (150, 60, 210, 140)
    preprocess = Preprocess(size=100, resize=resize, interpolation="nearest")
    model_input = preprocess_image(_rectangle_image(300, 200, box), preprocess)
    heat = model_input[..., 0].astype(float) / 255
    frame = Frame.for_input(heat.shape, 300, 200, preprocess)
    (region,) = top_regions(heat, 0.5, frame=frame)
    assert region.bounds() == pytest.approx(box, abs=3.5)  # one input pixel is 2 or 3 image pixels
    assert region.area == pytest.approx(60 * 80, rel=0.1)
    # a map at a quarter of the input's resolution lands on the same pixels
    coarse = heat.reshape(25, 4, 25, 4).mean(axis=(1, 3))
    (same,) = top_regions(coarse, 0.5, frame=Frame.for_input(coarse.shape, 300, 200, preprocess))
    assert same.bounds() == pytest.approx(box, abs=12.5)


def test_letterbox_padding_is_never_a_region():
    preprocess = Preprocess(size=100, resize="letterbox")
    frame = Frame.for_input((100, 100), 300, 200, preprocess)  # the image is 100 x 67 at rows 16..82
    content = frame.content((100, 100))
    assert content[:16].sum() == 0 and content[16:83].all() and content[83:].sum() == 0
    heat = np.zeros((100, 100))
    heat[:16] = 5.0  # a map hot on the padding (a shortcut) is still not drawn there
    heat[40:60, 40:60] = 1.0
    (region,) = top_regions(heat, 0.2, frame=frame)
    assert region.bounds() == pytest.approx((120, (40 - 16) * 3, 180, (60 - 16) * 3), abs=1.5)
    assert region.energy_share == pytest.approx(1.0)  # the padding is not the image's energy either


def test_a_huge_map_is_averaged_down_and_still_lands_on_its_pixels():
    heat = np.zeros((300, 6000), dtype=np.float32)
    heat[100:200, 3000:3600] = 1.0
    (region,) = top_regions(heat, 0.2, max_side=1000)  # blocks of 6 x 6
    assert region.bounds() == pytest.approx((3000, 100, 3600, 200), abs=6)
    assert region.map_pixels < 100 * 600 / 30


def test_the_feature_collection_is_geojson_that_qupath_imports(tmp_path):
    heat = np.zeros((40, 60))
    heat[5:25, 5:25] = 1.0
    heat[12:18, 12:18] = 0.0
    heat[30:36, 40:50] = 0.7
    frame = Frame.identity(heat.shape, 120, 80)  # a map at half the image's resolution
    regions = top_regions(heat, 0.3, frame=frame)
    collection = feature_collection(regions, image="/data/a.png", target="tumour", method="gradcam",
                                    layer="stage4", fraction=0.3, class_index=2)
    path = write_geojson(tmp_path / "a.gradcam.tumour.geojson", collection)
    loaded = json.loads(path.read_text())
    assert loaded == json.loads(json.dumps(collection)) and not list(tmp_path.glob("*.tmp"))
    assert_valid_collection(loaded, width=120, height=80)
    first, second = loaded["features"]
    assert len(first["geometry"]["coordinates"]) == 2  # the ring, then its hole
    props = first["properties"]
    assert (props["image"], props["class"], props["method"], props["layer"], props["top"]) == (
        "/data/a.png", "tumour", "gradcam", "stage4", 0.3)
    assert props["area_px"] == pytest.approx((400 - 36) * 4, rel=0.02)  # in image pixels (2 x 2 per map pixel)
    assert props["energy_share"] + second["properties"]["energy_share"] == pytest.approx(1.0, abs=1e-4)
    assert props["measurements"]["energy share"] == props["energy_share"]
    assert props["classification"] == {"name": "tumour", "color": [44, 160, 44]}


def test_formats_are_a_repeatable_or_comma_list_with_todays_default():
    assert check_formats(None) == ("png", "npy")
    assert check_formats(["geojson,png"]) == ("png", "geojson")
    assert check_formats(["npy", "GeoJSON"]) == ("npy", "geojson")
    with pytest.raises(InputError, match="choose from png, npy, geojson"):
        check_formats(["svg"])


def test_cli_explain_writes_geojson_regions_on_the_images_pixels(trained_workspace, tmp_path):
    from handlens.cli.app import app
    from handlens.train.run import train
    from tests.conftest import tiny_config

    bundle = str(train(tiny_config(), trained_workspace).bundle)
    root = ["--workspace", str(trained_workspace.root)]
    wide = tmp_path / "wide.png"  # a non-square image: the polygons must land on its 64 x 40 pixels
    Image.open(next((tmp_path / "colours" / "red").iterdir())).resize((64, 40)).save(wide)
    out = tmp_path / "regions"
    result = runner.invoke(app, [*root, "explain", bundle, str(wide), "--method", "gradcam", "--format", "geojson",
                                 "--out", str(out), "--json"])
    assert result.exit_code == 0, result.output
    index = json.loads(result.stdout)
    (entry,) = index["images"]
    assert index["formats"] == ["geojson"] and index["top"] == 0.2
    assert entry["geojson"] == str(out / f"wide.gradcam.{entry['target']}.geojson")
    assert "overlay" not in entry and "map" not in entry
    assert not list(out.glob("*.png")) and not list(out.glob("*.npy"))  # only what was asked for
    collection = json.loads((out / f"wide.gradcam.{entry['target']}.geojson").read_text())
    assert_valid_collection(collection, width=64, height=40)
    assert collection["features"], "a trained model's map has a top 20%"
    assert all(f["properties"]["image"] == str(wide) for f in collection["features"])
    saved = json.loads((out / "index.json").read_text())
    assert saved["images"][0]["geojson"] == entry["geojson"]

    every = runner.invoke(app, [*root, "explain", bundle, str(wide), "--target", "all", "--format", "png,geojson",
                                "--top", "0.1", "--out", str(tmp_path / "every"), "--json"])
    assert every.exit_code == 0, every.output
    (entry,) = json.loads(every.stdout)["images"]
    assert set(entry["geojson_classes"]) == {"blue", "green", "red"} and entry["overlay"].endswith(".png")
    small = json.loads(Path(entry["geojson"]).read_text())
    assert sum(f["properties"]["area_px"] for f in small["features"]) <= 0.1 * 64 * 40 * 1.2

    tiled = runner.invoke(app, [*root, "explain", bundle, str(wide), "--tile", "16", "--format", "geojson",
                                "--out", str(tmp_path / "tiled")])
    assert tiled.exit_code == 0, tiled.output
    (path,) = (tmp_path / "tiled").glob("wide.gradcam.tiled.*.geojson")
    assert_valid_collection(json.loads(path.read_text()), width=64, height=40)

    bad = runner.invoke(app, [*root, "explain", bundle, str(wide), "--format", "svg"])
    assert bad.exit_code == 2 and "choose from png, npy, geojson" in bad.output
