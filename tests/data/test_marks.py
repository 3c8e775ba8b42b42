"""Burned-in marks: a bar at a fixed place in one class is found; texture and a mark on every class are told apart."""

import numpy as np

from handlens.data.marks import GRID, contrasted, find_marks, marks_verdict


def noisy(rng, size=(80, 120)):
    return rng.uniform(90, 160, (*size, 3)).astype(np.uint8)


def with_bar(image, top=0.04, left=0.05):
    out = image.copy()
    h, w = out.shape[:2]
    out[int(top * h):int(top * h) + 3, int(left * w):int(left * w) + w // 3] = 255  # top-left, thin and long
    return out


def test_a_bar_on_one_class_is_a_shortcut_mark_in_its_corner():
    rng = np.random.default_rng(0)
    images = [("a", with_bar(noisy(rng))) for _ in range(15)] + [("b", noisy(rng)) for _ in range(15)]
    marks, regions = find_marks(images)
    assert [m.label for m in marks] == ["a"] and marks[0].shortcut and marks[0].where == "top-left corner"
    assert marks[0].in_class == 1.0 and marks[0].in_others == 0.0
    assert regions["a"].shape == (GRID, GRID) and regions["a"][:GRID // 5, :GRID // 5].any()
    assert marks_verdict(marks).startswith("shortcut: burned-in mark on one class: class 'a'")


def test_a_mark_on_every_class_is_not_a_shortcut_and_plain_texture_is_no_mark():
    rng = np.random.default_rng(1)
    both = [(label, with_bar(noisy(rng))) for label in ("a", "b") for _ in range(10)]
    marks, _ = find_marks(both)
    assert {m.label for m in marks} == {"a", "b"} and not any(m.shortcut for m in marks)
    assert marks_verdict(marks).startswith("burned-in mark, not a shortcut by itself")
    harsh = [(label, rng.choice([0, 255], (90, 90)).astype(np.uint8)) for label in ("a", "b")
             for _ in range(8)]  # contrast everywhere, so nowhere in particular
    plain = [(label, noisy(rng)) for label in ("a", "b") for _ in range(10)]
    assert find_marks(plain)[0] == [] and find_marks(harsh)[0] == []
    assert marks_verdict([]).startswith("no burned-in mark")


def test_contrast_survives_a_thin_line_in_a_large_image():
    big = np.full((1200, 1600), 128, dtype=np.uint8)
    big[1100:1104, 1200:1500] = 255  # a 4 px scale bar in a 1600 px image
    found = contrasted(big)
    assert found[int(1102 / 1200 * GRID), int(1350 / 1600 * GRID)]
    assert found.sum() < 0.05 * GRID * GRID


def test_a_mark_on_a_minority_of_a_class_among_texture_is_found_where_it_is():
    """As on real thin sections: a scale bar on ~14% of one class (and a few of the others), in one corner,
    among grain texture that is contrasted here and there in every image."""
    rng = np.random.default_rng(2)

    def grains():
        image = noisy(rng, (90, 120))
        for _ in range(6):  # a few sharp grains at random places
            y, x = rng.integers(0, 80), rng.integers(0, 110)
            image[y:y + 8, x:x + 8] = rng.choice([20, 240])
        return image

    def bottom_right_bar(image):
        out = image.copy()
        out[80:83, 80:115] = 255
        return out

    images = [("a", bottom_right_bar(grains()) if i < 7 else grains()) for i in range(50)]
    images += [("b", bottom_right_bar(grains()) if i < 2 else grains()) for i in range(50)]
    marks, _ = find_marks(images)
    found = [m for m in marks if m.label == "a"]
    assert found and found[0].where == "bottom-right corner", marks
    assert abs(found[0].in_class - 0.14) < 0.05 and found[0].in_others < 0.1 and not found[0].shortcut
    assert all(m.where == "bottom-right corner" for m in marks)  # the grains make no mark


def test_a_16_bit_image_is_scaled_over_its_range_not_clipped_white(tmp_path):
    from PIL import Image

    from handlens.data.leaks import frame_dhash
    from handlens.data.marks import grid_image

    ramp = (np.linspace(0, 40000, 256)[None, :] * np.ones((256, 1))).astype(np.uint16)
    ramp[230:236, 150:250] = 65535  # a bright scale bar in an X-ray
    Image.fromarray(ramp).save(tmp_path / "xray.png")  # a 16-bit PNG
    small = grid_image(str(tmp_path / "xray.png"))
    assert small.min() < 10 and 140 < small.max() <= 255 and small.std() > 20  # not all 255
    assert contrasted(small).any() and frame_dhash(str(tmp_path / "xray.png")) is not None
