"""``handlens``: import, inspect and split datasets (training, explanations and serving come on top).

Every command is a thin shell: it parses flags, calls one library function, prints the result.
Nothing heavy is imported at module level, so ``handlens --help`` stays instant.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from handlens.cli.output import emit_json, fmt, handle_errors, stderr, stdout, table, warn

app = typer.Typer(
    name="handlens",
    help="A workbench for small, expert-labelled image collections: catalog, transfer learning, "
    "explanations and serving, offline.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

JSON_OPTION = typer.Option(False, "--json", help="Print one JSON document on stdout instead of tables.")


@app.callback()
def main(
    ctx: typer.Context,
    workspace: Path | None = typer.Option(
        None, "--workspace", envvar="HANDLENS_WORKSPACE",
        help="Workspace directory (default ./handlens-workspace); created on first use.",
    ),
    db: str | None = typer.Option(
        None, "--db", envvar="HANDLENS_DB_URL",
        help="Catalog database URL (any SQLAlchemy URL; default: SQLite inside the workspace).",
    ),
) -> None:
    ctx.obj = {"workspace": workspace, "db": db}


def _workspace(ctx: typer.Context) -> Any:
    """The workspace (created on first use), for commands whose library call opens the catalog itself."""
    from handlens.core.workspace import Workspace

    return Workspace.open(ctx.obj["workspace"], ctx.obj["db"])


def _open(ctx: typer.Context) -> tuple[Any, Any]:
    """The workspace and its catalog, opened on first use by a command."""
    from handlens.data.catalog import open_catalog

    ws = _workspace(ctx)
    return ws, open_catalog(ws.db_url)


# --------------------------------------------------------------------------- import


@app.command("import")
@handle_errors
def import_cmd(
    ctx: typer.Context,
    path: Path = typer.Argument(..., help="A folder of class folders, or a CSV manifest."),
    dataset: str = typer.Option(..., "--dataset", help="Dataset to add the images to (created if new)."),
    labelset: str | None = typer.Option(None, "--labelset", help="Labelset for the labels (default 'default')."),
    csv: Path | None = typer.Option(None, "--csv", help="CSV manifest: path,label[,labelset][,group]."),
    allow_outside: bool = typer.Option(False, "--allow-outside", help="Accept manifest rows outside PATH."),
    workers: int | None = typer.Option(None, "--workers", min=1, help="Decoding processes (default: all cores)."),
    min_size: int = typer.Option(16, "--min-size", min=1, help="Skip images whose shorter side is below this."),
    max_pixels: int = typer.Option(250_000_000, "--max-pixels", min=1, help="Skip images above this many pixels."),
    as_json: bool = JSON_OPTION,
) -> None:
    """Import images into a dataset, validating every file. Bad files are reported and skipped."""
    from handlens.data.importer import import_path

    _, catalog = _open(ctx)
    with _progress("decoding", enabled=not as_json) as progress:
        report = import_path(catalog, path, dataset, labelset, csv, allow_outside, workers, min_size,
                             max_pixels, progress)
    if as_json:
        emit_json(report.to_dict())
        return
    _print_import(report)


class _progress:
    """A rich progress bar on stderr (only on a terminal) fed by (done, total) callbacks."""

    def __init__(self, label: str, enabled: bool = True) -> None:
        self.label, self.enabled = label, enabled and stderr.is_terminal
        self._bar: Any = None
        self._task: Any = None

    def __enter__(self) -> Any:
        if not self.enabled:
            return None
        from rich.progress import Progress

        self._bar = Progress(console=stderr, transient=True)
        self._bar.start()
        return self

    def __call__(self, done: int, total: int) -> None:
        if self._task is None:
            self._task = self._bar.add_task(self.label, total=total)
        self._bar.update(self._task, completed=done)

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.stop()


def _print_import(report: Any) -> None:
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
def datasets_cmd(ctx: typer.Context, as_json: bool = JSON_OPTION) -> None:
    """List the datasets in the catalog."""
    from handlens.data.queries import dataset_summaries

    _, catalog = _open(ctx)
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
    dataset: str = typer.Argument(..., help="Dataset name."),
    labelset: str | None = typer.Option(None, "--labelset", help="Labelset (needed when there are several)."),
    as_json: bool = JSON_OPTION,
) -> None:
    """Class balance, image sizes per class, duplicates, label conflicts and shortcut warnings."""
    from handlens.data.queries import find_dataset, find_labelset
    from handlens.data.stats import dataset_stats

    _, catalog = _open(ctx)
    with catalog.session() as session:
        ds = find_dataset(session, dataset)
        stats = dataset_stats(session, ds, find_labelset(session, ds, labelset))
    if as_json:
        emit_json(stats)
        return
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
    dataset: str = typer.Argument(..., help="Dataset name."),
    labelset: str | None = typer.Option(None, "--labelset", help="Labelset to stratify on."),
    ratios: str = typer.Option("0.8,0.1,0.1", "--ratios", help="train,val[,test] shares summing to 1."),
    group_by: str | None = typer.Option(None, "--group-by", help="'group' (import's group column) or 'hash'."),
    group_regex: str | None = typer.Option(
        None, "--group-regex", help="Group by file name: a regex searched in each file name, its first capture "
        "group is the group (e.g. '^([^_]+)_' puts H1_23a_4.jpg in group H1); `stats` suggests one."),
    folds: int | None = typer.Option(None, "--folds", help="K-fold cross-validation (test share held out first)."),
    seed: int = typer.Option(0, "--seed", help="Random seed: the same seed gives the same split."),
    name: str | None = typer.Option(None, "--name", help="Split name (default splitN)."),
    min_per_class: int = typer.Option(1, "--min-per-class", min=1,
                                      help="Refuse if a non-zero share gets fewer images of a class."),
    max_per_class: int | None = typer.Option(None, "--max-per-class", min=1,
                                             help="Use at most this many images per class."),
    as_json: bool = JSON_OPTION,
) -> None:
    """Split a dataset into train/val/test (stratified, grouped, k-fold); report leakage."""
    from handlens.data.splits import make_split

    _, catalog = _open(ctx)
    summary = make_split(catalog, dataset, labelset, ratios, seed, group_by, folds, name,
                         min_per_class, max_per_class, group_regex=group_regex)
    if as_json:
        emit_json(summary)
        return
    _print_split(summary)


def _print_split(summary: dict[str, Any]) -> None:
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


@app.command("demo")
@handle_errors
def demo_cmd(
    ctx: typer.Context,
    name: str = typer.Argument("textures", help="Embedded demo dataset."),
    seed: int = typer.Option(0, "--seed"),
    train_model: bool = typer.Option(True, "--train/--no-train", help="Also train, evaluate and predict."),
    epochs: int | None = typer.Option(None, "--epochs", min=1, help="Epochs for the demo model (a gradient-trained "
                                      "head: model.head=linear; the default logistic head has none)."),
    as_json: bool = JSON_OPTION,
) -> None:
    """The main job on embedded data: build a demo dataset offline, import, split, train, evaluate, predict."""
    from handlens.data.demo import DEMO_DATASETS
    from handlens.data.importer import import_path
    from handlens.data.queries import find_dataset, find_labelset, latest_split
    from handlens.data.splits import make_split, split_summary
    from handlens.data.stats import dataset_stats

    demo = DEMO_DATASETS.get(name)
    ws, catalog = _open(ctx)
    manifest = demo.build(ws.demo_dir / demo.name, seed=seed)
    report = import_path(catalog, manifest, demo.name)
    with catalog.session() as session:
        ds = find_dataset(session, demo.name)
        labelset = find_labelset(session, ds, None)
        stats = dataset_stats(session, ds, labelset)
        existing = latest_split(session, ds, labelset)
        summary = split_summary(existing, ds.name, labelset.name) if existing else None
    if summary is None:
        summary = make_split(catalog, demo.name, None, "0.6,0.2,0.2", seed, demo.group_by, name="demo")
    catalog.close()
    result: dict[str, Any] = {"workspace": str(ws.root), "catalog": ws.db_url, "images": str(manifest.parent),
                              "import": report.to_dict(), "stats": stats, "split": summary}
    if not as_json:
        _print_import(report)
        stdout.print(f"Stats: {stats['images']} images in {len(stats['classes'])} classes, imbalance "
                     f"{stats['imbalance_ratio']:.2f}:1, {stats['groups']} groups.")
        warn(stats["warnings"])
        _print_split(summary)
    if train_model:
        result.update(_demo_train(ws, demo.name, seed, epochs, quiet=as_json))
    if as_json:
        emit_json(result)
        return
    stdout.print(f"\nworkspace: {ws.root}\ncatalog:   {ws.db_url}\nimages:    {manifest.parent}")
    if train_model:
        stdout.print(f"bundle:    {result['train']['bundle']}\n"
                     f"tracking:  mlflow ui --backend-store-uri {result['train']['tracking_uri']}\n"
                     f"next:      handlens --workspace {ws.root} predict {result['train']['bundle']} YOUR_IMAGE.png")


def _demo_train(ws: Any, dataset: str, seed: int, epochs: int | None, quiet: bool) -> dict[str, Any]:
    """Train EfficientNet-Lite0 (packaged ImageNet weights, frozen), evaluate on test, predict two images."""
    from handlens.models.bundle import load_bundle
    from handlens.train.config import load_config
    from handlens.train.evaluate import evaluate
    from handlens.train.run import train

    head = [f"train.epochs={epochs}", "model.head=linear"] if epochs else []
    cfg = load_config(None, [f"data.dataset={dataset}", "model.backbone=efficientnet_lite0", "model.weights=packaged",
                             "model.freeze=frozen", f"train.seed={seed}", *head])
    if not quiet:
        how = f"a linear head for {epochs} epochs" if epochs else "the default logistic head"
        stdout.print(f"\nTraining efficientnet_lite0 (packaged ImageNet weights, frozen) with {how}...")
    result = train(cfg, ws)
    report = evaluate(result.bundle, ws, subset="test")
    bundle = load_bundle(result.bundle)
    members = bundle.manifest["split_membership"]["test"]
    from handlens.data.catalog import Image as ImageRow
    from handlens.data.catalog import open_catalog

    catalog = open_catalog(ws.db_url)
    with catalog.session() as session:
        rows = {row.id: row.path for row in session.query(ImageRow).filter(ImageRow.id.in_(members))}
    catalog.close()
    picks = [rows[members[0]], rows[members[-1]]]
    predictions = [p.to_dict() for p in bundle.predict(picks, top_k=2)]
    if not quiet:
        stdout.print(f"test: accuracy {report['accuracy']:.3f}, macro-F1 {report['macro_f1']:.3f} "
                     f"({report['n']} images); trained in {result.seconds:.1f}s")
        for p in predictions:
            stdout.print(f"predict {Path(p['source']).name}: {p['label']} ({p['confidence']:.2f})")
    return {"train": result.to_dict(), "evaluate": {k: report[k] for k in ("accuracy", "macro_f1", "n")},
            "predictions": predictions}


# --------------------------------------------------------------------------- training and inference


def _backbone_names() -> list[str]:
    from handlens.models.backbones import BACKBONES

    return BACKBONES.names()


def _tracking_names() -> list[str]:
    from handlens.track import TRACKERS

    return TRACKERS.names()


def _run_config(config: Path | None, overrides: list[str] | None, **flags: Any) -> Any:
    """The run config: YAML file <- flags given on the command line <- key=value overrides."""
    from handlens.train.config import load_config

    sections: dict[str, dict[str, Any]] = {"data": {}, "model": {}, "train": {}, "tracking": {}, "augment": {}}
    where = {"dataset": "data", "labelset": "data", "split": "data", "backbone": "model", "weights": "model",
             "freeze": "model", "epochs": "train", "overfit_batches": "train", "tracking": "tracking",
             "policy": "augment", "balance": "data"}
    for key, value in flags.items():
        if value is not None:
            sections[where[key]]["backend" if key == "tracking" else key] = value
    return load_config(config, overrides or [], sections)


DATASET_OPT = typer.Option(None, "--dataset", help="Dataset to train on.")
LABELSET_OPT = typer.Option(None, "--labelset", help="Labelset (default: the split's).")
SPLIT_OPT = typer.Option(None, "--split", help="Split name (default: the newest).")
BACKBONE_OPT = typer.Option(None, "--backbone", help="Backbone: " + ", ".join(_backbone_names())
                            + " (default efficientnet_lite0).")
WEIGHTS_OPT = typer.Option(None, "--weights", help="packaged (offline ImageNet, efficientnet_lite0), imagenet "
                           "(download), none, or a .safetensors/.pth file (default packaged).")
FREEZE_OPT = typer.Option(None, "--freeze", help="frozen, partial:N or full (default frozen).")
CONFIG_OPT = typer.Option(None, "--config", help="Run config YAML; flags and key=value override it.")
OVERRIDES_ARG = typer.Argument(None, help="Config overrides: section.key=value, e.g. train.lr=0.01.")


@app.command("train")
@handle_errors
def train_cmd(
    ctx: typer.Context,
    overrides: list[str] | None = OVERRIDES_ARG,
    dataset: str | None = DATASET_OPT,
    labelset: str | None = LABELSET_OPT,
    split: str | None = SPLIT_OPT,
    backbone: str | None = BACKBONE_OPT,
    weights: str | None = WEIGHTS_OPT,
    freeze: str | None = FREEZE_OPT,
    epochs: int | None = typer.Option(None, "--epochs", min=1, help="Epochs (default 10)."),
    overfit_batches: int | None = typer.Option(None, "--overfit-batches", min=1,
                                               help="Sanity run: can the model overfit K batches?"),
    tracking: str | None = typer.Option(None, "--tracking", help="mlflow (default), tensorboard or none."),
    policy: str | None = typer.Option(None, "--policy", help="Augmentation: auto (default: basic for a learning "
                                      "backbone, none for a frozen one), none, basic, a preset (natural-photo, xray, "
                                      "thin-section, microscopy) or a policy .yaml file."),
    balance: str | None = typer.Option(None, "--balance", help="Class balance: none (default), oversample, sampler "
                                       "or downsample (with data.per_class=N)."),
    config: Path | None = CONFIG_OPT,
    resume: str | None = typer.Option(None, "--resume", help="Continue run RUN from its last checkpoint."),
    as_json: bool = JSON_OPTION,
) -> None:
    """Train a classifier by transfer learning. The last line printed is the bundle's path."""
    from handlens.train.run import train

    ws = _workspace(ctx)
    if backbone is not None and backbone not in _backbone_names():
        from handlens.core.errors import InputError

        raise InputError(f"--backbone {backbone!r}: choose one of {', '.join(_backbone_names())}")
    if tracking is not None and tracking not in _tracking_names():
        from handlens.core.errors import InputError

        raise InputError(f"--tracking {tracking!r}: choose one of {', '.join(_tracking_names())}")
    cfg = None if resume else _run_config(config, overrides, dataset=dataset, labelset=labelset, split=split,
                                          backbone=backbone, weights=weights, freeze=freeze, epochs=epochs,
                                          overfit_batches=overfit_batches, tracking=tracking, policy=policy,
                                          balance=balance)
    result = train(cfg, ws, resume=resume)  # type: ignore[arg-type]
    if as_json:
        emit_json(result.to_dict())
        return
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
    print(result.bundle, flush=True)


