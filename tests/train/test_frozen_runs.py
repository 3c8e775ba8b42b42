"""Frozen-backbone runs on cached features: the logistic default, no Lightning, given subsets, policy checks."""

import json
import subprocess
import sys

import pytest
import yaml

import handlens.train.features as features
from handlens.core.errors import InputError
from handlens.models.bundle import load_bundle
from handlens.train.evaluate import evaluate
from handlens.train.run import train
from tests.conftest import tiny_config

FROZEN = "model.freeze=frozen"


def saved(result) -> dict:
    return yaml.safe_load((result.run_dir / "config.yaml").read_text())


def test_the_default_frozen_run_fits_a_logistic_probe_and_pins_what_auto_chose(trained_workspace):
    result = train(tiny_config(FROZEN), trained_workspace)
    config = saved(result)
    assert config["model"]["head"] == "logistic" and config["augment"]["policy"] == "none"
    assert result.epochs == 1 and result.best_epoch == 1 and len(result.history) == 1
    fit = result.metrics["head_fit"]
    assert fit["head"] == "logistic" and fit["C"] == result.history[0]["logistic_C"] and "cv" in fit
    assert not (result.run_dir / "checkpoints").exists()  # nothing to resume: it retrains in seconds
    for name in ("config.yaml", "history.json", "metrics.json", "confusion_test.png", "confusion_val.png"):
        assert (result.run_dir / name).is_file(), name
    bundle = load_bundle(result.bundle)
    assert bundle.manifest["head"]["type"] == "logistic"
    report = evaluate(result.bundle, trained_workspace, subset="test")
    assert report["accuracy"] == pytest.approx(result.metrics["test"]["accuracy"])
    assert report["macro_f1"] == pytest.approx(result.metrics["test"]["macro_f1"])


def test_a_learning_backbone_resolves_auto_to_basic_and_linear(trained_workspace):
    result = train(tiny_config(), trained_workspace)
    config = saved(result)
    assert config["model"]["head"] == "linear" and config["augment"]["policy"] == "basic"


def test_a_gradient_head_on_features_trains_without_lightning_and_an_unfinished_run_retrains(trained_workspace):
    result = train(tiny_config(FROZEN, "model.head=mlp", "model.hidden=16", "train.epochs=3"), trained_workspace)
    assert result.epochs == 3 and [h["epoch"] for h in result.history] == [1, 2, 3]
    best = max(result.history, key=lambda h: (h["val_macro_f1"], -h["val_loss"]))
    assert result.best_epoch == best["epoch"]
    assert result.metrics["val"]["macro_f1"] == pytest.approx(best["val_macro_f1"])
    (result.run_dir / "history.json").unlink()  # as if it had stopped before the end
    again = train(None, trained_workspace, resume=result.run_id)
    assert again.resumed and again.epochs == 3
    from handlens.core.errors import ConflictError

    with pytest.raises(ConflictError, match="already finished"):
        train(None, trained_workspace, resume=result.run_id)


