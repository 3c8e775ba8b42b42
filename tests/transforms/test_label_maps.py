"""Label maps on geometric steps: parsing, validation, composition, and labels that follow the pixels."""

import pytest
import torch

from handlens.core.errors import InputError
from handlens.transforms.augment import PolicyAugmenter
from handlens.transforms.engine import AugmentingCollate, as_sources, augment_sources, augment_with_labels
from handlens.transforms.policy import label_permutations, parse_policy

SWAP = {"cw": "ccw", "ccw": "cw"}
CLASSES = ["ccw", "cw", "round"]  # index order of a run: sorted names


def chiral_policy(*, vflip=True, p=0.5):
    steps = [{"op": "hflip", "p": p, "labels": SWAP}]
    if vflip:
        steps.append({"op": "vflip", "p": p, "labels": SWAP})
    return parse_policy({"name": "chiral", "steps": steps})


def asymmetric(n=16, size=6, seed=0):
    """Images with no symmetry at all: which flip a sample went through can be read back from its pixels."""
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def flip_of(out, original):
    """Which of identity / hflip / vflip / both turns ``original`` into ``out`` (exact: flips never resample)."""
    x = original.float()
    for name, view in (("id", x), ("h", x.flip(-1)), ("v", x.flip(-2)), ("hv", x.flip(-1, -2))):
        if torch.equal(out, view):
            return name
    raise AssertionError("not a flip of the original")


def test_a_label_map_parses_and_round_trips_through_to_dict():
    policy = chiral_policy()
    assert policy.steps[0].labels == SWAP and policy.steps[0].params == {} and policy.has_label_maps
    assert policy.to_dict()["steps"][0] == {"op": "hflip", "p": 0.5, "labels": SWAP}
    assert parse_policy(policy.to_dict()) == policy
    plain = parse_policy({"steps": [{"op": "hflip", "p": 0.5}]})
    assert not plain.has_label_maps and "labels" not in plain.to_dict()["steps"][0]
    assert not policy.without_label_maps().has_label_maps
    turned = parse_policy({"steps": [{"op": "rotate", "degrees": "right_angles", "labels": {"up": "left",
                                                                                           "left": "up"}}]})
    assert parse_policy(turned.to_dict()) == turned


@pytest.mark.parametrize(("step", "message"), [
    ({"op": "brightness", "labels": SWAP}, "labels: on brightness makes no sense"),
    ({"op": "resized_crop", "labels": SWAP}, "labels: on resized_crop makes no sense"),
    ({"op": "mixup", "labels": SWAP}, "labels: on mixup makes no sense"),
    ({"op": "rotate", "degrees": 15, "labels": SWAP}, "free-angle rotate .*degrees: right_angles"),
    ({"op": "rotate", "labels": SWAP}, "free-angle rotate"),  # the default is a free angle too
    ({"op": "hflip", "labels": {"cw": "ccw"}}, "not a permutation: 'ccw' is mapped to but not from"),
    ({"op": "hflip", "labels": {"cw": "ccw", "ccw": "ccw"}}, "not a permutation: 'ccw' is the image of several"),
    ({"op": "hflip", "labels": ["cw", "ccw"]}, "must map class names to class names"),
    ({"op": "hflip", "labels": {}}, "must map class names to class names"),
])
def test_bad_label_maps_name_the_step_and_the_fix(step, message):
    with pytest.raises(InputError, match=message) as caught:
        parse_policy({"steps": [{"op": "noise"}, step]}, "mine")
    assert "policy 'mine', step 2" in str(caught.value)


def test_names_must_be_classes_of_the_run_with_a_did_you_mean():
    perms = label_permutations(chiral_policy(), CLASSES)
    assert perms == ((1, 0, 2), (1, 0, 2))  # ccw <-> cw, round stays
    with pytest.raises(InputError, match=r"names 'cw' \(did you mean 'cw_'\?\), which is not a class of this run"):
        label_permutations(chiral_policy(), ["ccw", "cw_", "round"])
    with pytest.raises(InputError, match="step 1 \\(hflip\\)"):
        label_permutations(chiral_policy(), ["red", "green"])
    mixed = parse_policy({"steps": [{"op": "blur"}, {"op": "hflip", "labels": SWAP}]})
    assert label_permutations(mixed, CLASSES) == (None, (1, 0, 2))


