"""evaluate's leak check: test images that copy training images, exact (bytes) or near (resized), by id or
by the bundle's training_sha256; and --tta in evaluate and predict."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image
from sqlalchemy import select, update
from typer.testing import CliRunner

from handlens.cli.main import app
from handlens.core.workspace import Workspace
from handlens.data.catalog import Image as ImageRow
from handlens.data.catalog import SplitAssignment, open_catalog
from handlens.data.importer import import_path
from handlens.data.splits import make_split
from handlens.models.backbones import BACKBONES
from handlens.models.bundle import save_bundle
from handlens.models.classifier import create_classifier
from handlens.train.data import load_split_data
from handlens.train.evaluate import evaluate
from tests.conftest import colour_tree, tiny_config

runner = CliRunner()


def _resized(source, target, factor=2.0):
    with Image.open(source) as img:
        img.resize((int(img.width * factor), int(img.height * factor)), Image.Resampling.BICUBIC).save(target)


@pytest.fixture(scope="module")
def leaky(tmp_path_factory):
    """A workspace whose test subset holds 2 byte copies and 1 resized copy of training images, and a model."""
    root = tmp_path_factory.mktemp("leaky")
    tree = colour_tree(root / "colours")
    shutil.copy(tree / "red" / "red_00.png", tree / "red" / "copy_red.png")
    shutil.copy(tree / "green" / "green_00.png", tree / "green" / "copy_green.png")
    _resized(tree / "blue" / "blue_00.png", tree / "blue" / "bigger_blue.png")
    ws = Workspace.open(root / "ws")
    catalog = open_catalog(ws.db_url)
    import_path(catalog, tree, "colours", workers=1)
    summary = make_split(catalog, "colours", ratios="0.5,0.25,0.25", seed=0)
    with catalog.session() as session:  # place the copies in test, their originals in train
        ids = dict(session.execute(select(ImageRow.path, ImageRow.id)).all())
        for name, subset in (("copy_red", "test"), ("copy_green", "test"), ("bigger_blue", "test"),
                             ("red_00", "train"), ("green_00", "train"), ("blue_00", "train")):
            image_id = next(i for p, i in ids.items() if p.endswith(f"/{name}.png"))
            session.execute(update(SplitAssignment).where(SplitAssignment.split_id == summary["id"],
                                                          SplitAssignment.image_id == image_id).values(subset=subset))
    data = load_split_data(catalog, "colours")
    catalog.close()
    return ws, _bundle(root / "bundle", data), tree


def _bundle(path, data, policy="basic"):
    """A bundle of an untrained tiny model that 'learnt from' ``data``'s train+val (the leak check needs no
    skill; training is tested in test_run.py, and its manifest's training_sha256 below)."""
    torch.manual_seed(0)
    model = create_classifier("tiny_cnn", len(data.classes), weights="none", freeze="full").eval()
    learnt = {sha for name in ("train", "val") for sha in data.subsets[name].sha256s}
    manifest = {"backbone": "tiny_cnn", "classes": data.classes, "freeze": "full", "head": {"type": "linear"},
                "preprocess": BACKBONES.get("tiny_cnn").preprocess().to_dict(), "dataset": data.dataset,
                "labelset": data.labelset, "split": data.split, "fold": 0,
                "config": {"augment": {"policy": policy, "hflip": True, "vflip": False, "crop_scale": 0.8}},
                "split_membership": data.membership(), "training_sha256": sorted(learnt)}
    return save_bundle(path, model, manifest)


def _pairs(report):
    return {(p["test"].rsplit("/", 1)[-1], p["train"].rsplit("/", 1)[-1], p["kind"])
            for p in report["leakage"]["pairs"]}


def test_evaluate_reports_exact_and_near_copies_of_training_images(leaky):
    ws, bundle, _ = leaky
    report = evaluate(bundle, ws, subset="test")
    leakage = report["leakage"]
    assert (leakage["exact"], leakage["near"]) == (2, 1)
    assert _pairs(report) == {("copy_red.png", "red_00.png", "exact"), ("copy_green.png", "green_00.png", "exact"),
                              ("bigger_blue.png", "blue_00.png", "near")}
    n = report["n"]
    assert leakage["verdict"] == (f"leaks: 3 of {n} test images are copies of training images "
                                  "(2 exact, 1 near-duplicate)")
    near = next(p for p in leakage["pairs"] if p["kind"] == "near")
    assert near["distance"] <= leakage["max_distance"]
    assert set(leakage["seconds"]) == {"training_images", "training_hashes", "compare"}
    assert 0 <= leakage["accuracy_without_copies"] <= 1
    saved = json.loads(Path(report["report"]).read_text())
    assert saved["leakage"]["verdict"] == leakage["verdict"]