def test_the_fast_path_never_imports_lightning(trained_workspace):
    code = ("import sys, json\n"
            "from handlens.core.workspace import Workspace\n"
            "from handlens.train.run import train\n"
            "from tests.conftest import tiny_config\n"
            f"result = train(tiny_config('{FROZEN}'), Workspace.open({str(trained_workspace.root)!r}))\n"
            "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] == 'lightning')))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []


def test_given_subsets_regroup_the_split_and_reuse_every_cached_feature(trained_workspace):
    first = train(tiny_config(FROZEN), trained_workspace)
    membership = load_bundle(first.bundle).manifest["split_membership"]
    pool = membership["train"] + membership["val"]
    fold = {"train": pool[6:], "val": pool[:6], "test": membership["test"]}
    before = features.FEATURE_PASSES
    result = train(tiny_config(FROZEN), trained_workspace, subsets=fold)
    assert features.FEATURE_PASSES - before == 0  # every image's features were in the store
    assert load_bundle(result.bundle).manifest["split_membership"] == fold
    assert result.metrics["val"]["n"] == 6 and result.metrics["test"]["n"] == 12
    refit = train(tiny_config(FROZEN, "model.head=linear"), trained_workspace,
                  subsets={"train": pool, "test": membership["test"]})
    assert "val" not in refit.metrics and refit.best_epoch == refit.epochs == 2


def test_given_subsets_are_checked(trained_workspace):
    with pytest.raises(InputError, match="not labelled images of split"):
        train(tiny_config(FROZEN), trained_workspace, subsets={"train": [1, 2, 99999]})
    with pytest.raises(InputError, match="is in train and in val"):
        train(tiny_config(FROZEN), trained_workspace, subsets={"train": [1, 2, 3], "val": [3, 4]})
    with pytest.raises(InputError, match="give train"):
        train(tiny_config(FROZEN), trained_workspace, subsets={"val": [1]})
    assert list(trained_workspace.runs_dir.iterdir()) == []


def test_a_policy_that_cannot_reach_cached_features_is_refused_with_the_fix(trained_workspace):
    with pytest.raises(InputError, match=r"augment\.policy=basic has no effect on a frozen backbone's cached "
                                         r"features: add train\.views=4"):
        train(tiny_config(FROZEN, "augment.policy=basic"), trained_workspace)
    views = train(tiny_config(FROZEN, "augment.policy=basic", "train.views=2"), trained_workspace)
    assert saved(views)["augment"]["policy"] == "basic" and views.metrics["head_fit"]["rows"] == 48
    learning = train(tiny_config("augment.policy=basic"), trained_workspace)  # a learning backbone: fine
    assert learning.epochs == 2


def test_the_basic_policys_settings_are_refused_where_the_basic_policy_is_not_applied(trained_workspace):
    """augment.vflip (hflip, crop_scale) tune the basic policy: on cached features without views, or with
    another policy, they would change nothing, silently."""
    with pytest.raises(InputError, match=r"augment\.vflip=True has no effect on a frozen backbone's cached "
                                         r"features \(no image is augmented\): add train\.views=4"):
        train(tiny_config(FROZEN, "augment.vflip=true"), trained_workspace)
    with pytest.raises(InputError, match=r"augment\.hflip=False, augment\.crop_scale=0\.5 have no effect with "
                                         r"augment\.policy=none: it tunes the basic policy only"):
        train(tiny_config("augment.policy=none", "augment.hflip=false", "augment.crop_scale=0.5"), trained_workspace)
    views = train(tiny_config(FROZEN, "augment.vflip=true", "augment.policy=basic", "train.views=2"),
                  trained_workspace)
    assert saved(views)["augment"]["vflip"] is True
    assert train(tiny_config("augment.vflip=true"), trained_workspace).epochs == 2  # auto is basic here


def test_logistic_needs_cached_features(trained_workspace):
    with pytest.raises(InputError, match=r"model\.head=logistic is fitted on a frozen backbone's cached features"):
        train(tiny_config("model.head=logistic"), trained_workspace)
    with pytest.raises(InputError, match="plain cross-entropy"):
        train(tiny_config(FROZEN, "model.head=logistic", "train.label_smoothing=0.1"), trained_workspace)


def test_a_fixed_logistic_c_is_fitted_as_given_and_refused_where_it_has_no_effect(trained_workspace, capsys):
    result = train(tiny_config(FROZEN, "model.logistic_c=0.05"), trained_workspace)
    assert result.metrics["head_fit"]["C"] == 0.05 and result.metrics["head_fit"]["cv"]["folds"] == 0
    # said as given, not as a data problem (a study's refit said "a class has fewer than 2 training images")
    err = capsys.readouterr().err
    assert "C=0.05 as given (model.logistic_c)" in err and "fewer than 2" not in err
    with pytest.raises(InputError, match=r"model\.logistic_c has no effect with model\.head=linear"):
        train(tiny_config(FROZEN, "model.head=linear", "model.logistic_c=0.05"), trained_workspace)


@pytest.mark.parametrize("views", [[], ["train.views=2", "augment.policy=basic"]], ids=["plain", "views"])
def test_a_repeated_frozen_run_reads_every_feature_from_the_store_without_decoding(trained_workspace, monkeypatch,
                                                                                  views):
    """A second run with another head (or a study's refit) on features the store already holds decodes no image
    and computes no feature (with augmented views: the train subset's from their own store); a run whose images
    are not all stored still decodes them."""
    import handlens.train.run as run_module

    first = train(tiny_config(FROZEN, "model.head=linear", "train.epochs=2", *views), trained_workspace)
    decoded = []
    real_decode = run_module._whole_inputs

    def counting_decode(*args, **kwargs):
        decoded.append(1)
        return real_decode(*args, **kwargs)

    monkeypatch.setattr(run_module, "_whole_inputs", counting_decode)
    images = features.FEATURE_IMAGES
    again = train(tiny_config(FROZEN, "model.head=linear", "train.epochs=2", *views), trained_workspace)
    assert decoded == [] and images == features.FEATURE_IMAGES
    assert again.timings["decode"] < 0.5
    assert again.metrics["test"]["macro_f1"] == pytest.approx(first.metrics["test"]["macro_f1"])
    other = train(tiny_config(FROZEN, "model.head=linear", "preprocess.size=40", *views), trained_workspace)
    assert decoded == [1] and images < features.FEATURE_IMAGES and other.epochs == 2