@app.command("lr-find")
@handle_errors
def lr_find_cmd(
    ctx: typer.Context,
    overrides: list[str] | None = OVERRIDES_ARG,
    dataset: str | None = DATASET_OPT,
    labelset: str | None = LABELSET_OPT,
    split: str | None = SPLIT_OPT,
    backbone: str | None = BACKBONE_OPT,
    weights: str | None = WEIGHTS_OPT,
    freeze: str | None = FREEZE_OPT,
    config: Path | None = CONFIG_OPT,
    steps: int = typer.Option(100, "--steps", min=10, help="Learning rates to try."),
    min_lr: float = typer.Option(1e-6, "--min-lr", help="Smallest learning rate tried."),
    max_lr: float = typer.Option(1.0, "--max-lr", help="Largest learning rate tried."),
    as_json: bool = JSON_OPTION,
) -> None:
    """Learning-rate range test: train briefly with a rising LR and suggest one."""
    from handlens.train.run import lr_find, quiet_lightning

    quiet_lightning()
    ws = _workspace(ctx)
    cfg = _run_config(config, overrides, dataset=dataset, labelset=labelset, split=split, backbone=backbone,
                      weights=weights, freeze=freeze)
    result = lr_find(cfg, ws, min_lr=min_lr, max_lr=max_lr, steps=steps)
    if as_json:
        emit_json(result)
        return
    if result["suggestion"]:
        stdout.print(f"suggested learning rate: {result['suggestion']:.2e}  (use train.lr={result['suggestion']:.2e})")
    else:
        stdout.print(result["note"])


