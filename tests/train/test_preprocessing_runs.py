"""Training with the preprocessing options end to end: patches, normalisation modes, balance, mixup, ROI."""

import numpy as np
import pytest
import yaml
from PIL import Image

from handlens.core.errors import InputError
from handlens.models.bundle import load_bundle
from handlens.train.evaluate import evaluate
from handlens.train.run import train
from tests.conftest import tiny_config

PATCHES = ["preprocess.patches.enabled=true", "preprocess.patches.size=24", "preprocess.patches.max_side=0",
           "preprocess.patches.per_image=3", "preprocess.patches.grid_max=4", "preprocess.size=24"]


def saved_config(result) -> dict:
    return yaml.safe_load((result.run_dir / "config.yaml").read_text())


def test_patch_training_evaluates_images_not_patches(trained_workspace):
    result = train(tiny_config(*PATCHES, "train.epochs=3"), trained_workspace)
    assert result.metrics["val"]["n"] == 12 and result.metrics["test"]["n"] == 12  # images, not 4 patches each
    assert all(record["val_macro_f1"] is not None for record in result.history)
    # the validation loss is a mean over patches, not a patch sum divided by the number of images
    assert result.history[-1]["val_loss"] < 3.0
    bundle = load_bundle(result.bundle)
    assert bundle.patch_trained and bundle.preprocess.patches["size"] == 24
    report = evaluate(result.bundle, trained_workspace, subset="test")
    assert report["accuracy"] == pytest.approx(result.metrics["test"]["accuracy"])
    assert report["n"] == 12
    red = next((trained_workspace.root.parent / "colours" / "red").glob("*.png"))
    prediction = bundle.predict(str(red))[0]
    assert prediction.top[0][0] in bundle.classes and sum(prediction.probabilities.values()) == pytest.approx(1, 1e-4)


def test_dataset_normalisation_stores_the_train_statistics(trained_workspace):
    result = train(tiny_config("preprocess.normalize=dataset"), trained_workspace)
    bundle = load_bundle(result.bundle)
    assert bundle.preprocess.normalize == "dataset"
    train_ids = set(bundle.manifest["split_membership"]["train"])
    from handlens.data.catalog import Image as ImageRow
    from handlens.data.catalog import open_catalog

    catalog = open_catalog(trained_workspace.db_url)
    with catalog.session() as session:
        paths = [session.get(ImageRow, i).path for i in train_ids]
    catalog.close()
    pixels = np.concatenate([np.asarray(Image.open(p).convert("RGB").resize((32, 32))).reshape(-1, 3) for p in paths])
    assert np.allclose(bundle.preprocess.mean, pixels.mean(0) / 255, atol=0.02)
    assert np.allclose(bundle.preprocess.std, pixels.std(0) / 255, atol=0.02)
    assert bundle.preprocess.mean != (0.485, 0.456, 0.406)


def test_balance_mixup_and_focal_loss_train_and_are_recorded(trained_workspace):
    result = train(tiny_config("data.balance=oversample", "augment.mixup=0.4", "augment.cutmix=1.0",
                               "augment.mix_p=1.0", "train.loss=focal"), trained_workspace)
    assert all(np.isfinite(r["train_loss"]) for r in result.history)
    config = saved_config(result)
    assert config["data"]["balance"] == "oversample" and config["augment"]["mixup"] == 0.4
    down = train(tiny_config("data.balance=downsample", "data.per_class=3", "train.batch_size=16"), trained_workspace)
    assert down.history[0]["train"]["n"] == 9  # 3 images of each of 3 classes
    sampled = train(tiny_config("data.balance=sampler", "train.batch_size=32"), trained_workspace)
    assert sampled.history[0]["train"]["n"] == 24


def test_preset_preprocessing_applies_unless_the_config_says_otherwise(trained_workspace):
    result = train(tiny_config("augment.policy=thin-section", "preprocess.patches.size=24",
                               "preprocess.patches.max_side=0", "preprocess.size=24"), trained_workspace)
    config = saved_config(result)
    assert config["preprocess"]["patches"]["enabled"] is True and config["preprocess"]["patches"]["size"] == 24
    assert load_bundle(result.bundle).patch_trained
    xray = train(tiny_config("augment.policy=xray"), trained_workspace)
    assert load_bundle(xray.bundle).preprocess.normalize == "percentile"
    mine = train(tiny_config("augment.policy=xray", "preprocess.normalize=unit"), trained_workspace)
    assert load_bundle(mine.bundle).preprocess.normalize == "unit"  # the run's own choice wins


def test_a_frozen_run_whose_policy_samples_patches_says_it_is_not_on_cached_features(trained_workspace, capsys):
    """thin-section turns patch sampling on: a frozen backbone then runs on every new patch (17 s against 1 s on
    cached features in a newcomer's try); the note says so, and how to get the cached path."""
    args = ("augment.policy=thin-section", "preprocess.patches.size=24", "preprocess.patches.max_side=0",
            "preprocess.size=24", "model.freeze=frozen", "train.epochs=1")
    train(tiny_config(*args), trained_workspace)
    assert ("note: augment.policy=thin-section samples random patches (its preprocess.patches): the frozen backbone's "
            "features are computed for every new patch each epoch") in capsys.readouterr().err
    cached = train(tiny_config(*args, "preprocess.patches.enabled=false", "train.views=2"), trained_workspace)
    assert "samples random patches" not in capsys.readouterr().err
    assert not load_bundle(cached.bundle).patch_trained


