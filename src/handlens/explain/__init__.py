"""Explanations: where the model looks (CAM family, Captum attributions), computed apart from drawing."""

from handlens.explain.api import ExplainableBundle, explain, load_bundle
from handlens.explain.base import Explanation
from handlens.explain.registry import EXPLAINERS

__all__ = ["EXPLAINERS", "ExplainableBundle", "Explanation", "explain", "load_bundle"]
