"""Training and inference commands: ``train``, ``lr-find``, ``evaluate`` and ``predict``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from handlens.cli.context import workspace
from handlens.cli.options import (
    BackboneOption,
    BundleArg,
    ConfigOption,
    FreezeOption,
    JsonFlag,
    LabelsetOption,
    OverridesArg,
    SplitOption,
    TrainDatasetOption,
    TtaFlag,
    WeightsOption,
    backbone_names,
    check_choice,
    tracking_names,
)
from handlens.cli.output import emit_json, handle_errors, stdout, table, warn

app = typer.Typer()

#: which run-config section each flag of ``train``/``lr-find`` sets (``--tracking`` is tracking.backend)
FLAG_SECTIONS = {"dataset": "data", "labelset": "data", "split": "data", "backbone": "model", "weights": "model",
                 "freeze": "model", "epochs": "train", "overfit_batches": "train", "tracking": "tracking",
                 "policy": "augment", "balance": "data", "name": "tracking"}


def run_config(config: Path | None, overrides: list[str] | None, **flags: Any) -> Any:
    """The run config: YAML file <- flags given on the command line <- key=value overrides."""
    from handlens.train.config import load_config

    sections: dict[str, dict[str, Any]] = {"data": {}, "model": {}, "train": {}, "tracking": {}, "augment": {}}
    for key, value in flags.items():
        if value is not None:
            sections[FLAG_SECTIONS[key]]["backend" if key == "tracking" else key] = value
    return load_config(config, overrides or [], sections)


# --------------------------------------------------------------------------- train and lr-find


@app.command("train")
@handle_errors
def train_cmd(
    ctx: typer.Context,
    overrides: OverridesArg = None,
    *,
    dataset: TrainDatasetOption = None,
    labelset: LabelsetOption = None,
    split: SplitOption = None,
    backbone: BackboneOption = None,
    weights: WeightsOption = None,
    freeze: FreezeOption = None,
    epochs: Annotated[int | None, typer.Option("--epochs", min=1, help="Epochs (default 10).")] = None,
    overfit_batches: Annotated[int | None, typer.Option("--overfit-batches", min=1, help="Sanity run: can the "
                                                        "model overfit K batches?")] = None,
    tracking: Annotated[str | None, typer.Option("--tracking", help="mlflow (default), tensorboard or "
                                                 "none.")] = None,
    policy: Annotated[str | None, typer.Option(
        "--policy", help="Augmentation: auto (default: basic for a learning backbone, none for a frozen one), "
        "none, basic, a preset (natural-photo, xray, thin-section, microscopy) or a policy .yaml file.")] = None,
    balance: Annotated[str | None, typer.Option(
        "--balance", help="Class balance: none (default), oversample, sampler or downsample (with "
        "data.per_class=N).")] = None,
    name: Annotated[str | None, typer.Option("--name", help="A name that tells this run apart in the viewer and "
                                             "the tracker (tracking.name; default: what differs from other "
                                             "runs).")] = None,
    config: ConfigOption = None,
    resume: Annotated[str | None, typer.Option("--resume", help="Continue run RUN from its last "
                                               "checkpoint.")] = None,
    as_json: JsonFlag = False,
) -> None:
    """Train a classifier by transfer learning. The last line printed is the bundle's path."""
    from handlens.train.run import train

    ws = workspace(ctx)
    check_choice("--backbone", backbone, backbone_names())
    check_choice("--tracking", tracking, tracking_names())
    if resume:  # a resume continues with the run's saved config: a flag given beside it would change nothing
        given = {"--dataset": dataset, "--labelset": labelset, "--split": split, "--backbone": backbone,
                 "--weights": weights, "--freeze": freeze, "--epochs": epochs, "--overfit-batches": overfit_batches,
                 "--tracking": tracking, "--policy": policy, "--balance": balance, "--name": name,
                 "--config": config, "key=value": overrides or None}
        ignored = [flag for flag, value in given.items() if value is not None]
        if ignored:
            warn([f"--resume {resume} continues with the run's saved config ({', '.join(ignored)} ignored); start "
                  "a new run to change it"])
    cfg = None if resume else run_config(config, overrides, dataset=dataset, labelset=labelset, split=split,
                                         backbone=backbone, weights=weights, freeze=freeze, epochs=epochs,
                                         overfit_batches=overfit_batches, tracking=tracking, policy=policy,
                                         balance=balance, name=name)
    result = train(cfg, ws, resume=resume)  # type: ignore[arg-type]
    if result.rank:  # another process of a DDP run (torchrun, srun, another machine): rank 0 prints the run
        return
    if as_json:
        emit_json(result.to_dict())
        return
    _print_run(result)
    print(result.bundle, flush=True)


