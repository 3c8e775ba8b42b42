"""Normalisation modes give their documented ranges; morphology steps do what their names say;
the decode cache is keyed by every pixel-changing parameter and stays within its bounds."""

import numpy as np
import pytest
import torch

from handlens.core.errors import InputError
from handlens.transforms.cache import DecodedCache, decode_many, working_key
from handlens.transforms.morphology import apply_morphology, check_steps, threshold_mask
from handlens.transforms.preprocess import NORMALIZE_RANGES, Preprocess, normalize_batch, preprocess_image


def batch(seed: int = 0, n: int = 4) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    out = torch.randint(40, 180, (n, 3, 32, 32), generator=generator, dtype=torch.uint8)
    out[1] //= 4  # a dark image beside bright ones
    return out


def test_every_mode_is_documented():
    assert set(NORMALIZE_RANGES) == {"backbone", "unit", "minmax", "percentile", "dataset"}


def test_unit_is_divide_by_255():
    x = batch()
    assert torch.allclose(normalize_batch(x, (0.5,) * 3, (0.5,) * 3, "unit"), x.float() / 255)


def test_minmax_spans_exactly_zero_to_one_per_image():
    out = normalize_batch(batch(), (0.5,) * 3, (0.5,) * 3, "minmax")
    flat = out.flatten(1)
    assert torch.allclose(flat.amin(1), torch.zeros(4)) and torch.allclose(flat.amax(1), torch.ones(4))
    flat_image = torch.full((1, 3, 8, 8), 77, dtype=torch.uint8)
    assert torch.equal(normalize_batch(flat_image, (0.5,) * 3, (0.5,) * 3, "minmax"), torch.zeros(1, 3, 8, 8))


def test_percentile_clipping_ignores_a_few_saturated_pixels():
    x = batch()
    x[:, :, 0, 0] = 255  # one hot pixel per image (an X-ray marker)
    x[:, :, 0, 1] = 0
    minmax = normalize_batch(x, (0.5,) * 3, (0.5,) * 3, "minmax")
    clipped = normalize_batch(x, (0.5,) * 3, (0.5,) * 3, "percentile", percentiles=(1.0, 99.0))
    assert clipped.min() >= 0 and clipped.max() <= 1
    flat = clipped.flatten(1)
    assert bool(((flat == 0).float().mean(1) >= 0.005).all()) and bool(((flat == 1).float().mean(1) >= 0.005).all())
    # the hot pixel squeezed min-max into a narrow band; percentile clipping uses the full range
    assert float(clipped[1].std()) > 1.5 * float(minmax[1].std())


