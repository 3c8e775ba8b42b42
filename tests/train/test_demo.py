"""The demo's library half: prepare_demo (build, import, split once) and train_demo (train, evaluate, predict)."""

import pytest
from sqlalchemy import select

from handlens.core.errors import NotFoundError
from handlens.core.workspace import Workspace
from handlens.data.catalog import Image, open_catalog
from handlens.models.bundle import read_manifest
from handlens.train.demo import demo_recipe, prepare_demo, train_demo


def test_prepare_demo_builds_imports_and_splits_once(tmp_path):
    ws = Workspace.open(tmp_path / "ws")
    data = prepare_demo(ws, "textures", seed=0)
    assert data.dataset == "textures" and data.images == ws.demo_dir / "textures"
    assert data.report.added == 180 and not data.report.skipped
    assert set(data.stats["classes"]) == {"brick", "grass", "gravel"}
    assert data.split["name"] == "demo" and data.split["params"]["group_by"] == "group"
    assert data.split["leakage"] == []
    document = data.to_dict()
    assert list(document) == ["workspace", "catalog", "images", "import", "stats", "split"]
    assert document["workspace"] == str(ws.root) and document["catalog"] == ws.db_url
    again = prepare_demo(ws, "textures", seed=0)
    assert again.report.nothing_new and again.split["id"] == data.split["id"]  # the split is kept, not redone
    with pytest.raises(NotFoundError, match="unknown demo dataset 'nope'; choose one of: textures"):
        prepare_demo(ws, "nope")


def test_train_demo_trains_evaluates_on_test_and_predicts_two_test_images(trained_workspace):
    training = train_demo(trained_workspace, "colours", seed=0)
    manifest = read_manifest(training.result.bundle)
    assert (manifest["backbone"], manifest["weights"], manifest["freeze"]) == ("efficientnet_lite0", "packaged",
                                                                              "frozen")
    assert set(training.evaluation) == {"accuracy", "macro_f1", "n"} and training.evaluation["n"] == 12
    # packaged ImageNet features tell the dominant colours apart
    assert training.evaluation["macro_f1"] >= 0.8
    members = manifest["split_membership"]["test"]
    catalog = open_catalog(trained_workspace.db_url)
    with catalog.session() as session:
        paths = dict(session.execute(select(Image.id, Image.path).where(Image.id.in_(members))).all())
    catalog.close()
    predictions = training.predictions
    assert [p["source"] for p in predictions] == [paths[members[0]], paths[members[-1]]]
    assert all(len(p["top"]) == 2 for p in predictions)
    assert list(training.to_dict()) == ["train", "evaluate", "predictions"]
    assert training.to_dict()["train"]["bundle"] == str(training.result.bundle)


def test_train_demo_with_epochs_trains_a_linear_head_for_that_many(trained_workspace):
    training = train_demo(trained_workspace, "colours", seed=0, epochs=2)
    manifest = read_manifest(training.result.bundle)
    assert manifest["head"]["type"] == "linear" and training.result.epochs == 2
    assert demo_recipe(2) == "efficientnet_lite0 (packaged ImageNet weights, frozen) with a linear head for 2 epochs"
    assert demo_recipe(None).endswith("with the default logistic head")