@app.command("evaluate")
@handle_errors
def evaluate_cmd(
    ctx: typer.Context,
    bundle: str = typer.Argument(..., help="Run id or bundle directory."),
    dataset: str | None = typer.Option(None, "--dataset", help="Dataset (default: the one it trained on)."),
    subset: str = typer.Option("test", "--split", help="Subset of the split: train, val or test."),
    split_name: str | None = typer.Option(None, "--split-name", help="Stored split (default: the training one)."),
    images: Path | None = typer.Option(None, "--images", help="A folder-per-class tree outside the catalog."),
    out: Path | None = typer.Option(None, "--out", help="Where to write the confusion-matrix PNG."),
    top: int = typer.Option(10, "--top", min=0, help="How many top losses to list."),
    tta: bool = typer.Option(False, "--tta", help="Average over the flips/right-angle turns the training "
                             "policy allows (test-time augmentation)."),
    as_json: bool = JSON_OPTION,
) -> None:
    """Accuracy, macro-F1, per-class precision/recall/F1, ROC-AUC, confusion matrix, top losses, and
    test images that are copies of training images (leak check)."""
    from handlens.train.evaluate import evaluate

    ws = _workspace(ctx)
    report = evaluate(bundle, ws, dataset, subset, split_name, images, out, top, tta=tta)
    if as_json:
        emit_json(report)
        return
    _print_tta(report["tta"])
    auc = f"{report['roc_auc']:.3f}" if report.get("roc_auc") is not None else "n/a (a class is absent)"
    stdout.print(f"{report['source']}: {report['n']} images · accuracy {report['accuracy']:.3f} · "
                 f"macro-F1 {report['macro_f1']:.3f} · ROC-AUC {auc}")
    rows = [[c, v["precision"], v["recall"], v["f1"], v["support"]] for c, v in report["per_class"].items()]
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


