"""augment_preview: a seeded sample, originals beside their augmentations, computed apart from drawing."""

from dataclasses import dataclass

import numpy as np
import pytest
from PIL import Image

from handlens.core.errors import InputError
from handlens.transforms.preview import augment_preview, preview_policy


@dataclass(frozen=True)
class Source:
    path: str
    sha256: str
    label: str


@pytest.fixture
def sources(tmp_path):
    """Eight textured 48x40 images, alternately labelled a and b."""
    rng = np.random.default_rng(0)
    out = []
    for i in range(8):
        path = tmp_path / f"img_{i}.png"
        Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(path)
        out.append(Source(str(path), f"sha{i}", "ab"[i % 2]))
    return out


def test_the_same_seed_gives_the_same_picks_and_augmentations(sources):
    first = augment_preview(sources, policy="basic", n=4, size=32, seed=3)
    again = augment_preview(sources, policy="basic", n=4, size=32, seed=3)
    other = augment_preview(sources, policy="basic", n=4, size=32, seed=4)
    assert len(first.picks) == 4 and first.picks == again.picks
    assert first.originals.shape == first.augmented.shape == (4, 32, 32, 3)
    assert first.augmented.dtype == np.uint8
    assert np.array_equal(first.augmented, again.augmented)
    assert not np.array_equal(first.augmented, first.originals)  # the basic policy crops and flips
    assert not np.array_equal(other.augmented, first.augmented)


def test_no_policy_leaves_the_images_as_decoded_and_n_is_capped(sources):
    preview = augment_preview(sources, policy="none", n=50, size=32)
    assert len(preview.picks) == len(sources)
    assert np.array_equal(preview.augmented, preview.originals)
    assert preview_policy("none") is None and preview_policy("auto") == preview_policy("basic")


def test_panels_pair_each_original_with_its_augmented_version(sources):
    preview = augment_preview(sources, policy="basic", n=2, size=32)
    panels, titles = preview.panels()
    assert len(panels) == 4 and np.array_equal(panels[0], preview.originals[0])
    assert np.array_equal(panels[1], preview.augmented[0]) and panels[1].flags.c_contiguous
    label = preview.picks[0].label
    assert titles[:2] == [label, f"{label} (basic)"]


def test_a_patch_policy_shows_the_patches_the_network_gets(sources):
    """thin-section trains on patches: the augmented column holds patches resized to the input size."""
    assert preview_policy("thin-section").preprocess["patches"]["enabled"]
    preview = augment_preview(sources, policy="thin-section", n=3, size=16, seed=0)
    assert preview.originals.shape == preview.augmented.shape == (3, 16, 16, 3)
    assert preview.nearly_uniform == []


def test_blank_images_are_flagged_as_nearly_uniform(tmp_path, sources):
    black = tmp_path / "black.png"
    Image.fromarray(np.zeros((40, 48, 3), dtype=np.uint8)).save(black)
    preview = augment_preview([Source(str(black), "black", "a"), sources[0]], policy="none", n=2, size=32)
    assert preview.nearly_uniform == [str(black)]


def test_an_unknown_policy_or_no_images_is_a_clear_error(sources):
    with pytest.raises(InputError, match=r"unknown augmentation preset 'nope'; presets: .*thin-section"):
        augment_preview(sources, policy="nope")
    with pytest.raises(InputError, match="no images to preview"):
        augment_preview([], policy="basic")
