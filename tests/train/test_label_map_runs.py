"""Training with a policy whose flips swap labels: the permuted targets reach the loss; modes that cannot carry
them refuse."""

import pytest
import torch

from handlens.core.errors import InputError
from handlens.data.catalog import open_catalog
from handlens.train.run import prepare, train
from tests.conftest import tiny_config


def swap_policy(tmp_path, p=1.0, names=("red", "green")):
    """A policy file: a horizontal flip (always, by default) that swaps two of the colour classes."""
    a, b = names
    path = tmp_path / "swap.yaml"
    path.write_text(f"name: swap\nsteps:\n  - {{op: hflip, p: {p}, labels: {{{a}: {b}, {b}: {a}}}}}\n")
    return path


def prepared(cfg, ws):
    catalog = open_catalog(ws.db_url)
    try:
        return prepare(cfg, ws, catalog)
    finally:
        catalog.close()


def test_the_train_loader_hands_the_loss_permuted_targets(trained_workspace, tmp_path):
    run = prepared(tiny_config(f"augment.policy={swap_policy(tmp_path)}"), trained_workspace)
    classes = run.data.classes
    red, green = classes.index("red"), classes.index("green")
    swapped = {red: green, green: red}
    dataset = run.train_loader.dataset
    samples = [dataset[i] for i in range(len(dataset))]
    images, targets = run.train_loader.collate_fn(samples)  # what the module's training step receives
    given = [int(s[1]) for s in samples]
    assert [int(t) for t in targets] == [swapped.get(t, t) for t in given]  # every sample flipped: all swapped
    assert set(given) == {0, 1, 2} and targets.dtype == torch.int64
    pixels = torch.stack([torch.as_tensor(s[0]) for s in samples]).float()
    assert torch.equal(images, pixels.flip(-1))  # and the pixels were mirrored with them
    batch = next(iter(run.train_loader))
    assert batch[1].shape[0] == 8


def test_a_tiny_run_with_a_label_map_and_mixup_trains(trained_workspace, tmp_path):
    result = train(tiny_config(f"augment.policy={swap_policy(tmp_path, p=0.5)}", "augment.mixup=0.2"),
                   trained_workspace)
    assert result.epochs == 2


def test_the_bundle_pins_the_policy_as_trained(trained_workspace, tmp_path):
    """The policy file may move or change after training: the bundle's own record of it is what TTA and
    ``trust --consistency`` read."""
    import json

    from handlens.explain.consistency import policy_swap

    policy = swap_policy(tmp_path, p=0.5)
    result = train(tiny_config(f"augment.policy={policy}"), trained_workspace)
    manifest = json.loads((result.bundle / "bundle.json").read_text())
    assert manifest["augment_policy"]["steps"][0]["labels"] == {"red": "green", "green": "red"}
    policy.unlink()
    swap, source = policy_swap(manifest, "hflip", manifest["classes"])
    assert swap == {"red": "green", "green": "red"} and "hflip" in source


def test_a_name_outside_the_labelset_is_refused_before_training(trained_workspace, tmp_path):
    with pytest.raises(InputError, match=r"names 'gren' \(did you mean 'green'\?\), which is not a class"):
        prepared(tiny_config(f"augment.policy={swap_policy(tmp_path, names=('red', 'gren'))}"), trained_workspace)


def test_cached_feature_views_refuse_a_label_map_and_say_how(trained_workspace, tmp_path):
    cfg = tiny_config(f"augment.policy={swap_policy(tmp_path)}", "model.freeze=frozen", "train.views=2")
    with pytest.raises(InputError, match=r"cached augmented feature views .*train\.feature_cache=off"):
        prepared(cfg, trained_workspace)


def test_patches_carry_their_labels_through_the_flips():
    """Patch sampling: a sample is a patch still to cut (a Source); the collate cuts, flips and relabels it."""
    import numpy as np

    from handlens.train.patch_data import RandomPatchDataset
    from handlens.transforms.augment import PolicyAugmenter
    from handlens.transforms.engine import AugmentingCollate, pixel_batch
    from handlens.transforms.patches import PatchSpec
    from handlens.transforms.policy import parse_policy

    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (40, 40, 3), dtype=np.uint8) for _ in range(6)]
    dataset = RandomPatchDataset(images, np.array([0, 1, 2, 0, 1, 2]), PatchSpec(size=16, scale=(1.0, 1.0),
                                                                               per_image=2, min_roi=0.0), 16)
    policy = parse_policy({"steps": [{"op": "hflip", "p": 0.5, "labels": {"cw": "ccw", "ccw": "cw"}}]})
    samples = [dataset[i] for i in range(len(dataset))]
    torch.manual_seed(3)
    images_out, targets = AugmentingCollate(PolicyAugmenter(policy, ["ccw", "cw", "round"]))(samples)
    plain = pixel_batch([s[0] for s in samples]).float()
    flipped = [bool(torch.equal(images_out[i], plain[i].flip(-1))) and not torch.equal(plain[i], plain[i].flip(-1))
               for i in range(len(samples))]
    kept = [bool(torch.equal(images_out[i], plain[i])) for i in range(len(samples))]
    assert all(f or k for f, k in zip(flipped, kept, strict=True)) and any(flipped) and any(kept)
    given = [int(s[1]) for s in samples]
    assert [int(t) for t in targets] == [{0: 1, 1: 0}.get(g, g) if f else g
                                         for g, f in zip(given, flipped, strict=True)]
