"""Computing the audit of one bundle (see :mod:`handlens.audit`): plain data, drawn by :mod:`handlens.audit.html`."""

from __future__ import annotations

import base64
import io
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from handlens.core.workspace import Workspace

#: a map "sits on" a burned-in mark when its energy there is at least this many times the mark's area ...
ON_MARK_LIFT = 2.0
#: ... and at least this share of its energy
ON_MARK_SHARE = 0.1
#: images per class decoded for the burned-in mark search (seeded sample beyond that)
MARK_IMAGES_PER_CLASS = 200
OVERLAY_SIDE = 256
#: images explained at once (an explanation keeps every input's activations and gradients)
EXPLAIN_BATCH = 16


@dataclass
class WorstCase:
    """One of the most confidently wrong (or least confidently right) images, with its map."""

    image: str
    truth: str
    predicted: str
    probability: float  # of the predicted class
    loss: float
    overlay_png: str  # base64
    shortcuts: str  # the shortcut sentence of its map
    trust: str  # the image's faithfulness verdict ("" when not measured)


@dataclass
class AuditReport:
    bundle: str
    source: str
    classes: list[str]
    images: int
    method: str
    layer: str | None
    accuracy: float
    macro_f1: float
    baselines: list[dict[str, Any]]
    baselines_verdict: str
    leakage: dict[str, Any]
    per_class: dict[str, dict[str, Any]]  # explain.shortcuts.shares_summary of the sampled maps, per true class
    shortcuts_verdict: str
    marks: list[dict[str, Any]]
    marks_verdict: str
    maps_on_marks: dict[str, dict[str, Any]]  # per class with a mark: the maps' energy on it
    trust: dict[str, Any] | None  # explain.verdicts.FaithfulnessVerdict over the sample
    trust_note: str
    worst: list[WorstCase] = field(default_factory=list)
    sample: int = 0
    seconds: dict[str, float] = field(default_factory=dict)

    def verdicts(self) -> list[tuple[str, str]]:
        """(check, sentence) for every check, in the order the report shows them."""
        trust = self.trust["sentence"] if self.trust else self.trust_note
        on_marks = [f"class {label!r}: {found['verdict']}" for label, found in self.maps_on_marks.items()]
        return [("file-attribute baselines", self.baselines_verdict),
                ("train/test copies", self.leakage.get("verdict", "")),
                ("map energy", self.shortcuts_verdict),
                ("burned-in marks", self.marks_verdict + (f"; {'; '.join(on_marks)}" if on_marks else "")),
                ("faithfulness", trust)]

    def to_dict(self) -> dict[str, Any]:
        body = asdict(self)
        body["verdicts"] = [{"check": check, "verdict": sentence} for check, sentence in self.verdicts()]
        for case in body["worst"]:
            case.pop("overlay_png")  # the JSON says what; the HTML shows it
        return body


