"""Data commands: ``import``, ``datasets``, ``stats``, ``split``, ``demo`` and ``annotate import``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from handlens.cli.context import workspace, workspace_and_catalog
from handlens.cli.options import DatasetArg, JsonFlag, SeedOption
from handlens.cli.output import ProgressBar, emit_json, fmt, handle_errors, stdout, table, warn
from handlens.core.errors import InputError

app = typer.Typer()
annotate_app = typer.Typer(help="Expert regions (masks or polygons) on catalog images.", no_args_is_help=True)


# --------------------------------------------------------------------------- import


@app.command("import")
@handle_errors
def import_cmd(
    ctx: typer.Context,
    path: Annotated[Path, typer.Argument(help="A folder of class folders, or a CSV manifest.")],
    *,
    dataset: Annotated[str, typer.Option("--dataset", help="Dataset to add the images to (created if new).")],
    labelset: Annotated[str | None, typer.Option("--labelset", help="Labelset for the labels (default "
                                                 "'default').")] = None,
    csv: Annotated[Path | None, typer.Option("--csv", help="CSV manifest: path,label[,labelset][,group].")] = None,
    allow_outside: Annotated[bool, typer.Option("--allow-outside", help="Accept manifest rows and "
                                                "symlinks that lead outside PATH.")] = False,
    workers: Annotated[int | None, typer.Option("--workers", min=1, help="Decoding processes (default: all "
                                                "cores).")] = None,
    min_size: Annotated[int, typer.Option("--min-size", min=1, help="Skip images whose shorter side is below "
                                          "this.")] = 16,
    max_pixels: Annotated[int, typer.Option("--max-pixels", min=1, help="Skip images above this many "
                                            "pixels.")] = 250_000_000,
    as_json: JsonFlag = False,
) -> None:
    """Import images into a dataset, validating every file. Bad files are reported and skipped."""
    from handlens.data.importer import import_path

    _, catalog = workspace_and_catalog(ctx)
    with ProgressBar("decoding", enabled=not as_json) as progress:
        report = import_path(catalog, path, dataset_name=dataset, labelset=labelset, csv_file=csv,
                             allow_outside=allow_outside, workers=workers, min_side=min_size, max_pixels=max_pixels,
                             progress=progress)
    if as_json:
        emit_json(report.to_dict())
        return
    print_import(report)


def print_import(report: Any) -> None:
    """An import report: counts, skipped files, classes per labelset, duplicates and label conflicts."""
    if report.nothing_new and not report.skipped:
        stdout.print(f"Nothing new: all {report.unchanged:,} images from {report.source} are already in "
                     f"dataset '{report.dataset}'.")
    else:
        stdout.print(
            f"Dataset '{report.dataset}': {report.added:,} added, {report.updated:,} updated, "
            f"{report.unchanged:,} unchanged, {len(report.skipped):,} skipped "
            f"({report.scanned:,} images checked in {report.seconds:.1f}s, {report.images_per_second:,.0f}/s)."
        )
        if report.nothing_new:
            stdout.print("Nothing new was added.")
    if report.skipped:
        rows = [[s.reason, s.path, s.detail] for s in report.skipped[:25]]
        stdout.print(table("Skipped files", ["reason", "file", "detail"], rows, justify_numbers=False))
        if len(report.skipped) > 25:
            stdout.print(f"... and {len(report.skipped) - 25} more (use --json for all)")
    for labelset, counts in report.class_counts.items():
        stdout.print(table(f"Labelset '{labelset}'", ["class", "images"], [[c, n] for c, n in counts.items()]))
    if report.duplicates:
        warn([f"{len(report.duplicates)} sets of identical images (same SHA-256) in the dataset"])
    for conflict in report.label_conflicts:
        labels = ", ".join(f"{Path(p).name}={lab}" for p, lab in conflict["labels"].items())
        warn([f"label conflict in '{conflict['labelset']}': identical images labelled {labels}"])


# --------------------------------------------------------------------------- datasets and stats


@app.command("datasets")
@handle_errors
def datasets_cmd(ctx: typer.Context, as_json: JsonFlag = False) -> None:
    """List the datasets in the catalog."""
    from handlens.data.queries import dataset_summaries

    _, catalog = workspace_and_catalog(ctx)
    with catalog.session() as session:
        summaries = dataset_summaries(session)
    if as_json:
        emit_json(summaries)
        return
    if not summaries:
        stdout.print("No datasets yet. Import one with: handlens import PATH --dataset NAME")
        return
    rows = [[s["name"], s["images"], ", ".join(f"{k} ({v} classes)" for k, v in s["labelsets"].items()),
             ", ".join(s["splits"]) or "-"] for s in summaries]
    stdout.print(table("Datasets", ["dataset", "images", "labelsets", "splits"], rows))


@app.command("stats")
@handle_errors
def stats_cmd(
    ctx: typer.Context,
    dataset: DatasetArg,
    labelset: Annotated[str | None, typer.Option("--labelset", help="Labelset (needed when there are "
                                                 "several).")] = None,
    as_json: JsonFlag = False,
) -> None:
    """Class balance, image sizes per class, duplicates, label conflicts and shortcut warnings."""
    from handlens.data.queries import find_dataset, find_labelset
    from handlens.data.stats import dataset_stats

    _, catalog = workspace_and_catalog(ctx)
    with catalog.session() as session:
        ds = find_dataset(session, dataset)
        stats = dataset_stats(session, ds, find_labelset(session, ds, labelset))
    from handlens.data.boxes import box_stats

    stats["boxes"] = box_stats(catalog, dataset)
    catalog.close()
    if as_json:
        emit_json(stats)
        return
    _print_stats(stats)
    if stats["boxes"]["boxes"]:
        from handlens.cli.boxes import print_box_stats

        print_box_stats(stats["boxes"])


def _print_stats(stats: dict[str, Any]) -> None:
    by_size = stats["size_shortcut"]["per_class"]
    rows = []
    for label, info in stats["classes"].items():
        w, h = info["width"], info["height"]
        rows.append([label, info["count"], f"{info['share']:.1%}", f"{w['min']}/{fmt(w['median'])}/{w['max']}",
                     f"{h['min']}/{fmt(h['median'])}/{h['max']}",
                     f"{by_size[label]['precision']:.2f}/{by_size[label]['recall']:.2f}",
                     f"{by_size[label]['others_with_sizes_never_seen']:.0%}",
                     _value_counts(info["modes"]), _value_counts(info["formats"])])
    stdout.print(table(f"Dataset '{stats['dataset']}', labelset '{stats['labelset']}': {stats['images']:,} images",
                       ["class", "images", "share", "width min/med/max", "height min/med/max",
                        "size-only P/R", "others in sizes it lacks", "modes", "formats"], rows))
    shortcut = stats["size_shortcut"]
    stdout.print(f"imbalance ratio {stats['imbalance_ratio']:.2f}:1 · size-only accuracy "
                 f"{shortcut['size_only_accuracy']:.2f} vs majority baseline {shortcut['majority_baseline']:.2f}"
                 f" · {len(stats['duplicates'])} duplicate sets · {len(stats['label_conflicts'])} label conflicts"
                 f" · {stats['groups']} groups")
    stdout.print(f"mode: {stats['mode_shortcut']['verdict']}")
    stdout.print(f"format: {stats['format_shortcut']['verdict']}")
    if stats["filename_ids"]["verdict"] not in stats["warnings"]:  # a warning below otherwise
        stdout.print(f"file names: {stats['filename_ids']['verdict']}")
    warn(stats["warnings"])


def _value_counts(counts: dict[str, int]) -> str:
    """``{"RGB": 30, "L": 2}`` -> ``RGB 30, L 2`` (a lone value without its count)."""
    return next(iter(counts)) if len(counts) == 1 else ", ".join(f"{v} {n}" for v, n in counts.items())


# --------------------------------------------------------------------------- split


@app.command("split")
@handle_errors
def split_cmd(
    ctx: typer.Context,
    dataset: DatasetArg,
    *,
    labelset: Annotated[str | None, typer.Option("--labelset", help="Labelset to stratify on.")] = None,
    ratios: Annotated[str, typer.Option("--ratios", help="train,val[,test] shares summing to 1.")] = "0.8,0.1,0.1",
    group_by: Annotated[str | None, typer.Option("--group-by", help="'group' (import's group column) or "
                                                 "'hash'.")] = None,
    group_regex: Annotated[str | None, typer.Option(
        "--group-regex", help="Group by file name: a regex searched in each file name, its first capture "
        "group is the group (e.g. '^([^_]+)_' puts H1_23a_4.jpg in group H1); `stats` suggests one.")] = None,
    folds: Annotated[int | None, typer.Option("--folds", help="K-fold cross-validation (test share held out "
                                              "first).")] = None,
    seed: Annotated[int, typer.Option("--seed", help="Random seed: the same seed gives the same split.")] = 0,
    name: Annotated[str | None, typer.Option("--name", help="Split name (default splitN).")] = None,
    min_per_class: Annotated[int, typer.Option("--min-per-class", min=1, help="Refuse if a non-zero share gets "
                                               "fewer images of a class.")] = 1,
    max_per_class: Annotated[int | None, typer.Option("--max-per-class", min=1, help="Use at most this many "
                                                      "images per class.")] = None,
    as_json: JsonFlag = False,
) -> None:
    """Split a dataset into train/val/test (stratified, grouped, k-fold); report leakage."""
    from handlens.data.splits import make_split

    _, catalog = workspace_and_catalog(ctx)
    summary = make_split(catalog, dataset, labelset_name=labelset, ratios=ratios, seed=seed, group_by=group_by,
                         folds=folds, name=name, min_per_class=min_per_class, max_per_class=max_per_class,
                         group_regex=group_regex)
    if as_json:
        emit_json(summary)
        return
    print_split(summary)


def print_split(summary: dict[str, Any]) -> None:
    """A split's counts per class and subset (per fold), its grouping and the leakage check."""
    stdout.print(f"Split '{summary['name']}' of '{summary['dataset']}' (labelset '{summary['labelset']}') "
                 "saved; it is now the default for training.")
    for fold, counts in summary["counts"].items():
        subsets = list(counts)
        classes = list(next(iter(counts.values())))
        rows = [[c, *[counts[s][c] for s in subsets], summary["class_weights"][fold].get(c, 0.0)] for c in classes]
        rows.append(["total", *[sum(counts[s].values()) for s in subsets], ""])
        title = f"Fold {fold}" if len(summary["counts"]) > 1 else "Images per split"
        stdout.print(table(title, ["class", *subsets, "class weight"], rows))
    if summary["excluded_by_max_per_class"]:
        stdout.print(f"{summary['excluded_by_max_per_class']} images left out by --max-per-class.")
    groups = summary.get("groups")
    if groups:
        origin = (f"from file names by --group-regex {summary['params'].get('group_regex')!r}"
                  if groups["source"] == "file names" else "from the catalog's group column")
        stdout.print(f"Grouped {origin}: {groups['groups']} groups of {groups['min_images']}-{groups['max_images']} "
                     "images, each kept in one split" + (f"; {groups['ungrouped_images']} images without a group "
                                                        "are placed one by one" if groups["ungrouped_images"] else ""))
    leaks = summary["leakage"]
    if leaks:
        warn([f"leakage: {len(leaks)} identical image(s) sit in more than one split "
              "(re-split with --group-by hash to keep copies together)"])
    else:
        stdout.print("Leakage check: no identical image appears in two splits.")