def _print_run(result: Any) -> None:
    stdout.print(f"run:      {result.run_id}{' (resumed)' if result.resumed else ''}")
    stdout.print(f"epochs:   {result.epochs} (best {result.best_epoch}) in {result.seconds:.1f}s")
    for subset in ("val", "test"):
        m = result.metrics.get(subset)
        if m:
            auc = f", ROC-AUC {m['roc_auc']:.3f}" if m.get("roc_auc") is not None else ""
            stdout.print(f"{subset + ':':9} accuracy {m['accuracy']:.3f}, macro-F1 {m['macro_f1']:.3f}{auc} "
                         f"({m['n']} images)")
    if result.tracking_uri:
        how = (f"mlflow ui --backend-store-uri {result.tracking_uri}" if result.tracking_uri.startswith("sqlite")
               else f"tensorboard --logdir {result.tracking_uri}")
        stdout.print(f"tracking: {how}")
    stdout.print(f"run dir:  {result.run_dir}")
    if result.verdict:
        stdout.print(f"verdict:  {result.verdict}")


@app.command("lr-find")
@handle_errors
def lr_find_cmd(
    ctx: typer.Context,
    overrides: OverridesArg = None,
    *,
    dataset: TrainDatasetOption = None,
    labelset: LabelsetOption = None,
    split: SplitOption = None,
    backbone: BackboneOption = None,
    weights: WeightsOption = None,
    freeze: FreezeOption = None,
    config: ConfigOption = None,
    steps: Annotated[int, typer.Option("--steps", min=10, help="Learning rates to try.")] = 100,
    min_lr: Annotated[float, typer.Option("--min-lr", help="Smallest learning rate tried.")] = 1e-6,
    max_lr: Annotated[float, typer.Option("--max-lr", help="Largest learning rate tried.")] = 1.0,
    as_json: JsonFlag = False,
) -> None:
    """Learning-rate range test: train briefly with a rising LR and suggest one."""
    from handlens.train.run import lr_find, quiet_lightning

    quiet_lightning()
    ws = workspace(ctx)
    cfg = run_config(config, overrides, dataset=dataset, labelset=labelset, split=split, backbone=backbone,
                     weights=weights, freeze=freeze)
    result = lr_find(cfg, ws, min_lr=min_lr, max_lr=max_lr, steps=steps)
    if as_json:
        emit_json(result)
        return
    if result["suggestion"]:
        stdout.print(f"suggested learning rate: {result['suggestion']:.2e}  (use train.lr={result['suggestion']:.2e})")
    else:
        stdout.print(result["note"])


# --------------------------------------------------------------------------- evaluate and predict


@app.command("evaluate")
@handle_errors
def evaluate_cmd(
    ctx: typer.Context,
    bundle: BundleArg,
    *,
    dataset: Annotated[str | None, typer.Option("--dataset", help="Dataset (default: the one it trained "
                                                "on).")] = None,
    subset: Annotated[str, typer.Option("--split", help="Subset of the split: train, val or test.")] = "test",
    split_name: Annotated[str | None, typer.Option("--split-name", help="Stored split (default: the training "
                                                   "one).")] = None,
    images: Annotated[Path | None, typer.Option("--images", help="A folder-per-class tree outside the "
                                                "catalog.")] = None,
    out: Annotated[Path | None, typer.Option("--out", help="Where to write the confusion-matrix PNG.")] = None,
    top: Annotated[int, typer.Option("--top", min=0, help="How many top losses to list.")] = 10,
    tta: TtaFlag = False,
    as_json: JsonFlag = False,
) -> None:
    """Accuracy, macro-F1, per-class precision/recall/F1, ROC-AUC, confusion matrix, top losses, and
    test images that are copies of training images (leak check)."""
    from handlens.track import log_evaluation
    from handlens.train.evaluate import evaluate

    ws = workspace(ctx)
    report = evaluate(bundle, ws, dataset=dataset, subset=subset, split=split_name, images=images,
                      out_dir=out, top=top, tta=tta)
    # beside the training curves in MLflow (a run tracked elsewhere, or not at all, is left alone)
    report["tracked_in"] = log_evaluation(ws.runs_dir, report["bundle"], report,
                                          subset=("images" if images else subset) + ("_tta" if tta else ""))
    if as_json:
        emit_json(report)
        return
    _print_evaluation(report)


def _print_evaluation(report: dict[str, Any]) -> None:
    print_tta(report["tta"])
    held = report.get("held_out") or {}
    if held.get("verdict") in ("not held out", "optimistic", "unknown"):  # before the scores it qualifies
        warn([held["message"]])
    elif held:
        stdout.print(f"{held['message']}.")
    auc = f"{report['roc_auc']:.3f}" if report.get("roc_auc") is not None else "n/a (a class is absent)"
    stdout.print(f"{report['source']}: {report['n']} images · accuracy {report['accuracy']:.3f} · "
                 f"macro-F1 {report['macro_f1']:.3f} · ROC-AUC {auc}")
    rows = [[c, *(f"{float(v[k]):.3f}" for k in ("precision", "recall", "f1")), v["support"]]
            for c, v in report["per_class"].items()]  # 1.000 beside 0.500, not 1
    stdout.print(table("Per class", ["class", "precision", "recall", "F1", "images"], rows))
    classes = report["classes"]
    stdout.print(table("Confusion (rows: true, columns: predicted)", ["", *classes],
                       [[c, *row] for c, row in zip(classes, report["confusion"], strict=True)]))
    if report["top_losses"]:
        stdout.print(table("Top losses (most confidently wrong, by loss)",
                           ["image", "true", "predicted", "confidence", "loss"],
                           [[x["path"], x["true"], x["predicted"], x["confidence"], x["loss"]]
                            for x in report["top_losses"]]))
    _print_leakage(report["leakage"])
    stdout.print(f"confusion matrix: {report['confusion_png']}")