def audit(bundle_ref: str | Path, workspace: Workspace, *, subset: str = "test", sample: int = 24, worst: int = 6,
          method: str = "gradcam", layer: str | None = None, steps: int = 20, seed: int = 0) -> AuditReport:
    """Judge ``bundle_ref`` on ``subset`` of its split and gather the trust checks (see :mod:`handlens.audit`).
    Maps are drawn for ``sample`` images (the ``worst`` highest losses first, the rest spread over the
    classes); their faithfulness curves have ``steps`` points."""
    import torch

    from handlens.data.baselines import attribute_baselines, baselines_verdict
    from handlens.explain.api import load_bundle
    from handlens.train.evaluate import judge, leak_check
    from handlens.train.metrics import classification_metrics

    timings: dict[str, float] = {}
    started = time.perf_counter()
    judged = judge(bundle_ref, workspace, subset=subset)
    bundle = load_bundle(judged.path)  # the explainable kind of the same bundle
    metrics = classification_metrics(torch.from_numpy(judged.probs), torch.from_numpy(judged.targets), bundle.classes)
    timings["predict"] = time.perf_counter() - started
    started = time.perf_counter()
    known = _catalog_facts(workspace, bundle.manifest, judged.image_ids or [])
    facts, train_facts, regions = known.judged, known.train, known.regions
    baselines = attribute_baselines(train_facts, [f for f in facts if f is not None], bundle.classes)
    if subset == "test":
        leakage = leak_check(workspace, bundle, judged.paths, judged.decoded, sha256s=judged.sha256s).to_dict()
    else:  # the model learnt from (or was selected on) these images: every one would be its own copy
        leakage = {"verdict": f"not checked: the model trained on (or was selected on) the {subset} subset; the "
                              "copy check is for the test subset", "pairs": []}
    timings["baselines_and_copies"] = time.perf_counter() - started
    started = time.perf_counter()
    chosen, worst_ids = choose_sample(judged.probs, judged.targets, sample=sample, worst=worst, seed=seed)
    maps = _sample_maps(bundle, judged, chosen, facts=facts, regions=regions, method=method, layer=layer,
                        steps=steps)
    timings["maps_and_trust"] = time.perf_counter() - started
    started = time.perf_counter()
    marks, marks_verdict, on_marks = _marks(known.train_paths, bundle, judged, chosen=chosen, maps=maps, facts=facts)
    timings["marks"] = time.perf_counter() - started
    per_class = _per_class(bundle.classes, judged.labels, chosen, maps["shares"])
    flagged = sum(summary["flagged"] for summary in per_class.values())
    judged_maps = sum(summary["maps"] - summary["empty"] for summary in per_class.values())
    from handlens.explain.shortcuts import NO_SHORTCUT_SIGN, SHORTCUT_WARNING

    if not judged_maps:
        shortcuts_verdict = "not checked: every sampled map was empty (no positive energy to locate)"
    elif flagged:
        shortcuts_verdict = (f"{SHORTCUT_WARNING}: {flagged} of {judged_maps} sampled maps put their energy outside "
                             "the specimen, on padding or in the border band")
    else:
        shortcuts_verdict = f"{NO_SHORTCUT_SIGN} in {judged_maps} sampled maps"
    return AuditReport(
        bundle=str(judged.path), source=judged.source, classes=bundle.classes, images=len(judged.paths),
        method=method, layer=maps["layer"], accuracy=round(float(metrics["accuracy"]), 4),
        macro_f1=round(float(metrics["macro_f1"]), 4), baselines=[b.to_dict() for b in baselines],
        baselines_verdict=baselines_verdict(baselines, float(metrics["accuracy"])), leakage=leakage,
        per_class=per_class, shortcuts_verdict=shortcuts_verdict, marks=[m.to_dict() for m in marks],
        marks_verdict=marks_verdict, maps_on_marks=on_marks, trust=maps["trust"], trust_note=maps["trust_note"],
        worst=_worst_cases(bundle, judged, chosen=chosen, worst_ids=worst_ids, maps=maps), sample=len(chosen),
        seconds={k: round(v, 3) for k, v in timings.items()})


def choose_sample(probs: np.ndarray, targets: np.ndarray, *, sample: int, worst: int,
                  seed: int = 0) -> tuple[list[int], list[int]]:
    """Indices of the images to draw maps for: the ``worst`` highest losses first, then images spread evenly
    over the true classes (seeded), ``sample`` in all; and the worst ones' indices."""
    losses = -np.log(np.clip(probs[np.arange(len(targets)), targets], 1e-12, 1.0))
    worst_ids = [int(i) for i in np.argsort(-losses, kind="stable")[:min(worst, sample)]]
    chosen = list(worst_ids)
    rng = np.random.default_rng(seed)
    pools = {c: [int(i) for i in rng.permutation(np.flatnonzero(targets == c)) if int(i) not in chosen]
             for c in np.unique(targets)}
    while len(chosen) < min(sample, len(targets)) and any(pools.values()):
        for pool in pools.values():
            if pool and len(chosen) < sample:
                chosen.append(pool.pop(0))
    return chosen, worst_ids


@dataclass
class CatalogFacts:
    """What the audit reads from the catalog, in one pass: the judged images' file facts (None where the
    catalog has no label for one), the training images' (train + val) facts and (label, path) pairs, and the
    expert-region masks of judged images that have any."""

    judged: list[Any]
    train: list[Any]
    train_paths: list[tuple[str, str]]
    regions: dict[int, np.ndarray]


def _catalog_facts(ws: Workspace, manifest: dict[str, Any], ids: list[int]) -> CatalogFacts:
    """One read of the catalog for the audit (:class:`CatalogFacts`)."""
    from sqlalchemy import select

    from handlens.data.annotations import annotated_images_by_id, region_mask
    from handlens.data.baselines import FileFacts
    from handlens.data.catalog import Image, Label, open_catalog

    membership = manifest.get("split_membership") or {}
    train_ids = sorted({int(i) for name in ("train", "val") for i in membership.get(name, [])})
    catalog = open_catalog(ws.db_url)
    try:
        with catalog.session() as session:
            labelset = _labelset(session, manifest)
            wanted = sorted(set(ids) | set(train_ids))
            rows: dict[int, Any] = {}
            for start in range(0, len(wanted), 500):
                chunk = wanted[start:start + 500]
                query = select(Image.id, Image.width, Image.height, Image.mode, Image.format, Label.label,
                               Image.path).join(
                    Label, (Label.image_id == Image.id) & (Label.labelset_id == (labelset.id if labelset else -1)))
                rows.update({row[0]: row for row in session.execute(query.where(Image.id.in_(chunk)))})
            annotations = annotated_images_by_id(session, list(ids))
            regions = {i: region_mask(found, int(rows[i][1]), int(rows[i][2]))
                       for i, found in annotations.items() if i in rows}
    finally:
        catalog.close()

    def facts(i: int) -> Any:
        _, width, height, mode, fmt, label, _ = rows[i]
        return FileFacts(label=label, width=int(width), height=int(height), mode=mode or "", format=fmt or "")

    present = [i for i in train_ids if i in rows]
    return CatalogFacts(judged=[facts(i) if i in rows else None for i in ids], train=[facts(i) for i in present],
                        train_paths=[(rows[i][5], rows[i][6]) for i in present if Path(rows[i][6]).is_file()],
                        regions=regions)