def _print_tta(tta: dict[str, Any]) -> None:
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
    bundle: str = typer.Argument(..., help="Run id or bundle directory."),
    images: list[Path] = typer.Argument(..., help="Image files or folders."),
    top_k: int = typer.Option(3, "--top-k", min=1, help="Classes to show per image."),
    tta: bool = typer.Option(False, "--tta", help="Average over the flips/right-angle turns the training "
                             "policy allows (test-time augmentation)."),
    as_json: bool = JSON_OPTION,
) -> None:
    """Predict the class of images with a trained bundle."""
    from handlens.core.errors import InputError
    from handlens.models.bundle import iter_images, load_bundle
    from handlens.train.evaluate import resolve_bundle

    ws = _workspace(ctx)
    from handlens.data.imaging import probe_image

    loaded = load_bundle(resolve_bundle(ws, bundle))
    files = iter_images(images)
    problems = {}
    for f in files:  # a bad file is reported and skipped; the others are still predicted
        probe = probe_image(f)
        if not probe.ok:
            problems[f] = f"{probe.reason}: {probe.detail}"
    readable = [f for f in files if f not in problems]
    if not readable:
        detail = "; ".join(f"{Path(f).name} ({why})" for f, why in list(problems.items())[:3])
        raise InputError(f"no readable image to predict: {detail or images}")
    from handlens.models.tta import tta_plan

    predictions = loaded.predict(readable, top_k=top_k, tta=tta)
    tta_report = {**tta_plan(loaded.manifest).to_dict(), "requested": True} if tta else \
        {"requested": False, "tta_views": 1}
    if as_json:
        emit_json({"predictions": [p.to_dict() for p in predictions],
                   "skipped": [{"path": f, "reason": why} for f, why in problems.items()], "tta": tta_report})
        return
    _print_tta(tta_report)
    for f, why in problems.items():
        warn([f"skipped {f}: {why}"])
    rows = [[p.source, p.top[0][0], p.top[0][1], ", ".join(f"{c} {v:.3f}" for c, v in p.top[1:])]
            for p in predictions]
    stdout.print(table("Predictions", ["image", "class", "probability", "next"], rows))