def test_labels_follow_the_flips_that_fire_and_hflip_then_vflip_is_the_identity():
    x, y = asymmetric(), torch.tensor([0, 1, 2, 1] * 4)
    policy = chiral_policy()
    perms = label_permutations(policy, CLASSES)
    seen = set()
    for seed in range(4):
        out, labels = augment_with_labels(as_sources(x), y, policy, perms=perms, seed=seed)
        assert torch.equal(out, augment_sources(as_sources(x), policy, seed=seed))  # same draws, same pixels
        for i in range(len(x)):
            flip = flip_of(out[i], x[i])
            seen.add(flip)
            swapped = {0: 1, 1: 0, 2: 2}[int(y[i])]
            assert int(labels[i]) == (swapped if flip in ("h", "v") else int(y[i])), (seed, i, flip)
    assert seen == {"id", "h", "v", "hv"}  # every case happened, the half turn included
    again = augment_with_labels(as_sources(x), y, policy, perms=perms, seed=1)[1]
    assert torch.equal(again, augment_with_labels(as_sources(x), y, policy, perms=perms, seed=1)[1])
    assert labels.dtype == torch.int64 and torch.equal(y, torch.tensor([0, 1, 2, 1] * 4))  # input untouched


def test_a_quarter_turn_map_applies_once_per_quarter_turn():
    x = torch.zeros(12, 3, 6, 6, dtype=torch.uint8)
    x[..., 0, :] = 255  # a bright top edge: where it went says how far the image turned
    classes = ["down", "left", "right", "up"]
    policy = parse_policy({"steps": [{"op": "rotate", "degrees": "right_angles",
                                      "labels": {"up": "left", "left": "down", "down": "right", "right": "up"}}]})
    out, labels = augment_with_labels(as_sources(x), torch.full((12,), 3), policy,
                                      perms=label_permutations(policy, classes), seed=0)
    edges = {"up": out[:, 0, 0].mean(-1), "down": out[:, 0, -1].mean(-1), "left": out[:, 0, :, 0].mean(-1),
             "right": out[:, 0, :, -1].mean(-1)}
    found = [max(edges, key=lambda k: float(edges[k][i])) for i in range(12)]
    assert [classes[int(v)] for v in labels] == found and len(set(found)) > 2


def test_a_map_after_a_colour_step_still_follows_the_flips():
    x, y = asymmetric(), torch.ones(16, dtype=torch.int64)
    policy = parse_policy({"steps": [{"op": "noise", "p": 0.0}, {"op": "hflip", "p": 0.5, "labels": SWAP}]})
    out, labels = augment_with_labels(as_sources(x), y, policy, perms=label_permutations(policy, CLASSES), seed=2)
    flips = [flip_of(out[i], x[i]) for i in range(16)]
    assert {"id", "h"} == set(flips)
    assert [int(v) for v in labels] == [0 if f == "h" else 1 for f in flips]


def test_the_collate_hands_permuted_targets_on_and_the_plain_path_is_unchanged():
    x, y = asymmetric(n=8), torch.tensor([0, 1] * 4)
    samples = [(x[i], y[i]) for i in range(8)]
    torch.manual_seed(0)
    images, targets = AugmentingCollate(PolicyAugmenter(chiral_policy(vflip=False, p=0.5), CLASSES))(samples)
    flips = [flip_of(images[i], x[i]) for i in range(8)]
    assert set(flips) == {"id", "h"}
    assert [int(t) for t in targets] == [1 - int(y[i]) if f == "h" else int(y[i]) for i, f in enumerate(flips)]
    plain = PolicyAugmenter(parse_policy({"steps": [{"op": "hflip", "p": 0.5}]}))
    assert not plain.permutes_labels
    torch.manual_seed(0)
    images, targets = AugmentingCollate(plain)(samples)
    assert torch.equal(targets, y)  # no map: the targets are the loader's own


def test_an_augmenter_refuses_images_without_their_labels_or_without_classes():
    x = asymmetric(n=2)
    with pytest.raises(InputError, match=r"cached augmented feature views .*train\.views=0"):
        PolicyAugmenter(chiral_policy(), CLASSES)(x, torch.Generator().manual_seed(0))
    with pytest.raises(InputError, match="build its augmenter with the run's classes"):
        PolicyAugmenter(chiral_policy())(x, labels=torch.tensor([0, 1]))
    with pytest.raises(InputError, match="not a class of this run"):
        PolicyAugmenter(chiral_policy(), ["red", "green"])
