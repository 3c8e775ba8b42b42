"""ONNX export: parity with torch on real image files, CAM from the outputs equal to Grad-CAM, what preprocess.json
and the model card say, heads without maps, patch-trained bundles, damaged bundles, unsupported operators, the
command."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import typer
from PIL import Image
from torch import nn
from typer.testing import CliRunner

from handlens.cli import exporting
from handlens.cli.app import main as app_main
from handlens.core.errors import InputError
from handlens.explain.api import explain
from handlens.explain.api import load_bundle as load_explainable
from handlens.export.onnx import (
    CARD_FILE,
    MODEL_FILE,
    PARITY_TOLERANCE,
    PREPROCESS_FILE,
    ExportError,
    cam_from_outputs,
    export_bundle,
    layer_of,
    to_onnx,
)
from handlens.models.backbones import BACKBONES
from handlens.models.bundle import DamagedBundleError, load_bundle, save_bundle
from handlens.models.classifier import create_classifier
from handlens.transforms.patches import PatchSpec
from handlens.transforms.preprocess import decode_working
from handlens.transforms.roi import RoiRule
from tests.conftest import colour_tree, write_image

CLASSES = ["brick", "grass", "gravel"]
METRICS = {"val": {"n": 6, "accuracy": 0.8333, "macro_f1": 0.8222, "roc_auc": 0.9},
           "test": {"n": 7, "accuracy": 0.7143, "macro_f1": 0.7, "roc_auc": 0.85}, "best_epoch": 3}
STUDY = {"name": "stones-study", "trial": 4, "objective": "macro_f1", "cv": 5, "repeats": 2, "cv_mean": 0.8123,
         "cv_std": 0.0456, "refitted": True, "images_seen": 40, "test_images_held_out": 10}
PATCHES = {**PatchSpec(size=16, max_side=64, grid_max=4, min_roi=0.5).to_dict(), "roi": RoiRule().to_dict()}
runner = CliRunner()


def save_tiny(directory: Path, *, head: str = "linear", pool: str = "avg", seed: int = 0, **manifest) -> Path:
    """A saved 3-class tiny_cnn bundle whose batch-norm statistics are not the identity (a few train-mode passes)."""
    torch.manual_seed(seed)
    model = create_classifier("tiny_cnn", 3, head=head, hidden=16, pool=pool)
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(8, 3, 32, 32) * 1.5 + 0.3)
    preprocess = BACKBONES.get("tiny_cnn").preprocess().to_dict()
    preprocess.update(manifest.pop("preprocess", {}))
    full = {"backbone": "tiny_cnn", "classes": CLASSES, "freeze": "full",
            "head": {"type": head, "hidden": 16, "dropout": 0.0, "pool": pool}, "preprocess": preprocess,
            "dataset": "stones", "labelset": "default", "split": "split1", "run_id": f"run-{head}-{pool}-{seed}",
            "metrics": METRICS, "split_membership": {"train": list(range(20)), "val": [20, 21], "test": [22]},
            **manifest}
    return save_bundle(directory, model.eval(), full)


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list[str]:
    """Real image files: the colour tree (square) and two non-square textured ones (shorter-crop at work)."""
    root = tmp_path_factory.mktemp("images")
    colour_tree(root, per_class=2, size=40)
    write_image(root / "odd" / "wide.png", 5, (64, 40))
    write_image(root / "odd" / "tall.jpg", 6, (30, 52))
    return sorted(str(p) for p in root.rglob("*") if p.is_file())


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> tuple[Path, Path]:
    """A linear-head tiny_cnn bundle (with a study's CV estimate) exported with a dynamic batch."""
    root = tmp_path_factory.mktemp("tiny")
    bundle = save_tiny(root / "bundle", study=STUDY)
    export_bundle(bundle, root / "out", dynamic_batch=True)
    return bundle, root / "out"


def session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def test_onnx_logits_and_features_match_torch_on_real_images(exported, images):
    bundle_dir, out = exported
    bundle = load_bundle(bundle_dir)
    inputs = bundle.transform_many(images)
    logits, features = session(out / MODEL_FILE).run(["logits", "features"], {"input": inputs.numpy()})
    activation = {}
    hook = bundle.layer(bundle.module.default_layer).register_forward_hook(
        lambda _m, _i, output: activation.setdefault("a", output))
    with torch.no_grad():
        reference = bundle.module(inputs).numpy()
    hook.remove()
    assert logits.shape == (len(images), 3) and features.shape == (len(images), 32, 4, 4)
    assert np.abs(logits - reference).max() < PARITY_TOLERANCE
    assert np.abs(features - activation["a"].numpy()).max() < 1e-5
    assert np.abs(reference).max() > 0.05  # the logits are not trivially zero


def test_cam_from_the_onnx_outputs_is_handlens_gradcam(exported, images):
    bundle_dir, out = exported
    bundle = load_explainable(bundle_dir)
    spec = json.loads((out / PREPROCESS_FILE).read_text())
    inputs = bundle.transform_many(images)
    (features,) = session(out / MODEL_FILE).run(["features"], {"input": inputs.numpy()})
    maps = cam_from_outputs(features, np.array(spec["cam"]["weight"]), spec["size"])
    assert maps.shape == (len(images), 3, 32, 32)
    for target in range(3):  # one backward pass per class: the gradient route, not the closed form
        gradcam = explain(bundle.module, inputs, bundle.classes, "gradcam", target=[target] * len(images)).maps
        assert np.abs(maps[:, target] - gradcam).max() < 1e-5
    everything = explain(bundle.module, inputs, bundle.classes, "gradcam", target="all").maps
    assert np.abs(maps - everything).max() < 1e-5
    assert maps.max() > 1e-3  # a map with something on it
    one = cam_from_outputs(features, np.array(spec["cam"]["weight"]), 32, targets=[2] * len(images))
    assert np.array_equal(one, maps[:, 2])


def test_preprocess_json_describes_input_outputs_and_the_head(exported, images):
    bundle_dir, out = exported
    spec = json.loads((out / PREPROCESS_FILE).read_text())
    assert (spec["format"], spec["size"], spec["resize"], spec["interpolation"]) == ("handlens-onnx", 32,
                                                                                      "shorter-crop", "bilinear")
    assert spec["mean"] == [0.5, 0.5, 0.5] and spec["std"] == [0.5, 0.5, 0.5] and spec["normalize"] == "backbone"
    assert spec["classes"] == CLASSES and spec["labelset"] == "default"
    assert spec["input"]["shape"] == ["batch", 3, 32, 32]
    assert spec["outputs"]["features"] == {"layer": "stage3", "module": "backbone.stages.2",
                                           "shape": ["batch", 32, 4, 4]}
    assert spec["cam"]["available"] and spec["patches"] is None
    assert spec["export"]["parity"]["passed"] and spec["export"]["exporter"] == "dynamo"
    # the head in the file is the model's: logits = W . mean(features) + b
    bundle = load_bundle(bundle_dir)
    logits, features = session(out / MODEL_FILE).run(None, {"input": bundle.transform_many(images).numpy()})
    weight, bias = np.array(spec["cam"]["weight"]), np.array(spec["cam"]["bias"])
    assert weight.shape == (3, 32)
    assert np.abs(features.mean((2, 3)) @ weight.T + bias - logits).max() < 1e-5
    model = onnx.load(str(out / MODEL_FILE))
    props = {p.key: p.value for p in model.metadata_props}
    assert json.loads(props["handlens.classes"]) == CLASSES
    assert props["handlens.weights_sha256"] == bundle.manifest["weights_sha256"]


def test_the_model_card_gives_data_metrics_cv_limits_and_versions(exported):
    card = (exported[1] / CARD_FILE).read_text()
    assert "# Model card: run-linear-avg-0" in card
    assert "dataset **stones**, labelset **default**, split **split1**" in card
    assert "train 20, val 2, test 1" in card
    assert "| test | 7 | 0.714 | 0.700 | 0.850 |" in card
    assert "**Cross-validation estimate**" in card and "macro_f1 0.812 ± 0.046 over 5 folds × 2 repeat(s)" in card
    assert "refitted by study **stones-study**" in card
    assert "No trust check is recorded" in card
    assert "## Intended use and limits" in card and "There is no 'none of these'" in card
    assert "In-browser maps: Grad-CAM on layer stage3" in card
    assert "| onnxruntime | — | " in card and "| torch | " in card


def test_batch_is_one_unless_dynamic(tmp_path, images):
    bundle = load_bundle(save_tiny(tmp_path / "bundle"))
    fixed = ort.InferenceSession(to_onnx(bundle).data)
    assert not any(m._forward_hooks for m in bundle.module.modules())  # the export's hook is gone
    assert fixed.get_inputs()[0].shape == [1, 3, 32, 32]
    inputs = bundle.transform_many(images[:3]).numpy()
    with pytest.raises(Exception, match=r"(?i)dimension|shape"):
        fixed.run(None, {"input": inputs})
    logits, _ = fixed.run(None, {"input": inputs[:1]})
    with torch.no_grad():
        assert np.abs(logits - bundle.module(torch.from_numpy(inputs[:1])).numpy()).max() < PARITY_TOLERANCE


@pytest.mark.parametrize("case", [("mlp", "avg", "its head is an MLP"),
                                  ("linear", "texture", "pools by texture statistics")])
def test_heads_that_are_not_pool_plus_linear_export_logits_and_say_no_maps(tmp_path, images, case):
    head, pool, why = case
    bundle_dir = save_tiny(tmp_path / "bundle", head=head, pool=pool)
    result = export_bundle(bundle_dir, tmp_path / "out")
    assert result.model.outputs == ["logits"] and not result.model.maps
    sess = session(tmp_path / "out" / MODEL_FILE)
    assert [o.name for o in sess.get_outputs()] == ["logits"]
    bundle = load_bundle(bundle_dir)
    inputs = bundle.transform_many(images)
    got = np.concatenate([sess.run(None, {"input": inputs[i:i + 1].numpy()})[0] for i in range(len(images))])
    with torch.no_grad():
        assert np.abs(got - bundle.module(inputs).numpy()).max() < PARITY_TOLERANCE
    spec = json.loads((tmp_path / "out" / PREPROCESS_FILE).read_text())
    assert spec["cam"]["available"] is False and why in spec["cam"]["reason"]
    card = (tmp_path / "out" / CARD_FILE).read_text()
    assert "In-browser maps are not available for this model" in card and why in card


def test_logits_only_drops_the_features_and_the_card_says_so(tmp_path):
    result = export_bundle(save_tiny(tmp_path / "bundle"), tmp_path / "out", logits_only=True)
    assert [o.name for o in session(tmp_path / "out" / MODEL_FILE).get_outputs()] == ["logits"]
    assert "--logits-only" in (tmp_path / "out" / CARD_FILE).read_text()
    assert result.to_dict()["maps"] is False


def test_an_old_opset_uses_the_torchscript_exporter(tmp_path, images):
    bundle = load_bundle(save_tiny(tmp_path / "bundle"))
    model = to_onnx(bundle, opset=17, dynamic_batch=True)
    assert model.exporter == "torchscript" and "opset 18 or later" in model.fallback
    proto = onnx.load_from_string(model.data)
    assert next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")) == 17
    inputs = bundle.transform_many(images)
    logits, _ = ort.InferenceSession(model.data).run(None, {"input": inputs.numpy()})
    with torch.no_grad():
        assert np.abs(logits - bundle.module(inputs).numpy()).max() < PARITY_TOLERANCE
    with pytest.raises(InputError, match=r"--opset 99: choose 7\.\.\d+"):
        export_bundle(bundle, tmp_path / "out", opset=99)


def test_a_patch_trained_bundle_exports_its_patch_model_and_says_how_it_predicts(tmp_path):
    bundle_dir = save_tiny(tmp_path / "bundle", preprocess={"patches": PATCHES})
    export_bundle(bundle_dir, tmp_path / "out", dynamic_batch=True)
    spec = json.loads((tmp_path / "out" / PREPROCESS_FILE).read_text())
    patches = spec["patches"]
    assert patches["trained_on_patches"] and patches["patch_size"] == 16 and patches["working_side"] == 64
    assert patches["model_input"] == 32 and patches["prediction"]["grid_max"] == 4
    assert "mean over its grid patches of softmax" in patches["prediction"]["average"]
    assert patches["explanation"]["overlap"] == 0.25
    assert "16-pixel patches" in (tmp_path / "out" / CARD_FILE).read_text()
    # what the file says reproduces the bundle's own image-level prediction
    bundle = load_bundle(bundle_dir)
    image = np.asarray(Image.open(write_image(tmp_path / "big.png", 3, (120, 90))).convert("RGB"))
    working = decode_working(image, patches["working_side"])
    crops, owners, _ = bundle.grid_patches([working])
    assert len(owners) == 4  # 64x48 working image, 16-px boxes: 4 x 3 = 12 thinned to grid_max
    (logits,) = session(tmp_path / "out" / MODEL_FILE).run(["logits"], {
        "input": bundle.preprocess.normalize_batch(crops).numpy()})
    mean = torch.softmax(torch.from_numpy(logits), 1).mean(0).numpy()
    assert np.abs(mean - bundle.predict_proba([image])[0]).max() < 1e-5


def test_a_damaged_bundle_gets_the_loaders_error(tmp_path):
    bundle_dir = save_tiny(tmp_path / "bundle")
    (bundle_dir / "weights.safetensors").write_bytes(b"")
    with pytest.raises(DamagedBundleError, match=r"weights file weights\.safetensors is empty"):
        export_bundle(bundle_dir, tmp_path / "out")
    (bundle_dir / "bundle.json").write_text("{not json")
    with pytest.raises(DamagedBundleError, match="is not valid JSON"):
        export_bundle(bundle_dir, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@torch.library.custom_op("handlens_test::wobble", mutates_args=())
def wobble(x: torch.Tensor) -> torch.Tensor:
    """An operator no ONNX exporter knows."""
    return x * 1.0


@wobble.register_fake
def _(x: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x)


class Wobble(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return wobble(x)


def test_an_unsupported_operator_is_one_message_naming_its_layer(tmp_path, capfd):
    bundle = load_bundle(save_tiny(tmp_path / "bundle"))
    bundle.module.backbone.stages[1].append(Wobble())
    with pytest.raises(ExportError) as caught:
        to_onnx(bundle)
    message = str(caught.value)
    assert "operator handlens_test.wobble in layer stage2 (backbone.stages.1.4)" in message
    assert "--logits-only does not avoid it (stage2 is on the path to the logits)" in message
    assert "Traceback" not in message and len(message.splitlines()) == 1
    assert "Torch IR graph" not in capfd.readouterr().err  # the TorchScript exporter's graph dump is muted


def test_layer_of_picks_the_innermost_named_layer():
    layers = {"stage1": "backbone.stages.0", "stage2": "backbone.stages.1", "conv_head": "backbone.stages.1.4"}
    assert layer_of(layers, "backbone.stages.1.2") == "stage2"
    assert layer_of(layers, "backbone.stages.1.4.conv") == "conv_head"
    assert layer_of(layers, "backbone.stages.10") is None


def cli() -> typer.Typer:
    """The export command under the app's global options (the lead adds it to cli/app.py)."""
    app = typer.Typer()
    app.callback()(app_main)
    app.add_typer(exporting.app)
    return app


def test_the_command_writes_the_files_and_refuses_bad_requests(tmp_path):
    bundle_dir = save_tiny(tmp_path / "bundle")
    audit = tmp_path / "audit.json"
    audit.write_text(json.dumps({"verdicts": [{"check": "faithfulness", "verdict": "faithful · deletion beats "
                                               "random on 9 of 10 images"}]}))
    ws = ["--workspace", str(tmp_path / "ws")]
    result = runner.invoke(cli(), [*ws, "export", str(bundle_dir), "--format", "onnx", "--out", str(tmp_path / "o"),
                                   "--opset", "18", "--trust", str(audit), "--json"])
    assert result.exit_code == 0, result.output
    body = json.loads(result.stdout)
    assert body["outputs"] == ["logits", "features"] and body["parity"]["max_abs_logits"] < PARITY_TOLERANCE
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == [CARD_FILE, MODEL_FILE, PREPROCESS_FILE]
    assert "- **faithfulness**: faithful · deletion beats random on 9 of 10" in (tmp_path / "o" / CARD_FILE).read_text()
    wrong = runner.invoke(cli(), [*ws, "export", str(bundle_dir), "--format", "tflite"])
    assert wrong.exit_code == 2 and "choose one of onnx" in wrong.output
    (tmp_path / "empty.json").write_text("{}")
    no_verdicts = runner.invoke(cli(), [*ws, "export", str(bundle_dir), "--trust", str(tmp_path / "empty.json")])
    assert no_verdicts.exit_code == 2 and "holds no verdicts" in no_verdicts.output
    (bundle_dir / "bundle.json").write_text("[]")
    damaged = runner.invoke(cli(), [*ws, "export", str(bundle_dir), "--out", str(tmp_path / "d")])
    assert damaged.exit_code == 2 and "is damaged" in damaged.output and "Traceback" not in damaged.output


def test_efficientnet_lite0_with_packaged_weights_matches_torch_and_gradcam(tmp_path, images):
    """The default backbone, real ImageNet weights, real files: logits within 1e-4, CAM equal to Grad-CAM."""
    torch.manual_seed(0)
    model = create_classifier("efficientnet_lite0", 3, weights="packaged", freeze="frozen")
    manifest = {"backbone": "efficientnet_lite0", "classes": CLASSES, "freeze": "frozen", "weights": "packaged",
                "head": {"type": "linear", "pool": "avg"},
                "preprocess": BACKBONES.get("efficientnet_lite0").preprocess().to_dict()}
    bundle = load_explainable(save_bundle(tmp_path / "bundle", model.eval(), manifest))
    onnx_model = to_onnx(bundle, dynamic_batch=True)
    assert onnx_model.exporter == "dynamo" and onnx_model.feature_layer == "conv_head"
    inputs = bundle.transform_many(images[:4])
    logits, features = ort.InferenceSession(onnx_model.data).run(None, {"input": inputs.numpy()})
    with torch.no_grad():
        assert np.abs(logits - bundle.module(inputs).numpy()).max() < PARITY_TOLERANCE
    weight = bundle.module.head[0].weight.detach().numpy()
    maps = cam_from_outputs(features, weight, 224)
    gradcam = explain(bundle.module, inputs, bundle.classes, "gradcam", target=[1] * len(inputs)).maps
    assert np.abs(maps[:, 1] - gradcam).max() < 1e-5 * max(1.0, float(gradcam.max()))
