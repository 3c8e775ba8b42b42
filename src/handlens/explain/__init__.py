"""Explanations: where the model looks (CAM family, Captum attributions), computed apart from drawing.

The package's names load lazily, so that CLI help and the registry of method names never import torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from handlens.explain.api import ExplainableBundle, explain, load_bundle
    from handlens.explain.base import Explanation
    from handlens.explain.registry import EXPLAINERS

_LAZY = {"ExplainableBundle": "api", "explain": "api", "load_bundle": "api", "Explanation": "base",
         "EXPLAINERS": "registry"}
__all__ = ["EXPLAINERS", "ExplainableBundle", "Explanation", "explain", "load_bundle"]


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'handlens.explain' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(f"handlens.explain.{_LAZY[name]}"), name)
