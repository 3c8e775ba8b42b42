"""Writing explanations to disk: overlays (PNG), raw maps (.npy) and an index JSON."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from handlens.explain.render import grid, overlay
from handlens.transforms.preprocess import preprocess_image


def write_explanations(bundle: Any, files: list[str], out: Path, method: str, layer: str | None, target: str,
                       opacity: float = 0.5, params: dict[str, Any] | None = None,
                       batch_size: int = 8) -> dict[str, Any]:
    """Explain ``files`` in batches and write ``<stem>.<method>.png`` / ``.npy`` plus ``index.json``."""
    from PIL import Image

    out.mkdir(parents=True, exist_ok=True)
    entries: list[dict[str, Any]] = []
    timings: list[dict[str, float]] = []
    used_layer = None
    for start in range(0, len(files), batch_size):
        chunk = files[start:start + batch_size]
        result = bundle.explain(chunk, method=method, layer=layer, target=target, **(params or {}))
        used_layer = result.layer
        timings.append(result.timings)
        for i, path in enumerate(chunk):
            stem = f"{Path(path).stem}.{method}"
            picture = preprocess_image(path, bundle.preprocess)
            predicted = int(result.probabilities[i].argmax())
            chosen = result.targets[i] if result.targets is not None else predicted
            np.save(out / f"{stem}.npy", result.maps[i].astype(np.float32))
            Image.fromarray(overlay(picture, result.map_for(i, chosen), opacity, result.signed)).save(
                out / f"{stem}.png")
            entry = {"image": str(path), "overlay": str(out / f"{stem}.png"), "map": str(out / f"{stem}.npy"),
                     "target": bundle.classes[chosen], "predicted": bundle.classes[predicted],
                     "probability": float(result.probabilities[i, chosen]),
                     "probabilities": dict(zip(bundle.classes, map(float, result.probabilities[i]), strict=True))}
            if result.maps.ndim == 4:  # all classes: one panel per class side by side
                panels = [overlay(picture, result.maps[i, c], opacity, result.signed)
                          for c in range(len(bundle.classes))]
                grid(panels, bundle.classes).save(out / f"{stem}.all.png")
                entry["all_classes"] = str(out / f"{stem}.all.png")
            if "convergence_delta" in result.extras:
                entry["convergence_delta"] = result.extras["convergence_delta"][i]
            entries.append(entry)
    index = {"bundle": str(bundle.path), "method": method, "layer": used_layer, "target": target,
             "params": params or {}, "images": entries, "index": str(out / "index.json"),
             "seconds": round(sum(t.get("total", 0.0) for t in timings), 4)}
    (out / "index.json").write_text(json.dumps(index, indent=1))
    return index