def print_tta(tta: dict[str, Any]) -> None:
    """What test-time augmentation did (nothing when it was not asked for)."""
    if not tta.get("requested"):
        return
    if tta.get("warning"):
        warn([tta["warning"]])
    else:
        stdout.print(f"test-time augmentation: {tta['tta_views']} views ({', '.join(tta['views'])}) from the "
                     f"training policy {tta['policy']!r}")


def _print_leakage(leakage: dict[str, Any], shown: int = 20) -> None:
    """The leak check's verdict (as in --json), its pairs and what it cost."""
    from handlens.data.leaks import short_path

    pairs = leakage.get("pairs") or []
    if pairs:
        rows = [[short_path(p["test"]), short_path(p["train"]) or "(not on disk here)", p["kind"], p["distance"],
                 p["others"]] for p in pairs[:shown]]
        title = "Copies of training images (test -> train)" + (f", first {shown}" if len(pairs) > shown else "")
        stdout.print(table(title, ["test image", "training image", "kind", "distance", "other matches"], rows))
        clean = leakage.get("accuracy_without_copies")
        verdict = leakage["verdict"] + (f"; accuracy without them {clean:.3f}" if clean is not None else "")
        warn([verdict])
    else:
        stdout.print(f"Leak check: {leakage['verdict']}.")
    for note in leakage.get("notes") or []:
        stdout.print(f"  ({note})")
    if leakage.get("seconds"):
        stdout.print(f"  leak check took {sum(leakage['seconds'].values()):.2f} s (near-duplicates: dHash "
                     f"distance <= {leakage['max_distance']} of 64 bits)")


@app.command("predict")
@handle_errors
def predict_cmd(
    ctx: typer.Context,
    bundle: BundleArg,
    images: Annotated[list[Path], typer.Argument(help="Image files or folders.")],
    *,
    top_k: Annotated[int, typer.Option("--top-k", min=1, help="Classes to show per image.")] = 3,
    tta: TtaFlag = False,
    runtime: Annotated[str, typer.Option("--runtime", help="torch, or onnx: onnxruntime (the model exported on "
                                         "first use, cached in the workspace).")] = "torch",
    as_json: JsonFlag = False,
) -> None:
    """Predict the class of images with a trained bundle."""
    from handlens.models.bundle import load_bundle
    from handlens.train.evaluate import resolve_bundle

    check_choice("--runtime", runtime, ["torch", "onnx"])
    loaded = load_bundle(resolve_bundle(workspace(ctx), bundle))
    readable, problems = _readable_images(images)
    predictions = loaded.predict(readable, top_k=top_k, tta=tta, runtime=runtime)
    tta_report = _tta_report(loaded.manifest, tta)
    if as_json:
        emit_json({"predictions": [p.to_dict() for p in predictions],
                   "skipped": [{"path": f, "reason": why} for f, why in problems.items()], "tta": tta_report})
        return
    print_tta(tta_report)
    for f, why in problems.items():
        warn([f"skipped {f}: {why}"])
    rows = [[p.source, p.top[0][0], p.top[0][1], ", ".join(f"{c} {v:.3f}" for c, v in p.top[1:])]
            for p in predictions]
    stdout.print(table("Predictions", ["image", "class", "probability", "next"], rows))


def _readable_images(images: list[Path]) -> tuple[list[str], dict[str, str]]:
    """The image files of ``images`` (folders expanded) that decode, and why each other one does not; an
    InputError when none does (a bad file is reported and skipped, the others are still predicted)."""
    from handlens.core.errors import InputError
    from handlens.data.imaging import probe_image
    from handlens.models.bundle import iter_images

    files = iter_images(images)
    problems = {}
    for f in files:
        probe = probe_image(f)
        if not probe.ok:
            problems[f] = f"{probe.reason}: {probe.detail}"
    readable = [f for f in files if f not in problems]
    if not readable:
        detail = "; ".join(f"{Path(f).name} ({why})" for f, why in list(problems.items())[:3])
        raise InputError(f"no readable image to predict: {detail or images}")
    return readable, problems


def _tta_report(manifest: dict[str, Any], requested: bool) -> dict[str, Any]:
    """The ``tta`` section of a prediction: the views the training policy allows, when asked for."""
    if not requested:
        return {"requested": False, "tta_views": 1}
    from handlens.models.tta import tta_plan

    return {**tta_plan(manifest).to_dict(), "requested": True}