def test_roi_rules(trained_workspace):
    result = train(tiny_config(*PATCHES, "preprocess.roi.source=threshold", "preprocess.patches.min_roi=0.3"),
                   trained_workspace)
    assert load_bundle(result.bundle).preprocess.patches["roi"]["source"] == "threshold"
    with pytest.raises(InputError, match="no image of this split has an expert region"):
        train(tiny_config(*PATCHES, "preprocess.roi.source=annotations"), trained_workspace)


def test_invalid_preprocessing_settings_are_named(trained_workspace):
    with pytest.raises(InputError, match=r"preprocess\.morphology"):
        tiny_config("preprocess.morphology=[{op: skeleton}]")
    with pytest.raises(InputError, match="per_class"):
        tiny_config("data.balance=downsample")
    with pytest.raises(InputError, match=r"no effect with data\.balance=sampler"):
        tiny_config("data.balance=sampler", "data.per_class=5")
    with pytest.raises(InputError, match=r"preprocess\.normalize"):
        tiny_config("preprocess.normalize=zscore")


def test_mixup_in_a_policy_file_is_never_dropped_by_the_feature_cache(trained_workspace, tmp_path):
    policy = tmp_path / "mix.yaml"
    policy.write_text("steps:\n  - {op: hflip, p: 0.5}\n  - {op: mixup, p: 1.0, alpha: 0.4}\n")
    result = train(tiny_config("model.freeze=frozen", f"augment.policy={policy}"), trained_workspace)
    assert "features" not in result.timings  # trained on mixed images, not on cached features
    with pytest.raises(InputError, match="no mixup/cutmix"):
        train(tiny_config("model.freeze=frozen", f"augment.policy={policy}", "train.feature_cache=on"),
              trained_workspace)


def test_a_roi_without_patches_is_refused(trained_workspace):
    with pytest.raises(InputError, match=r"patches\.enabled=true"):
        train(tiny_config("preprocess.roi.source=threshold"), trained_workspace)


def test_the_loader_augmenter_survives_pickling():
    import pickle

    from handlens.train.config import load_config
    from handlens.transforms.augment import build_augmenter
    from handlens.transforms.engine import AugmentingCollate

    collate = pickle.loads(pickle.dumps(AugmentingCollate(build_augmenter(
        load_config(None, ["augment.policy=thin-section"]).augment))))
    import torch

    samples = [(torch.full((3, 8, 8), 200, dtype=torch.uint8), torch.tensor(1))] * 4
    images, targets = collate(samples)  # in-process: float, no rounding trip through uint8
    assert images.shape == (4, 3, 8, 8) and images.dtype == torch.float32 and targets.tolist() == [1] * 4
    assert float(images.min()) >= 0 and float(images.max()) <= 255
    loader = torch.utils.data.DataLoader(samples, batch_size=4, num_workers=1, collate_fn=collate)
    from_worker, _ = next(iter(loader))  # from a worker process: uint8, a quarter of the bytes
    assert from_worker.dtype == torch.uint8 and from_worker.shape == (4, 3, 8, 8)


def test_a_patch_model_is_explained_at_its_patch_scale(trained_workspace, tmp_path):
    import json

    from typer.testing import CliRunner

    from handlens.cli.main import app
    from handlens.explain.api import load_bundle as load_explainable
    from handlens.explain.tiles import tiled_explain

    big = tmp_path / "big.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (90, 120, 3), dtype=np.uint8)).save(big)
    result = train(tiny_config(*PATCHES[:-2], "preprocess.patches.max_side=60", "preprocess.patches.grid_max=4",
                               "preprocess.size=24"), trained_workspace)
    bundle = load_explainable(result.bundle)
    tiled = tiled_explain(bundle, str(big), layer="stage2")
    assert tiled.heatmap.shape == (90, 120)  # stitched on the 60x45 working image, scaled back
    # the class explained and the probabilities shown are the model's own prediction, as predict gives it
    np.testing.assert_allclose(tiled.probabilities, bundle.predict_proba([str(big)])[0], rtol=1e-5, atol=1e-6)
    lean = tiled_explain(bundle, str(big), layer="stage2", with_probability_map=False)  # as the service asks
    assert lean.probability_map is None and len(lean.tile_probabilities) == 0
    np.testing.assert_allclose(lean.heatmap, tiled.heatmap, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(lean.probabilities, tiled.probabilities, rtol=1e-6)
    assert tiled.tile_size == 48  # 24-px patches of the working image are 48 px of the original
    out = CliRunner().invoke(app, ["--workspace", str(trained_workspace.root), "explain", str(result.bundle),
                                   str(big), "--out", str(tmp_path / "maps"), "--json"])
    assert out.exit_code == 0, out.output
    index = json.loads(out.stdout)
    assert index["images"][0]["tiles"] >= 2 and np.load(index["images"][0]["map"]).shape == (90, 120)
