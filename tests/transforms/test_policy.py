"""Augmentation policies: presets respect their domain constraints; bad policies are clear errors."""

import pytest
import torch

from handlens.core.errors import InputError
from handlens.transforms.engine import apply_policy
from handlens.transforms.policy import AUGMENT_OPS, load_policy, parse_policy, preset_names


def top_bright(n: int = 64, size: int = 48) -> torch.Tensor:
    """Images whose top half is white and bottom half black: a vertical flip is unmistakable."""
    batch = torch.zeros(n, 3, size, size, dtype=torch.uint8)
    batch[:, :, : size // 2] = 255
    return batch


def test_the_presets_exist_as_plain_yaml():
    assert {"natural-photo", "xray", "thin-section", "microscopy"} <= set(preset_names())
    for name in preset_names():
        policy = load_policy(name)
        assert policy.steps and all(step.op in AUGMENT_OPS for step in policy.steps)


def test_xray_never_turns_an_image_upside_down():
    """Property over many random draws: the bright half stays on top whatever else happens."""
    policy = load_policy("xray")
    assert not any(step.op == "vflip" for step in policy.steps)
    for seed in range(25):
        out = apply_policy(top_bright(), policy, seed=seed).float()
        top, bottom = out[:, :, :20].mean((1, 2, 3)), out[:, :, 28:].mean((1, 2, 3))
        assert bool((top > bottom + 100).all()), f"seed {seed}"


def test_xray_never_changes_hue():
    assert not any(step.op in ("hue", "saturation") for step in load_policy("xray").steps)


def test_thin_section_turns_sections_every_way():
    out = apply_policy(top_bright(n=200), load_policy("thin-section"), seed=0).float()
    top, bottom = out[:, :, :20].mean((1, 2, 3)), out[:, :, 28:].mean((1, 2, 3))
    assert bool((bottom > top + 100).any()) and bool((top > bottom + 100).any())  # up became down, and not


def test_apply_keeps_shape_dtype_and_is_reproducible():
    batch = torch.randint(0, 255, (6, 3, 32, 32), dtype=torch.uint8)
    policy = load_policy("natural-photo")
    one, two = apply_policy(batch, policy, seed=3), apply_policy(batch, policy, seed=3)
    assert one.shape == batch.shape and one.dtype == torch.uint8 and torch.equal(one, two)
    assert not torch.equal(one, apply_policy(batch, policy, seed=4))


def test_bad_policies_name_the_problem(tmp_path):
    with pytest.raises(InputError, match="unknown op 'flip_upside'"):
        parse_policy({"steps": [{"op": "flip_upside"}]})
    with pytest.raises(InputError, match=r"p=1\.5"):
        parse_policy({"steps": [{"op": "hflip", "p": 1.5}]})
    with pytest.raises(InputError, match="presets: microscopy"):
        load_policy("xrays")
    custom = tmp_path / "mine.yaml"
    custom.write_text("steps:\n  - {op: vflip, p: 1.0}\n")
    flipped = apply_policy(top_bright(n=2), load_policy(str(custom)), seed=0).float()
    assert bool(flipped[:, :, 28:].mean() > flipped[:, :, :20].mean())


def test_training_with_a_preset_policy(trained_workspace):
    from handlens.train.run import train
    from tests.conftest import tiny_config

    result = train(tiny_config("augment.policy=thin-section"), trained_workspace)
    assert result.epochs == 2
    from handlens.train.config import load_config

    with pytest.raises(InputError, match="unknown augmentation preset"):
        load_config(None, ["augment.policy=nonsense"])


def test_augment_preview_writes_a_grid(trained_workspace, tmp_path):
    import json

    from PIL import Image
    from typer.testing import CliRunner

    from handlens.cli.main import app

    out = tmp_path / "preview.png"
    result = CliRunner().invoke(app, ["--workspace", str(trained_workspace.root), "augment-preview", "colours",
                                      "--policy", "thin-section", "--n", "6", "--size", "32", "--out", str(out),
                                      "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["images"] == 6 and report["nearly_uniform"] == []
    assert Image.open(out).size[0] > 6 * 32  # originals and augmented side by side
    bad = CliRunner().invoke(app, ["--workspace", str(trained_workspace.root), "augment-preview", "colours",
                                   "--policy", "nope", "--out", str(out)])
    assert bad.exit_code == 2 and "unknown augmentation preset" in bad.output


def test_presets_recommend_their_preprocessing():
    assert load_policy("xray").preprocess == {"normalize": "percentile", "clip_percentiles": [1, 99]}
    thin = load_policy("thin-section")
    assert thin.preprocess["patches"]["enabled"] is True
    assert load_policy("natural-photo").preprocess == {}


def test_natural_photo_keeps_up_up():
    """Photos of fungi on a table: mild rotation only, never upside down."""
    policy = load_policy("natural-photo")
    for seed in range(10):
        out = apply_policy(top_bright(), policy, seed=seed).float()
        top, bottom = out[:, :, :16].mean((1, 2, 3)), out[:, :, 32:].mean((1, 2, 3))
        assert bool((top > bottom).all()), f"seed {seed}"


def test_microscopy_keeps_stain_colour_close():
    """Slides: any orientation, but hue shifts stay small (stain colour carries the class)."""
    policy = load_policy("microscopy")
    reddish = torch.zeros(50, 3, 24, 24, dtype=torch.uint8)
    reddish[:, 0], reddish[:, 1], reddish[:, 2] = 180, 60, 90
    out = apply_policy(reddish, policy, seed=0).float().mean((2, 3))
    assert bool((out[:, 0] > out[:, 1] + 60).all()) and bool((out[:, 0] > out[:, 2] + 40).all())


def test_mixup_and_cutmix_are_batch_steps_with_soft_targets():
    from handlens.transforms.policy import batch_mixer

    policy = parse_policy({"steps": [{"op": "hflip", "p": 0.5}, {"op": "mixup", "p": 1.0, "alpha": 0.4}]})
    assert [s.op for s in policy.batch_steps] == ["mixup"] and [s.op for s in policy.image_steps] == ["hflip"]
    batch = torch.randint(0, 255, (4, 3, 16, 16), dtype=torch.uint8)
    assert apply_policy(batch, parse_policy({"steps": [{"op": "cutmix", "p": 1.0}]}), seed=0) is batch
    torch.manual_seed(0)
    x, y = torch.rand(8, 3, 16, 16), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    mixed, soft = batch_mixer(policy.batch_steps, 3)(x, y)
    assert soft.shape == (8, 3) and torch.allclose(soft.sum(1), torch.ones(8)) and not torch.equal(mixed, x)
    assert (soft.max(1).values < 1).any()  # labels really were mixed
    never = batch_mixer(parse_policy({"steps": [{"op": "cutmix", "p": 0.0}]}).batch_steps, 3)
    same, hard = never(x, y)
    assert torch.equal(same, x) and torch.equal(hard.argmax(1), y)
    with pytest.raises(InputError, match="only alpha"):
        parse_policy({"steps": [{"op": "mixup", "beta": 1}]})