def _labelset(session: Any, manifest: dict[str, Any]) -> Any:
    from sqlalchemy import select

    from handlens.data.catalog import Dataset, Labelset

    return session.scalars(select(Labelset).join(Dataset, Dataset.id == Labelset.dataset_id).where(
        Dataset.name == manifest.get("dataset"), Labelset.name == manifest.get("labelset"))).first()


def _sample_maps(bundle: Any, judged: Any, chosen: list[int], *, facts: list[Any], regions: dict[int, np.ndarray],
                 method: str, layer: str | None, steps: int) -> dict[str, Any]:
    """Maps of the chosen images (what the model sees), their shortcut shares and their faithfulness verdict."""
    if bundle.patch_trained:
        return _patch_maps(bundle, judged, chosen, regions, method=method, layer=layer)
    import torch

    from handlens.explain.api import explain
    from handlens.explain.metrics import deletion_insertion
    from handlens.explain.shortcuts import model_input_shares
    from handlens.explain.verdicts import faithfulness_verdict, image_verdict
    from handlens.transforms.roi import mask_for_input

    preprocess = bundle.preprocess
    pictures = np.ascontiguousarray(judged.decoded[chosen])
    inputs = preprocess.normalize_batch(torch.from_numpy(np.ascontiguousarray(pictures.transpose(0, 3, 1, 2))))
    mean, std = preprocess.affine()
    parts = [explain(bundle.module, inputs[i:i + EXPLAIN_BATCH], bundle.classes, method, layer=layer, target="pred",
                     mean=mean, std=std) for i in range(0, len(inputs), EXPLAIN_BATCH)]  # bounded memory
    result = parts[0]
    result.maps = np.concatenate([p.maps for p in parts])
    result.targets = [t for p in parts for t in p.targets]
    maps = result.maps if result.maps.ndim == 3 else result.maps[:, 0]
    ids = judged.image_ids or []
    shares, rois = [], []
    for k, i in enumerate(chosen):
        region = regions.get(ids[i]) if ids else None
        roi = None if region is None else mask_for_input(region, preprocess.size, preprocess.resize)
        rois.append(roi if roi is not None else np.ones(maps.shape[1:], dtype=bool))
        width, height = (facts[i].width, facts[i].height) if facts[i] is not None else (pictures.shape[2],
                                                                                        pictures.shape[1])
        shares.append(model_input_shares(maps[k], width=width, height=height, preprocess=preprocess, roi=roi))
    measured = deletion_insertion(bundle.module, inputs, maps.astype(np.float32), list(result.targets), steps=steps,
                                  rois=np.stack(rois) if regions else None)
    verdicts = [image_verdict(row) for row in measured["images"]]
    return {"maps": maps, "pictures": pictures, "shares": shares, "layer": result.layer, "image_verdicts": verdicts,
            "trust": faithfulness_verdict(measured["images"]).to_dict(), "trust_note": "", "signed": result.signed}


def _patch_maps(bundle: Any, judged: Any, chosen: list[int], regions: dict[int, np.ndarray], *, method: str,
                layer: str | None) -> dict[str, Any]:
    """A patch-trained model: stitched maps over its working images (faithfulness is measured on its grid
    patches by ``handlens trust``, not here)."""
    from handlens.explain.image import explain_image

    ids = judged.image_ids or []
    maps, pictures, shares, used = [], [], [], layer
    signed = False
    for i in chosen:
        picture = np.asarray(judged.decoded[i])
        explained = explain_image(bundle, picture, method=method, layer=layer, target="pred",
                                  roi=regions.get(ids[i]) if ids else None)
        maps.append(explained.heatmap)
        pictures.append(picture)
        shares.append(explained.shortcuts)
        used, signed = explained.layer, explained.signed
    note = ("not measured here: a patch-trained model's maps are judged on its grid patches; run `handlens trust "
            "BUNDLE IMAGES`")
    return {"maps": maps, "pictures": pictures, "shares": shares, "layer": used, "image_verdicts": [""] * len(chosen),
            "trust": None, "trust_note": note, "signed": signed}


