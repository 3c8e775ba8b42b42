"""explain_image: one image explained as the model sees images, whole or in patches, its map over the image."""

import numpy as np
import pytest

from handlens.core.errors import InputError
from handlens.explain.api import load_bundle
from handlens.explain.image import explain_image, trust_image
from handlens.train.run import train
from tests.conftest import tiny_config

PATCHES = ["preprocess.patches.enabled=true", "preprocess.patches.size=16", "preprocess.patches.max_side=0",
           "preprocess.size=16"]


@pytest.mark.parametrize("overrides,seen_as", [((), "whole image"), (PATCHES, "patches")])
def test_whole_image_and_patch_models_are_explained_as_they_see_images(trained_workspace, overrides, seen_as):
    bundle = load_bundle(train(tiny_config(*overrides), trained_workspace).bundle)
    picture = np.random.default_rng(0).integers(0, 255, (32, 48, 3), dtype=np.uint8)
    explained = explain_image(bundle, picture, method="gradcam")
    assert explained.seen_as == seen_as and explained.heatmap.shape == (32, 48)
    assert explained.probabilities.sum() == pytest.approx(1, abs=1e-3) and explained.layer
    if seen_as == "whole image":
        assert explained.model_map.shape == (bundle.preprocess.size, bundle.preprocess.size)
    with pytest.raises(InputError, match="layers are"):
        explain_image(bundle, picture, method="gradcam", layer="nope")
    with pytest.raises(InputError, match="use pred or one of"):
        explain_image(bundle, picture, method="gradcam", target="purple")


def test_maps_are_placed_back_where_the_preprocessing_took_them():
    from handlens.explain.image import heat_on_image
    from handlens.transforms.preprocess import Preprocess

    heat = np.ones((32, 32), dtype=np.float32)
    cropped = heat_on_image(heat, 40, 80, Preprocess(size=32, resize="shorter-crop"))  # 40x80 -> centre 40x40
    assert cropped.shape == (40, 80) and cropped[:, 20:60].min() > 0.99 and cropped[:, :19].max() == 0
    assert heat_on_image(heat, 40, 80, Preprocess(size=32, resize="stretch")).min() > 0.99
    padded = heat.copy()
    padded[:8], padded[24:] = 0, 0  # letterbox: the 80x40 image fills rows 8..24 of the input
    boxed = heat_on_image(padded, 40, 80, Preprocess(size=32, resize="letterbox"))
    assert boxed.shape == (40, 80) and boxed.min() > 0.99



def test_one_images_trust_is_its_map_against_a_random_map(trained_workspace):
    bundle = load_bundle(train(tiny_config(), trained_workspace).bundle)
    picture = np.random.default_rng(1).integers(0, 255, (40, 40, 3), dtype=np.uint8)
    measured = trust_image(bundle, picture, method="gradcam", steps=6)
    assert measured.verdict in ("faithful", "not better than random", "worse than random")
    assert measured.sentence().startswith(f"{measured.verdict} · deletion {measured.deletion_auc:.2f} vs random")
    patch_bundle = load_bundle(train(tiny_config(*PATCHES), trained_workspace).bundle)
    with pytest.raises(InputError, match="grid patches"):
        trust_image(patch_bundle, picture, method="gradcam")


def test_the_part_of_the_image_outside_a_centre_crop_is_marked_unseen_and_hatched():
    import numpy as np

    from handlens.explain.image import unseen_on_image
    from handlens.explain.render import overlay
    from handlens.transforms.preprocess import Preprocess

    crop = Preprocess(size=32, resize="shorter-crop")
    unseen = unseen_on_image(40, 80, crop)  # a 2:1 image: a quarter on each side is cut
    assert unseen is not None and unseen[:, :18].all() and unseen[:, 62:].all() and not unseen[:, 22:58].any()
    assert unseen_on_image(40, 80, Preprocess(size=32, resize="letterbox")) is None
    assert unseen_on_image(40, 40, crop) is None
    picture = np.full((40, 80, 3), 200, dtype=np.uint8)
    drawn = overlay(picture, np.zeros((32, 32)), 0.5, unseen=unseen)
    cold = overlay(picture, np.zeros((32, 32)), 0.5)
    assert (drawn[:, 30:50] == cold[:, 30:50]).all()  # inside the crop: the map as it is
    assert (drawn[:, :10, 2] != cold[:, :10, 2]).any() and drawn[:, :10].std(axis=2).max() < 1  # grey, not blue


def test_a_model_with_its_own_threshold_roi_counts_energy_off_the_specimen(trained_workspace):
    """No expert region, but the model was trained with a threshold ROI: its shortcut shares use that rule."""
    import numpy as np

    from handlens.explain.api import load_bundle
    from handlens.explain.image import explain_image, own_roi
    from handlens.train.run import train
    from tests.conftest import tiny_config

    patches = ["preprocess.patches.enabled=true", "preprocess.patches.size=24", "preprocess.patches.max_side=0",
               "preprocess.patches.per_image=3", "preprocess.patches.grid_max=4", "preprocess.size=24",
               "preprocess.roi.source=threshold", "preprocess.patches.min_roi=0.3"]
    bundle = load_bundle(train(tiny_config(*patches), trained_workspace).bundle)
    picture = np.zeros((48, 48, 3), dtype=np.uint8)
    picture[:, :24] = np.random.default_rng(0).integers(150, 255, (48, 24, 3))  # a bright specimen, left
    mask = own_roi(bundle, picture)
    assert mask is not None and mask[:, :24].mean() > 0.9 and mask[:, 30:].mean() < 0.1
    explained = explain_image(bundle, picture, method="gradcam", max_tiles=64)
    assert explained.shortcuts.verdict == "empty map" or explained.shortcuts.outside_roi is not None
