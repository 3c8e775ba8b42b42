"""Writing explanations to disk: overlays (PNG), raw maps (.npy) and an index JSON."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from handlens.explain.render import grid, overlay
from handlens.transforms.preprocess import load_rgb, preprocess_image

#: panels in an all-class overlay grid: the most probable classes (a 1,000-class grid helps nobody)
ALL_CLASS_PANELS = 12


def write_explanations(bundle: Any, files: list[str], out: Path, method: str, *, layer: str | None, target: str,
                       opacity: float = 0.5, params: dict[str, Any] | None = None, batch_size: int = 8,
                       resume: bool = False, progress: Any = None) -> dict[str, Any]:
    """Explain ``files`` in batches and write ``<stem>.<method>.png`` / ``.npy`` plus ``index.json``.

    With ``resume``, images whose entries an earlier ``index.json`` in ``out`` already lists (and whose
    maps exist) are kept and not explained again; the index is rewritten after every batch, so a killed
    run loses at most one batch.
    """
    from PIL import Image

    from handlens.explain.api import method_params
    from handlens.explain.shortcuts import model_input_shares

    checked = method_params(method, params)  # a typo fails before anything is written
    out.mkdir(parents=True, exist_ok=True)
    entries: list[dict[str, Any]] = []
    if resume and (out / "index.json").is_file():
        previous = json.loads((out / "index.json").read_text())
        same = (previous.get("bundle"), previous.get("method"), previous.get("requested_layer"),
                previous.get("target"), previous.get("params")) == (str(bundle.path), method, layer, target,
                                                                   params or {})
        if same:  # maps of another model, layer or method are never reused
            entries = [e for e in previous.get("images", []) if Path(e["map"]).is_file() and e["image"] in files]
    done = {e["image"] for e in entries}
    todo = [f for f in files if f not in done]
    timings: list[dict[str, float]] = []
    used_layer = layer
    for start in range(0, len(todo), batch_size):
        chunk = todo[start:start + batch_size]
        result = bundle.explain(chunk, method=method, layer=layer, target=target, params=checked)
        used_layer = result.layer
        timings.append(result.timings)
        for i, path in enumerate(chunk):
            stem = f"{Path(path).stem}.{method}"
            decoded = load_rgb(path)
            picture = preprocess_image(decoded, bundle.preprocess)
            predicted = int(result.probabilities[i].argmax())
            chosen = result.targets[i] if result.targets is not None else predicted
            np.save(out / f"{stem}.npy", result.maps[i].astype(np.float32))
            Image.fromarray(overlay(picture, result.map_for(i, chosen), opacity, result.signed)).save(
                out / f"{stem}.png")
            shares = model_input_shares(result.map_for(i, chosen), width=decoded.width, height=decoded.height,
                                        preprocess=bundle.preprocess)
            entry = {"image": str(path), "overlay": str(out / f"{stem}.png"), "map": str(out / f"{stem}.npy"),
                     "target": bundle.classes[chosen], "predicted": bundle.classes[predicted],
                     "probability": float(result.probabilities[i, chosen]),
                     "probabilities": dict(zip(bundle.classes, map(float, result.probabilities[i]), strict=True)),
                     "shortcuts": shares.to_dict()}
            if result.maps.ndim == 4:  # all classes: the most probable ones side by side (.npy holds all)
                shown = np.argsort(-result.probabilities[i])[:ALL_CLASS_PANELS]
                panels = [overlay(picture, result.maps[i, c], opacity, result.signed) for c in shown]
                grid(panels, [bundle.classes[c] for c in shown]).save(out / f"{stem}.all.png")
                entry["all_classes"] = str(out / f"{stem}.all.png")
            if "convergence_delta" in result.extras:
                entry["convergence_delta"] = result.extras["convergence_delta"][i]
            entries.append(entry)
        _write_index(out, bundle, method, layer=used_layer, target=target, params=params, entries=entries,
                     timings=timings, requested_layer=layer)
        if progress:
            progress(len(done) + start + len(chunk), len(files))
    return _write_index(out, bundle, method, layer=used_layer, target=target, params=params, entries=entries,
                        timings=timings, requested_layer=layer)


def _write_index(out: Path, bundle: Any, method: str, *, layer: str | None, target: str, params: dict[str, Any] | None,
                 entries: list[dict[str, Any]], timings: list[dict[str, float]],
                 requested_layer: str | None = None) -> dict[str, Any]:
    index = {"bundle": str(bundle.path), "method": method, "layer": layer, "requested_layer": requested_layer,
             "target": target,
             "params": params or {}, "images": entries, "index": str(out / "index.json"),
             "seconds": round(sum(t.get("total", 0.0) for t in timings), 4)}
    return _save_index(out, index)


def explain_subset(bundle: Any, catalog: Any, subset: str, out: Path, *, method: str, layer: str | None = None,
                   target: str = "pred", dataset: str | None = None, opacity: float = 0.5,
                   params: dict[str, Any] | None = None, gallery: int = 12, progress: Any = None) -> dict[str, Any]:
    """Explain every image of one subset of the bundle's split; resumable; with a gallery of the top losses."""
    from sqlalchemy import select

    from handlens.core.errors import InputError
    from handlens.data.catalog import Image, Label, Labelset
    from handlens.data.queries import find_dataset

    manifest = bundle.manifest
    ids = manifest.get("split_membership", {}).get(subset)
    if ids is None:
        raise InputError(f"--split {subset!r}: the model's split has subsets "
                         f"{', '.join(manifest.get('split_membership', {}))}")
    if not ids:
        raise InputError(f"the {subset} subset of the model's split is empty")
    with catalog.session() as session:
        ds = find_dataset(session, dataset or manifest["dataset"])
        labelset = session.scalars(select(Labelset).where(Labelset.dataset_id == ds.id,
                                                          Labelset.name == manifest.get("labelset"))).first()
        rows = session.execute(select(Image.id, Image.path).where(Image.id.in_(ids)).order_by(Image.id)).all()
        labels = dict(session.execute(select(Label.image_id, Label.label)
                                      .where(Label.labelset_id == labelset.id)).all()) if labelset else {}
    files = [row.path for row in rows]
    truth = {row.path: labels.get(row.id) for row in rows}
    index = write_explanations(bundle, files, out, method, layer=layer, target=target, opacity=opacity,
                               params=params, resume=True, progress=progress)
    index["gallery"] = _top_loss_gallery(bundle, index["images"], truth, out, method=method, count=gallery)
    return _save_index(out, index)


