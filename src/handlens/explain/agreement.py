"""Do models look where experts look? Agreement of explanations with expert regions, per image and class."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import numpy as np
from sqlalchemy import select

from handlens.core.errors import InputError
from handlens.data.annotations import annotated_images, region_mask
from handlens.data.catalog import Catalog, Image, Label, Labelset
from handlens.data.queries import find_dataset
from handlens.explain.metrics import agreement
from handlens.transforms.roi import mask_for_input


def agreement_report(bundle: Any, catalog: Catalog, *, dataset_name: str | None = None, method: str = "gradcam",
                     layer: str | None = None, fraction: float = 0.2, tolerance: int = 0, subset: str | None = None,
                     batch_size: int = 8, **params: Any) -> dict[str, Any]:
    """Pointing game, energy inside and top-k% IoU of ``method``'s maps for every annotated image.

    Each image is explained for its true class (the expert region shows that class's evidence). A
    uniform map would put ``region_share`` of its energy inside: the chance level to beat. Maps and
    regions meet on the model input, or for a patch-trained model on the image itself (its maps are
    stitched from tiles at its patch scale; ``tolerance`` is then in image pixels).
    """
    manifest = bundle.manifest
    dataset_name = dataset_name or manifest["dataset"]
    with catalog.session() as session:
        dataset = find_dataset(session, dataset_name)
        regions = annotated_images(session, dataset.id)
        if not regions:
            raise InputError(f"dataset {dataset_name!r} has no expert regions; add them with "
                             f"`handlens annotate import {dataset_name} DIR`")
        labelset = session.scalars(select(Labelset).where(Labelset.dataset_id == dataset.id,
                                                          Labelset.name == manifest.get("labelset"))).first()
        labels = dict(session.execute(select(Label.image_id, Label.label).where(Label.labelset_id == labelset.id))
                      .all()) if labelset else {}
        wanted = set(regions)
        if subset:
            wanted &= set(manifest.get("split_membership", {}).get(subset, []))
        rows = session.execute(select(Image.id, Image.path, Image.width, Image.height)
                               .where(Image.id.in_(sorted(wanted))).order_by(Image.id)).all()
        masks = {row.id: region_mask(regions[row.id], row.width, row.height) for row in rows}
    score = _scores_on_tiles if bundle.patch_trained else _scores_on_inputs
    images = score(bundle, rows, labels, masks, method=method, layer=layer, fraction=fraction, tolerance=tolerance,
                   batch_size=batch_size, params=params)
    from handlens.explain.verdicts import agreement_verdict

    by_class: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for item in images:
        by_class[str(item["label"])].append(item)
    return {"bundle": str(bundle.path), "method": method, "layer": layer or bundle.layer_names[0],
            "dataset": dataset_name, "top_fraction": fraction, "verdict": agreement_verdict(images),
            "per_class_verdicts": {c: agreement_verdict(items)["verdict"] for c, items in sorted(by_class.items())},
            "images": images, "per_class": _summarise(images, key="label"), "overall": _summarise(images)["all"]}


def _explained_for(bundle: Any, label: str | None) -> str:
    """The class an image is explained for: its expert label, else the model's prediction."""
    return label if label in bundle.classes else "pred"


def _scores_on_inputs(bundle: Any, rows: list[Any], labels: dict[int, str], masks: dict[int, np.ndarray], *,
                      method: str, layer: str | None, fraction: float, tolerance: int, batch_size: int,
                      params: dict[str, Any]) -> list[dict[str, Any]]:
    """Agreement on the model input: maps of whole resized images, regions carried through the same resize."""
    images: list[dict[str, Any]] = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        targets = [_explained_for(bundle, labels.get(r.id)) for r in chunk]
        explained = bundle.explain([r.path for r in chunk], method=method, layer=layer, target=targets, **params)
        maps, probs, used = explained.maps, explained.probabilities, explained.targets
        for i, row in enumerate(chunk):
            region = mask_for_input(masks[row.id], bundle.preprocess.size, bundle.preprocess.resize)
            if not region.any():
                continue  # the region fell outside the model's crop
            scores = agreement(maps[i], region, fraction, tolerance)
            images.append({"image_id": row.id, "path": row.path, "label": labels.get(row.id),
                           "explained_class": bundle.classes[used[i]],
                           "predicted": bundle.classes[int(probs[i].argmax())], **scores})
    return images


def _scores_on_tiles(bundle: Any, rows: list[Any], labels: dict[int, str], masks: dict[int, np.ndarray], *,
                     method: str, layer: str | None, fraction: float, tolerance: int, batch_size: int,
                     params: dict[str, Any]) -> list[dict[str, Any]]:
    """Agreement of a patch-trained model on the image itself: maps stitched from tiles at its patch scale."""
    from handlens.explain.tiles import tiled_explain

    images: list[dict[str, Any]] = []
    for row in rows:
        tiled = tiled_explain(bundle, row.path, method=method, layer=layer,
                              target=_explained_for(bundle, labels.get(row.id)), batch_size=batch_size, **params)
        images.append({"image_id": row.id, "path": row.path, "label": labels.get(row.id),
                       "explained_class": bundle.classes[tiled.target],
                       "predicted": bundle.classes[int(tiled.probabilities.argmax())],
                       **agreement(tiled.heatmap, masks[row.id], fraction, tolerance)})
    return images


def _summarise(images: list[dict[str, Any]], key: str | None = None) -> dict[str, dict[str, float]]:
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for item in images:
        groups[str(item[key]) if key else "all"].append(item)
    return {name: {"n": len(items), "pointing_hit_rate": float(np.mean([i["pointing_hit"] for i in items])),
                   "energy_inside": float(np.mean([i["energy_inside"] for i in items])),
                   "top_iou": float(np.mean([i["top_iou"] for i in items])),
                   "region_share": float(np.mean([i["region_share"] for i in items]))}
            for name, items in sorted(groups.items())} if images else {"all": {"n": 0}}
