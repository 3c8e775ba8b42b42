"""Writing explanations to disk: overlays (PNG), raw maps (.npy), top regions (GeoJSON) and an index JSON."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from handlens.explain.render import grid, overlay
from handlens.transforms.preprocess import load_rgb, preprocess_image

#: panels in an all-class overlay grid: the most probable classes (a 1,000-class grid helps nobody)
ALL_CLASS_PANELS = 12

#: what ``handlens explain --format`` writes: overlays, raw maps, top-region polygons (explain.regions)
FORMATS = ("png", "npy", "geojson")
#: what it writes unless told: as before GeoJSON existed
DEFAULT_FORMATS = ("png", "npy")
#: the top share of a map's pixels whose outlines become GeoJSON polygons (as ``agreement --top``)
DEFAULT_TOP = 0.2


def check_formats(formats: Sequence[str] | None) -> tuple[str, ...]:
    """``formats`` (each a name or a comma list: ``png,geojson``) as a tuple in :data:`FORMATS` order, or the
    defaults; an unknown one is an InputError naming the known ones."""
    from handlens.core.errors import InputError

    if not formats:
        return DEFAULT_FORMATS
    names = {part.strip().lower() for item in formats for part in item.split(",") if part.strip()}
    unknown = sorted(names - set(FORMATS))
    if unknown or not names:
        raise InputError(f"--format {', '.join(unknown) or repr(formats)}: choose from {', '.join(FORMATS)} "
                         "(repeat --format or give a comma list, e.g. --format png,geojson)")
    return tuple(f for f in FORMATS if f in names)


def _safe(name: str) -> str:
    """A class name fit for a file name (``a/b c`` -> ``a_b_c``)."""
    return re.sub(r"[^\w.-]+", "_", name).strip("._") or "class"


def _written(entry: dict[str, Any], formats: Sequence[str]) -> bool:
    """Whether an earlier run wrote every requested output of this index entry."""
    keys = {"png": "overlay", "npy": "map", "geojson": "geojson"}
    return all(keys[f] in entry and Path(entry[keys[f]]).is_file() for f in formats)


def write_regions(heatmap: np.ndarray, path: Path, *, frame: Any, image: str, target: str, method: str,
                  layer: str | None, top: float, class_index: int) -> str:
    """The top ``top`` share of ``heatmap`` as GeoJSON polygons on the original image (``frame``) at ``path``."""
    from handlens.explain.regions import feature_collection, top_regions, write_geojson

    regions = top_regions(heatmap, top, frame=frame)
    collection = feature_collection(regions, image=image, target=target, method=method, layer=layer,
                                    fraction=top, class_index=class_index)
    return str(write_geojson(path, collection))


def write_explanations(bundle: Any, files: list[str], out: Path, method: str, *, layer: str | None, target: str,
                       opacity: float = 0.5, params: dict[str, Any] | None = None, batch_size: int = 8,
                       resume: bool = False, progress: Any = None, formats: Sequence[str] = DEFAULT_FORMATS,
                       top: float = DEFAULT_TOP) -> dict[str, Any]:
    """Explain ``files`` in batches and write, per ``formats``, ``<stem>.<method>.png`` (overlay), ``.npy``
    (the raw map on the model input) and ``<stem>.<method>.<class>.geojson`` (the outlines of the map's top
    ``top`` share on the original image's pixels, :mod:`handlens.explain.regions`), plus ``index.json``.

    With ``resume``, images whose entries an earlier ``index.json`` in ``out`` already lists (and whose
    requested outputs exist) are kept and not explained again; the index is rewritten after every batch, so
    a killed run loses at most one batch.
    """
    from handlens.explain.api import method_params

    formats = check_formats(formats)
    checked = method_params(method, params)  # a typo fails before anything is written
    out.mkdir(parents=True, exist_ok=True)
    entries: list[dict[str, Any]] = []
    if resume and (out / "index.json").is_file():
        previous = json.loads((out / "index.json").read_text())
        same = (previous.get("bundle"), previous.get("method"), previous.get("requested_layer"),
                previous.get("target"), previous.get("params")) == (str(bundle.path), method, layer, target,
                                                                   params or {})
        if "geojson" in formats and previous.get("top", DEFAULT_TOP) != top:
            same = False  # polygons of another top share are not these
        if same:  # maps of another model, layer or method are never reused
            entries = [e for e in previous.get("images", []) if _written(e, formats) and e["image"] in files]
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
            entries.append(_write_one(bundle, result, i, path, out=out, method=method, opacity=opacity,
                                      formats=formats, top=top))
        _write_index(out, bundle, method, layer=used_layer, target=target, params=params, entries=entries,
                     timings=timings, requested_layer=layer, formats=formats, top=top)
        if progress:
            progress(len(done) + start + len(chunk), len(files))
    return _write_index(out, bundle, method, layer=used_layer, target=target, params=params, entries=entries,
                        timings=timings, requested_layer=layer, formats=formats, top=top)


def _write_one(bundle: Any, result: Any, i: int, path: str, *, out: Path, method: str, opacity: float,
               formats: Sequence[str], top: float) -> dict[str, Any]:
    """Write image ``i`` of an explanation ``result`` in ``formats``; its index entry."""
    from PIL import Image

    from handlens.explain.regions import Frame
    from handlens.explain.shortcuts import model_input_shares

    stem = f"{Path(path).stem}.{method}"
    decoded = load_rgb(path)
    predicted = int(result.probabilities[i].argmax())
    chosen = result.targets[i] if result.targets is not None else predicted
    shares = model_input_shares(result.map_for(i, chosen), width=decoded.width, height=decoded.height,
                                preprocess=bundle.preprocess)
    entry: dict[str, Any] = {
        "image": str(path), "target": bundle.classes[chosen], "predicted": bundle.classes[predicted],
        "probability": float(result.probabilities[i, chosen]),
        "probabilities": dict(zip(bundle.classes, map(float, result.probabilities[i]), strict=True)),
        "shortcuts": shares.to_dict()}
    # all classes: the most probable ones drawn (.npy holds all)
    shown = np.argsort(-result.probabilities[i])[:ALL_CLASS_PANELS] if result.maps.ndim == 4 else [chosen]
    if "npy" in formats:
        np.save(out / f"{stem}.npy", result.maps[i].astype(np.float32))
        entry["map"] = str(out / f"{stem}.npy")
    if "png" in formats:
        picture = preprocess_image(decoded, bundle.preprocess)
        Image.fromarray(overlay(picture, result.map_for(i, chosen), opacity, result.signed)).save(out / f"{stem}.png")
        entry["overlay"] = str(out / f"{stem}.png")
        if result.maps.ndim == 4:
            panels = [overlay(picture, result.maps[i, c], opacity, result.signed) for c in shown]
            grid(panels, [bundle.classes[c] for c in shown]).save(out / f"{stem}.all.png")
            entry["all_classes"] = str(out / f"{stem}.all.png")
    if "geojson" in formats:
        frame = Frame.for_input(result.map_for(i, chosen).shape, decoded.width, decoded.height, bundle.preprocess)
        written = {bundle.classes[c]: write_regions(
            result.map_for(i, int(c)), out / f"{stem}.{_safe(bundle.classes[c])}.geojson", frame=frame,
            image=str(path), target=bundle.classes[c], method=method, layer=result.layer, top=top,
            class_index=int(c)) for c in shown}
        entry["geojson"] = written[bundle.classes[chosen]]
        if result.maps.ndim == 4:
            entry["geojson_classes"] = written
    if "convergence_delta" in result.extras:
        entry["convergence_delta"] = result.extras["convergence_delta"][i]
    return entry


def _write_index(out: Path, bundle: Any, method: str, *, layer: str | None, target: str, params: dict[str, Any] | None,
                 entries: list[dict[str, Any]], timings: list[dict[str, float]],
                 requested_layer: str | None = None, formats: Sequence[str] = DEFAULT_FORMATS,
                 top: float = DEFAULT_TOP) -> dict[str, Any]:
    index = {"bundle": str(bundle.path), "method": method, "layer": layer, "requested_layer": requested_layer,
             "target": target,
             "params": params or {}, "formats": list(formats), "images": entries, "index": str(out / "index.json"),
             "seconds": round(sum(t.get("total", 0.0) for t in timings), 4)}
    if "geojson" in formats:
        index["top"] = top
    return _save_index(out, index)


def explain_subset(bundle: Any, catalog: Any, subset: str, out: Path, *, method: str, layer: str | None = None,
                   target: str = "pred", dataset: str | None = None, opacity: float = 0.5,
                   params: dict[str, Any] | None = None, gallery: int = 12, progress: Any = None,
                   formats: Sequence[str] = DEFAULT_FORMATS, top: float = DEFAULT_TOP) -> dict[str, Any]:
    """Explain every image of one subset of the bundle's split (in ``formats``, :func:`write_explanations`);
    resumable; with a gallery of the top losses when overlays are drawn."""
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
                               params=params, resume=True, progress=progress, formats=formats, top=top)
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
        if "overlay" not in entry or label is None or label == entry["predicted"]:
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
                preview: int = 2048, formats: Sequence[str] = DEFAULT_FORMATS,
                top: float = DEFAULT_TOP) -> dict[str, Any]:
    """Tiled explanation of large images, per ``formats``: full-resolution heatmap and probability map (.npy),
    an overlay PNG (downscaled to ``preview`` pixels on its long side, for viewing), and the heatmap's top
    ``top`` share as GeoJSON polygons on the image (``<stem>.<method>.tiled.<class>.geojson``)."""
    from PIL import Image

    from handlens.explain.regions import Frame
    from handlens.explain.tiles import tiled_explain

    formats = check_formats(formats)
    out.mkdir(parents=True, exist_ok=True)
    entries = []
    for path in files:
        result = tiled_explain(bundle, path, tile=tile, overlap=overlap, method=method, layer=layer, target=target,
                               params=params, with_probability_map="npy" in formats)
        stem = f"{Path(path).stem}.{method}.tiled"
        picture = load_rgb(path)
        shares = _tiled_shares(bundle, np.asarray(picture), result.heatmap)
        label = bundle.classes[result.target]
        entry: dict[str, Any] = {"image": str(path), "label": label,
                                 "probability": float(result.probabilities[result.target]), **result.summary(),
                                 "shortcuts": shares.to_dict()}
        if "npy" in formats:
            np.save(out / f"{stem}.npy", result.heatmap)
            np.save(out / f"{stem}.probabilities.npy", result.probability_map)
            entry.update(map=str(out / f"{stem}.npy"), probability_map=str(out / f"{stem}.probabilities.npy"))
        if "geojson" in formats:
            entry["geojson"] = write_regions(
                result.heatmap, out / f"{stem}.{_safe(label)}.geojson",
                frame=Frame.identity(result.heatmap.shape, picture.width, picture.height), image=str(path),
                target=label, method=method, layer=result.layer, top=top, class_index=int(result.target))
        if "png" in formats:
            scale = min(1.0, preview / max(picture.size))
            if scale < 1.0:
                picture = picture.resize((round(picture.width * scale), round(picture.height * scale)))
            Image.fromarray(overlay(np.asarray(picture), result.heatmap, opacity)).save(out / f"{stem}.png")
            entry["overlay"] = str(out / f"{stem}.png")
        entries.append(entry)
    index = {"bundle": str(bundle.path), "method": method, "tile": tile, "overlap": overlap,
             "formats": list(formats), "images": entries, "index": str(out / "index.json")}
    if "geojson" in formats:
        index["top"] = top
    return _save_index(out, index)