# --------------------------------------------------------------------------- explanations


def _explainer_names() -> list[str]:
    from handlens.explain.registry import EXPLAINERS

    return EXPLAINERS.names()


@app.command("explain")
@handle_errors
def explain_cmd(
    ctx: typer.Context,
    bundle: str = typer.Argument(..., help="Run id or bundle directory."),
    images: list[Path] | None = typer.Argument(None, help="Image files or folders (or use --dataset/--split)."),
    dataset: str | None = typer.Option(None, "--dataset", help="Explain catalog images (default: the model's)."),
    subset: str | None = typer.Option(None, "--split", help="Subset of the model's split: train, val or test."),
    method: str = typer.Option("gradcam", "--method", help="One of: " + ", ".join(_explainer_names()) + "."),
    layer: str | None = typer.Option(None, "--layer", help="Named layer (stage4, conv_head...) or module path; "
                                     "default: the model's last feature map."),
    target: str = typer.Option("pred", "--target", help="pred, a class name, or all."),
    out: Path = typer.Option(Path("explanations"), "--out", help="Folder for overlays (PNG), maps (.npy), index."),
    opacity: float = typer.Option(0.5, "--opacity", min=0.0, max=1.0, help="Overlay opacity."),
    param: list[str] | None = typer.Option(None, "--param", help="Method parameter key=value, e.g. steps=50."),
    tile: int | None = typer.Option(None, "--tile", min=8, help="Large images: tiles of this many pixels, "
                                    "predicted and explained in batches, stitched at full resolution."),
    overlap: float = typer.Option(0.25, "--overlap", min=0.0, max=0.9, help="Tile overlap share (with --tile)."),
    as_json: bool = JSON_OPTION,
) -> None:
    """Where the model looks: heatmaps over images, as PNG overlays and raw .npy maps."""
    from handlens.core.errors import InputError
    from handlens.explain.api import load_bundle
    from handlens.explain.output import write_explanations
    from handlens.models.bundle import iter_images
    from handlens.train.config import parse_value
    from handlens.train.evaluate import resolve_bundle

    if method not in _explainer_names():
        raise InputError(f"--method {method!r}: choose one of {', '.join(_explainer_names())}")
    params = {}
    for item in param or []:
        if "=" not in item:
            raise InputError(f"--param {item!r}: write key=value, e.g. --param steps=50")
        key, value = item.split("=", 1)
        params[key] = parse_value(value)
    if not images and not subset:
        raise InputError("give image files, or --split train|val|test (with --dataset) to explain catalog images")
    patch_bundle = None
    if tile is None and images and not subset:
        candidate = load_bundle(resolve_bundle(_workspace(ctx), bundle))
        if candidate.patch_trained:  # whole images resized to the input are not what it learned from
            patch_bundle = candidate
            stderr.print(f"{bundle} was trained on patches: explaining tile by tile at its patch scale (--tile)")
    if tile is not None or patch_bundle is not None:
        from handlens.explain.output import write_tiled

        loaded = patch_bundle or load_bundle(resolve_bundle(_workspace(ctx), bundle))
        tile = tile or int(loaded.preprocess.patches.get("size", loaded.preprocess.size))
        files = iter_images(images or [])
        index = write_tiled(loaded, files, out, method, layer, target, tile, overlap, opacity, params)
        if as_json:
            emit_json(index)
            return
        for item in index["images"]:
            stdout.print(f"{Path(item['image']).name}: {item['label']} ({item['probability']:.2f}) from "
                         f"{item['tiles']} tiles -> {item['overlay']}")
        return
    ws, catalog = _open(ctx)
    loaded = load_bundle(resolve_bundle(ws, bundle))
    if subset:
        from handlens.explain.output import explain_subset

        try:
            with _progress("explaining", enabled=not as_json) as progress:
                index = explain_subset(loaded, catalog, subset, out, method, layer, target, dataset, opacity,
                                       params, progress=progress)
        finally:
            catalog.close()
    else:
        catalog.close()
        files = iter_images(images or [])
        missing = [f for f in files if not Path(f).is_file()]
        if missing or not files:
            raise InputError(f"no such image file: {missing[0] if missing else images}")
        index = write_explanations(loaded, files, out, method, layer, target, opacity, params)
    if as_json:
        emit_json(index)
        return
    if subset:
        stdout.print(f"{len(index['images'])} images explained with {index['method']} -> {out}")
        if index.get("gallery"):
            stdout.print(f"top losses with their maps: {index['gallery']}")
        stdout.print(f"index: {index['index']}")
        return
    for item in index["images"]:
        stdout.print(f"{Path(item['image']).name}: {item['target']} ({item['probability']:.2f}) -> {item['overlay']}")
    stdout.print(f"{index['method']} on {index['layer'] or 'pixels'}; index: {index['index']}")


