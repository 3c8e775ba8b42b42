"""Bundles round-trip with identical logits, load without pickle, and predict from paths/PIL/arrays."""

import json
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from handlens.core.errors import InputError, NotFoundError
from handlens.models.backbones import BACKBONES
from handlens.models.bundle import load_bundle, save_bundle
from handlens.models.classifier import create_classifier


def _bundle(tmp_path, freeze="partial:1", head="mlp"):
    torch.manual_seed(0)
    model = create_classifier("tiny_cnn", 3, freeze=freeze, head=head, hidden=16, dropout=0.1)
    with torch.no_grad():  # make BN statistics non-trivial so the round trip checks them too
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
    manifest = {"backbone": "tiny_cnn", "classes": ["brick", "grass", "gravel"], "freeze": freeze,
                "head": {"type": head, "hidden": 16, "dropout": 0.1},
                "preprocess": BACKBONES.get("tiny_cnn").preprocess().to_dict(), "metrics": {"val_macro_f1": 0.5}}
    return model.eval(), save_bundle(tmp_path / "bundle", model, manifest)


def test_round_trip_gives_identical_logits(tmp_path):
    model, path = _bundle(tmp_path)
    bundle = load_bundle(path)
    x = torch.randn(5, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), bundle.module(x))
    assert bundle.classes == ["brick", "grass", "gravel"]
    assert not bundle.module.training
    assert bundle.layer_names[0] == "stage3" and "head" in bundle.layer_names
    assert bundle.layer("stage3") is bundle.module.backbone.stages[2]
    manifest = json.loads((path / "bundle.json").read_text())
    assert manifest["schema_version"] == 1 and "torch" in manifest["versions"]


def test_predict_accepts_paths_pil_and_arrays(tmp_path):
    _, path = _bundle(tmp_path)
    bundle = load_bundle(path)
    array = np.random.default_rng(0).integers(0, 255, (40, 50, 3), dtype=np.uint8)
    Image.fromarray(array).save(tmp_path / "x.png")
    by_path, by_pil, by_array = bundle.predict([tmp_path / "x.png", Image.fromarray(array), array], top_k=2)
    assert by_path.top == by_pil.top == by_array.top
    assert len(by_path.top) == 2 and abs(sum(by_path.probabilities.values()) - 1) < 1e-4
    assert bundle.transform(array).shape == (3, 32, 32)
    single = bundle.predict(array, top_k=10)
    assert len(single) == 1 and len(single[0].top) == 3


def test_saving_again_replaces_atomically(tmp_path):
    _, path = _bundle(tmp_path)
    _, again = _bundle(tmp_path, freeze="full", head="linear")
    assert again == path and load_bundle(path).manifest["freeze"] == "full"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]  # no temp or old dirs left


def test_damaged_or_foreign_bundles_are_refused(tmp_path):
    _, path = _bundle(tmp_path)
    weights = path / "weights.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(InputError, match="damaged"):
        load_bundle(path)
    with pytest.raises(NotFoundError, match="not a model bundle"):
        load_bundle(tmp_path)


def test_inference_path_does_not_import_lightning(tmp_path):
    import subprocess

    _, path = _bundle(tmp_path)
    code = (f"import sys; from handlens.models.bundle import load_bundle; b = load_bundle({str(path)!r}); "
            "import numpy as np; b.predict(np.zeros((40, 40, 3), dtype=np.uint8)); "
            "print([m for m in ('lightning', 'pytorch_lightning', 'mlflow') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_top_level_load_bundle_is_the_public_entry_point(tmp_path):
    import handlens

    _, path = _bundle(tmp_path)
    bundle = handlens.load_bundle(path)
    assert bundle.classes == ["brick", "grass", "gravel"]
    assert bundle.predict(np.zeros((40, 40, 3), dtype=np.uint8))[0].top[0][0] in bundle.classes


def test_bundles_are_readable_by_colleagues(tmp_path):
    import os
    import stat

    _, path = _bundle(tmp_path)
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o777 & ~umask
    assert stat.S_IMODE((path / "weights.safetensors").stat().st_mode) == 0o666 & ~umask


def test_explainable_layers_leave_out_the_classifier_head():
    from handlens.models.bundle import explainable_layers

    layers = {"stage1": "backbone.blocks.0", "conv_head": "backbone.bn2", "head": "head", "fc": "head.1"}
    assert explainable_layers(layers) == ["stage1", "conv_head"]