# --------------------------------------------------------------------------- demo

#: images the sigma-clasts demo generates unless --images says otherwise
SIGMA_DEMO_IMAGES = 12


@app.command("demo")
@handle_errors
def demo_cmd(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="Embedded demo dataset: textures, or sigma-clasts (generated "
                                        "images with boxed clasts; crops imported, nothing trained).")] = "textures",
    *,
    seed: SeedOption = 0,
    images: Annotated[int | None, typer.Option("--images", min=1, help="sigma-clasts only: how many images "
                                               f"to generate (default {SIGMA_DEMO_IMAGES}).")] = None,
    train_model: Annotated[bool | None, typer.Option("--train/--no-train", help="Also train, evaluate and "
                                                     "predict (textures; the default there).")] = None,
    epochs: Annotated[int | None, typer.Option(
        "--epochs", min=1, help="Epochs for the demo model (a gradient-trained head: model.head=linear; the "
        "default logistic head has none).")] = None,
    as_json: JsonFlag = False,
) -> None:
    """The main job on embedded data: build a demo dataset offline, import, split, train, evaluate, predict."""
    if name == "sigma-clasts":
        _sigma_demo(ctx, images=images or SIGMA_DEMO_IMAGES, seed=seed, train_model=train_model, epochs=epochs,
                    as_json=as_json)
        return
    from handlens.train.demo import demo_recipe, prepare_demo, train_demo

    if images is not None:
        raise InputError(f"--images is for the sigma-clasts demo; the {name} demo has a fixed size (drop --images)")
    ws = workspace(ctx)
    data = prepare_demo(ws, name, seed=seed)
    if not as_json:
        _print_demo_data(data)
    training = None
    if train_model is not False:
        if not as_json:
            stdout.print(f"\nTraining {demo_recipe(epochs)}...")
        training = train_demo(ws, data.dataset, seed=seed, epochs=epochs)
    if as_json:
        emit_json({**data.to_dict(), **(training.to_dict() if training else {})})
        return
    if training:
        _print_demo_training(training)
    stdout.print(f"\nworkspace: {ws.root}\ncatalog:   {ws.db_url}\nimages:    {data.images}")
    if training:
        bundle = training.result.bundle
        stdout.print(f"bundle:    {bundle}\n"
                     f"tracking:  mlflow ui --backend-store-uri {training.result.tracking_uri}\n"
                     f"next:      handlens --workspace {ws.root} predict {bundle} YOUR_IMAGE.png")


