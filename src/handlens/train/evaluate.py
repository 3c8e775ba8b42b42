"""Evaluate a bundle on a catalog subset or on a folder-per-class tree: metrics, confusion, top losses,
and whether the judged images are copies of the images the model trained on (``leakage``).

No Lightning here: evaluation is plain inference plus torchmetrics.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
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


def top_losses(probs: np.ndarray, targets: np.ndarray, paths: list[str], classes: list[str], *,
               count: int = 10) -> list[dict[str, Any]]:
    """The most confidently wrong images: highest cross-entropy among the misclassified."""
    pred = probs.argmax(1)
    losses = -np.log(np.clip(probs[np.arange(len(targets)), targets], 1e-12, 1.0))
    wrong = np.flatnonzero(pred != targets)
    order = wrong[np.argsort(-losses[wrong])][:count]
    return [{"path": paths[i], "true": classes[targets[i]], "predicted": classes[pred[i]],
             "confidence": round(float(probs[i, pred[i]]), 4), "loss": round(float(losses[i]), 4)} for i in order]


@dataclass
class Judged:
    """The images a bundle is judged on, as it sees them, and its probabilities for them."""

    bundle: Any
    path: Path  # the bundle's folder
    paths: list[str]
    labels: list[str]
    targets: np.ndarray  # (N,) class indices of the bundle
    probs: np.ndarray  # (N, classes)
    decoded: Any  # model-input arrays, or working images for a patch-trained model
    sha256s: list[str] | None
    source: str  # dataset/split/subset, or the folder
    image_ids: list[int] | None = None  # catalog ids (a catalog subset)


def judge(bundle_ref: str | Path, ws: Workspace, *, dataset: str | None = None, subset: str = "test",
          split: str | None = None, images: Path | None = None, tta: bool = False) -> Judged:
    """Load a bundle and predict ``subset`` of a catalog split (default: the one it trained on) or the
    folder-per-class tree ``images``: what :func:`evaluate` and ``handlens audit`` judge."""
    from handlens.models.bundle import load_bundle
    from handlens.transforms.cache import decode_many, decode_working_many

    path = resolve_bundle(ws, bundle_ref)
    bundle = load_bundle(path)
    index = {c: i for i, c in enumerate(bundle.classes)}
    ids: list[int] | None = None
    if images is not None:
        paths, labels, source = _folder_images(Path(images), bundle.classes)
        sha256s: list[str] | None = None
    else:
        paths, labels, sha256s, ids, source = _subset_images(ws, bundle, dataset=dataset, subset=subset, split=split)
    targets = np.array([index[label] for label in labels], dtype=np.int64)
    if bundle.patch_trained:  # image-level: mean probability over each image's grid patches
        decoded: Any = decode_working_many(paths, bundle.preprocess.working_side, bundle.preprocess.morphology,
                                           sha256s=sha256s, cache_dir=ws.cache_dir if sha256s else None)
        probs = bundle.predict_working(decoded, tta=tta)
    else:
        decoded = decode_many(paths, bundle.preprocess, sha256s=sha256s, cache_dir=ws.cache_dir if sha256s else None)
        stored = None if tta or not sha256s else _frozen_probs(ws, bundle, decoded, sha256s)
        probs = stored if stored is not None else bundle.predict_arrays(decoded, tta=tta)
    return Judged(bundle=bundle, path=path, paths=paths, labels=labels, targets=targets, probs=probs,
                  decoded=decoded, sha256s=sha256s, source=source, image_ids=ids)


def _folder_images(images: Path, classes: list[str]) -> tuple[list[str], list[str], str]:
    from handlens.data.importer import scan_folder

    if not images.is_dir():
        raise InputError(f"--images {images}: give a folder with one sub-folder per class")
    entries, loose, _ = scan_folder(images)
    if not entries and loose:
        raise InputError(f"the images in {images} are not in class folders; put each image in a sub-folder "
                         "named after its class (to predict without labels, use `handlens predict`)")
    labels = [e.labels["default"] for e in entries]
    unknown = sorted(set(labels) - set(classes))
    if unknown:
        raise InputError(f"class folder(s) {', '.join(unknown)} in {images} are not classes of this model "
                         f"({', '.join(classes)}); rename or remove them")
    if not entries:
        raise InputError(f"no images found under {images}")
    return [e.path for e in entries], labels, str(images.resolve())


def _subset_images(ws: Workspace, bundle: Any, *, dataset: str | None, subset: str,
                   split: str | None) -> tuple[list[str], list[str], list[str], list[int], str]:
    from handlens.data.catalog import open_catalog
    from handlens.train.data import load_split_data

    manifest = bundle.manifest
    catalog = open_catalog(ws.db_url)
    try:
        data = load_split_data(catalog, dataset or manifest["dataset"], manifest.get("labelset"),
                               split_name=split or manifest.get("split"), fold=int(manifest.get("fold", 0)))
    finally:
        catalog.close()
    if subset not in data.subsets:
        raise InputError(f"--split {subset!r}: choose train, val or test")
    chosen = data.subsets[subset]
    if len(chosen) == 0:
        raise InputError(f"the {subset} subset of split {data.split!r} is empty; evaluate another subset")
    unknown = sorted({data.classes[t] for t in chosen.targets} - set(bundle.classes))
    if unknown:
        raise InputError(f"classes {', '.join(unknown)} of {data.dataset!r} are unknown to this model")
    labels = [data.classes[t] for t in chosen.targets]
    return (chosen.paths, labels, chosen.sha256s, [int(i) for i in chosen.ids],
            f"{data.dataset}/{data.split}/{subset}")


def evaluate(
    bundle_ref: str | Path,
    workspace: Workspace | None = None,
    *,
    dataset: str | None = None,
    subset: str = "test",
    split: str | None = None,
    images: Path | None = None,
    out_dir: Path | None = None,
    top: int = 10,
    tta: bool = False,
) -> dict[str, Any]:
    """Metrics of a bundle on ``subset`` of a catalog split (default: the one it trained on) or on ``images``.

    The report's ``leakage`` says which judged images are copies (exact or near) of the model's training
    images; ``tta`` averages over the views its training policy allows (``tta`` section of the report).
    """
    import torch

    from handlens.models.tta import tta_plan
    from handlens.train.metrics import classification_metrics, confusion_png

    ws = workspace or Workspace.open()
    judged = judge(bundle_ref, ws, dataset=dataset, subset=subset, split=split, images=images, tta=tta)
    bundle, path, paths, probs, targets = judged.bundle, judged.path, judged.paths, judged.probs, judged.targets
    metrics = classification_metrics(torch.from_numpy(probs), torch.from_numpy(targets), bundle.classes)
    held = None
    if judged.image_ids is not None:
        name = dataset or bundle.manifest.get("dataset", "")
        held = held_out(bundle.manifest, judged.image_ids, sha256s=judged.sha256s, n=len(paths), dataset=name,
                        val_contents=_validation_contents(ws, bundle.manifest))
    if images is None and subset != "test":
        leakage: dict[str, Any] = {"verdict": f"not checked: the model trained on (or was selected on) the {subset} "
                                   "subset; the leak check is for test subsets and --images", "pairs": []}
    else:
        leakage = leak_check(ws, bundle, paths, judged.decoded, sha256s=judged.sha256s).to_dict()
        pred = probs.argmax(1)
        leaked = {p["test"] for p in leakage["pairs"]}
        clean = [i for i, p in enumerate(paths) if p not in leaked]
        leakage["accuracy_without_copies"] = round(float((pred[clean] == targets[clean]).mean()), 4) if clean else None
    plan = tta_plan(bundle.manifest)
    tta_report = {**plan.to_dict(), "requested": tta} if tta else {"requested": False, "tta_views": 1}
    out_dir = Path(out_dir) if out_dir else path.parent
    out_dir.mkdir(parents=True, exist_ok=True)
    png = out_dir / f"eval_confusion_{subset if images is None else 'images'}.png"
    confusion_png(metrics["confusion"], bundle.classes, png,
                  f"{judged.source}: accuracy {metrics['accuracy']:.3f}, macro-F1 {metrics['macro_f1']:.3f}")
    report = {"bundle": str(path), "source": judged.source, "classes": bundle.classes, **metrics,
              "confusion_png": str(png), "top_losses": top_losses(probs, targets, paths, bundle.classes, count=top),
              "held_out": held, "leakage": leakage, "tta": tta_report}
    report_file = png.with_name(png.stem.replace("eval_confusion_", "eval_report_") + ".json")
    report_file.write_text(json.dumps(report, indent=1, default=float))  # for people, and the service
    return {**report, "report": str(report_file)}


def held_out(manifest: dict[str, Any], image_ids: list[int], *, sha256s: list[str] | None, dataset: str,
             n: int, val_contents: set[str] | frozenset[str] = frozenset()) -> dict[str, Any]:
    """Whether catalog images judged by a bundle were kept from it: a score on images the model trained on (the
    train subset; val too after a study's refit on train+val) says nothing about new images, and one on its
    validation images is optimistic (they can have chosen its best epoch or settings). The verdict in words
    (``held out``, ``optimistic``, ``not held out``, ``unknown``) leads the report, so a 1.000 on training
    images is not read as accuracy.

    By the image ids the bundle records (``split_membership``) when they are ids of this dataset, each checked
    against the contents it records (``training_sha256``) where it has them: ids of another workspace or of a
    re-imported dataset mean other images. Otherwise by content alone (``training_sha256`` lumps train and
    val; ``val_contents``, the SHA-256s of its validation images, tells a copy of one apart); with neither, the
    verdict is ``unknown``."""
    membership = manifest.get("split_membership") or {}
    recorded = set(manifest.get("training_sha256") or [])
    own = manifest.get("dataset") == dataset and bool(membership)
    if not recorded and not own:
        return {"verdict": "unknown", "checked_by": None, "trained_on": None, "validated_on": None,
                "copies_of_training_images": None, "n": n,
                "message": "unknown: the bundle records neither its training images' ids for this dataset nor "
                           "their contents, so whether these images trained it cannot be told"}
    trained = set(membership.get("train") or []) if own else set()
    validated = set(membership.get("val") or []) if own else set()
    shas = list(sha256s) if sha256s else [None] * len(image_ids)
    on_train = on_val = copies = 0
    for image_id, sha in zip(image_ids, shas, strict=True):
        if recorded and sha not in recorded:
            continue  # not a picture the model learnt from, whatever its id says
        if image_id in trained:
            on_train += 1
        elif image_id in validated or sha in val_contents:  # a validation image, or a copy of one
            on_val += 1
        elif recorded:  # the contents of a training image under another id: a copy (or ids from elsewhere)
            copies += 1
    by = ("by content (its training_sha256) and image ids" if recorded and own else
          "by content (its training_sha256)" if recorded else "by the image ids it records")
    out = {"checked_by": by, "trained_on": on_train, "validated_on": on_val, "copies_of_training_images": copies,
           "n": n}
    return {"verdict": _held_verdict(on_train + copies, on_val), "message": _held_message(
        manifest, on_train=on_train, on_val=on_val, copies=copies, n=n), **out}


def _validation_contents(ws: Workspace, manifest: dict[str, Any]) -> set[str]:
    """The SHA-256s of a bundle's validation images, through the catalog (by their ids, under its dataset)."""
    from sqlalchemy import select

    from handlens.data.catalog import Dataset, Image, open_catalog

    ids = [int(i) for i in (manifest.get("split_membership") or {}).get("val") or []]
    if not ids:
        return set()
    catalog = open_catalog(ws.db_url)
    try:
        with catalog.session() as session:
            return set(session.scalars(select(Image.sha256).join(Dataset, Dataset.id == Image.dataset_id)
                                       .where(Dataset.name == manifest.get("dataset"), Image.id.in_(ids))))
    finally:
        catalog.close()


def _held_verdict(learnt: int, validated: int) -> str:
    return "not held out" if learnt else "optimistic" if validated else "held out"


def _held_message(manifest: dict[str, Any], *, on_train: int, on_val: int, copies: int, n: int) -> str:
    study = manifest.get("study") if isinstance(manifest.get("study"), dict) else {}
    split = f"the test subset of split {manifest['split']!r}" if manifest.get("split") else "held-out images"
    if on_train or copies:
        parts = []
        if on_train:
            why = " (a study refitted it on all train+val images)" if study.get("refitted") else ""
            parts.append(f"the model trained on {on_train} of these {n} images{why}; judge it on {split}")
        if copies:
            parts.append(f"{copies} of these {n} images {'has' if copies == 1 else 'have'} the contents of images "
                         "it learnt from (byte copies, or the same images under other ids)")
        return "not an estimate for new images: " + "; ".join(parts)
    if on_val:
        return (f"optimistic: {on_val} of these {n} images are the run's validation images, which can have chosen "
                f"its best epoch or settings; {split} is the held-out estimate")
    return "held out: the model neither trained nor validated on these images"


def _frozen_probs(ws: Workspace, bundle: Any, decoded: np.ndarray, sha256s: list[str]) -> np.ndarray | None:
    """A frozen-backbone bundle's probabilities from the workspace's per-image feature store (training
    stored the features of every subset there): only the head runs, and only images not stored yet see the
    backbone. None where that does not apply (a learning backbone, an ensemble, a config this cannot read)."""
    import torch

    from handlens.models.backbones import BACKBONES
    from handlens.models.classifier import Classifier
    from handlens.train.config import RunConfig
    from handlens.train.features import feature_rows
    from handlens.train.run import feature_key_parts

    manifest = bundle.manifest
    if manifest.get("freeze") != "frozen" or not isinstance(bundle.module, Classifier):
        return None
    try:
        cfg = RunConfig.model_validate(manifest["config"])
    except Exception:  # a bundle from another handlens version: plain inference
        return None
    parts = feature_key_parts(cfg, BACKBONES.get(bundle.backbone), bundle.preprocess, 0)
    images = torch.from_numpy(np.ascontiguousarray(decoded.transpose(0, 3, 1, 2)))
    features = feature_rows(bundle.module, images, list(sha256s), key_parts=parts, cache_dir=ws.cache_dir,
                            normalize=bundle.preprocess.normalize_batch)
    with torch.inference_mode():
        return torch.softmax(bundle.module.head(features).float(), 1).numpy()


def _file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def training_images(ws: Workspace, manifest: dict[str, Any]) -> tuple[list[tuple[str, str]], list[str]]:
    """(path, sha256) of each image a bundle learnt from (train + val), and notes on how they were found.

    Image ids (``split_membership``) resolve through the catalog when it holds them under the bundle's
    dataset and, where the bundle records ``training_sha256``, with exactly those contents. Otherwise (a
    bundle from another workspace, a re-imported dataset) the recorded SHA-256s are the truth: each is
    given a path where this catalog holds a file with that content, else an empty path (exact check only).
    """
    from sqlalchemy import select

    from handlens.data.catalog import Dataset, Image, open_catalog

    membership = manifest.get("split_membership") or {}
    ids = sorted({int(i) for name in ("train", "val") for i in membership.get(name, [])})
    recorded = set(manifest.get("training_sha256") or [])
    notes: list[str] = []
    catalog = open_catalog(ws.db_url)
    try:
        with catalog.session() as session:
            rows = [] if not ids else list(session.execute(
                select(Image.id, Image.path, Image.sha256).join(Dataset, Dataset.id == Image.dataset_id)
                .where(Dataset.name == manifest.get("dataset"), Image.id.in_(ids))))
            if rows and len(rows) == len(ids) and (not recorded or {r[2] for r in rows} == recorded):
                return [(r[1], r[2]) for r in rows], notes
            if not recorded:
                notes.append("this catalog does not hold the bundle's training images (by id) and the bundle "
                             "records no training_sha256 (trained before handlens recorded them)")
                return [], notes
            known: dict[str, str] = {}
            for path, sha in session.execute(select(Image.path, Image.sha256)
                                             .where(Image.sha256.in_(recorded)).order_by(Image.id)):
                known.setdefault(sha, path)
    finally:
        catalog.close()
    notes.append(f"training images identified by the bundle's training_sha256 (its image ids do not match this "
                 f"catalog); {len(known)} of {len(recorded)} found in the catalog for the near-duplicate check")
    return [(known.get(sha, ""), sha) for sha in sorted(recorded)], notes


def leak_check(ws: Workspace, bundle: Any, paths: list[str], decoded: Any, *, sha256s: list[str] | None = None,
               chunk: int = 64) -> Any:
    """Which of ``paths`` (decoded as the model sees them: ``decoded``) copy an image the bundle trained on.

    Exact copies by SHA-256; near-duplicates by dHash (``data.leaks``) of the decoded pixels, the training
    images read through the decode cache (warm after training in this workspace), ``chunk`` at a time.
    """
    from handlens.data.leaks import ImageRef, find_copies, frame_dhash, hash_many
    from handlens.transforms.cache import decode_many, decode_working_many

    started = time.perf_counter()
    train, notes = training_images(ws, bundle.manifest)
    test_sha = list(sha256s) if sha256s else [_file_sha256(p) for p in paths]
    test = [ImageRef(p, s, h, frame_dhash(p)) for p, s, h in zip(paths, test_sha, hash_many(decoded), strict=True)]
    timings = {"training_images": time.perf_counter() - started}
    started = time.perf_counter()
    on_disk = [(p, s) for p, s in train if p and Path(p).is_file()]
    missing = len(train) - len(on_disk)
    if missing:
        notes.append(f"{missing} training image(s) are not on disk here: checked for exact copies only")
    hashes: list[int | None] = []
    for start in range(0, len(on_disk), chunk):  # bounded memory: working images can be megapixels each
        part = on_disk[start:start + chunk]
        part_paths, part_sha = [p for p, _ in part], [s for _, s in part]
        if bundle.patch_trained:
            arrays: Any = decode_working_many(part_paths, bundle.preprocess.working_side,
                                              bundle.preprocess.morphology, sha256s=part_sha, cache_dir=ws.cache_dir)
        else:
            arrays = decode_many(part_paths, bundle.preprocess, sha256s=part_sha, cache_dir=ws.cache_dir)
        hashes += hash_many(arrays)
    refs = [ImageRef(p, s, h, frame_dhash(p)) for (p, s), h in zip(on_disk, hashes, strict=True)]
    refs += [ImageRef(p, s) for p, s in train if not (p and Path(p).is_file())]
    timings["training_hashes"] = time.perf_counter() - started
    started = time.perf_counter()
    report = find_copies(test, refs, near=bool(on_disk), subject="test")
    timings["compare"] = time.perf_counter() - started
    report.notes = notes
    report.seconds = {k: round(v, 3) for k, v in timings.items()}
    return report
