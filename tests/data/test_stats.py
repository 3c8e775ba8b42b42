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