def _sigma_demo(ctx: typer.Context, *, images: int, seed: int, train_model: bool | None, epochs: int | None,
                as_json: bool) -> None:
    """Generate the sigma-clast images, import the scenes with their boxes and the crops; no training here (a
    detector takes minutes: the next steps are printed)."""
    from handlens.data.sigma import prepare_sigma_demo

    if train_model or epochs is not None:
        raise InputError("the sigma-clasts demo trains nothing itself (a detector takes minutes); drop "
                         f"--train/--epochs, then run `handlens detect train --dataset sigma-clasts-{seed} --labelset "
                         f"detection` and `handlens train --dataset sigma-crops-{seed}` (after `handlens split "
                         f"sigma-crops-{seed}`)")
    ws = workspace(ctx)
    demo = prepare_sigma_demo(ws, images=images, seed=seed)
    if as_json:
        emit_json({"workspace": str(ws.root), "catalog": ws.db_url, **demo.to_dict()})
        return
    report = demo.report
    print_import(demo.imported)
    counts = report.counts()
    stdout.print(f"Generated {len(report.images)} images ({report.size[0]}x{report.size[1]}) with "
                 f"{len(report.clasts)} sigma clasts: {counts['cw']} cw, {counts['ccw']} ccw.")
    stdout.print(f"\nworkspace: {ws.root}\ncatalog:   {ws.db_url}\nimages:    {report.out / 'images'}\n"
                 f"boxes:     {report.csv} (path,x0,y0,x1,y1,label)\n"
                 f"coco:      {report.coco}\ncrops:     {report.crops} (dataset '{demo.dataset}')\n"
                 f"scenes:    dataset '{demo.scenes}', {demo.boxes.added} boxes added (box labelsets detection, "
                 f"rotation)\n"
                 f"next:      handlens --workspace {ws.root} detect train --dataset {demo.scenes} --labelset detection "
                 f"(the detector); handlens --workspace {ws.root} split {demo.dataset} --ratios 0.8,0.2 "
                 f"--group-regex '^(sigma_\\d+)_', then handlens --workspace {ws.root} train --dataset {demo.dataset} "
                 f"--freeze partial:4 --policy {report.out / 'chiral-sigma.yaml'} --epochs 20 preprocess.size=96 "
                 f"train.lr=0.003 (the crop classifier: frozen ImageNet features cannot tell a mirror image); then "
                 f"handlens --workspace {ws.root} detect run DETECTOR IMAGE... --classifier CLASSIFIER")


