"""Large images as tiles: batched prediction and explanation, stitched back at full resolution.

A thin section of 3000x2000 pixels squeezed into 224x224 loses the grain-scale texture a geologist
reads. Instead the image is covered by a grid of tiles (``tile`` pixels square, ``overlap`` shared
between neighbours), each resized to the model's input. Tiles go through the model ``batch_size``
at a time, so memory is bounded by the batch, not by the image. The image-level prediction is the
mean of the tile probabilities; each tile is then explained for that class, and tile maps and tile
probabilities are stitched into full-resolution maps (cross-faded where tiles overlap: no seams).

A patch-trained model is explained at the scale it learned: tiles of its patch size are cut from its
working image (longer side ``max_side``, morphology applied) and the maps scaled back to the image; its
image-level prediction (and so the class explained) is its own, from its grid patches, as ``predict``
and ``evaluate`` give it.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from handlens.core.errors import InputError
from handlens.explain.registry import ExplainParams
from handlens.transforms.preprocess import load_rgb


def tile_origins(length: int, tile: int, overlap: float) -> list[int]:
    """Start offsets along one axis so that tiles of ``tile`` pixels cover ``length`` with the given overlap."""
    if tile >= length:
        return [0]
    stride = max(1, round(tile * (1 - overlap)))
    origins = list(range(0, length - tile + 1, stride))
    if origins[-1] != length - tile:
        origins.append(length - tile)  # the last tile ends exactly at the edge
    return origins


def cross_fade(tile: int) -> np.ndarray:
    """(tile, tile) weights falling linearly from 1 at the centre to 1/tile at the edges: overlapping tiles
    blend into each other instead of meeting at a seam (each tile's map is normalised on its own)."""
    ramp = np.minimum(np.arange(tile) + 0.5, tile - np.arange(tile) - 0.5) / (tile / 2)
    return np.outer(ramp, ramp).astype(np.float32)


@dataclass
class TiledResult:
    probabilities: np.ndarray  # (C,) image level: mean over tiles (a patch-trained model's own grid prediction)
    tile_probabilities: np.ndarray  # (T, C)
    tiles: list[tuple[int, int]]  # (x, y) origins
    tile_size: int
    target: int
    heatmap: np.ndarray  # (H, W) at full resolution
    probability_map: np.ndarray | None  # (C, H, W) at full resolution, float16 (None when not asked for)
    classes: list[str]
    method: str
    timings: dict[str, float] = field(default_factory=dict)
    layer: str | None = None  # the layer explained (CAM methods)
    signed: bool = False  # attributions with a sign (drawn diverging), not a heatmap

    def summary(self) -> dict[str, Any]:
        return {"label": self.classes[self.target], "probabilities": dict(zip(self.classes,
                                                                             map(float, self.probabilities),
                                                                             strict=True)),
                "tiles": len(self.tiles), "tile_size": self.tile_size, "method": self.method,
                "size": list(self.heatmap.shape[::-1]), "timings": {k: round(v, 3) for k, v in self.timings.items()}}


def _tile_batch(picture: np.ndarray, origins: list[tuple[int, int]], tile: int, size: int, *,
                preprocess: Any) -> torch.Tensor:
    from PIL import Image

    crops = []
    for x, y in origins:
        crop = picture[y:y + tile, x:x + tile]
        if tile != size:
            crop = np.asarray(Image.fromarray(crop).resize((size, size), Image.BICUBIC))
        crops.append(crop)
    batch = torch.from_numpy(np.ascontiguousarray(np.stack(crops))).permute(0, 3, 1, 2)
    return preprocess.normalize_batch(batch)


def _tiled_picture(bundle: Any, original: np.ndarray) -> np.ndarray:
    """What the tiles are cut from: a patch-trained model's working image (its scale and morphology), else the
    image with the bundle's morphology applied."""
    preprocess = bundle.preprocess
    if bundle.patch_tile:
        from handlens.transforms.preprocess import decode_working

        return decode_working(original, preprocess.working_side, preprocess.morphology)
    if preprocess.morphology:
        from handlens.transforms.morphology import apply_morphology

        return apply_morphology(original, preprocess.morphology)
    return original


def tiled_explain(bundle: Any, image: Any, *, tile: int | None = None, overlap: float = 0.25, batch_size: int = 8,
                  method: str = "gradcam", layer: str | None = None, target: Any = "pred",
                  max_tiles: int | None = None, with_probability_map: bool = True,
                  params: Mapping[str, Any] | ExplainParams | None = None, **keywords: Any) -> TiledResult:
    """Predict and explain a large image tile by tile (see the module docstring); more than ``max_tiles``
    tiles is an error (a service's bound on the work one request may ask for). Without
    ``with_probability_map`` the per-class map (C full-resolution planes) is not built, and a patch-trained
    model's tiles are not predicted at all (its image-level prediction comes from its own grid). The
    method's parameters come as in :func:`handlens.explain.api.explain` (``params=`` or keywords)."""
    import torch.nn.functional as F

    from handlens.explain.api import explain, method_params

    if not 0 <= overlap < 1:
        raise InputError("--overlap must be in [0, 1)")
    checked_params = method_params(method, params, keywords)  # a typo fails before any tile is predicted
    preprocess = bundle.preprocess
    original = np.asarray(load_rgb(image))
    picture = _tiled_picture(bundle, original)
    tile = tile or bundle.patch_tile  # a patch-trained model: tiles at the scale it trained on
    height, width = picture.shape[:2]
    size = bundle.preprocess.size
    tile = min(tile or size, height, width)
    origins = [(x, y) for y in tile_origins(height, tile, overlap) for x in tile_origins(width, tile, overlap)]
    if max_tiles is not None and len(origins) > max_tiles:
        raise InputError(f"explaining this {width}x{height} image takes {len(origins)} tiles of {tile} px; the "
                         f"limit is {max_tiles}")
    mean, std = bundle.preprocess.affine()
    timings: dict[str, float] = {}

    started = time.perf_counter()
    probs = [np.zeros((0, len(bundle.classes)), dtype=np.float32)]
    if with_probability_map or not preprocess.patches:
        with torch.inference_mode():
            for start in range(0, len(origins), batch_size):
                batch = _tile_batch(picture, origins[start:start + batch_size], tile, size,
                                    preprocess=bundle.preprocess)
                probs.append(torch.softmax(bundle.module(batch).float(), 1).numpy())
    tile_probs = np.concatenate(probs)
    # a patch-trained model's image-level prediction is its own: its grid, as predict and evaluate give
    image_probs = bundle.predict_working([picture])[0] if preprocess.patches else tile_probs.mean(0)
    timings["predict"] = time.perf_counter() - started
    if target in (None, "pred"):
        chosen = int(image_probs.argmax())
    elif isinstance(target, str) and target in bundle.classes:
        chosen = bundle.classes.index(target)
    else:
        raise InputError(f"target {target!r}: use pred or one of the classes: {', '.join(bundle.classes)}")

    started = time.perf_counter()
    heat = np.zeros((height, width), dtype=np.float32)
    window = cross_fade(tile)
    explained: Any = None
    prob_map = np.zeros((len(bundle.classes), height, width), dtype=np.float32) if with_probability_map else None
    weight = np.zeros((height, width), dtype=np.float32)
    for start in range(0, len(origins), batch_size):
        chunk = origins[start:start + batch_size]
        batch = _tile_batch(picture, chunk, tile, size, preprocess=bundle.preprocess)
        result = explained = explain(bundle.module, batch, bundle.classes, method, layer=layer,
                                     target=[chosen] * len(chunk), mean=mean, std=std, params=checked_params)
        maps = torch.from_numpy(result.maps)[:, None]
        if tile != size:
            maps = F.interpolate(maps, size=(tile, tile), mode="bilinear", align_corners=False)
        for i, (x, y) in enumerate(chunk):
            heat[y:y + tile, x:x + tile] += maps[i, 0].numpy() * window
            if prob_map is not None:
                prob_map[:, y:y + tile, x:x + tile] += tile_probs[start + i][:, None, None] * window
            weight[y:y + tile, x:x + tile] += window
    heat /= weight
    if prob_map is not None:
        prob_map /= weight[None]
    if picture.shape[:2] != original.shape[:2]:  # working image -> the image's own resolution
        full = original.shape[:2]
        heat = F.interpolate(torch.from_numpy(heat)[None, None], size=full, mode="bilinear",
                             align_corners=False)[0, 0].numpy()
        if prob_map is not None:
            prob_map = F.interpolate(torch.from_numpy(prob_map)[None], size=full, mode="bilinear",
                                     align_corners=False)[0].numpy()
        scale = full[1] / width
        origins = [(round(x * scale), round(y * scale)) for x, y in origins]
        tile = round(tile * scale)
    timings["explain"] = time.perf_counter() - started
    return TiledResult(probabilities=image_probs, tile_probabilities=tile_probs, tiles=origins, tile_size=tile,
                       target=chosen, heatmap=heat,
                       probability_map=prob_map.astype(np.float16) if prob_map is not None else None,
                       classes=list(bundle.classes), method=method, timings=timings,
                       layer=explained.layer if explained is not None else layer,
                       signed=bool(explained.signed) if explained is not None else False)
