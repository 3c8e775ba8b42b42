"""Drawing a pipeline result (apart from computing it): the per-box maps blended inside their crops, each box
outlined with its label and score, and the files ``detect run --out`` writes."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np

#: outline colours: the classifier's classes cycle through these; boxes without a class label are white
PALETTE = ((255, 215, 0), (0, 200, 255), (255, 80, 160), (120, 255, 120), (255, 140, 0), (180, 120, 255))


def box_colour(label: str | None, classes: list[str]) -> tuple[int, int, int]:
    if label is None or label not in classes:
        return (255, 255, 255)
    return PALETTE[classes.index(label) % len(PALETTE)]


def draw_result(picture: np.ndarray, result: Any, *, opacity: float = 0.5) -> np.ndarray:
    """(H, W, 3) uint8: the image, each crop's map blended inside that crop (the rest left as it is), and
    every box outlined with ``label score``."""
    from PIL import Image, ImageDraw

    from handlens.explain.render import overlay

    canvas = picture.copy()
    if result.heatmap is not None:
        for box in result.boxes:
            x0, y0, x1, y1 = box.crop
            local = result.heatmap[y0:y1, x0:x1]
            if local.size and box.map_peak:  # a flat map is not drawn as if it were cold everywhere
                canvas[y0:y1, x0:x1] = overlay(picture[y0:y1, x0:x1], local, opacity, result.signed)
    image = Image.fromarray(canvas)
    draw = ImageDraw.Draw(image)
    classes = sorted({b.label for b in result.boxes if b.label is not None})
    width = max(2, round(max(result.size) / 600))
    font = _font(max(11, round(max(result.size) / 80)))
    for box in result.boxes:
        colour = box_colour(box.label, classes)
        draw.rectangle([round(v) for v in box.box], outline=colour, width=width)
        text = f"{box.label or box.detected} {box.score:.2f}" + (" flat map" if box.map_peak == 0 else "")
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
        x, y = box.box[0], max(0.0, box.box[1] - (bottom - top) - 2 * width)
        draw.rectangle([x, y, x + right - left + 2 * width, y + bottom - top + 2 * width], fill=(0, 0, 0))
        draw.text((x + width - left, y + width - top), text, fill=colour, font=font)
    return np.asarray(image)


def _font(size: int) -> Any:
    """Pillow's own font at ``size`` pixels (a scalable one where Pillow has FreeType), never a system file."""
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # an old Pillow or one without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def _stem(path: Any) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", Path(str(path)).stem) or "image"


def write_image_outputs(result: Any, source: Any, out: Path) -> dict[str, str]:
    """``<out>/<stem>.overlay.png``, ``<out>/<stem>/box_NN.png`` (each crop with its margin) and, with a map,
    ``<out>/<stem>.map.npy`` (float16); returns the paths written, relative to ``out``."""
    from PIL import Image

    from handlens.transforms.preprocess import load_rgb

    picture = np.asarray(load_rgb(source))
    stem = _stem(source)
    out.mkdir(parents=True, exist_ok=True)
    files = {"overlay": f"{stem}.overlay.png"}
    Image.fromarray(draw_result(picture, result)).save(out / files["overlay"])
    if result.boxes:
        (out / stem).mkdir(exist_ok=True)
        for number, box in enumerate(result.boxes):
            x0, y0, x1, y1 = box.crop
            Image.fromarray(np.ascontiguousarray(picture[y0:y1, x0:x1])).save(out / stem / f"box_{number:02d}.png")
        files["crops"] = stem
    if result.heatmap is not None:
        files["map"] = f"{stem}.map.npy"
        np.save(out / files["map"], result.heatmap.astype(np.float16))
    return files
