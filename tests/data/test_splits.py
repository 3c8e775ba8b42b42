"""Splits: stratified, grouped, k-fold, reproducible, refusing empty classes, reporting leakage."""

from collections import Counter

import pytest

from handlens.core.errors import ConflictError, InputError
from handlens.data.importer import import_path
from handlens.data.queries import LabelledImage
from handlens.data.splits import inverse_frequency_weights, make_split, parse_ratios, plan_split


def _images(counts: dict[str, int], group_size: int | None = None) -> list[LabelledImage]:
    out, i = [], 0
    for label, n in counts.items():
        for k in range(n):
            group = f"{label}-g{k // group_size}" if group_size else None
            out.append(LabelledImage(i, f"/d/{i}.png", f"{i:064x}", 32, 32, group, label))
            i += 1
    return out


def _subset_counts(plan, images, fold=0):
    label = {img.id: img.label for img in images}
    counts: dict[str, Counter] = {}
    for img_id, subset in plan.assignments[fold].items():
        counts.setdefault(subset, Counter())[label[img_id]] += 1
    return counts


def test_parse_ratios():
    assert parse_ratios("0.8,0.1,0.1") == (0.8, 0.1, 0.1)
    assert parse_ratios("0.9,0.1") == (0.9, 0.1, 0.0)
    assert parse_ratios("1,0,0") == (1.0, 0.0, 0.0)
    for bad in ("0.5,0.2", "a,b", "0.5", "0.5,0.5,0,0", "-0.1,1.1", "0,0.5,0.5"):
        with pytest.raises(InputError):
            parse_ratios(bad)


def test_stratified_split_keeps_class_proportions():
    images = _images({"a": 100, "b": 50, "c": 20})
    plan = plan_split(images, (0.8, 0.1, 0.1), seed=1)
    counts = _subset_counts(plan, images)
    assert counts["train"] == Counter({"a": 80, "b": 40, "c": 16})
    assert counts["val"] == Counter({"a": 10, "b": 5, "c": 2})
    assert counts["test"] == Counter({"a": 10, "b": 5, "c": 2})
    assert len(plan.assignments[0]) == 170


def test_same_seed_same_split_other_seed_other_split():
    images = _images({"a": 40, "b": 40})
    one = plan_split(images, (0.7, 0.15, 0.15), seed=7).assignments
    assert one == plan_split(images, (0.7, 0.15, 0.15), seed=7).assignments
    assert one != plan_split(images, (0.7, 0.15, 0.15), seed=8).assignments


def test_zero_share_is_allowed():
    images = _images({"a": 10, "b": 10})
    plan = plan_split(images, (0.8, 0.2, 0.0))
    assert set(plan.assignments[0].values()) == {"train", "val"}
    assert set(plan.counts["0"]) == {"train", "val"}


def test_grouped_split_never_lets_a_group_cross_splits():
    images = _images({"a": 60, "b": 60}, group_size=5)  # 12 groups per class
    plan = plan_split(images, (0.6, 0.2, 0.2), seed=3, group_by="group")
    subsets_of_group: dict[str, set[str]] = {}
    for img in images:
        subsets_of_group.setdefault(img.group, set()).add(plan.assignments[0][img.id])
    assert all(len(s) == 1 for s in subsets_of_group.values())
    counts = _subset_counts(plan, images)
    for label in ("a", "b"):  # whole groups, still close to the shares
        assert counts["train"][label] == pytest.approx(36, abs=5)
        assert counts["val"][label] >= 5 and counts["test"][label] >= 5


def test_group_by_group_needs_groups():
    with pytest.raises(InputError, match="no image has a group"):
        plan_split(_images({"a": 5, "b": 5}), (0.8, 0.2, 0.0), group_by="group")
    with pytest.raises(InputError, match="'group'"):
        plan_split(_images({"a": 5, "b": 5}), (0.8, 0.2, 0.0), group_by="patient")


