"""Backbones, classifiers, freezing, weight sources and model bundles (the inference path: no Lightning)."""