def test_a_clean_folder_is_no_leak_and_a_copied_one_leaks(leaky, tmp_path):
    ws, bundle, tree = leaky
    clean = colour_tree(tmp_path / "fresh", per_class=2)  # same generator, same seed: red_00 == red_00 ...
    for f in clean.rglob("*.png"):  # ... so make them new pictures: mirror each one
        with Image.open(f) as img:
            img.transpose(Image.Transpose.FLIP_TOP_BOTTOM).rotate(90).save(f)
    report = evaluate(bundle, ws, images=clean)
    assert report["leakage"]["verdict"] == "no leak: none of the 6 test images matches a training image"
    shutil.copy(tree / "red" / "red_00.png", clean / "red" / "again.png")
    _resized(tree / "green" / "green_00.png", clean / "green" / "zoomed.png", 1.5)
    report = evaluate(bundle, ws, images=clean)
    assert _pairs(report) == {("again.png", "red_00.png", "exact"), ("zoomed.png", "green_00.png", "near")}
    assert report["leakage"]["verdict"].startswith("leaks: 2 of 8 test images")


def test_a_bundle_from_elsewhere_is_checked_by_its_training_sha256(leaky, tmp_path):
    ws, bundle, tree = leaky
    moved = tmp_path / "bundle"
    shutil.copytree(bundle, moved)
    manifest = json.loads((moved / "bundle.json").read_text())
    assert len(manifest["training_sha256"]) == len(set(manifest["training_sha256"])) > 0
    manifest["split_membership"] = {k: [i + 10_000 for i in v] for k, v in manifest["split_membership"].items()}
    (moved / "bundle.json").write_text(json.dumps(manifest))
    folder = tmp_path / "judge"
    (folder / "red").mkdir(parents=True)
    shutil.copy(tree / "red" / "red_00.png", folder / "red" / "x.png")
    leakage = evaluate(moved, ws, images=folder)["leakage"]
    assert leakage["exact"] == 1 and "training_sha256" in " ".join(leakage["notes"])
    assert leakage["pairs"][0]["train"].rsplit("/", 1)[-1] in ("red_00.png", "copy_red.png")  # by content

    del manifest["training_sha256"]
    (moved / "bundle.json").write_text(json.dumps(manifest))
    leakage = evaluate(moved, ws, images=folder)["leakage"]
    assert leakage["verdict"].startswith("not checked:") and leakage["pairs"] == []


def test_cli_evaluate_prints_the_verdict_and_the_pairs(leaky):
    ws, bundle, _ = leaky
    result = runner.invoke(app, ["--workspace", str(ws.root), "evaluate", str(bundle)])
    assert result.exit_code == 0, result.output
    assert "leaks: 3 of" in result.stdout and "copy_red.png" in result.stdout and "near" in result.stdout
    document = json.loads(runner.invoke(app, ["--workspace", str(ws.root), "evaluate", str(bundle),
                                              "--json"]).stdout)
    assert document["leakage"]["verdict"].startswith("leaks: 3 of")
    val = evaluate(bundle, ws, subset="val")["leakage"]
    assert val["verdict"].startswith("not checked:")


def test_scores_on_images_the_model_learnt_from_lead_with_what_they_are_worth(leaky, tmp_path):
    """The train subset is not held out, val is optimistic, test is held out; after a study's refit (val images
    moved into train) val is not held out either, and the CLI says so before the scores."""
    from handlens.train.evaluate import held_out

    ws, bundle, _ = leaky
    for subset, verdict in (("train", "not held out"), ("val", "optimistic")):
        held = evaluate(bundle, ws, subset=subset)["held_out"]
        assert held["verdict"] == verdict, (subset, held)
    test = evaluate(bundle, ws, subset="test")["held_out"]  # its byte copies of training images
    assert (test["verdict"], test["trained_on"], test["copies_of_training_images"]) == ("not held out", 0, 2)
    assert "2 of these" in test["message"] and "byte copies" in test["message"]
    manifest = {"dataset": "d", "split": "s", "split_membership": {"train": [1, 2], "val": [3], "test": [4, 5]}}
    assert held_out(manifest, [4, 5], sha256s=None, dataset="d", n=2)["verdict"] == "held out"
    assert held_out(manifest, [3, 4], sha256s=None, dataset="d", n=2)["verdict"] == "optimistic"
    assert held_out(manifest, [1], sha256s=None, dataset="other", n=1)["verdict"] == "unknown"  # ids of another
    recorded = {**manifest, "training_sha256": ["a", "b", "c"]}  # image 3 (val) has contents c
    copy_of_val = held_out(recorded, [4, 5], sha256s=["c", "e"], dataset="d", n=2, val_contents={"c"})
    assert (copy_of_val["verdict"], copy_of_val["validated_on"]) == ("optimistic", 1)
    copy_of_train = held_out(recorded, [4], sha256s=["a"], dataset="d", n=1, val_contents={"c"})
    assert copy_of_train["verdict"] == "not held out" and "1 of these 1 images has the" in copy_of_train["message"]
    n_val = evaluate(bundle, ws, subset="val")["n"]
    refitted = tmp_path / "refitted"
    shutil.copytree(bundle, refitted)
    manifest = json.loads((refitted / "bundle.json").read_text())
    members = manifest["split_membership"]
    manifest["split_membership"] = {"train": members["train"] + members["val"], "test": members["test"]}
    manifest["study"] = {"name": "s", "refitted": True}
    (refitted / "bundle.json").write_text(json.dumps(manifest))
    held = evaluate(refitted, ws, subset="val")["held_out"]
    assert (held["verdict"], held["trained_on"], held["n"]) == ("not held out", n_val, n_val)
    result = runner.invoke(app, ["--workspace", str(ws.root), "evaluate", str(refitted), "--split", "val"])
    assert result.exit_code == 0, result.output
    first = result.stdout.index(f"warning: not an estimate for new images: the model trained on {n_val} of these "
                                f"{n_val} images (a study refitted it on all train+val images)")
    assert first < result.stdout.index("macro-F1")
    assert f"judge it on the test subset of split {manifest['split']!r}" in held["message"]
    clean = json.loads((bundle / "bundle.json").read_text())
    catalog = open_catalog(ws.db_url)
    try:
        tested = set(load_split_data(catalog, "colours").subsets["test"].sha256s)
    finally:
        catalog.close()
    clean["training_sha256"] = [s for s in clean["training_sha256"] if s not in tested]  # no test copies now
    (refitted / "bundle.json").write_text(json.dumps(clean))
    shown = runner.invoke(app, ["--workspace", str(ws.root), "evaluate", str(refitted)]).stdout
    assert shown.index("held out: the model neither trained nor validated on these images.") < shown.index("macro-F1")


