import pytest

from handlens.core.errors import NotFoundError
from handlens.core.registry import Registry


def test_registry_lists_sorted_names_and_gets_entries():
    reg: Registry[int] = Registry("thing")
    reg.register("b", 2)
    reg.decorator("a")(1)
    assert reg.names() == ["a", "b"]
    assert reg.get("b") == 2
    assert "a" in reg and "z" not in reg
    assert len(reg) == 2


def test_unknown_name_lists_the_known_ones():
    reg: Registry[int] = Registry("backbone")
    reg.register("resnet18", 1)
    with pytest.raises(NotFoundError, match=r"unknown backbone 'vgg'; choose one of: resnet18"):
        reg.get("vgg")


def test_double_registration_is_refused():
    reg: Registry[int] = Registry("thing")
    reg.register("a", 1)
    with pytest.raises(ValueError, match="twice"):
        reg.register("a", 2)
