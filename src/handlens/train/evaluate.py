"""Evaluate a bundle on a catalog subset or on a folder-per-class tree: metrics, confusion, top losses.

No Lightning here: evaluation is plain inference plus torchmetrics.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from handlens.core.errors import InputError, NotFoundError
from handlens.core.workspace import Workspace


def resolve_bundle(ws: Workspace, ref: str | Path) -> Path:
    """A bundle directory, a run directory, or a run id in the workspace -> the bundle directory."""
    for candidate in (Path(ref), Path(ref) / "bundle", ws.runs_dir / str(ref) / "bundle"):
        if (candidate / "bundle.json").is_file():
            return candidate.resolve()
    raise NotFoundError(f"{ref!r} is neither a bundle directory nor a run id in {ws.runs_dir}")


def top_losses(probs: np.ndarray, targets: np.ndarray, paths: list[str], classes: list[str],
               count: int = 10) -> list[dict[str, Any]]:
    """The most confidently wrong images: highest cross-entropy among the misclassified."""
    pred = probs.argmax(1)
    losses = -np.log(np.clip(probs[np.arange(len(targets)), targets], 1e-12, 1.0))
    wrong = np.flatnonzero(pred != targets)
    order = wrong[np.argsort(-losses[wrong])][:count]
    return [{"path": paths[i], "true": classes[targets[i]], "predicted": classes[pred[i]],
             "confidence": round(float(probs[i, pred[i]]), 4), "loss": round(float(losses[i]), 4)} for i in order]


def evaluate(
    bundle_ref: str | Path,
    workspace: Workspace | None = None,
    dataset: str | None = None,
    subset: str = "test",
    split: str | None = None,
    images: Path | None = None,
    out_dir: Path | None = None,
    top: int = 10,
) -> dict[str, Any]:
    """Metrics of a bundle on ``subset`` of a catalog split (default: the one it trained on) or on ``images``."""
    import torch

    from handlens.data.catalog import open_catalog
    from handlens.models.bundle import load_bundle
    from handlens.train.metrics import classification_metrics, confusion_png
    from handlens.transforms.cache import decode_many, decode_working_many

    ws = workspace or Workspace.open()
    path = resolve_bundle(ws, bundle_ref)
    bundle = load_bundle(path)
    manifest = bundle.manifest
    index = {c: i for i, c in enumerate(bundle.classes)}
    sha256s: list[str] | None = None
    if images is not None:
        from handlens.data.importer import scan_folder

        if not Path(images).is_dir():
            raise InputError(f"--images {images}: give a folder with one sub-folder per class")
        entries, loose, _ = scan_folder(Path(images))
        if not entries and loose:
            raise InputError(f"the images in {images} are not in class folders; put each image in a sub-folder "
                             "named after its class (to predict without labels, use `handlens predict`)")
        labels = [e.labels["default"] for e in entries]
        unknown = sorted(set(labels) - set(index))
        if unknown:
            raise InputError(f"class folder(s) {', '.join(unknown)} in {images} are not classes of this model "
                             f"({', '.join(bundle.classes)}); rename or remove them")
        if not entries:
            raise InputError(f"no images found under {images}")
        paths, source = [e.path for e in entries], str(Path(images).resolve())
    else:
        from handlens.train.data import load_split_data

        catalog = open_catalog(ws.db_url)
        try:
            data = load_split_data(catalog, dataset or manifest["dataset"], manifest.get("labelset"),
                                   split or manifest.get("split"), int(manifest.get("fold", 0)))
        finally:
            catalog.close()
        if subset not in data.subsets:
            raise InputError(f"--split {subset!r}: choose train, val or test")
        chosen = data.subsets[subset]
        if len(chosen) == 0:
            raise InputError(f"the {subset} subset of split {data.split!r} is empty; evaluate another subset")
        unknown = sorted({data.classes[t] for t in chosen.targets} - set(index))
        if unknown:
            raise InputError(f"classes {', '.join(unknown)} of {data.dataset!r} are unknown to this model")
        paths, sha256s = chosen.paths, chosen.sha256s
        labels = [data.classes[t] for t in chosen.targets]
        source = f"{data.dataset}/{data.split}/{subset}"
    targets = np.array([index[label] for label in labels], dtype=np.int64)
    if bundle.patch_trained:  # image-level: mean probability over each image's grid patches
        working = decode_working_many(paths, bundle.preprocess.working_side,
                                      bundle.preprocess.morphology, sha256s, ws.cache_dir if sha256s else None)
        probs = bundle.predict_working(working)
    else:
        arrays = decode_many(paths, bundle.preprocess, sha256s, ws.cache_dir if sha256s else None)
        probs = bundle.predict_arrays(arrays)
    metrics = classification_metrics(torch.from_numpy(probs), torch.from_numpy(targets), bundle.classes)
    out_dir = Path(out_dir) if out_dir else path.parent
    out_dir.mkdir(parents=True, exist_ok=True)
    png = out_dir / f"eval_confusion_{subset if images is None else 'images'}.png"
    confusion_png(metrics["confusion"], bundle.classes, png,
                  f"{source}: accuracy {metrics['accuracy']:.3f}, macro-F1 {metrics['macro_f1']:.3f}")
    report = {"bundle": str(path), "source": source, "classes": bundle.classes, **metrics,
              "confusion_png": str(png), "top_losses": top_losses(probs, targets, paths, bundle.classes, top)}
    report_file = png.with_name(png.stem.replace("eval_confusion_", "eval_report_") + ".json")
    report_file.write_text(json.dumps(report, indent=1, default=float))  # for people, and the service
    return {**report, "report": str(report_file)}
