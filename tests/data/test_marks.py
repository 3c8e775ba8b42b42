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
    assert marks_verdict(marks).startswith("burned-in mark on every class")
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
