"""Synthetic sigma clasts (data/sigma.py): deterministic from the seed, 3-8 tight, disjoint boxes per image,
labels the masks bear out (a mirror flips the sense, a half turn keeps it), and the CLI demo imports crops."""

import csv
import json

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from handlens.cli.app import app
from handlens.core.errors import InputError
from handlens.data.sigma import CROP_MARGIN, draw_sigma_image, generate_sigma_clasts, tail_sense

SMALL = (800, 600)


def files(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_same_files_other_seed_other_files(tmp_path):
    one = generate_sigma_clasts(tmp_path / "a", images=2, seed=5, size=SMALL)
    two = generate_sigma_clasts(tmp_path / "b", images=2, seed=5, size=SMALL)
    other = generate_sigma_clasts(tmp_path / "c", images=2, seed=6, size=SMALL)
    assert files(tmp_path / "a") == files(tmp_path / "b")
    assert [c.box for c in one.clasts] == [c.box for c in two.clasts]
    assert [c.box for c in one.clasts] != [c.box for c in other.clasts]
    first = tmp_path / "a" / one.images[0]
    assert first.read_bytes() != (tmp_path / "c" / other.images[0]).read_bytes()


def test_box_files_agree_and_crops_have_the_margin(tmp_path):
    report = generate_sigma_clasts(tmp_path, images=3, seed=2, size=SMALL)
    rows = list(csv.DictReader(report.csv.open()))
    assert [(r["path"], int(r["x0"]), int(r["y0"]), int(r["x1"]), int(r["y1"]), r["label"]) for r in rows] == [
        (c.image, *c.box, c.label) for c in report.clasts]
    coco = json.loads(report.coco.read_text())
    assert [c["name"] for c in coco["categories"]] == ["sigma-clast"]
    files_by_id = {i["id"]: i["file_name"] for i in coco["images"]}
    assert all(i["width"] == SMALL[0] and i["height"] == SMALL[1] for i in coco["images"])
    for note, clast in zip(coco["annotations"], report.clasts, strict=True):
        x, y, w, h = note["bbox"]
        assert (files_by_id[note["image_id"]], x, y, x + w, y + h) == (clast.image, *clast.box)
        assert note["attributes"]["rotation"] == clast.label
    for clast in report.clasts:
        crop = Image.open(tmp_path / clast.crop)
        x0, y0, x1, y1 = clast.box
        assert clast.crop.startswith(f"crops/{clast.label}/")
        grown_w = min(SMALL[0], x1 + round(CROP_MARGIN * (x1 - x0))) - max(0, x0 - round(CROP_MARGIN * (x1 - x0)))
        assert crop.width == grown_w and crop.height > y1 - y0
    assert sorted(p.parent.name for p in report.crops.rglob("*.png")) == sorted(c.label for c in report.clasts)


@pytest.mark.parametrize("seed", range(6))
def test_boxes_are_tight_inside_and_disjoint(seed):
    pixels, drawn = draw_sigma_image(np.random.default_rng([seed, 0]), SMALL)
    assert pixels.shape == (SMALL[1], SMALL[0], 3)
    assert 3 <= len(drawn) <= 8
    for index, clast in enumerate(drawn):
        x0, y0, x1, y1 = clast.box
        assert 0 <= x0 < x1 <= SMALL[0] and 0 <= y0 < y1 <= SMALL[1]
        mask = clast.mask
        assert mask.shape == (y1 - y0, x1 - x0)
        # every edge of the box touches a clast pixel: the box is the mask's, not the parameters'
        assert mask[0].any() and mask[-1].any() and mask[:, 0].any() and mask[:, -1].any()
        assert clast.tails.any() and clast.body.any() and not (clast.tails & clast.body).any()
        for other in drawn[index + 1:]:
            a0, b0, a1, b1 = other.box
            assert x1 <= a0 or a1 <= x0 or y1 <= b0 or b1 <= y0, (clast.box, other.box)


def test_clasts_are_painted_where_their_masks_are():
    rng = np.random.default_rng([3, 0])
    pixels, drawn = draw_sigma_image(rng, SMALL)
    gray = pixels.mean(axis=2)
    matrix = np.ones(gray.shape, bool)
    for clast in drawn:
        matrix[clast.box[1]:clast.box[3], clast.box[0]:clast.box[2]] &= ~clast.mask
    level = np.median(gray[matrix])
    for clast in drawn:
        body = gray[clast.box[1]:clast.box[3], clast.box[0]:clast.box[2]][clast.body]
        assert abs(np.median(body) - level) > 20  # a darker or brighter ellipse, not lost in the matrix


def test_the_masks_bear_out_the_label_a_mirror_flips_it_a_half_turn_keeps_it():
    seen = set()
    for seed in range(8):
        _, drawn = draw_sigma_image(np.random.default_rng([seed, 0]), SMALL)
        for clast in drawn:
            body, tails = clast.body, clast.tails
            seen.add(clast.label)
            assert tail_sense(body, tails) == clast.label
            flipped = {"cw": "ccw", "ccw": "cw"}[clast.label]
            assert tail_sense(body[:, ::-1], tails[:, ::-1]) == flipped  # left-right mirror
            assert tail_sense(body[::-1], tails[::-1]) == flipped  # top-bottom mirror
            assert tail_sense(body[::-1, ::-1], tails[::-1, ::-1]) == clast.label  # 180 degree turn
            assert tail_sense(np.rot90(body), np.rot90(tails)) == clast.label  # quarter turn
    assert seen == {"cw", "ccw"}


def test_bad_requests_are_refused(tmp_path):
    with pytest.raises(InputError, match="at least 1"):
        generate_sigma_clasts(tmp_path, images=0, seed=0, size=SMALL)
    with pytest.raises(InputError, match="sides of at least"):
        generate_sigma_clasts(tmp_path, images=1, seed=0, size=(300, 200))


def test_cli_demo_generates_imports_crops_and_trains_nothing(tmp_path):
    runner = CliRunner()
    ws = tmp_path / "ws"
    result = runner.invoke(app, ["--workspace", str(ws), "demo", "sigma-clasts", "--images", "2", "--seed", "1",
                                 "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    out = ws / "demo" / "sigma-clasts-1"
    assert report["dataset"] == "sigma-crops-1" and report["out"] == str(out)
    assert report["import"]["added"] == report["clasts"] == sum(report["labels"].values()) >= 6
    assert (out / "boxes.csv").is_file() and (out / "boxes.coco.json").is_file()
    assert len(list((out / "images").glob("*.png"))) == 2
    assert "train" not in report

    stats = json.loads(runner.invoke(app, ["--workspace", str(ws), "stats", "sigma-crops-1", "--json"]).stdout)
    assert {k: v["count"] for k, v in stats["classes"].items()} == report["labels"]

    again = runner.invoke(app, ["--workspace", str(ws), "demo", "sigma-clasts", "--images", "2", "--seed", "1"])
    assert again.exit_code == 0, again.output
    assert "Nothing new" in again.stdout and "boxes:" in again.stdout and "coco:" in again.stdout

    refused = runner.invoke(app, ["--workspace", str(ws), "demo", "sigma-clasts", "--train"])
    assert refused.exit_code == 2 and "trains nothing" in refused.output
    wrong = runner.invoke(app, ["--workspace", str(ws), "demo", "textures", "--images", "3"])
    assert wrong.exit_code == 2 and "--images" in wrong.output