@app.command("trust")
@handle_errors
def trust_cmd(
    ctx: typer.Context,
    bundle: str = typer.Argument(..., help="Run id or bundle directory."),
    images: list[Path] = typer.Argument(..., help="Image files or folders (a handful is enough)."),
    method: str = typer.Option("gradcam", "--method", help="Explanation method to check."),
    layer: str | None = typer.Option(None, "--layer", help="Layer for CAM methods."),
    baseline: str = typer.Option("blur", "--baseline", help="What removed pixels become: blur or mean."),
    steps: int = typer.Option(20, "--steps", min=2, help="Points on the deletion/insertion curves."),
    sanity_steps: int | None = typer.Option(None, "--sanity-steps", min=1,
                                            help="Blocks to randomise from the head down (default: all)."),
    roi: str = typer.Option("none", "--roi", help="Measure on the specimen only: none, threshold (the model's ROI "
                            "rule, else Otsu) or annotations (expert regions in the catalog)."),
    as_json: bool = JSON_OPTION,
) -> None:
    """Can the maps be trusted? Deletion/insertion AUC beside a random map, and the randomisation sanity check.

    A patch-trained model is measured on what it sees: the grid patches of each image, at its patch scale.
    """
    from handlens.explain.api import explain, load_bundle
    from handlens.explain.metrics import deletion_insertion, parameter_randomisation
    from handlens.models.bundle import iter_images
    from handlens.train.evaluate import resolve_bundle

    ws = _workspace(ctx)
    loaded = load_bundle(resolve_bundle(ws, bundle))
    files = iter_images(images)
    if loaded.patch_trained:
        inputs, rois = _patch_inputs_and_rois(ws, loaded, files, roi)
    else:
        inputs, rois = loaded.transform_many(files), _input_rois(ws, loaded.preprocess, files, roi)
    mean, std = loaded.preprocess.affine()
    result = explain(loaded.module, inputs, loaded.classes, method, layer, "pred", mean, std)
    faithfulness = deletion_insertion(loaded.module, inputs, result.maps if result.maps.ndim == 3 else
                                      result.maps[:, 0], result.targets, baseline, steps, rois=rois)
    sanity = parameter_randomisation(loaded.module, inputs, loaded.classes, method, layer, sanity_steps,
                                     mean=mean, std=std)
    report = {"method": method, "layer": result.layer, "images": files,
              "inputs": "grid patches" if loaded.patch_trained else "whole images", "n_inputs": len(inputs),
              "faithfulness": faithfulness, "sanity": sanity}
    if as_json:
        emit_json(report)
        return
    f = faithfulness
    measured_on = f"{len(inputs)} grid patches of {len(files)} images" if loaded.patch_trained else \
        f"{len(files)} images"
    stdout.print(table(f"Faithfulness of {method} ({measured_on}, {baseline} baseline)",
                       ["curve", f"{method} AUC", "random map AUC", "better is"],
                       [["deletion", f["deletion_auc"], f["random_deletion_auc"], "lower"],
                        ["insertion", f["insertion_auc"], f["random_insertion_auc"], "higher"]]))
    rows = [[step["randomised_down_to"], step["spearman"]] for step in sanity["steps"]]
    stdout.print(table("Sanity: rank correlation with the trained model's maps as blocks are randomised",
                       ["randomised down to", "Spearman"], rows))
    verdict = "passes" if sanity["passed"] else "FAILS (its maps barely depend on the model's weights)"
    stdout.print(f"sanity check {verdict}: final correlation {sanity['final_spearman']:.2f} "
                 f"(threshold {sanity['threshold']})")


def _roi_rule(preprocess: Any, source: str) -> Any:
    """The threshold rule ``--roi threshold`` uses: the model's own, else Otsu."""
    from handlens.core.errors import InputError
    from handlens.transforms.roi import RoiRule

    if source not in ("none", "threshold", "annotations"):
        raise InputError(f"--roi {source!r}: choose none, threshold or annotations")
    rule = RoiRule.from_dict((preprocess.patches or {}).get("roi"))
    return rule if rule.source == "threshold" else RoiRule(source="threshold")


def _expert_masks(ws: Any, files: list[str]) -> list[Any]:
    """Each file's expert regions as a mask at the image's resolution (an error names a file without any)."""
    from sqlalchemy import select

    from handlens.core.errors import InputError
    from handlens.data.annotations import annotated_images_by_id, region_mask
    from handlens.data.catalog import Image, open_catalog

    catalog = open_catalog(ws.db_url)
    masks = []
    try:
        with catalog.session() as session:
            for f in files:
                row = session.scalars(select(Image).where(Image.path == str(Path(f).resolve()))).first()
                found = annotated_images_by_id(session, [row.id]).get(row.id) if row is not None else None
                if not found:
                    raise InputError(f"{f} has no expert region in the catalog; import regions with "
                                     "`handlens annotate import` or use --roi threshold")
                masks.append(region_mask(found, int(row.width), int(row.height)))
    finally:
        catalog.close()
    return masks


def _input_rois(ws: Any, preprocess: Any, files: list[str], source: str) -> Any:
    """ROI masks on the model input grid for ``files`` (None for ``none``)."""
    import numpy as np

    from handlens.transforms.preprocess import preprocess_image
    from handlens.transforms.roi import mask_for_input, threshold_roi

    rule = _roi_rule(preprocess, source)
    if source == "none":
        return None
    if source == "threshold":
        return np.stack([threshold_roi(preprocess_image(f, preprocess), rule) for f in files])
    return np.stack([mask_for_input(mask, preprocess.size, preprocess.resize) for mask in _expert_masks(ws, files)])