def test_kfold_each_image_validates_once_and_test_stays_fixed():
    images = _images({"a": 30, "b": 30})
    plan = plan_split(images, (0.8, 0.1, 0.1), seed=2, folds=5)
    assert sorted(plan.assignments) == [0, 1, 2, 3, 4]
    tests = [{i for i, s in a.items() if s == "test"} for a in plan.assignments.values()]
    assert all(t == tests[0] for t in tests) and len(tests[0]) == 6
    val_counts = Counter(i for a in plan.assignments.values() for i, s in a.items() if s == "val")
    assert set(val_counts.values()) == {1} and len(val_counts) == 54
    assert set(plan.class_weights) == {"0", "1", "2", "3", "4"}


def test_grouped_kfold_keeps_groups_together_in_every_fold():
    images = _images({"a": 40, "b": 40}, group_size=4)
    plan = plan_split(images, (0.8, 0.2, 0.0), seed=0, folds=4, group_by="group")
    for assignment in plan.assignments.values():
        by_group: dict[str, set[str]] = {}
        for img in images:
            by_group.setdefault(img.group, set()).add(assignment[img.id])
        assert all(len(s) == 1 for s in by_group.values())


def test_refuses_a_share_that_would_leave_a_class_empty():
    images = _images({"common": 50, "rare": 3})
    with pytest.raises(InputError, match=r"the (val|test) split would hold fewer than 1 image\(s\) of class 'rare'"):
        plan_split(images, (0.8, 0.1, 0.1))
    plan_split(images, (0.4, 0.3, 0.3))  # enough room: fine


def test_min_per_class_is_enforced():
    images = _images({"a": 20, "b": 20})
    plan_split(images, (0.8, 0.1, 0.1), min_per_class=2)
    with pytest.raises(InputError, match="fewer than 3"):
        plan_split(images, (0.8, 0.1, 0.1), min_per_class=3)


def test_max_per_class_caps_each_class():
    images = _images({"a": 100, "b": 10})
    plan = plan_split(images, (0.8, 0.2, 0.0), max_per_class=10, seed=4)
    counts = _subset_counts(plan, images)
    assert counts["train"] + counts["val"] == Counter({"a": 10, "b": 10})
    assert plan.excluded == 90


def test_class_weights_are_inverse_frequency_of_train():
    assert inverse_frequency_weights({"a": 30, "b": 10}) == {"a": pytest.approx(0.666667), "b": 2.0}
    plan = plan_split(_images({"a": 60, "b": 20}), (0.5, 0.5, 0.0))
    assert plan.class_weights["0"] == {"a": pytest.approx(2 / 3, abs=1e-5), "b": 2.0}


def test_identical_images_in_two_splits_are_reported_as_leakage():
    images = _images({"a": 20, "b": 20})
    # give ten images the same content hash: wherever they land, some end up in different splits
    images = [LabelledImage(i.id, i.path, "f" * 64 if i.id % 4 == 0 else i.sha256, 32, 32, None, i.label)
              for i in images]
    plan = plan_split(images, (0.5, 0.5, 0.0), seed=0)
    assert plan.leakage and plan.leakage[0]["sha256"] == "f" * 64
    assert set(plan.leakage[0]["subsets"]) == {"train", "val"}
    grouped = plan_split(images, (0.5, 0.5, 0.0), seed=0, group_by="hash")
    assert grouped.leakage == []


def test_make_split_stores_and_names_splits(make_tree, catalog):
    root = make_tree({"a": 10, "b": 10})
    import_path(catalog, root, "ds")
    first = make_split(catalog, "ds", ratios="0.6,0.2,0.2", seed=1)
    assert first["name"] == "split1"
    assert first["counts"]["0"]["train"] == {"a": 6, "b": 6}
    second = make_split(catalog, "ds", ratios="0.5,0.5", name="half")
    assert second["name"] == "half" and set(second["counts"]["0"]) == {"train", "val"}
    with pytest.raises(ConflictError, match="already has a split named 'half'"):
        make_split(catalog, "ds", ratios="0.5,0.5", name="half")

    from handlens.data.queries import find_dataset, latest_split
    from handlens.data.splits import split_members

    with catalog.session() as session:
        latest = latest_split(session, find_dataset(session, "ds"))
        assert latest.name == "half"
        members = split_members(session, latest.id)
        assert len(members["train"]) == 10 and len(members["val"]) == 10 and members["test"] == []


