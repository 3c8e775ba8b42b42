"""Fixtures of the models tests."""

import pytest
import torch

from handlens.models.backbones import BACKBONES
from handlens.models.bundle import save_bundle
from handlens.models.classifier import create_classifier


@pytest.fixture
def write_bundle():
    """``write_bundle(directory, **manifest_overrides)`` -> a saved 3-class tiny_cnn bundle at ``directory``."""

    def write(directory, **overrides):
        torch.manual_seed(0)
        model = create_classifier("tiny_cnn", 3, freeze="full", head="linear")
        manifest = {"backbone": "tiny_cnn", "classes": ["brick", "grass", "gravel"], "freeze": "full",
                    "head": {"type": "linear", "hidden": 16, "dropout": 0.0},
                    "preprocess": BACKBONES.get("tiny_cnn").preprocess().to_dict(), "metrics": {"val_macro_f1": 0.5},
                    **overrides}
        return save_bundle(directory, model.eval(), manifest)

    return write