def _per_class(classes: list[str], labels: list[str], chosen: list[int], shares: list[Any]) -> dict[str, Any]:
    from handlens.explain.shortcuts import shares_summary

    return {c: shares_summary([s for i, s in zip(chosen, shares, strict=True) if labels[i] == c]) for c in classes}


def _marks(paths: list[tuple[str, str]], bundle: Any, judged: Any, *, chosen: list[int], maps: dict[str, Any],
           facts: list[Any]) -> tuple[list[Any], str, dict[str, dict[str, Any]]]:
    """Burned-in marks among the judged and training images (``paths``: the training images' (label, path)), and
    whether the sampled maps sit on them."""
    from handlens.data.marks import find_marks, grid_image, marks_verdict

    labelled = list(zip(judged.labels, judged.paths, strict=True)) + paths
    rng = np.random.default_rng(0)
    by_class: dict[str, list[str]] = {}
    for label, path in labelled:
        by_class.setdefault(label, []).append(path)
    picked = [(label, str(p)) for label, found in sorted(by_class.items())
              for p in (rng.permutation(found)[:MARK_IMAGES_PER_CLASS] if len(found) > MARK_IMAGES_PER_CLASS
                        else found)]
    marks, regions = find_marks((label, grid_image(path)) for label, path in picked)
    on_marks = {}
    for label, region in regions.items():
        on_marks[label] = _energy_on(region, bundle, judged, chosen=chosen, maps=maps, facts=facts, label=label)
    return marks, marks_verdict(marks), on_marks


def _energy_on(region: np.ndarray, bundle: Any, judged: Any, *, chosen: list[int], maps: dict[str, Any],
               facts: list[Any], label: str) -> dict[str, Any]:
    """The sampled maps of class ``label``'s images: their median energy share on the mark's region (a
    GRID x GRID mask over the stretched image) beside the region's area."""
    from PIL import Image

    from handlens.data.marks import GRID
    from handlens.explain.image import heat_on_image

    shares = []
    for k, i in enumerate(chosen):
        if judged.labels[i] != label:
            continue
        heat = np.asarray(maps["maps"][k], dtype=np.float32)
        if not bundle.patch_trained and facts[i] is not None:
            heat = heat_on_image(heat, facts[i].height, facts[i].width, bundle.preprocess)
        small = np.clip(np.asarray(Image.fromarray(heat, mode="F").resize((GRID, GRID), Image.BILINEAR)), 0, None)
        total = float(small.sum())
        if total > 0:
            shares.append(float(small[region].sum() / total))
    area = float(region.mean())
    energy = float(np.median(shares)) if shares else 0.0
    sits = bool(shares) and energy >= ON_MARK_SHARE and energy >= ON_MARK_LIFT * area
    verdict = (f"the maps sit on it ({energy:.0%} of their energy on {area:.0%} of the pixels)" if sits else
               f"the maps do not sit on it ({energy:.0%} of their energy on {area:.0%} of the pixels)" if shares else
               "no sampled map of this class")
    return {"energy": round(energy, 4), "area": round(area, 4), "maps": len(shares), "sits_on": sits,
            "verdict": verdict}


def _worst_cases(bundle: Any, judged: Any, *, chosen: list[int], worst_ids: list[int],
                 maps: dict[str, Any]) -> list[WorstCase]:
    from PIL import Image

    from handlens.explain.render import overlay

    out = []
    for i in worst_ids:
        k = chosen.index(i)
        picture = np.asarray(maps["pictures"][k])
        scale = min(1.0, OVERLAY_SIDE / max(picture.shape[:2]))
        if scale < 1.0:
            size = (max(1, round(picture.shape[1] * scale)), max(1, round(picture.shape[0] * scale)))
            picture = np.asarray(Image.fromarray(picture).resize(size, Image.BILINEAR))
        buffer = io.BytesIO()
        Image.fromarray(overlay(picture, np.asarray(maps["maps"][k], dtype=np.float32), 0.5,
                                signed=bool(maps["signed"]))).save(buffer, "PNG")
        predicted = int(judged.probs[i].argmax())
        p_true = float(judged.probs[i, judged.targets[i]])
        out.append(WorstCase(image=judged.paths[i], truth=judged.labels[i], predicted=bundle.classes[predicted],
                             probability=round(float(judged.probs[i, predicted]), 4),
                             loss=round(float(-np.log(max(p_true, 1e-12))), 4),
                             overlay_png=base64.b64encode(buffer.getvalue()).decode(),
                             shortcuts=maps["shares"][k].sentence(), trust=maps["image_verdicts"][k]))
    return out
