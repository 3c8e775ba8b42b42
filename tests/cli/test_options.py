"""Shared flag handling (cli/options.py): --param key=value parsing and registry-fed choices."""

import pytest

from handlens.cli.options import backbone_names, check_choice, explainer_names, parse_params, tracking_names
from handlens.core.errors import InputError


def test_params_are_key_value_pairs_read_as_yaml_scalars():
    assert parse_params(["steps=50", "baseline=blur", "stride=0.5", "flag=true", "expr=a=b"]) == {
        "steps": 50, "baseline": "blur", "stride": 0.5, "flag": True, "expr": "a=b"}
    assert parse_params(None) == {} and parse_params([]) == {}
    with pytest.raises(InputError, match=r"--param 'steps': write key=value, e.g. --param steps=50"):
        parse_params(["steps"])


def test_choices_come_from_the_registries_and_a_typo_lists_them():
    assert "tiny_cnn" in backbone_names() and "none" in tracking_names() and "gradcam" in explainer_names()
    check_choice("--backbone", "tiny_cnn", backbone_names())
    check_choice("--backbone", None, backbone_names())  # not given: the config's default applies
    with pytest.raises(InputError, match=r"--method 'magic': choose one of .*gradcam"):
        check_choice("--method", "magic", explainer_names())
