import pytest

from handlens.data.importer import import_path
from handlens.data.queries import LabelledImage, find_dataset, find_labelset
from handlens.data.stats import dataset_stats, size_shortcut


def _img(i: int, label: str, w: int, h: int) -> LabelledImage:
    return LabelledImage(i, f"/x/{i}.png", f"{i:064x}", w, h, None, label)


def test_counts_shares_imbalance_and_sizes(make_tree, catalog):
    root = make_tree({"big": 9, "small": 3}, sizes={"big": (64, 48), "small": (32, 32)})
    import_path(catalog, root, "ds")
    with catalog.session() as session:
        ds = find_dataset(session, "ds")
        stats = dataset_stats(session, ds, find_labelset(session, ds, None))
    assert stats["images"] == 12
    assert stats["classes"]["big"]["count"] == 9 and stats["classes"]["big"]["share"] == 0.75
    assert stats["imbalance_ratio"] == 3.0
    assert stats["classes"]["small"]["width"] == {"min": 32, "median": 32, "max": 32}
    joined = " ".join(stats["warnings"])
    assert "imbalanced" in joined
    assert "image size alone identifies it" in joined  # each class has its own size: a shortcut


def test_no_shortcut_warning_when_sizes_are_shared(make_tree, catalog):
    root = make_tree({"a": 5, "b": 5})
    import_path(catalog, root, "ds")
    with catalog.session() as session:
        ds = find_dataset(session, "ds")
        stats = dataset_stats(session, ds, find_labelset(session, ds, None))
    assert stats["warnings"] == []
    assert stats["size_shortcut"]["size_only_accuracy"] == stats["size_shortcut"]["majority_baseline"]


def test_size_a_class_never_has_is_flagged():
    """Like the lithology set: class0 is never 224x224 while most of the others are."""
    images = [_img(i, "class0", 500, 380) for i in range(40)]
    images += [_img(100 + i, "class1", 224 if i < 30 else 500, 224 if i < 30 else 380) for i in range(40)]
    images += [_img(200 + i, "class2", 224 if i < 30 else 500, 224 if i < 30 else 380) for i in range(40)]
    shortcut = size_shortcut(images)
    assert shortcut["per_class"]["class0"]["others_with_sizes_never_seen"] == 0.75
    assert shortcut["per_class"]["class0"]["sizes_never_seen"] == ["224x224"]
    assert shortcut["per_class"]["class1"]["others_with_sizes_never_seen"] == 0.0


def test_duplicates_and_conflicts_show_in_stats(make_tree, catalog):
    import shutil

    root = make_tree({"a": 3, "b": 3})
    shutil.copy(root / "a" / "img_000.png", root / "b" / "same.png")
    import_path(catalog, root, "ds")
    with catalog.session() as session:
        ds = find_dataset(session, "ds")
        stats = dataset_stats(session, ds, find_labelset(session, ds, None))
    assert len(stats["duplicates"]) == 1 and len(stats["label_conflicts"]) == 1
    assert any("--group-by hash" in w for w in stats["warnings"])


def _stats(catalog, root):
    import_path(catalog, root, "ds", workers=1)
    with catalog.session() as session:
        ds = find_dataset(session, "ds")
        return dataset_stats(session, ds, find_labelset(session, ds, None))


def test_a_class_that_alone_is_grey_png_is_a_mode_and_format_shortcut(tmp_path, catalog):
    from tests.conftest import write_image

    for i in range(6):
        write_image(tmp_path / "t" / "xray" / f"a{i}.png", i, mode="L")
        write_image(tmp_path / "t" / "photo" / f"b{i}.jpg", 100 + i, fmt="JPEG")
        write_image(tmp_path / "t" / "scan" / f"c{i}.jpg", 200 + i, fmt="JPEG")
    stats = _stats(catalog, tmp_path / "t")
    assert stats["classes"]["xray"]["modes"] == {"L": 6} and stats["classes"]["photo"]["formats"] == {"JPEG": 6}
    assert stats["mode_shortcut"]["verdict"] == "shortcut: class 'xray' alone has mode L (6 of its 6 images)"
    assert stats["format_shortcut"]["verdict"] == "shortcut: class 'xray' alone has format PNG (6 of its 6 images)"
    assert [f["class"] for f in stats["mode_shortcut"]["findings"]] == ["xray"]  # not the mirror image too
    joined = " ".join(stats["warnings"])
    assert "class 'xray' alone has mode L" in joined and "JPEG compression" in joined


def test_grey_pictures_stored_as_rgb_are_no_mode_shortcut_against_grey_files(tmp_path, catalog):
    """X-rays of one class saved as L, of the other as RGB with R = G = B: the stored modes differ, the pixels
    training sees do not. A colour class against an L class stays a shortcut."""
    from PIL import Image

    from tests.conftest import write_image

    for i in range(6):
        write_image(tmp_path / "t" / "normal" / f"a{i}.png", i, mode="L")
        grey = write_image(tmp_path / "t" / "effusion" / f"b{i}.png", 100 + i, mode="L")
        with Image.open(grey) as img:
            img.convert("RGB").save(grey)
    stats = _stats(catalog, tmp_path / "t")
    assert stats["classes"]["effusion"]["modes"] == {"RGB": 6}  # as stored
    found = stats["mode_shortcut"]
    assert found["verdict"] == ("no shortcut: the RGB files of class(es) 'effusion' (6 of 6 sampled) hold grey "
                                "pictures (R = G = B), which look as the L files do once training converts every "
                                "file to RGB")
    assert found["findings"] == [] and not any("mode" in w for w in stats["warnings"])
    for i in range(6):  # colour pictures in a third class: RGB is its own again
        write_image(tmp_path / "t" / "photo" / f"c{i}.png", 200 + i)
    import_path(catalog, tmp_path / "t", "colour", workers=1)
    with catalog.session() as session:
        ds = find_dataset(session, "colour")
        again = dataset_stats(session, ds, find_labelset(session, ds, None))["mode_shortcut"]
    assert again["verdict"].startswith("shortcut: class 'photo' alone has mode RGB"), again["verdict"]
    assert "counted as L" in again["verdict"]


