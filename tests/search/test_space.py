"""Search spaces: parsed from YAML, checked against the run config before any trial runs."""

from __future__ import annotations

import pytest

from handlens.core.errors import InputError
from handlens.search.space import PRESETS, load_space, parse_space


def test_presets_parse_and_quick_is_frozen_only() -> None:
    for name in PRESETS:
        space = load_space(preset=name)
        assert space.params
    quick = load_space(preset="quick")
    assert quick.fixed["model.freeze"] == "frozen"
    assert "model.freeze" not in quick.keys
    thorough = load_space(preset="thorough")
    freezes = next(p for p in thorough.params if p.key == "model.freeze").choices
    assert {"frozen", "full"} <= set(freezes) and any(str(f).startswith("partial") for f in freezes)


def test_distributions_and_grid() -> None:
    space = parse_space({"space": {"model.pool": ["avg", "texture"], "train.epochs": {"int": [2, 6], "step": 2},
                                   "train.lr": {"float": [1e-4, 1e-2], "log": True}}})
    kinds = {p.key: p.kind for p in space.params}
    assert kinds == {"model.pool": "categorical", "train.epochs": "int", "train.lr": "float"}
    with pytest.raises(InputError, match=r"train\.lr.*grid"):
        space.grid()
    grid = parse_space({"space": {"model.pool": ["avg", "texture"], "train.epochs": {"int": [2, 6], "step": 2}}})
    assert grid.grid_size() == 6
    assert {"model.pool": "texture", "train.epochs": 4} in grid.grid()
    assert len({tuple(sorted(p.items())) for p in grid.grid()}) == 6


def test_unknown_key_is_one_error_with_did_you_mean() -> None:
    with pytest.raises(InputError, match=r"train\.lrr.*did you mean train\.lr"):
        parse_space({"space": {"train.lrr": [0.1, 0.01]}})
    with pytest.raises(InputError, match=r"modle.*not a section"):
        parse_space({"space": {"modle.pool": ["avg"]}})
    with pytest.raises(InputError, match=r"write a run-config key as section\.key"):
        parse_space({"space": {"lr": [0.1]}})


def test_bad_values_and_distributions_are_refused() -> None:
    with pytest.raises(InputError, match=r"model\.pool.*'max'"):
        parse_space({"space": {"model.pool": ["avg", "max"]}})
    with pytest.raises(InputError, match=r"log range needs low > 0"):
        parse_space({"space": {"train.lr": {"float": [0, 1], "log": True}}})
    with pytest.raises(InputError, match=r"low 5 must be below high 1"):
        parse_space({"space": {"train.epochs": {"int": [5, 1]}}})
    with pytest.raises(InputError, match=r"unknown field\(s\) lg"):
        parse_space({"space": {"train.lr": {"float": [1e-4, 1e-2], "lg": True}}})
    with pytest.raises(InputError, match=r"train\.epochs.*greater than or equal to 1"):
        parse_space({"space": {"train.epochs": {"int": [0, 4]}}})
    with pytest.raises(InputError, match=r"both searched and fixed"):
        parse_space({"space": {"train.lr": [0.1]}, "fixed": {"train.lr": 0.2}})
    with pytest.raises(InputError, match=r"non-empty 'space:'"):
        parse_space({"fixed": {"train.lr": 0.2}})
    with pytest.raises(InputError, match=r"freeze"):
        parse_space({"space": {"model.freeze": ["frozen", "parital:2"]}})
    with pytest.raises(InputError, match=r"step 20 is wider than the range \[5, 15\], so only 5 would be tried"):
        parse_space({"space": {"train.epochs": {"int": [5, 15], "step": 20}}})
    with pytest.raises(InputError, match=r"unknown section\(s\) 'spcae' \(did you mean 'space'\?\)"):
        parse_space({"spcae": {"train.lr": [0.1]}})


def test_space_file(tmp_path) -> None:
    path = tmp_path / "space.yaml"
    path.write_text("space:\n  model.pool: [avg, texture]\nfixed:\n  train.epochs: 3\n")
    space = load_space(path)
    assert space.keys == ["model.pool"] and space.fixed == {"train.epochs": 3}
    with pytest.raises(InputError, match="cannot read search space"):
        load_space(tmp_path / "missing.yaml")
    with pytest.raises(InputError, match="--preset 'fast'"):
        load_space(preset="fast")