def _named_tree(root, names_by_class):
    from tests.conftest import write_image

    seed = 0
    for label, names in names_by_class.items():
        for name in names:
            seed += 1
            write_image(root / label / name, seed)
    return root


def test_group_regex_keeps_each_file_name_id_in_one_split(tmp_path, catalog):
    from handlens.data.catalog import Image, SplitAssignment

    names = {"a": [f"P{p:02d}_slice{s}.png" for p in range(0, 10) for s in range(3)],
             "b": [f"P{p:02d}_slice{s}.png" for p in range(10, 20) for s in range(3)]}
    root = _named_tree(tmp_path / "tree", names)
    import_path(catalog, root, "ds", workers=1)
    summary = make_split(catalog, "ds", ratios="0.6,0.2,0.2", seed=3, group_regex=r"^([^_]+)_")
    assert summary["params"]["group_regex"] == r"^([^_]+)_" and summary["params"]["group_by"] == "group"
    assert summary["groups"]["groups"] == 20 and summary["groups"]["source"] == "file names"
    with catalog.session() as session:
        rows = session.execute(select_assignments(Image, SplitAssignment, summary["id"])).all()
        assert all(group is None for _, _, group in rows)  # the catalog's own groups are untouched
    subsets_of_id: dict[str, set[str]] = {}
    for path, subset, _ in rows:
        subsets_of_id.setdefault(path.rsplit("/", 1)[-1].split("_")[0], set()).add(subset)
    assert len(subsets_of_id) == 20 and all(len(s) == 1 for s in subsets_of_id.values())
    assert {s for subsets in subsets_of_id.values() for s in subsets} == {"train", "val", "test"}
    assert summary["leakage"] == []


def select_assignments(Image, SplitAssignment, split_id):
    from sqlalchemy import select

    return (select(Image.path, SplitAssignment.subset, Image.group)
            .join(SplitAssignment, SplitAssignment.image_id == Image.id).where(SplitAssignment.split_id == split_id))


def test_group_regex_refuses_names_it_does_not_match_and_bad_regexes(tmp_path, catalog):
    root = _named_tree(tmp_path / "tree", {"a": ["P1_1.png", "P1_2.png", "odd.png"], "b": ["P2_1.png", "P2_2.png"]})
    import_path(catalog, root, "ds", workers=1)
    with pytest.raises(InputError, match=r"1 of 5 file names \(e.g. odd.png\)"):
        make_split(catalog, "ds", ratios="0.5,0.5", group_regex=r"^([^_]+)_")
    with pytest.raises(InputError, match="not a valid regular expression"):
        make_split(catalog, "ds", ratios="0.5,0.5", group_regex=r"^([^_]+_")
    with pytest.raises(InputError, match="--group-by hash"):
        make_split(catalog, "ds", ratios="0.5,0.5", group_by="hash", group_regex=r"^P\d")
    summary = make_split(catalog, "ds", ratios="1,0", group_regex=r"^(?:P\d|odd)")  # no capture: the whole match
    assert summary["groups"]["groups"] == 3 and summary["groups"]["max_images"] == 2


def test_cli_split_group_regex_says_where_groups_came_from(tmp_path):
    from typer.testing import CliRunner

    from handlens.cli.main import app

    names = {c: [f"{c}{p}_{s}.png" for p in range(4) for s in range(2)] for c in ("a", "b")}
    root = _named_tree(tmp_path / "tree", names)
    ws = ["--workspace", str(tmp_path / "ws")]
    runner = CliRunner()
    assert runner.invoke(app, [*ws, "import", str(root), "--dataset", "ds"]).exit_code == 0
    result = runner.invoke(app, [*ws, "split", "ds", "--ratios", "0.5,0.5", "--group-regex", "^([^_]+)_"])
    assert result.exit_code == 0, result.output
    assert "Grouped from file names by --group-regex '^([^_]+)_': 8 groups of 2-2 images" in result.stdout