def test_shared_modes_and_formats_are_no_shortcut(make_tree, catalog):
    stats = _stats(catalog, make_tree({"a": 4, "b": 4}))
    assert stats["mode_shortcut"]["verdict"] == "no shortcut: every image has mode RGB"
    assert stats["format_shortcut"]["verdict"] == "no shortcut: every image has format PNG"


def test_a_format_a_class_never_has_is_flagged():
    from collections import Counter

    from handlens.data.stats import attribute_shortcut

    found = attribute_shortcut({"a": Counter({"PNG": 10}), "b": Counter({"JPEG": 6, "PNG": 4}),
                                "c": Counter({"JPEG": 6, "PNG": 4})}, "format")
    assert found["verdict"] == ("shortcut: class 'a' never has format JPEG, which 12 of the other classes' 20 "
                                "images have")
    two = attribute_shortcut({"a": Counter({"L": 5}), "b": Counter({"RGB": 5})}, "mode")
    assert two["verdict"] == "shortcut: each class has its own mode (a: L, b: RGB)" and two["each_class_own"]
    mixed = attribute_shortcut({"a": Counter({"RGB": 10, "L": 1}), "b": Counter({"RGB": 10})}, "mode")
    assert mixed["verdict"].startswith("no shortcut") and mixed["findings"] == []


def _names(names, labels=None):
    labels = labels or ["a", "b"] * len(names)
    return [LabelledImage(i, f"/d/{labels[i]}/{n}", f"{i:064x}", 32, 32, None, labels[i]) for i, n in enumerate(names)]


@pytest.mark.parametrize(("names", "regex", "example_id"), [
    ([f"patient{p:03d}_slice{s}.png" for p in range(12) for s in range(3)], "^([^_]+)_", "patient000"),
    ([f"S{p}-{s:02d}.tif" for p in range(12) for s in range(1, 4)], "^([^-]+)-", "S0"),
    ([f"H1_{s}a_{k}.jpg" for s in range(20, 30) for k in range(2 + s % 3)]
     + [f"H2_{s}b_{k}.jpg" for s in range(20, 25) for k in range(2)], "^([^_]+_[^_]+)_", "H1_20a"),
])
def test_file_names_with_sample_ids_are_recognised(names, regex, example_id):
    from handlens.data.splits import groups_from_names
    from handlens.data.stats import filename_ids

    found = filename_ids(_names(names))
    assert found["suggested_regex"] == regex
    assert found["levels"][0]["example"]["id"] == example_id
    assert found["verdict"].startswith("file names look like <id>") and f"--group-regex '{regex}'" in found["verdict"]
    # the suggestion works as --group-regex: every name matches, and gives the same ids
    groups = {img.group for img in groups_from_names(_names(names), regex)}
    assert len(groups) == found["levels"][0]["ids"]


def test_file_names_with_sample_ids_and_a_coarser_prefix_list_both():
    from handlens.data.stats import filename_ids

    names = [f"H{h}_{s}a_{k}.jpg" for h in range(1, 5) for s in range(10) for k in range(3)]
    found = filename_ids(_names(names))
    assert [level["regex"] for level in found["levels"]] == ["^([^_]+)_", "^([^_]+_[^_]+)_"]
    assert "5 ids" not in found["verdict"] and "4 ids with 30 images each" in found["verdict"]
    assert "finer ids too (40 ids" in found["verdict"]


@pytest.mark.parametrize(("names", "labels", "says"), [
    ([f"img_{i:03d}.png" for i in range(40)], None, "they share one prefix ('img')"),
    ([f"{c}_{i:02d}.png" for c in ("red", "green") for i in range(20)], ["red"] * 20 + ["green"] * 20,
     "one prefix per class (green, red)"),
    ([f"tr_img_{c}_{i:03d}.png" for c in ("covid", "normal") for i in range(20)], ["covid"] * 20 + ["normal"] * 20,
     "one prefix per class (tr_img_covid, tr_img_normal)"),
    ([f"{i:04d}.png" for i in range(40)], None, "no leading part"),
    ([f"IMG{i:04d}.png" for i in range(40)], None, "no leading part"),
])
def test_names_without_sample_ids_are_not_reported_as_ids(names, labels, says):
    from handlens.data.stats import filename_ids

    found = filename_ids(_names(names, labels))
    assert found["suggested_regex"] is None and found["levels"] == []
    assert found["verdict"].startswith("no ids in file names") and says in found["verdict"]


def test_stats_warns_about_file_name_ids_only_without_groups(tmp_path, catalog):
    from tests.conftest import write_image

    for p in range(6):
        for s in range(2):
            write_image(tmp_path / "t" / ("a" if p < 3 else "b") / f"P{p}_{s}.png", p * 10 + s)
    stats = _stats(catalog, tmp_path / "t")
    assert stats["filename_ids"]["suggested_regex"] == "^([^_]+)_"
    assert any("--group-regex '^([^_]+)_'" in w for w in stats["warnings"])
