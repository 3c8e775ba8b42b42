"""Drawing explanations (kept apart from computing them): colormap overlays, signed maps, grids."""

from __future__ import annotations

from typing import Any

import numpy as np

# A perceptually ordered blue -> cyan -> yellow -> red ramp (like 'jet', without the dark ends).
_STOPS = np.array([[0.0, 0.0, 0.6], [0.0, 0.4, 1.0], [0.0, 0.9, 0.9], [1.0, 1.0, 0.0], [1.0, 0.5, 0.0],
                   [0.85, 0.0, 0.0]])


def colormap(values: np.ndarray) -> np.ndarray:
    """Values in [0, 1] -> (…, 3) uint8 colours."""
    v = np.clip(values, 0.0, 1.0) * (len(_STOPS) - 1)
    low = np.floor(v).astype(int).clip(0, len(_STOPS) - 2)
    frac = (v - low)[..., None]
    rgb = _STOPS[low] * (1 - frac) + _STOPS[low + 1] * frac
    return (rgb * 255).round().astype(np.uint8)


def normalise(heatmap: np.ndarray, signed: bool = False, percentile: float = 99.5) -> np.ndarray:
    """Unsigned maps -> [0, 1] by a high percentile (one hot pixel does not wash the rest out);
    signed maps -> [-1, 1] by the same percentile of |value|."""
    m = np.asarray(heatmap, dtype=np.float32)
    scale = float(np.percentile(np.abs(m), percentile)) if m.size else 0.0
    if scale <= 0:
        return np.zeros_like(m)
    return np.clip(m / scale, -1.0 if signed else 0.0, 1.0)


def _resize(heatmap: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    from PIL import Image

    if heatmap.shape == (size[1], size[0]):
        return heatmap
    return np.asarray(Image.fromarray(heatmap.astype(np.float32), mode="F").resize(size, Image.BILINEAR))


def overlay(image: np.ndarray, heatmap: np.ndarray, opacity: float = 0.5, signed: bool = False, *,
            unseen: np.ndarray | None = None) -> np.ndarray:
    """Blend a map over an (H, W, 3) uint8 image. Signed maps: green for positive, red for negative evidence,
    each as strong as its magnitude; unsigned maps use the colour ramp. ``unseen`` (an (H, W) boolean mask:
    the part of the image the model never saw, e.g. outside its centre crop) is hatched grey rather than
    tinted as if the map were cold there."""
    h, w = image.shape[:2]
    values = normalise(_resize(heatmap, (w, h)), signed)
    base = image.astype(np.float32)
    if signed:
        colour = np.zeros_like(base)
        colour[..., 1] = 255.0 * (values > 0)
        colour[..., 0] = 255.0 * (values < 0)
        alpha = opacity * np.abs(values)[..., None]
        out = base * (1 - alpha) + colour * alpha
    else:
        out = base * (1 - opacity) + colormap(values).astype(np.float32) * opacity
    if unseen is not None and unseen.any():
        rows, cols = np.indices((h, w))
        stripes = ((rows + cols) // 6) % 2 == 0
        grey = base.mean(axis=2, keepdims=True) * 0.5 + 64.0
        hatched = np.where(stripes[..., None], grey * 0.6, grey)
        out = np.where(unseen[..., None], hatched, out)
    return out.round().clip(0, 255).astype(np.uint8)


def grid(panels: list[np.ndarray], titles: list[str] | None = None, columns: int = 4, pad: int = 4) -> Any:
    """Side-by-side panels (each (H, W, 3) uint8, same size) with optional titles -> a PIL image."""
    from PIL import Image, ImageDraw

    if not panels:
        raise ValueError("no panels to draw")
    h, w = panels[0].shape[:2]
    columns = max(1, min(columns, len(panels)))
    rows = (len(panels) + columns - 1) // columns
    title_h = 14 if titles else 0
    canvas = Image.new("RGB", (columns * (w + pad) + pad, rows * (h + pad + title_h) + pad), "white")
    draw = ImageDraw.Draw(canvas)
    for index, panel in enumerate(panels):
        row, col = divmod(index, columns)
        x, y = pad + col * (w + pad), pad + row * (h + pad + title_h)
        if titles:
            draw.text((x, y), titles[index][: max(4, w // 6)], fill="black")
        canvas.paste(Image.fromarray(panel), (x, y + title_h))
    return canvas
