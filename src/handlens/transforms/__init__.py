"""Preprocessing (decode, channel handling, resize, normalise) and augmentation, from a model's data config."""

from handlens.transforms.preprocess import Preprocess, load_rgb, preprocess_image

__all__ = ["Preprocess", "load_rgb", "preprocess_image"]