def _patch_inputs_and_rois(ws: Any, bundle: Any, files: list[str], source: str) -> tuple[Any, Any]:
    """A patch-trained model's normalised grid patches of ``files`` (cut from their working images, as it
    predicts) and their ROI masks (None for ``none``)."""
    import numpy as np

    from handlens.transforms.preprocess import decode_working
    from handlens.transforms.roi import resize_mask, threshold_roi

    preprocess = bundle.preprocess
    rule = _roi_rule(preprocess, source)
    working = [decode_working(f, preprocess.working_side, preprocess.morphology) for f in files]
    patches, owners, boxes = bundle.grid_patches(working)
    inputs = preprocess.normalize_batch(patches)
    if source == "none":
        return inputs, None
    if source == "threshold":
        # on the whole working image, as training does: Otsu on one patch would split even an all-specimen patch
        masks = [threshold_roi(image, rule) for image in working]
    else:
        masks = [resize_mask(mask, image.shape[0], image.shape[1])
                 for mask, image in zip(_expert_masks(ws, files), working, strict=True)]
    size = preprocess.size
    return inputs, np.stack([resize_mask(masks[owner][top:top + side, left:left + side], size, size)
                             for owner, (top, left, side) in zip(owners, boxes, strict=True)])


@app.command("serve")
@handle_errors
def serve_cmd(
    ctx: typer.Context,
    host: str = typer.Option("127.0.0.1", "--host", help="Address to bind (loopback by default)."),
    port: int = typer.Option(8000, "--port", min=0, max=65535),
    workers: int = typer.Option(1, "--workers", min=1, help="Server processes."),
    max_upload_mb: float = typer.Option(20.0, "--max-upload-mb", min=0.01, help="Larger uploads get 413."),
    max_pixels: int = typer.Option(50_000_000, "--max-pixels", min=1, help="Larger images get 413."),
    batch_size: int = typer.Option(16, "--batch-size", min=1, help="Predict micro-batch size (1: no batching)."),
    max_wait_ms: float = typer.Option(5.0, "--max-wait-ms", min=0, help="How long a request waits for a batch."),
    api_key: str | None = typer.Option(None, "--api-key", envvar="HANDLENS_API_KEY",
                                       help="Key for mutating endpoints (needed off loopback)."),
    cors: list[str] | None = typer.Option(None, "--cors", help="Allow this browser origin (repeatable; off by "
                                         "default)."),
) -> None:
    """Serve the API (/api/v1, OpenAPI at /docs), health (/livez, /readyz) and metrics (/metrics)."""
    import os

    import uvicorn

    from handlens.serve.app import SETTINGS_ENV
    from handlens.serve.settings import ServeSettings

    ws = _workspace(ctx)
    settings = ServeSettings(workspace=ws.root, db_url=ws.db_url, host=host, port=port,
                             max_upload_bytes=int(max_upload_mb * 2**20), max_pixels=max_pixels,
                             batch_size=batch_size, max_wait_ms=max_wait_ms, api_key=api_key,
                             cors_origins=list(cors or []))
    if not settings.loopback and not api_key:
        stderr.print(f"[yellow]warning:[/] serving on {host} without --api-key: read-only endpoints are open to "
                     "the network and mutating ones are refused")
    os.environ[SETTINGS_ENV] = settings.model_dump_json()
    stderr.print(f"handlens serving {ws.root} on http://{host}:{port} (API docs at /docs)")
    uvicorn.run("handlens.serve.app:app_from_env", factory=True, host=host, port=port, workers=workers,
                log_level="warning")