def _print_demo_data(data: Any) -> None:
    stats = data.stats
    print_import(data.report)
    stdout.print(f"Stats: {stats['images']} images in {len(stats['classes'])} classes, imbalance "
                 f"{stats['imbalance_ratio']:.2f}:1, {stats['groups']} groups.")
    warn(stats["warnings"])
    print_split(data.split)


def _print_demo_training(training: Any) -> None:
    report, result = training.evaluation, training.result
    stdout.print(f"test: accuracy {report['accuracy']:.3f}, macro-F1 {report['macro_f1']:.3f} "
                 f"({report['n']} images); trained in {result.seconds:.1f}s")
    for p in training.predictions:
        stdout.print(f"predict {Path(p['source']).name}: {p['label']} ({p['confidence']:.2f})")


# --------------------------------------------------------------------------- annotate


@annotate_app.command("import")
@handle_errors
def annotate_import_cmd(
    ctx: typer.Context,
    dataset: Annotated[str, typer.Argument(help="Dataset whose images the regions belong to.")],
    folder: Annotated[Path, typer.Argument(help="Files named after the images: <stem>.png masks or <stem>.json "
                                           "polygons.")],
    as_json: JsonFlag = False,
) -> None:
    """Import expert regions: binary PNG masks or polygon JSON, matched to images by file name."""
    from handlens.data.annotations import import_annotations

    _, catalog = workspace_and_catalog(ctx)
    try:
        report = import_annotations(catalog, dataset, folder)
    finally:
        catalog.close()
    if as_json:
        emit_json(report)
        return
    stdout.print(f"{report['added']} regions added to '{dataset}'.")
    warn([f"{len(report['unmatched'])} files match no image (e.g. {report['unmatched'][0]})"]
         if report["unmatched"] else [])
    warn([f"{len(report['ambiguous'])} files match several images with the same name"] if report["ambiguous"] else [])
    warn([f"invalid {item['path']}: {item['reason']}" for item in report["invalid"]])