def test_backbone_and_dataset_standardise_with_mean_and_std():
    x = batch()
    mean, std = (0.3, 0.4, 0.5), (0.2, 0.1, 0.25)
    out = normalize_batch(x, mean, std, "dataset")
    expected = (x.float() / 255 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    assert torch.allclose(out, expected, atol=1e-5)
    assert torch.allclose(normalize_batch(x, mean, std, "backbone"), out)
    with pytest.raises(ValueError, match="choose one of"):
        normalize_batch(x, mean, std, "zscore")


def test_preprocess_object_normalises_as_configured():
    x = batch()
    assert torch.allclose(Preprocess(normalize="unit").normalize_batch(x), x.float() / 255)
    assert Preprocess(normalize="percentile").affine() == ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    restored = Preprocess.from_dict(Preprocess(normalize="percentile", clip_percentiles=(2.0, 98.0)).to_dict())
    assert restored.normalize == "percentile" and restored.clip_percentiles == (2.0, 98.0)


def square(size: int = 40, side: int = 20) -> np.ndarray:
    image = np.zeros((size, size, 3), dtype=np.uint8)
    start = (size - side) // 2
    image[start:start + side, start:start + side] = 200
    return image


def test_threshold_otsu_fixed_and_inverted():
    image = square()
    image[0, 0] = 90  # below Otsu's level between 0 and 200, above a fixed 50
    assert threshold_mask(image, "otsu").sum() == 400
    assert threshold_mask(image, "fixed", 50).sum() == 401
    assert threshold_mask(image, "otsu", invert=True).sum() == 40 * 40 - 400
    assert threshold_mask(np.full((8, 8, 3), 5, np.uint8)).all()  # flat: no threshold, all foreground


def test_morphology_operators_shrink_grow_and_clean():
    image = square()
    eroded = apply_morphology(image, [{"op": "erosion", "radius": 2}])
    dilated = apply_morphology(image, [{"op": "dilation", "radius": 2}])
    assert (eroded[..., 0] > 0).sum() == 16 * 16 and (dilated[..., 0] > 0).sum() > 400
    speckled = square()
    speckled[2, 2] = 200  # a speck: opening removes it
    speckled[20, 20] = 0  # a pinhole: closing fills it
    opened = apply_morphology(speckled, [{"op": "threshold"}, {"op": "opening", "radius": 1}])
    closed = apply_morphology(speckled, [{"op": "threshold"}, {"op": "closing", "radius": 1}])
    assert opened[2, 2, 0] == 0 and closed[20, 20, 0] == 255
    assert set(np.unique(opened)) <= {0, 255} and opened.shape == (40, 40, 3) and opened.dtype == np.uint8


def test_morphology_runs_inside_preprocessing(tmp_path):
    from PIL import Image

    path = tmp_path / "square.png"
    Image.fromarray(square()).save(path)
    plain = preprocess_image(path, Preprocess(size=40, resize="stretch"))
    binary = preprocess_image(path, Preprocess(size=40, resize="stretch", morphology=[{"op": "threshold"}]))
    assert set(np.unique(binary)) == {0, 255} and not np.array_equal(plain, binary)


def test_bad_morphology_steps_are_clear_errors():
    with pytest.raises(InputError, match="one of threshold, erosion"):
        check_steps([{"op": "skeleton"}])
    with pytest.raises(InputError, match="radius must be a whole number"):
        check_steps([{"op": "opening", "radius": 0}])
    with pytest.raises(InputError, match="unknown key"):
        check_steps([{"op": "closing", "radius": 2, "shape": "square"}])
    with pytest.raises(InputError, match=r"value: 0\.\.255"):
        check_steps([{"op": "threshold", "method": "fixed"}])


def test_the_cache_key_changes_with_every_pixel_parameter():
    base = Preprocess()
    variants = [Preprocess(size=256), Preprocess(resize="stretch"), Preprocess(interpolation="bilinear"),
                Preprocess(morphology=[{"op": "erosion", "radius": 1}]),
                Preprocess(morphology=[{"op": "erosion", "radius": 2}])]
    keys = {base.key(), *(v.key() for v in variants)}
    assert len(keys) == 1 + len(variants)
    # normalisation does not change decoded pixels (same decode key) but does change the model input
    assert Preprocess(normalize="unit").key() == base.key()
    assert Preprocess(normalize="unit").model_key() != base.model_key()
    assert working_key(1024, []) != working_key(512, []) != working_key(512, [{"op": "threshold"}])


def test_decode_many_uses_the_cache_and_refreshes_on_a_new_key(tmp_path):
    from PIL import Image

    from handlens.transforms import cache as cache_module

    paths = []
    for i in range(3):
        path = tmp_path / f"{i}.png"
        Image.fromarray(np.full((30, 50, 3), 60 * i, np.uint8)).save(path)
        paths.append(str(path))
    shas = ["a" * 64, "b" * 64, "c" * 64]
    first = decode_many(paths, Preprocess(size=16), sha256s=shas, cache_dir=tmp_path / "cache", workers=1)
    store = cache_module.get_cache(tmp_path / "cache")
    before = dict(store.hits)
    again = decode_many(paths, Preprocess(size=16), sha256s=shas, cache_dir=tmp_path / "cache", workers=1)
    assert np.array_equal(first, again) and store.hits["memory"] - before["memory"] == 3
    bigger = decode_many(paths, Preprocess(size=20), sha256s=shas, cache_dir=tmp_path / "cache", workers=1)
    assert bigger.shape == (3, 20, 20, 3)  # a new key: decoded again, not served stale 16-px images
    assert len(list((tmp_path / "cache" / "decoded").glob("*/*/*.npy"))) == 6


def test_memory_and_disk_tiers_stay_within_their_bounds(tmp_path):
    item = np.zeros((32, 32, 3), np.uint8)  # 3,072 bytes
    store = DecodedCache(tmp_path / "decoded", max_memory=3 * item.nbytes, max_disk=5 * (item.nbytes + 128))
    for i in range(10):
        store.put("k", f"{i:064d}", item)
    assert store.memory_bytes <= 3 * item.nbytes
    assert store.get("k", f"{9:064d}") is not None and store.hits["memory"] == 1  # the newest stays in memory
    on_disk = list((tmp_path / "decoded").rglob("*.npy"))
    assert 0 < len(on_disk) <= 5
    assert sum(p.stat().st_size for p in on_disk) <= 5 * (item.nbytes + 128)
    assert store.get("k", f"{0:064d}") is None  # the oldest was evicted from both tiers
