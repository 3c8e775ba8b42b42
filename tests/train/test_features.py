"""The per-image feature store: any subset of known images runs no backbone pass; damage is recomputed."""

import hashlib

import pytest
import torch

import handlens.train.features as features
from handlens.models.classifier import create_classifier
from handlens.train.features import feature_rows, store_key
from handlens.transforms.preprocess import Preprocess


@pytest.fixture
def setup(tmp_path):
    torch.manual_seed(0)
    model = create_classifier("tiny_cnn", 2, weights="none", freeze="frozen")
    images = torch.randint(0, 255, (8, 3, 32, 32), dtype=torch.uint8)
    shas = [hashlib.sha256(bytes([i])).hexdigest() for i in range(8)]
    normalize = Preprocess(size=32).normalize_batch
    parts = {"backbone": "tiny_cnn", "weights": "none", "preprocess": "k", "pool": "avg"}

    def rows(index, views=0, cache=tmp_path, **kwargs):
        index = list(index)
        return feature_rows(model, images[index], [shas[i] for i in index], key_parts=parts, cache_dir=cache,
                            normalize=normalize, views=views, **kwargs)

    return rows, tmp_path, parts


def counted(call):
    passes, images = features.FEATURE_PASSES, features.FEATURE_IMAGES
    out = call()
    return out, features.FEATURE_PASSES - passes, features.FEATURE_IMAGES - images


def test_a_new_subset_of_known_images_runs_no_backbone_pass(setup):
    rows, _, _ = setup
    first, passes, images = counted(lambda: rows(range(0, 5)))
    assert first.shape == (5, 32) and passes == 1 and images == 5
    more, passes, images = counted(lambda: rows([3, 4, 5, 6]))
    assert images == 2 and torch.equal(more[:2], first[3:5])  # only 5 and 6 were computed
    fold, passes, images = counted(lambda: rows([6, 0, 4, 4]))
    assert passes == 0 and images == 0
    assert torch.equal(fold[1], first[0]) and torch.equal(fold[2], fold[3]) and torch.equal(fold[0], more[3])


def test_a_damaged_store_is_recomputed(setup):
    rows, cache, parts = setup
    first = rows(range(4))
    path = cache / "features" / f"rows-{store_key(parts, 0)}.safetensors"
    assert path.is_file()
    path.write_bytes(b"not a safetensors file")
    features._STORES.clear()
    again, _, images = counted(lambda: rows(range(4)))
    assert images == 4
    torch.testing.assert_close(again, first)
    assert counted(lambda: rows(range(4)))[2] == 0  # rewritten whole


def test_views_are_seeded_per_image_so_grouping_never_changes_them(setup):
    rows, _, _ = setup
    together = rows(range(6), views=2, cache=None)
    apart = torch.cat([rows([i], views=2, cache=None) for i in (0, 1, 2, 3, 4, 5)])
    assert together.shape == (6, 2, 32)
    torch.testing.assert_close(together, apart, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(together[:, 0], together[:, 1])  # two different views
    plain = rows(range(6), cache=None)
    assert not torch.allclose(together[:, 0], plain)  # augmented, not the plain image


def test_a_long_feature_pass_says_how_far_it_is(capsys):
    model = create_classifier("tiny_cnn", 2, weights="none", freeze="frozen")
    images = torch.zeros((300, 3, 16, 16), dtype=torch.uint8)
    features.compute_features(model, images, lambda batch: batch.float() / 255)
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("backbone features:")]
    assert len(lines) == 4 and lines[-1].startswith("backbone features: 300/300 images")
    features.compute_features(model, images[:20], lambda batch: batch.float() / 255)
    assert "backbone features" not in capsys.readouterr().err  # a short pass stays quiet
