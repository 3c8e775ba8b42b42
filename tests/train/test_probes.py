"""Tracking probes (issue 13): Grad-CAM overlays, map drift, graph and histograms of a fine-tune run."""

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from handlens.core.errors import InputError
from handlens.models.classifier import create_classifier
from handlens.train.probes import grad_cam, map_drift, overlay_grid, pick_probes, probe_callback
from handlens.train.run import train
from tests.conftest import tiny_config


def event_tags(result) -> tuple[dict, object]:
    """The tags of a TensorBoard run's event files, and the accumulator to read their values."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (events,) = {p.parent for p in Path(result.tracking_uri).rglob("events.out.tfevents.*")
                 if p.parent.name == result.run_id}
    accumulator = EventAccumulator(str(events), size_guidance={"images": 0, "histograms": 0, "scalars": 0})
    accumulator.Reload()
    return accumulator.Tags(), accumulator


def test_tensorboard_gets_overlays_histograms_graph_and_map_drift(trained_workspace):
    result = train(tiny_config("tracking.backend=tensorboard", "tracking.probes=4", "tracking.histograms=true"),
                   trained_workspace)
    tags, events = event_tags(result)
    assert "probes/gradcam" in tags["images"]
    assert [e.step for e in events.Images("probes/gradcam")] == [1, 2]
    assert "weights/head.0.weight" in tags["histograms"] and "grads/head.0.weight" in tags["histograms"]
    assert {e.step for e in events.Histograms("grads/backbone.stages.0.0.weight")} == {1, 2}
    assert tags["graph"]
    drift = events.Scalars("map_drift")
    assert [e.step for e in drift] == [2]  # from the second epoch: the first has no previous map
    assert all(-1.0 <= e.value <= 1.0 for e in drift)


def test_mlflow_gets_the_map_drift_metric_and_overlay_images(trained_workspace):
    from mlflow.tracking import MlflowClient

    result = train(tiny_config("tracking.backend=mlflow", "tracking.experiment=probes", "tracking.probes=4"),
                   trained_workspace)
    client = MlflowClient(tracking_uri=result.tracking_uri)
    run = client.search_runs([client.get_experiment_by_name("probes").experiment_id])[0]
    history = client.get_metric_history(run.info.run_id, "map_drift")
    assert [m.step for m in history] == [2] and -1.0 <= history[0].value <= 1.0
    images = [a.path for a in client.list_artifacts(run.info.run_id, "images") if a.path.endswith(".png")]
    assert len(images) == 2 and all("probes~gradcam+step+" in p for p in images)


def test_no_probes_log_none_of_it(trained_workspace):
    result = train(tiny_config("tracking.backend=tensorboard"), trained_workspace)
    tags, _ = event_tags(result)
    assert "probes/gradcam" not in tags["images"] and not tags["histograms"] and not tags["graph"]
    assert "map_drift" not in tags["scalars"] and "val_loss" in tags["scalars"]
    off = SimpleNamespace(probes=0, histograms=False)
    assert probe_callback(off, tracker=None, val_loader=object(), classes=["a", "b"]) is None


def test_probes_are_refused_where_they_would_have_no_effect():
    with pytest.raises(InputError, match=r"tracking\.probes=4 has no effect with model\.freeze=frozen"):
        tiny_config("model.freeze=frozen", "tracking.backend=tensorboard", "tracking.probes=4")
    with pytest.raises(InputError, match=r"tracking\.histograms has no effect with model\.freeze=frozen"):
        tiny_config("model.freeze=frozen", "tracking.backend=tensorboard", "tracking.histograms=true")
    # a frozen backbone that still sees the images (no feature cache) can be probed
    assert tiny_config("model.freeze=frozen", "train.feature_cache=off", "tracking.backend=mlflow",
                       "tracking.probes=2").tracking.probes == 2
    with pytest.raises(InputError, match=r"tracking\.probes=4 logs to a tracker"):
        tiny_config("tracking.probes=4")  # tiny_config's backend is none
    with pytest.raises(InputError, match=r"tracking\.histograms has no effect with tracking\.backend=mlflow"):
        tiny_config("tracking.backend=mlflow", "tracking.histograms=true")
    with pytest.raises(InputError, match=r"tracking\.probes"):
        tiny_config("tracking.backend=mlflow", "tracking.probes=65")


def test_without_validation_images_probes_are_dropped_with_a_warning(capsys):
    asked = SimpleNamespace(probes=4, histograms=False)
    assert probe_callback(asked, tracker=None, val_loader=None, classes=["a", "b"]) is None
    assert "tracking.probes=4 has no effect" in capsys.readouterr().err


def test_grad_cam_matches_the_explainer_and_leaves_the_model_as_it_was():
    from handlens.explain.cam import gradient_cam

    torch.manual_seed(0)
    model = create_classifier("tiny_cnn", 3, weights="none", freeze="partial:1")
    model.train()
    modes = {name: m.training for name, m in model.named_modules()}
    hooks = sum(len(m._forward_hooks) for m in model.modules())
    inputs = torch.randn(4, 3, 32, 32)
    targets = torch.tensor([0, 1, 2, 0])
    with torch.inference_mode():  # as in Lightning's validation loop
        maps, probs = grad_cam(model, inputs, targets, layer=model.layer(model.default_layer))
    assert maps.shape == (4, 4, 4) and probs.shape == (4, 3)
    assert {name: m.training for name, m in model.named_modules()} == modes
    assert sum(len(m._forward_hooks) for m in model.modules()) == hooks
    assert all(p.grad is None for p in model.parameters())
    reference = gradient_cam(model, inputs, ["a", "b", "c"], model.layer(model.default_layer),
                             layer_name=model.default_layer, target=targets.tolist())
    ours = torch.nn.functional.interpolate(maps[:, None], size=(32, 32), mode="bilinear", align_corners=False)[:, 0]
    np.testing.assert_allclose(ours.numpy(), reference.maps, rtol=1e-4, atol=1e-6)


def test_map_drift_is_one_for_the_same_maps_and_falls_for_others():
    maps = torch.rand(3, 4, 4)
    assert map_drift(maps, maps.clone(), (32, 32)) == pytest.approx(1.0)
    assert map_drift(maps, maps.flip(-1).flip(-2), (32, 32)) < 0.9
    assert map_drift(maps, torch.zeros(3, 4, 4), (32, 32)) == 0.0  # a flat map correlates 0


def test_probes_are_spread_over_the_set_and_drawn_in_one_grid():
    images = torch.arange(10, dtype=torch.uint8)[:, None, None, None].expand(10, 3, 32, 32).clone()
    dataset = torch.utils.data.TensorDataset(images, torch.arange(10) % 3)
    picked, targets = pick_probes(dataset, 4)
    assert picked[:, 0, 0, 0].tolist() == [0, 3, 6, 9] and targets.tolist() == [0, 0, 0, 0]
    assert len(pick_probes(dataset, 64)[0]) == 10  # at most the whole set
    sheet = overlay_grid(picked, torch.rand(4, 32, 32), ["a p=0.50"] * 4)
    assert sheet.dtype == np.uint8 and sheet.ndim == 3 and sheet.shape[2] == 3 and sheet.shape[1] >= 4 * 128
