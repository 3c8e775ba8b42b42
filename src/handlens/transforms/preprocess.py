"""Deterministic preprocessing: any image a user has -> a uint8 RGB array of the model's input size.

Kept as uint8 (not float) until the last moment: a quarter of the memory in caches, and
augmentation runs on uint8 batches. Normalisation happens on the batch, on the way into the model.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    import numpy as np

ResizeMode = Literal["shorter-crop", "stretch", "letterbox"]
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Preprocess:
    """How an image becomes a model input. Saved in every bundle so inference matches training.

    ``resize``: ``shorter-crop`` scales the shorter side to ``size`` and centre-crops (no distortion),
    ``stretch`` scales both sides to ``size``, ``letterbox`` fits the image inside and pads.
    """

    size: int = 224
    resize: ResizeMode = "shorter-crop"
    interpolation: Literal["bicubic", "bilinear", "nearest"] = "bicubic"
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["mean"], data["std"] = list(self.mean), list(self.std)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Preprocess:
        values = dict(data)
        values["mean"], values["std"] = tuple(values["mean"]), tuple(values["std"])
        return cls(**values)

    def key(self) -> str:
        """A short hash of what changes the decoded pixels (not mean/std): the decode-cache key."""
        relevant = {"size": self.size, "resize": self.resize, "interpolation": self.interpolation,
                    "extra": self.extra, "v": 1}
        return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:16]


def load_rgb(source: Any) -> Any:
    """Open a path, PIL image or array as an 8-bit RGB PIL image.

    16-bit images are scaled over their full range (65535 -> 255) rather than clipped at 255, which is
    what a plain ``convert("L")`` would do to an X-ray; palette and alpha images are flattened; CMYK
    is converted.
    """
    import numpy as np
    from PIL import Image

    if isinstance(source, (str, Path)):
        with Image.open(source) as opened:
            opened.load()
            img = opened.copy() if opened.mode != "P" else opened.convert("RGBA")
    elif isinstance(source, np.ndarray):
        img = Image.fromarray(_array_to_uint8(source))
    elif isinstance(source, Image.Image):
        img = source
    else:
        raise TypeError(f"cannot read an image from {type(source).__name__}; give a path, PIL image or array")
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        img = Image.fromarray(_array_to_uint8(np.asarray(img)))
    if img.mode == "P":
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA"):
        background = Image.new("RGB", img.size, (0, 0, 0))
        background.paste(img.convert("RGBA"), mask=img.convert("RGBA").getchannel("A"))
        return background
    return img.convert("RGB") if img.mode != "RGB" else img


def _array_to_uint8(array: np.ndarray) -> np.ndarray:
    import numpy as np

    if array.dtype == np.uint8:
        return array
    if array.dtype == np.uint16 or (np.issubdtype(array.dtype, np.integer) and array.max(initial=0) > 255):
        return (array.astype(np.float32) / 257.0).round().clip(0, 255).astype(np.uint8)
    if np.issubdtype(array.dtype, np.floating):
        scale = 255.0 if array.max(initial=0) <= 1.0 else 1.0
        return (array * scale).round().clip(0, 255).astype(np.uint8)
    return array.clip(0, 255).astype(np.uint8)


def preprocess_image(source: Any, preprocess: Preprocess) -> np.ndarray:
    """Decode and resize one image to a (size, size, 3) uint8 array."""
    import numpy as np
    from PIL import Image

    img = load_rgb(source)
    size = preprocess.size
    resample = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR, "nearest": Image.NEAREST}[
        preprocess.interpolation]
    w, h = img.size
    if preprocess.resize == "stretch":
        out = img.resize((size, size), resample)
    elif preprocess.resize == "letterbox":
        scale = size / max(w, h)
        inner = img.resize((max(1, round(w * scale)), max(1, round(h * scale))), resample)
        out = Image.new("RGB", (size, size), (0, 0, 0))
        out.paste(inner, ((size - inner.width) // 2, (size - inner.height) // 2))
    else:
        scale = size / min(w, h)
        nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
        # reducing_gap: decode-time downscaling for big images, a large speed-up at no visible cost
        resized = img.resize((nw, nh), resample, reducing_gap=3.0 if scale < 0.5 else None)
        left, top = (nw - size) // 2, (nh - size) // 2
        out = resized.crop((left, top, left + size, top + size))
    return np.array(out, dtype=np.uint8)  # writable: torch.from_numpy needs it


def normalize_batch(batch: Any, mean: tuple[float, ...], std: tuple[float, ...]) -> Any:
    """(N, 3, H, W) uint8 tensor -> float tensor normalised with mean/std (both in 0..1 units)."""
    import torch

    mean_t = torch.tensor(mean, dtype=torch.float32, device=batch.device).view(1, -1, 1, 1) * 255.0
    std_t = torch.tensor(std, dtype=torch.float32, device=batch.device).view(1, -1, 1, 1) * 255.0
    return (batch.float() - mean_t) / std_t
