"""``handlens detect train`` and ``detect run``: find objects on large images, then classify and explain each
(``handlens.detect``)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from handlens.cli.context import workspace
from handlens.cli.options import JsonFlag, TtaFlag, flags_model
from handlens.cli.output import emit_json, handle_errors, stderr, stdout, table

detect_app = typer.Typer(help="Detectors: train one on the catalog's boxes; run it, then classify and explain "
                              "each box.", no_args_is_help=True)


@detect_app.command("train")
@handle_errors
def detect_train_cmd(
    ctx: typer.Context,
    *,
    dataset: Annotated[str | None, typer.Option("--dataset", help="Dataset whose images carry boxes.")] = None,
    labelset: Annotated[str | None, typer.Option("--labelset", help="Box labelset to detect (default: the only "
                                                 "one).")] = None,
    backbone: Annotated[str, typer.Option("--backbone", help="Backbone of the detector's body.")] =
    "efficientnet_lite0",
    weights: Annotated[str, typer.Option("--weights", help="packaged, imagenet, none or a weights file.")] =
    "packaged",
    architecture: Annotated[str, typer.Option("--architecture", help="fcos (default) or fasterrcnn.")] = "fcos",
    freeze: Annotated[str, typer.Option("--freeze", help="frozen, partial:N (the body's last N stages learn) or "
                                        "full.")] = "partial:3",
    epochs: Annotated[int, typer.Option("--epochs", min=1)] = 12,
    tile: Annotated[int, typer.Option("--tile", min=64, help="Tile side in working pixels.")] = 384,
    scale: Annotated[str, typer.Option("--scale", help="Working scale (working px per image px) or auto.")] =
    "auto",
    max_minutes: Annotated[float | None, typer.Option("--max-minutes", help="Wall-time budget: no epoch starts "
                                                      "that would not fit.")] = None,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    resume: Annotated[str | None, typer.Option("--resume", help="Continue a stopped run (its saved config).")] =
    None,
    as_json: JsonFlag = False,
) -> None:
    """Train a detector (FCOS by default) on a dataset's boxes; the last line printed is the bundle's path."""
    from handlens.core.errors import InputError
    from handlens.detect.config import DetectTrainConfig
    from handlens.detect.train import train_detector

    if resume is None and dataset is None:
        raise InputError("give --dataset (a dataset with boxes), or --resume RUN")
    cfg = None
    if resume is None:
        cfg = flags_model(DetectTrainConfig, dataset=dataset, labelset=labelset, backbone=backbone, weights=weights,
                          architecture=architecture, freeze=freeze, epochs=epochs, tile=tile, scale=_scale(scale),
                          max_minutes=max_minutes, seed=seed)
    result = train_detector(cfg, workspace(ctx), resume=resume)
    if as_json:
        emit_json(result.to_dict())
        return
    val = result.metrics.get("val", {})
    stdout.print(f"detector run {result.run_id}: {result.epochs} epochs ({result.seconds:.0f} s), best epoch "
                 f"{result.best_epoch}; val mAP@0.5 {val.get('map_50', 0):.3f}, mAP@[.5:.95] {val.get('map', 0):.3f}; "
                 f"at score >= {result.metrics['score_threshold']['value']:.2f}: precision "
                 f"{val.get('precision', 0):.3f}, recall {val.get('recall', 0):.3f} on {val.get('images')} images",
                 markup=False)
    if result.stopped:
        stdout.print(f"stopped early: {result.stopped}", markup=False)
    print(result.bundle, flush=True)


def _scale(text: str) -> float | str:
    from handlens.core.errors import InputError

    if text == "auto":
        return text
    try:
        return float(text)
    except ValueError:
        raise InputError(f"--scale {text!r}: a number (working pixels per image pixel, e.g. 0.5) or auto") from None


@detect_app.command("run")
@handle_errors
def detect_run_cmd(
    ctx: typer.Context,
    detector: Annotated[str, typer.Argument(help="Detector run id or bundle directory.")],
    images: Annotated[list[Path], typer.Argument(help="Images (or folders of images).")],
    *,
    classifier: Annotated[str | None, typer.Option("--classifier", help="Classifier bundle (run id or folder) "
                                                   "for each box's crop.")] = None,
    method: Annotated[str | None, typer.Option("--method", help="Explain each crop with this method (default "
                                               "gradcam with --classifier).")] = None,
    layer: Annotated[str | None, typer.Option("--layer", help="The classifier's layer to explain.")] = None,
    margin: Annotated[float, typer.Option("--margin", help="Context kept around each box, a share of its width "
                                          "and height on each side.")] = 0.15,
    score: Annotated[float | None, typer.Option("--score", help="Report boxes scoring at least this (default: "
                                                "the detector's calibrated threshold).")] = None,
    single_pass: Annotated[bool, typer.Option("--single-pass", help="Resize the whole image to one tile instead "
                                              "of slicing it (fast, misses small objects).")] = False,
    out: Annotated[Path | None, typer.Option("--out", help="Folder for overlays, crops, maps and "
                                             "result.json.")] = None,
    tta: TtaFlag = False,
    as_json: JsonFlag = False,
) -> None:
    """Detect objects on each image; with --classifier, classify and explain each box's crop."""
    from handlens.detect.infer import load_detector
    from handlens.detect.pipeline import check_pipeline, run_pipeline
    from handlens.models.bundle import iter_images
    from handlens.train.evaluate import resolve_bundle

    ws = workspace(ctx)
    if classifier is not None and method is None:
        method = "gradcam"
    check_pipeline(classifier=classifier, method=method, margin=margin)
    found = load_detector(resolve_bundle(ws, detector))
    model = None
    if classifier is not None:
        from handlens.explain.api import load_bundle

        model = load_bundle(resolve_bundle(ws, classifier))
    paths = iter_images(images)
    if not as_json:
        stderr.print(f"detecting on {len(paths)} image(s) with {found}...")
    report = run_pipeline(found, paths, classifier=model, method=method, layer=layer, margin=margin,
                          score_threshold=score, single_pass=single_pass, out=out, tta=tta)
    if as_json:
        emit_json(report.to_dict())
        return
    _print_report(report, out)


def _print_report(report: Any, out: Path | None) -> None:
    rows = []
    for result in report.images:
        for number, box in enumerate(result.boxes):
            rows.append([Path(result.image).name, number, ", ".join(f"{v:.0f}" for v in box.box), f"{box.score:.2f}",
                         box.label or box.detected,
                         f"{max(box.probabilities.values()):.2f}" if box.probabilities else ""])
        if not result.boxes:
            rows.append([Path(result.image).name, "-", "no detections", "", "", ""])
    stdout.print(table("Detections", ["image", "box", "x0, y0, x1, y1", "score", "label", "p"], rows,
                       justify_numbers=False))
    stdout.print(f"{sum(len(r.boxes) for r in report.images)} boxes on {len(report.images)} image(s), score >= "
                 f"{report.score_threshold:.2f}" + (f"; files in {out}" if out else ""), markup=False)