def test_held_out_checks_ids_against_contents_and_says_unknown_without_either(leaky, tmp_path):
    """Ids of another workspace mean other images: the recorded contents decide then (the test subset's two byte
    copies of training images are 'not held out'); a bundle that records neither is 'unknown', not 'held out'."""
    ws, bundle, _ = leaky
    moved = tmp_path / "moved"
    shutil.copytree(bundle, moved)
    manifest = json.loads((moved / "bundle.json").read_text())
    manifest["split_membership"] = {k: [i + 10_000 for i in v] for k, v in manifest["split_membership"].items()}
    (moved / "bundle.json").write_text(json.dumps(manifest))
    train_images = evaluate(moved, ws, subset="train")["held_out"]
    assert train_images["verdict"] == "not held out" and train_images["checked_by"].startswith("by content")
    test_images = evaluate(moved, ws, subset="test")["held_out"]
    assert (test_images["verdict"], test_images["copies_of_training_images"]) == ("not held out", 2)
    del manifest["training_sha256"]
    manifest["split_membership"] = {}
    (moved / "bundle.json").write_text(json.dumps(manifest))
    assert evaluate(moved, ws, subset="val")["held_out"]["verdict"] == "unknown"
    result = runner.invoke(app, ["--workspace", str(ws.root), "evaluate", str(moved), "--split", "val"])
    assert "warning: unknown: the bundle records neither" in result.stdout


def test_tta_in_evaluate_and_predict_uses_the_policy_flips(leaky, tmp_path):
    ws, bundle, tree = leaky  # tiny_config trains with the basic policy: horizontal flips only
    report = evaluate(bundle, ws, tta=True)
    assert report["tta"]["tta_views"] == 2 and report["tta"]["views"] == ["identity", "hflip"]
    assert evaluate(bundle, ws)["tta"] == {"requested": False, "tta_views": 1}
    image = str(tree / "red" / "red_01.png")
    out = json.loads(runner.invoke(app, ["--workspace", str(ws.root), "predict", str(bundle), image, "--tta",
                                         "--json"]).stdout)
    assert out["tta"]["tta_views"] == 2

    flat = tmp_path / "noflip"
    shutil.copytree(bundle, flat)
    manifest = json.loads((flat / "bundle.json").read_text())
    manifest["config"]["augment"]["hflip"] = False
    (flat / "bundle.json").write_text(json.dumps(manifest))
    result = runner.invoke(app, ["--workspace", str(ws.root), "predict", str(flat), image, "--tta"])
    assert result.exit_code == 0, result.output
    assert "no test-time views" in result.stdout and "1 view" in result.stdout
    assert evaluate(flat, ws, tta=True)["tta"]["tta_views"] == 1


def test_a_trained_bundle_records_the_contents_it_learnt_from(trained_workspace):
    from handlens.models.bundle import read_manifest
    from handlens.train.run import train

    result = train(tiny_config("train.epochs=1"), trained_workspace)
    manifest = read_manifest(result.bundle)
    catalog = open_catalog(trained_workspace.db_url)
    try:
        data = load_split_data(catalog, "colours")
    finally:
        catalog.close()
    expected = sorted({s for name in ("train", "val") for s in data.subsets[name].sha256s})
    assert manifest["training_sha256"] == expected and not set(expected) & set(data.subsets["test"].sha256s)