@app.command("augment-preview")
@handle_errors
def augment_preview_cmd(
    ctx: typer.Context,
    dataset: str = typer.Argument(..., help="Dataset to sample images from."),
    policy: str = typer.Option("basic", "--policy", help="basic, a preset (natural-photo, xray, thin-section, "
                               "microscopy) or a policy .yaml file."),
    n: int = typer.Option(16, "--n", min=1, max=256, help="How many images."),
    size: int = typer.Option(224, "--size", min=16, help="Input size the images are resized to first."),
    seed: int = typer.Option(0, "--seed"),
    out: Path = typer.Option(Path("augment-preview.png"), "--out", help="Where to write the grid PNG."),
    as_json: bool = JSON_OPTION,
) -> None:
    """See what the network sees: originals beside their augmented versions, in one grid."""
    import random

    import numpy as np
    import torch

    from handlens.data.queries import find_dataset, find_labelset, labelled_images
    from handlens.explain.render import grid
    from handlens.train.config import load_config
    from handlens.transforms.augment import build_augmenter
    from handlens.transforms.cache import decode_many
    from handlens.transforms.policy import load_policy
    from handlens.transforms.preprocess import Preprocess

    ws, catalog = _open(ctx)
    with catalog.session() as session:
        ds = find_dataset(session, dataset)
        images = labelled_images(session, find_labelset(session, ds, None))
    catalog.close()
    picks = random.Random(seed).sample(images, min(n, len(images)))
    originals = decode_many([p.path for p in picks], Preprocess(size=size), [p.sha256 for p in picks], ws.cache_dir)
    torch.manual_seed(seed)
    cfg = load_config(None, [f"augment.policy={policy}"])  # clear errors for unknown policies
    augment = build_augmenter(cfg.augment)
    batch = torch.from_numpy(originals).permute(0, 3, 1, 2).contiguous()
    recommended = (load_policy(policy).preprocess if policy not in ("none", "basic", "auto") else {}).get("patches", {})
    if recommended.get("enabled"):  # the policy trains on patches: show the patches the network gets
        from handlens.transforms.cache import decode_working_many
        from handlens.transforms.patches import PatchSpec, crop_resize, sample_boxes

        spec = PatchSpec.from_dict({k: v for k, v in recommended.items() if k != "enabled"})
        working = decode_working_many([p.path for p in picks], spec.max_side, [], [p.sha256 for p in picks],
                                      ws.cache_dir)
        rng = random.Random(seed)
        batch = torch.stack([crop_resize(w, sample_boxes(w.shape[0], w.shape[1], spec, rng, count=1)[0], size)
                             for w in working])
    augmented = (augment(batch).round().to(torch.uint8) if augment else batch).permute(0, 2, 3, 1).numpy()
    panels, titles = [], []
    for pick, before, after in zip(picks, originals, augmented, strict=True):
        panels += [before, np.ascontiguousarray(after)]
        titles += [pick.label, f"{pick.label} ({policy})"]
    grid(panels, titles, columns=8).save(out)
    uniform = [p.path for p, a in zip(picks, augmented, strict=True) if float(a.std()) < 2.0]
    report = {"out": str(out.resolve()), "policy": policy, "images": len(picks), "nearly_uniform": uniform}
    if as_json:
        emit_json(report)
        return
    stdout.print(f"{len(picks)} originals and their '{policy}' augmentations: {report['out']}")
    warn([f"{len(uniform)} augmented samples are nearly uniform (all-black or blank patches?), e.g. {uniform[0]}"]
         if uniform else [])


from handlens.cli.study import study_app  # noqa: E402  (a command group of its own module)

app.add_typer(study_app, name="study")

annotate_app = typer.Typer(help="Expert regions (masks or polygons) on catalog images.", no_args_is_help=True)
app.add_typer(annotate_app, name="annotate")


@annotate_app.command("import")
@handle_errors
def annotate_import_cmd(
    ctx: typer.Context,
    dataset: str = typer.Argument(..., help="Dataset whose images the regions belong to."),
    folder: Path = typer.Argument(..., help="Files named after the images: <stem>.png masks or <stem>.json polygons."),
    as_json: bool = JSON_OPTION,
) -> None:
    """Import expert regions: binary PNG masks or polygon JSON, matched to images by file name."""
    from handlens.data.annotations import import_annotations

    _, catalog = _open(ctx)
    report = import_annotations(catalog, dataset, folder)
    catalog.close()
    if as_json:
        emit_json(report)
        return
    stdout.print(f"{report['added']} regions added to '{dataset}'.")
    warn([f"{len(report['unmatched'])} files match no image (e.g. {report['unmatched'][0]})"]
         if report["unmatched"] else [])
    warn([f"{len(report['ambiguous'])} files match several images with the same name"] if report["ambiguous"] else [])
    warn([f"invalid {item['path']}: {item['reason']}" for item in report["invalid"]])


@app.command("agreement")
@handle_errors
def agreement_cmd(
    ctx: typer.Context,
    bundle: str = typer.Argument(..., help="Run id or bundle directory."),
    dataset: str | None = typer.Option(None, "--dataset", help="Dataset with expert regions (default: the model's)."),
    method: str = typer.Option("gradcam", "--method", help="Explanation method."),
    layer: str | None = typer.Option(None, "--layer", help="Layer for CAM methods (default: the last)."),
    subset: str | None = typer.Option(None, "--split", help="Only images of this subset of the model's split."),
    fraction: float = typer.Option(0.2, "--top", min=0.01, max=1.0, help="Top share of the map for the IoU."),
    as_json: bool = JSON_OPTION,
) -> None:
    """Do models look where experts look? Pointing game, energy inside the region, top-k% IoU."""
    from handlens.explain.agreement import agreement_report
    from handlens.explain.api import load_bundle
    from handlens.train.evaluate import resolve_bundle

    ws, catalog = _open(ctx)
    try:
        report = agreement_report(load_bundle(resolve_bundle(ws, bundle)), catalog, dataset, method, layer,
                                  fraction, subset=subset)
    finally:
        catalog.close()
    if as_json:
        emit_json(report)
        return
    rows = [[name, v["n"], v.get("pointing_hit_rate", 0.0), v.get("energy_inside", 0.0), v.get("top_iou", 0.0),
             v.get("region_share", 0.0)] for name, v in {**report["per_class"], "all": report["overall"]}.items()]
    stdout.print(table(f"Agreement of {report['method']} ({report['layer']}) with expert regions",
                       ["class", "images", "pointing hit rate", "energy inside", f"top-{fraction:.0%} IoU",
                        "region share (chance)"], rows))


def run() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    run()
