import numpy as np
import pytest
import torch
from PIL import Image

from handlens.transforms.augment import basic_policy
from handlens.transforms.cache import decode_many
from handlens.transforms.engine import apply_policy
from handlens.transforms.preprocess import Preprocess, input_placement, load_rgb, normalize_batch, preprocess_image


@pytest.mark.parametrize("mode", ["shorter-crop", "stretch", "letterbox"])
def test_every_resize_mode_gives_the_input_size(mode):
    array = np.random.default_rng(0).integers(0, 255, (30, 80, 3), dtype=np.uint8)
    out = preprocess_image(array, Preprocess(size=48, resize=mode))
    assert out.shape == (48, 48, 3) and out.dtype == np.uint8 and out.flags.writeable


def test_letterbox_pads_and_shorter_crop_does_not():
    array = np.full((20, 80, 3), 255, dtype=np.uint8)
    assert preprocess_image(array, Preprocess(size=40, resize="letterbox"))[0, 20].tolist() == [0, 0, 0]
    assert preprocess_image(array, Preprocess(size=40, resize="shorter-crop")).min() > 200


def test_sixteen_bit_is_scaled_not_clipped():
    """A 16-bit X-ray whose values lie above 255 must not come out all white."""
    ramp = np.linspace(1000, 60000, 64 * 64).reshape(64, 64).astype(np.uint16)
    rgb = np.asarray(load_rgb(Image.fromarray(ramp)))
    assert rgb.shape == (64, 64, 3)
    assert rgb.min() < 10 and rgb.max() > 230 and len(np.unique(rgb)) > 100


def test_alpha_and_palette_become_rgb():
    rgba = Image.new("RGBA", (10, 10), (255, 0, 0, 0))
    assert load_rgb(rgba).getpixel((0, 0)) == (0, 0, 0)  # transparent -> black background
    assert load_rgb(Image.new("P", (10, 10))).mode == "RGB"


def test_normalize_batch_matches_the_formula():
    batch = torch.full((1, 3, 2, 2), 255, dtype=torch.uint8)
    out = normalize_batch(batch, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    assert torch.allclose(out, torch.full_like(out, 2.0))


@pytest.mark.parametrize("mode", ["backbone", "unit", "minmax", "percentile"])
def test_normalizing_in_place_gives_the_same_and_spares_integer_batches(mode):
    pixels = torch.randint(0, 256, (3, 3, 8, 8), dtype=torch.uint8)
    expected = normalize_batch(pixels, (0.4, 0.5, 0.6), (0.2, 0.25, 0.3), mode)
    owned = pixels.float()
    out = normalize_batch(owned, (0.4, 0.5, 0.6), (0.2, 0.25, 0.3), mode, in_place=True)
    assert out.data_ptr() == owned.data_ptr() and torch.allclose(out, expected, atol=1e-5)
    copy = pixels.float()
    normalize_batch(copy, (0.4, 0.5, 0.6), (0.2, 0.25, 0.3), mode)  # not in place: the caller's batch stays
    assert torch.equal(copy, pixels.float())
    kept = pixels.clone()
    normalize_batch(kept, (0.4, 0.5, 0.6), (0.2, 0.25, 0.3), mode, in_place=True)  # uint8 cannot hold it
    assert torch.equal(kept, pixels)


def test_augment_keeps_shape_and_varies_samples():
    torch.manual_seed(0)
    batch = torch.arange(2 * 3 * 16 * 16, dtype=torch.int64).reshape(2, 3, 16, 16).remainder(256).to(torch.uint8)
    batch = batch.repeat(8, 1, 1, 1)
    out = apply_policy(batch, basic_policy(hflip=True, vflip=True, crop_scale=0.5))
    assert out.shape == batch.shape and out.dtype == torch.uint8
    assert len({bytes(out[i].numpy()) for i in range(0, 16, 2)}) > 1  # per-sample randomness
    assert apply_policy(batch, None) is batch


def test_decode_cache_is_reused_and_keyed_by_preprocessing(tmp_path):
    from tests.conftest import write_image

    paths = [str(write_image(tmp_path / f"{i}.png", i, (50, 40))) for i in range(3)]
    shas = [f"{i:064x}" for i in range(3)]
    first = decode_many(paths, Preprocess(size=24), sha256s=shas, cache_dir=tmp_path / "cache", workers=1)
    for p in paths:  # the files are gone: the second call must come from the cache
        (tmp_path / p).unlink()
    again = decode_many(paths, Preprocess(size=24), sha256s=shas, cache_dir=tmp_path / "cache", workers=1)
    assert np.array_equal(first, again)
    assert Preprocess(size=24).key() != Preprocess(size=32).key()
    assert Preprocess(size=24).key() != Preprocess(size=24, resize="stretch").key()
    assert Preprocess(size=24).key() == Preprocess(size=24, mean=(0, 0, 0)).key()  # mean/std act later


@pytest.mark.parametrize("mode", ["shorter-crop", "stretch", "letterbox"])
def test_input_placement_says_where_preprocessing_puts_the_image(mode):
    image = np.full((30, 60, 3), 255, dtype=np.uint8)
    out = preprocess_image(image, Preprocess(size=20, resize=mode, interpolation="nearest"))
    placement = input_placement(60, 30, Preprocess(size=20, resize=mode))
    (rw, rh), (x, y) = placement.resized, placement.offset
    expected = np.zeros((20, 20), dtype=bool)
    expected[max(0, y):min(20, y + rh), max(0, x):min(20, x + rw)] = True
    assert np.array_equal(out[..., 0] > 127, expected)
    assert (mode != "letterbox") or expected.sum() == 20 * 10  # a 2:1 image fills half of the padded square
