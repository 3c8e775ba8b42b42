import pytest

from handlens.core.errors import InputError
from handlens.train.config import RunConfig, apply_overrides, load_config


def test_defaults_are_the_offline_frozen_recipe():
    cfg = RunConfig()
    assert (cfg.model.backbone, cfg.model.weights, cfg.model.freeze) == ("efficientnet_lite0", "packaged", "frozen")
    assert cfg.train.monitor == "val_macro_f1" and cfg.tracking.backend == "mlflow"


def test_yaml_then_flags_then_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model:\n  backbone: resnet18\n  freeze: full\ntrain:\n  lr: 0.5\n  epochs: 3\n")
    cfg = load_config(path, ["train.lr=0.01", "train.class_weights=[1, 2.5]", "augment.vflip=true"],
                      {"train": {"epochs": 7, "batch_size": None}})
    assert cfg.model.backbone == "resnet18" and cfg.model.freeze == "full"
    assert cfg.train.epochs == 7 and cfg.train.batch_size == 32  # None flags do not override
    assert cfg.train.lr == 0.01 and cfg.train.class_weights == [1, 2.5] and cfg.augment.vflip is True


def test_config_round_trips_through_yaml(tmp_path):
    cfg = load_config(None, ["model.freeze=partial:2", "train.schedule=step"])
    path = tmp_path / "saved.yaml"
    path.write_text(cfg.to_yaml())
    assert load_config(path) == cfg


@pytest.mark.parametrize(("override", "message"), [
    ("train.lr=-1", "train.lr"),
    ("train.optimizer=adam", "train.optimizer"),
    ("model.freeze=half", "partial:N"),
    ("train.lrr=1", r"train.lrr: unknown key; did you mean train.lr\?"),
    ("lr=0.1", "lr: not a section; write section.key=value"),
    ("train.epochs", "section.key=value"),
])
def test_bad_values_name_the_key(override, message):
    with pytest.raises(InputError, match=message):
        load_config(None, [override])


def test_override_into_a_scalar_is_refused():
    with pytest.raises(InputError, match="not a section"):
        apply_overrides({"train": 3}, ["train.lr=1"])


def test_yaml_boolean_words_work_as_users_write_them(tmp_path):
    cfg = load_config(None, ["train.feature_cache=off", "augment.vflip=yes", "train.progress=off"])
    assert cfg.train.feature_cache == "off" and cfg.augment.vflip is True and cfg.train.progress is False
    path = tmp_path / "run.yaml"
    path.write_text("train:\n  feature_cache: on\n")
    assert load_config(path).train.feature_cache == "on"
