"""CLI contract of the data commands (cli/data.py): import, datasets, stats, split, demo; one JSON document
with --json, clear errors."""

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from handlens.cli.app import app
from tests.conftest import write_image

runner = CliRunner()


def invoke(ws: Path, *args: str):
    return runner.invoke(app, ["--workspace", str(ws), *args])


def test_import_stats_split_datasets_as_json(make_tree, tmp_path):
    root = make_tree({"limestone": 12, "dolomite": 8})
    (root / "dolomite" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    ws = tmp_path / "ws"

    result = invoke(ws, "import", str(root), "--dataset", "rocks", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["added"] == 20
    assert report["skipped"][0]["reason"] == "corrupt_or_truncated"
    assert report["skipped_by_reason"] == {"corrupt_or_truncated": 1}

    stats = json.loads(invoke(ws, "stats", "rocks", "--json").stdout)
    assert stats["classes"]["limestone"]["count"] == 12
    assert stats["imbalance_ratio"] == 1.5

    split = json.loads(invoke(ws, "split", "rocks", "--ratios", "0.5,0.25,0.25", "--seed", "3", "--json").stdout)
    assert split["counts"]["0"]["train"] == {"dolomite": 4, "limestone": 6}
    assert split["leakage"] == []

    listing = json.loads(invoke(ws, "datasets", "--json").stdout)
    assert listing[0]["name"] == "rocks" and listing[0]["images"] == 20 and listing[0]["splits"] == ["split1"]
    assert (ws / "handlens.db").is_file()


def test_human_output_is_readable(make_tree, tmp_path):
    root = make_tree({"a": 6, "b": 6})
    ws = tmp_path / "ws"
    out = invoke(ws, "import", str(root), "--dataset", "d").stdout
    assert "12 added" in out
    again = invoke(ws, "import", str(root), "--dataset", "d").stdout
    assert "Nothing new: all 12 images" in again
    stats = invoke(ws, "stats", "d").stdout
    assert "class" in stats and "imbalance ratio 1.00:1" in stats
    split = invoke(ws, "split", "d", "--ratios", "0.5,0.5").stdout
    assert "Split 'split1'" in split and "Leakage check: no identical image" in split


def test_csv_import_with_labelsets_and_group_split(tmp_path):
    root = tmp_path / "data"
    rows = ["path,label,labelset,group"]
    for i in range(24):
        write_image(root / f"s{i}.png", i + 1)
        rows.append(f"s{i}.png,{'a' if i % 2 else 'b'},dunham,core{i // 4}")
        rows.append(f"s{i}.png,{'x' if i < 12 else 'y'},lucia,core{i // 4}")
    (root / "m.csv").write_text("\n".join(rows))
    ws = tmp_path / "ws"
    result = invoke(ws, "import", str(root), "--csv", str(root / "m.csv"), "--dataset", "d", "--json")
    assert json.loads(result.stdout)["class_counts"]["lucia"] == {"x": 12, "y": 12}
    ambiguous = invoke(ws, "stats", "d")
    assert ambiguous.exit_code == 2 and "choose one with --labelset" in ambiguous.output
    split = invoke(ws, "split", "d", "--labelset", "lucia", "--group-by", "group", "--ratios", "0.5,0.5",
                   "--json")
    assert split.exit_code == 0, split.output
    assert json.loads(split.stdout)["labelset"] == "lucia"


def test_kfold_and_min_max_flags(make_tree, tmp_path):
    root = make_tree({"a": 20, "b": 20})
    ws = tmp_path / "ws"
    invoke(ws, "import", str(root), "--dataset", "d")
    result = invoke(ws, "split", "d", "--folds", "4", "--ratios", "0.8,0,0.2", "--max-per-class", "12",
                    "--min-per-class", "2", "--name", "cv", "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert len(summary["counts"]) == 4 and summary["excluded_by_max_per_class"] == 16
    assert summary["params"]["folds"] == 4


def test_errors_are_one_line_with_a_fix_and_an_exit_code(make_tree, tmp_path):
    ws = tmp_path / "ws"
    missing = invoke(ws, "stats", "nope")
    assert missing.exit_code == 3 and "no dataset named 'nope'" in missing.output
    assert "Traceback" not in missing.output
    root = make_tree({"common": 30, "rare": 2})
    invoke(ws, "import", str(root), "--dataset", "d")
    refused = invoke(ws, "split", "d", "--ratios", "0.8,0.1,0.1")
    assert refused.exit_code == 2 and "class 'rare'" in refused.output
    bad = invoke(ws, "split", "d", "--ratios", "0.8,0.1")
    assert bad.exit_code == 2 and "sums to 0.9" in bad.output


def test_demo_builds_imports_splits_trains_and_predicts(tmp_path):
    result = invoke(tmp_path / "ws", "demo", "--json", "--epochs", "5")
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["import"]["added"] == 180 and out["import"]["skipped"] == []
    assert set(out["stats"]["classes"]) == {"brick", "grass", "gravel"}
    assert out["split"]["params"]["group_by"] == "group" and out["split"]["leakage"] == []
    # real ImageNet features separate these textures: a frozen backbone gets them nearly all right
    assert out["evaluate"]["n"] == 39 and out["evaluate"]["macro_f1"] >= 0.9
    assert len(out["predictions"]) == 2 and Path(out["train"]["bundle"]).is_dir()
    again = json.loads(invoke(tmp_path / "ws", "demo", "--json", "--no-train").stdout)
    assert again["import"]["nothing_new"] and again["split"]["name"] == "demo" and "train" not in again


@pytest.mark.parametrize("args", [["import", "--help"], ["split", "--help"]])
def test_contract_flags_are_documented(args):
    out = runner.invoke(app, args).stdout
    flags = {"import": ["--dataset", "--labelset", "--csv", "--json", "--allow-outside"],
             "split": ["--ratios", "--group-by", "--folds", "--seed", "--name", "--min-per-class",
                       "--max-per-class"]}[args[0]]
    for flag in flags:
        assert flag in out
