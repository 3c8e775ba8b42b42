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
NormalizeMode = Literal["backbone", "unit", "minmax", "percentile", "dataset"]
#: what each normalisation mode gives the model (documented, and tested)
NORMALIZE_RANGES = {
    "backbone": "(x - mean) / std with the backbone's ImageNet statistics: about -2.1..2.6",
    "dataset": "(x - mean) / std with the train split's own per-channel statistics: mean 0, std 1 on train",
    "unit": "x / 255: 0..1",
    "minmax": "per image, (x - min) / (max - min): exactly 0..1 (a flat image gives 0)",
    "percentile": "per image, clipped to its low..high percentiles then scaled: 0..1 (X-rays: 1..99)",
}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Preprocess:
    """How an image becomes a model input. Saved in every bundle so inference matches training.

    ``resize``: ``shorter-crop`` scales the shorter side to ``size`` and centre-crops (no distortion),
    ``stretch`` scales both sides to ``size``, ``letterbox`` fits the image inside and pads.
    ``normalize``: see :data:`NORMALIZE_RANGES` (``dataset`` stores the train split's statistics in
    ``mean``/``std``). ``morphology``: steps run on the decoded image (``transforms.morphology``).
    ``patches``: a patch-trained model's patch settings (``transforms.patches.PatchSpec``), or None.
    """

    size: int = 224
    resize: ResizeMode = "shorter-crop"
    interpolation: Literal["bicubic", "bilinear", "nearest"] = "bicubic"
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    normalize: NormalizeMode = "backbone"
    clip_percentiles: tuple[float, float] = (1.0, 99.0)
    morphology: list[dict[str, Any]] = field(default_factory=list)
    patches: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["mean"], data["std"] = list(self.mean), list(self.std)
        data["clip_percentiles"] = list(self.clip_percentiles)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Preprocess:
        values = dict(data)
        values["mean"], values["std"] = tuple(values["mean"]), tuple(values["std"])
        if "clip_percentiles" in values:
            values["clip_percentiles"] = tuple(values["clip_percentiles"])
        return cls(**values)

    def key(self) -> str:
        """A short hash of what changes the decoded pixels (not the normalisation): the decode-cache key."""
        relevant = {"size": self.size, "resize": self.resize, "interpolation": self.interpolation,
                    "morphology": self.morphology, "extra": self.extra, "v": 2}
        return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:16]

    def model_key(self) -> str:
        """A short hash of everything that changes what the model receives (decoding and normalisation)."""
        relevant = {"decoded": self.key(), "normalize": self.normalize, "mean": list(self.mean),
                    "std": list(self.std), "clip": list(self.clip_percentiles)}
        return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:16]

    @property
    def working_side(self) -> int:
        """Longer side of a patch-trained model's working image (0: full resolution)."""
        return int((self.patches or {}).get("max_side", 1024))

    def affine(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """(mean, std) with model input ~ (pixel in 0..1 - mean) / std: what explanation baselines need
        (a black baseline, noise). Exact for standardising modes and ``unit``; for the per-image modes, an
        image's own min/percentiles stretch it further, and 0..1 is the best image-independent guess."""
        if self.normalize in ("backbone", "dataset"):
            return self.mean, self.std
        return (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)

    def normalize_batch(self, batch: Any, in_place: bool = False) -> Any:
        """(N, 3, H, W) uint8 -> the float tensor the model takes, as ``normalize`` says (``in_place``: see
        :func:`normalize_batch`)."""
        return normalize_batch(batch, self.mean, self.std, self.normalize, percentiles=self.clip_percentiles,
                               in_place=in_place)


def load_rgb(source: Any) -> Any:
    """Open a path, PIL image or array as an 8-bit RGB PIL image, upright as a browser shows it.

    The one decode that training, prediction, explanation and the viewer's thumbnails share: an
    EXIF orientation (a phone photo stored on its side) is applied here, so every one of them sees the
    image the way the user does. 16-bit images are scaled over their full range (65535 -> 255) rather
    than clipped at 255, which is what a plain ``convert("L")`` would do to an X-ray; palette and alpha
    images are flattened; CMYK is converted.
    """
    import numpy as np
    from PIL import Image

    if isinstance(source, (str, Path)):
        with Image.open(source) as opened:
            img = _upright(opened, copy=True)
    elif isinstance(source, np.ndarray):
        img = Image.fromarray(_array_to_uint8(source))
    elif isinstance(source, Image.Image):
        img = _upright(source, copy=False)
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


def _upright(img: Any, *, copy: bool) -> Any:
    """``img`` loaded and turned as its EXIF orientation says (tag 0x0112), the tag then dropped; an image
    without one is returned as is, or as a copy when ``copy`` (to outlive its closed file)."""
    from PIL import ImageOps

    img.load()
    try:
        orientation = int(img.getexif().get(0x0112, 1))
    except Exception:  # a broken EXIF block: show the pixels as stored
        orientation = 1
    if orientation == 1:
        return img.copy() if copy else img
    return ImageOps.exif_transpose(img)


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


@dataclass(frozen=True)
class Placement:
    """Where an image lands on the model input: resized to ``resized`` (width, height), its top-left corner
    at ``offset`` (x, y) on the size x size input (negative where a centre crop cuts it, positive where
    letterbox padding surrounds it)."""

    resized: tuple[int, int]
    offset: tuple[int, int]


def input_placement(width: int, height: int, preprocess: Preprocess) -> Placement:
    """The geometry of ``preprocess.resize`` for a width x height image: one definition for
    :func:`preprocess_image` and for whatever maps model-input pixels back onto the image."""
    size = preprocess.size
    if preprocess.resize == "stretch":
        return Placement((size, size), (0, 0))
    if preprocess.resize == "letterbox":
        scale = size / max(width, height)
        inner = (max(1, round(width * scale)), max(1, round(height * scale)))
        return Placement(inner, ((size - inner[0]) // 2, (size - inner[1]) // 2))
    scale = size / min(width, height)
    outer = (max(size, round(width * scale)), max(size, round(height * scale)))
    return Placement(outer, (-((outer[0] - size) // 2), -((outer[1] - size) // 2)))


def preprocess_image(source: Any, preprocess: Preprocess) -> np.ndarray:
    """Decode and resize one image to a (size, size, 3) uint8 array (geometry: :func:`input_placement`)."""
    import numpy as np
    from PIL import Image

    img = load_rgb(source)
    size = preprocess.size
    resample = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR, "nearest": Image.NEAREST}[
        preprocess.interpolation]
    placement = input_placement(img.width, img.height, preprocess)
    (rw, rh), (x, y) = placement.resized, placement.offset
    if preprocess.resize == "stretch":
        out = img.resize((size, size), resample)
    elif preprocess.resize == "letterbox":
        out = Image.new("RGB", (size, size), (0, 0, 0))
        out.paste(img.resize((rw, rh), resample), (x, y))
    else:
        # reducing_gap: decode-time downscaling for big images, a large speed-up at no visible cost
        gap = 3.0 if size / min(img.width, img.height) < 0.5 else None
        out = img.resize((rw, rh), resample, reducing_gap=gap).crop((-x, -y, -x + size, -y + size))
    array = np.array(out, dtype=np.uint8)  # writable: torch.from_numpy needs it
    if preprocess.morphology:
        from handlens.transforms.morphology import apply_morphology

        array = apply_morphology(array, preprocess.morphology)
    return array


def decode_working(source: Any, max_side: int, morphology: list[dict[str, Any]] | None = None) -> np.ndarray:
    """Decode an image for patch sampling: full resolution, or scaled so its longer side is ``max_side``."""
    import numpy as np
    from PIL import Image

    img = load_rgb(source)
    w, h = img.size
    scale = max_side / max(w, h) if max_side else 1.0
    if scale < 1.0:
        img = img.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.BICUBIC,
                         reducing_gap=3.0 if scale < 0.5 else None)
    array = np.array(img, dtype=np.uint8)
    if morphology:
        from handlens.transforms.morphology import apply_morphology

        array = apply_morphology(array, morphology)
    return array


def normalize_batch(batch: Any, mean: tuple[float, ...], std: tuple[float, ...], mode: str = "backbone", *,
                    percentiles: tuple[float, float] = (1.0, 99.0), in_place: bool = False) -> Any:
    """(N, 3, H, W) uint8 (or float 0..255) tensor -> float tensor; ``mode`` as in :data:`NORMALIZE_RANGES`.

    ``backbone``/``dataset`` standardise with ``mean``/``std`` (0..1 units); the per-image modes use
    each image's own statistics over all its pixels and channels, so one bright scan and one dark
    scan end up on the same scale (percentile clipping also ignores a few saturated pixels).
    ``in_place``: a float32 batch the caller owns (the train loader's augmented batch) is overwritten
    instead of copied, one allocation and pass fewer per step; otherwise the caller's batch is untouched.
    """
    import torch

    own = in_place and batch.dtype == torch.float32
    x = batch if own else batch.float()
    if mode == "unit":
        return x.div_(255.0) if own else x / 255.0
    if mode in ("minmax", "percentile"):
        flat = x.flatten(1)
        if mode == "minmax":
            low, high = flat.amin(1), flat.amax(1)
        else:
            q = torch.tensor([percentiles[0] / 100.0, percentiles[1] / 100.0], device=x.device)
            low, high = torch.quantile(flat, q, dim=1)
        low, span = low.view(-1, 1, 1, 1), (high - low).clamp_min(1e-6).view(-1, 1, 1, 1)
        if own:
            return x.sub_(low).div_(span).clamp_(0.0, 1.0)
        return ((x - low) / span).clamp(0.0, 1.0)
    if mode not in ("backbone", "dataset"):
        raise ValueError(f"unknown normalisation {mode!r}; choose one of {', '.join(NORMALIZE_RANGES)}")
    mean_t = torch.tensor(mean, dtype=torch.float32, device=batch.device).view(1, -1, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32, device=batch.device).view(1, -1, 1, 1)
    scale, shift = 1.0 / (std_t * 255.0), -mean_t / std_t  # x / (255 std) - mean / std
    if own:
        return x.mul_(scale).add_(shift)
    return torch.addcmul(shift, x, scale)  # one pass