def _save_index(out: Path, index: dict[str, Any]) -> dict[str, Any]:
    """Write ``index.json`` atomically (temp file, then rename): a killed run never leaves half an index."""
    tmp = out / "index.json.tmp"
    tmp.write_text(json.dumps(index, indent=1))
    tmp.replace(out / "index.json")
    return index


def _top_loss_gallery(bundle: Any, entries: list[dict[str, Any]], truth: dict[str, str | None], out: Path, *,
                      method: str, count: int) -> str | None:
    """The most confidently wrong images with their maps, side by side: where a model errs is worth seeing."""
    from PIL import Image

    wrong = []
    for entry in entries:
        label = truth.get(entry["image"])
        if label is None or label == entry["predicted"]:
            continue
        loss = -float(np.log(max(entry["probabilities"].get(label, 0.0), 1e-12)))
        wrong.append((loss, entry, label))
    if not wrong or count <= 0:
        return None
    wrong.sort(key=lambda item: -item[0])
    panels, titles = [], []
    for _, entry, label in wrong[:count]:
        panels.append(np.asarray(Image.open(entry["overlay"]).convert("RGB")))
        titles.append(f"{label}->{entry['predicted']} {entry['probabilities'][entry['predicted']]:.2f}")
    path = out / f"top_losses.{method}.png"
    grid(panels, titles).save(path)
    return str(path)


def _tiled_shares(bundle: Any, picture: np.ndarray, heatmap: np.ndarray) -> Any:
    """Where a stitched map's energy sits, with the model's own threshold ROI as the viewer measures it."""
    from handlens.explain.image import own_roi
    from handlens.explain.shortcuts import energy_shares
    from handlens.transforms.roi import resize_mask

    roi = own_roi(bundle, picture)
    return energy_shares(heatmap, roi=None if roi is None else resize_mask(roi, *heatmap.shape[:2]))


def write_tiled(bundle: Any, files: list[str], out: Path, method: str, *, layer: str | None, target: str,
                tile: int, overlap: float, opacity: float = 0.5, params: dict[str, Any] | None = None,
                preview: int = 2048) -> dict[str, Any]:
    """Tiled explanation of large images: full-resolution heatmap (.npy), probability map (.npy), and an
    overlay PNG (downscaled to ``preview`` pixels on its long side, for viewing)."""
    from PIL import Image

    from handlens.explain.tiles import tiled_explain

    out.mkdir(parents=True, exist_ok=True)
    entries = []
    for path in files:
        result = tiled_explain(bundle, path, tile=tile, overlap=overlap, method=method, layer=layer, target=target,
                               params=params)
        stem = f"{Path(path).stem}.{method}.tiled"
        np.save(out / f"{stem}.npy", result.heatmap)
        np.save(out / f"{stem}.probabilities.npy", result.probability_map)
        picture = load_rgb(path)
        shares = _tiled_shares(bundle, np.asarray(picture), result.heatmap)
        scale = min(1.0, preview / max(picture.size))
        if scale < 1.0:
            picture = picture.resize((round(picture.width * scale), round(picture.height * scale)))
        Image.fromarray(overlay(np.asarray(picture), result.heatmap, opacity)).save(out / f"{stem}.png")
        entries.append({"image": str(path), "overlay": str(out / f"{stem}.png"), "map": str(out / f"{stem}.npy"),
                        "probability_map": str(out / f"{stem}.probabilities.npy"),
                        "label": bundle.classes[result.target],
                        "probability": float(result.probabilities[result.target]), **result.summary(),
                        "shortcuts": shares.to_dict()})
    index = {"bundle": str(bundle.path), "method": method, "tile": tile, "overlap": overlap, "images": entries,
             "index": str(out / "index.json")}
    return _save_index(out, index)
