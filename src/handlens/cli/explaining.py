"""Explanation commands: ``explain``, ``trust``, ``agreement`` and ``augment-preview``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from handlens.cli.context import workspace, workspace_and_catalog
from handlens.cli.options import (
    BundleArg,
    JsonFlag,
    MethodOption,
    SeedOption,
    check_choice,
    explainer_names,
    parse_params,
)
from handlens.cli.output import ProgressBar, emit_json, handle_errors, stderr, stdout, table, warn
from handlens.core.errors import InputError

app = typer.Typer()


# --------------------------------------------------------------------------- explain


@app.command("explain")
@handle_errors
def explain_cmd(
    ctx: typer.Context,
    bundle: BundleArg,
    images: Annotated[list[Path] | None, typer.Argument(help="Image files or folders (or use "
                                                        "--dataset/--split).")] = None,
    *,
    dataset: Annotated[str | None, typer.Option("--dataset", help="Explain catalog images (default: the "
                                                "model's).")] = None,
    subset: Annotated[str | None, typer.Option("--split", help="Subset of the model's split: train, val or "
                                               "test.")] = None,
    method: Annotated[str, typer.Option("--method", help="One of: " + ", ".join(explainer_names())
                                        + ".")] = "gradcam",
    layer: Annotated[str | None, typer.Option("--layer", help="Named layer (stage4, conv_head...) or module path; "
                                              "default: the model's last feature map.")] = None,
    target: Annotated[str, typer.Option("--target", help="pred, a class name, or all.")] = "pred",
    out: Annotated[Path, typer.Option("--out", help="Folder for overlays (PNG), maps (.npy), regions (GeoJSON), "
                                      "index.")] = Path("explanations"),
    formats: Annotated[list[str] | None, typer.Option("--format", help="What to write: png (overlays), npy (raw "
                                                      "maps), geojson (the top regions' outlines as polygons on "
                                                      "the image, for QuPath and GIS tools); repeat it or give a "
                                                      "comma list. Default: png,npy.")] = None,
    top: Annotated[float, typer.Option("--top", min=0.01, max=1.0, help="Top share of the map whose outlines "
                                       "become GeoJSON polygons (as agreement's top-k%).")] = 0.2,
    opacity: Annotated[float, typer.Option("--opacity", min=0.0, max=1.0, help="Overlay opacity.")] = 0.5,
    param: Annotated[list[str] | None, typer.Option("--param", help="Method parameter key=value, e.g. "
                                                    "steps=50.")] = None,
    tile: Annotated[int | None, typer.Option("--tile", min=8, help="Large images: tiles of this many pixels, "
                                             "predicted and explained in batches, stitched at full "
                                             "resolution.")] = None,
    overlap: Annotated[float, typer.Option("--overlap", min=0.0, max=0.9, help="Tile overlap share (with "
                                           "--tile).")] = 0.25,
    as_json: JsonFlag = False,
) -> None:
    """Where the model looks: heatmaps over images, as PNG overlays, raw .npy maps and GeoJSON regions.

    ``--format geojson`` writes ``<stem>.<method>.<class>.geojson`` per image and class: the outlines of the
    map's top ``--top`` share as polygons in the original image's pixels (x = column, y = row), which QuPath
    imports as annotations.
    """
    from handlens.explain.api import load_bundle
    from handlens.explain.output import check_formats
    from handlens.train.evaluate import resolve_bundle

    check_choice("--method", method, explainer_names())
    params = parse_params(param, method=method)
    written = {"formats": check_formats(formats), "top": top}  # a typo in --format fails before any work
    if not images and not subset:
        raise InputError("give image files, or --split train|val|test (with --dataset) to explain catalog images")
    ws = workspace(ctx)
    loaded = load_bundle(resolve_bundle(ws, bundle))
    on_files = bool(images) and not subset
    if tile is None and on_files and loaded.patch_tile:
        # whole images resized to the input are not what it learned from: tiles at its patch scale are
        stderr.print(f"{bundle} was trained on patches: explaining tile by tile at its patch scale (--tile)")
        tile = loaded.patch_tile
    if tile is not None:
        _explain_tiled(loaded, images or [], out=out, method=method, layer=layer, target=target, tile=tile,
                       overlap=overlap, opacity=opacity, params=params, as_json=as_json, written=written)
    elif subset:
        _explain_subset(ctx, loaded, subset, out=out, method=method, layer=layer, target=target, dataset=dataset,
                        opacity=opacity, params=params, as_json=as_json, written=written)
    else:
        _explain_files(loaded, images or [], out=out, method=method, layer=layer, target=target, opacity=opacity,
                       params=params, as_json=as_json, written=written)


def _outputs(item: dict[str, Any]) -> str:
    """The files written for one image (overlay, map, regions: whichever --format asked for)."""
    return ", ".join(item[key] for key in ("overlay", "map", "geojson") if key in item)


def _explain_tiled(loaded: Any, images: list[Path], *, out: Path, method: str, layer: str | None, target: str,
                   tile: int, overlap: float, opacity: float, params: dict[str, Any], as_json: bool,
                   written: dict[str, Any]) -> None:
    from handlens.explain.output import write_tiled
    from handlens.models.bundle import iter_images

    index = write_tiled(loaded, iter_images(images), out, method, layer=layer, target=target, tile=tile,
                        overlap=overlap, opacity=opacity, params=params, **written)
    if as_json:
        emit_json(index)
        return
    for item in index["images"]:
        stdout.print(f"{Path(item['image']).name}: {item['label']} ({item['probability']:.2f}) from "
                     f"{item['tiles']} tiles -> {_outputs(item)}")
        stdout.print(f"  {item['shortcuts']['sentence']}", markup=False)


def _explain_subset(ctx: typer.Context, loaded: Any, subset: str, *, out: Path, method: str, layer: str | None,
                    target: str, dataset: str | None, opacity: float, params: dict[str, Any], as_json: bool,
                    written: dict[str, Any]) -> None:
    from handlens.explain.output import explain_subset
    from handlens.explain.shortcuts import SHORTCUT_WARNING

    _, catalog = workspace_and_catalog(ctx)
    try:
        with ProgressBar("explaining", enabled=not as_json) as progress:
            index = explain_subset(loaded, catalog, subset, out, method=method, layer=layer, target=target,
                                   dataset=dataset, opacity=opacity, params=params, progress=progress,
                                   **written)
    finally:
        catalog.close()
    if as_json:
        emit_json(index)
        return
    stdout.print(f"{len(index['images'])} images explained with {index['method']} -> {out}")
    flagged = [item for item in index["images"] if item.get("shortcuts", {}).get("verdict") == SHORTCUT_WARNING]
    for item in flagged[:10]:
        stdout.print(f"  {Path(item['image']).name}: {item['shortcuts']['sentence']}", markup=False)
    if flagged:
        stdout.print(f"{len(flagged)} of {len(index['images'])} maps carry a shortcut warning (index: shortcuts)")
    if index.get("gallery"):
        stdout.print(f"top losses with their maps: {index['gallery']}")
    stdout.print(f"index: {index['index']}")


def _explain_files(loaded: Any, images: list[Path], *, out: Path, method: str, layer: str | None, target: str,
                   opacity: float, params: dict[str, Any], as_json: bool, written: dict[str, Any]) -> None:
    from handlens.explain.output import write_explanations
    from handlens.models.bundle import iter_images

    files = iter_images(images)
    missing = [f for f in files if not Path(f).is_file()]
    if missing or not files:
        raise InputError(f"no such image file: {missing[0] if missing else images}")
    index = write_explanations(loaded, files, out, method, layer=layer, target=target, opacity=opacity,
                               params=params, **written)
    if as_json:
        emit_json(index)
        return
    for item in index["images"]:
        stdout.print(f"{Path(item['image']).name}: {item['target']} ({item['probability']:.2f}) -> {_outputs(item)}")
        stdout.print(f"  {item['shortcuts']['sentence']}", markup=False)
    stdout.print(f"{index['method']} on {index['layer'] or 'pixels'}; index: {index['index']}")


# --------------------------------------------------------------------------- trust and agreement


@app.command("trust")
@handle_errors
def trust_cmd(
    ctx: typer.Context,
    bundle: BundleArg,
    images: Annotated[list[Path], typer.Argument(help="Image files or folders (a handful is enough).")],
    *,
    method: Annotated[str, typer.Option("--method", help="Explanation method to check.")] = "gradcam",
    layer: Annotated[str | None, typer.Option("--layer", help="Layer for CAM methods.")] = None,
    baseline: Annotated[str, typer.Option("--baseline", help="What removed pixels become: blur or "
                                          "mean.")] = "blur",
    steps: Annotated[int, typer.Option("--steps", min=2, help="Points on the deletion/insertion curves.")] = 20,
    sanity_steps: Annotated[int | None, typer.Option("--sanity-steps", min=1, help="Blocks to randomise from the "
                                                     "head down (default: all).")] = None,
    roi: Annotated[str, typer.Option("--roi", help="Measure on the specimen only: none, threshold (the model's ROI "
                                     "rule, else Otsu) or annotations (expert regions in the catalog).")] = "none",
    consistency: Annotated[bool, typer.Option("--consistency", help="Check mirror consistency instead of the maps: "
                                              "predict(mirror(x)) == swap(predict(x)), the swap from --swap or the "
                                              "training policy's label map; with neither, mirror invariance. "
                                              "Consistent at >= 0.95 agreement.")] = False,
    swap: Annotated[list[str] | None, typer.Option("--swap", help="With --consistency: classes a mirror swaps, "
                                                   "A=B (repeatable), e.g. --swap cw=ccw.")] = None,
    mirror: Annotated[str, typer.Option("--mirror", help="With --consistency: hflip (left-right) or vflip "
                                        "(up-down).")] = "hflip",
    as_json: JsonFlag = False,
) -> None:
    """Can the maps be trusted? Deletion/insertion AUC beside a random map, and the randomisation sanity check.

    A patch-trained model is measured on what it sees: the grid patches of each image, at its patch scale.
    --consistency checks the predictions instead: is a mirror image predicted as the mirror changes the class?
    """
    from handlens.train.evaluate import resolve_bundle

    ws = workspace(ctx)
    if not consistency:
        if swap or mirror != "hflip":
            raise InputError("--swap and --mirror go with --consistency (the mirror-consistency check)")
        from handlens.explain.trust import trust_report

        report = trust_report(resolve_bundle(ws, bundle), images, workspace=ws, method=method, layer=layer,
                              baseline=baseline, steps=steps, sanity_steps=sanity_steps, roi=roi)
        if as_json:
            emit_json(report.to_dict())
            return
        _print_trust(report)
        return
    from handlens.explain.consistency import consistency_report

    checked = consistency_report(resolve_bundle(ws, bundle), images, swap=swap or (), mirror=mirror)
    if as_json:
        emit_json(checked.to_dict())
        return
    _print_consistency(checked)


def _print_consistency(report: Any) -> None:
    stdout.print(f"checks: {report.expects} ({report.swap_source}), on {report.n} {report.inputs}", markup=False)
    if report.disagreements:
        stdout.print(table(f"Images whose mirror image is not predicted as expected ({len(report.disagreements)})",
                           ["image", "pred", "mirrored pred", "expected"],
                           [[Path(d["image"]).name, d["pred"], d["mirrored_pred"], d["expected"]]
                            for d in report.disagreements]))
    stdout.print(f"agreement: {report.agreement:.3f} (n={report.n})", markup=False)
    stdout.print(f"verdict: {report.sentence}", markup=False)


def _print_trust(report: Any) -> None:
    f, sanity, method = report.faithfulness, report.sanity, report.method
    measured_on = (f"{report.n_inputs} grid patches of {len(report.images)} images" if report.patch_trained
                   else f"{len(report.images)} images")
    stdout.print(table(f"Faithfulness of {method} ({measured_on}, {f['baseline']} baseline)",
                       ["curve", f"{method} AUC", "random map AUC", "better is"],
                       [["deletion", f["deletion_auc"], f["random_deletion_auc"], "lower"],
                        ["insertion", f["insertion_auc"], f["random_insertion_auc"], "higher"]]))
    rows = [[step["randomised_down_to"], step["spearman"]] for step in sanity["steps"]]
    stdout.print(table("Sanity: rank correlation with the trained model's maps as blocks are randomised",
                       ["randomised down to", "Spearman"], rows))
    if report.verdict is not None:
        stdout.print(f"verdict: {report.verdict.sentence()}")
    stdout.print(report.sanity_verdict)
    if report.shortcuts is not None:
        stdout.print(f"shortcuts: {report.shortcuts['verdict']}", markup=False)
        for row, name in zip(f["images"], report.images, strict=False):
            if row.get("shortcuts", {}).get("warnings"):
                stdout.print(f"  {Path(name).name}: {row['shortcuts']['sentence']}", markup=False)


@app.command("agreement")
@handle_errors
def agreement_cmd(
    ctx: typer.Context,
    bundle: BundleArg,
    *,
    dataset: Annotated[str | None, typer.Option("--dataset", help="Dataset with expert regions (default: the "
                                                "model's).")] = None,
    method: MethodOption = "gradcam",
    layer: Annotated[str | None, typer.Option("--layer", help="Layer for CAM methods (default: the "
                                              "last).")] = None,
    subset: Annotated[str | None, typer.Option("--split", help="Only images of this subset of the model's "
                                               "split.")] = None,
    fraction: Annotated[float, typer.Option("--top", min=0.01, max=1.0, help="Top share of the map for the "
                                            "IoU.")] = 0.2,
    as_json: JsonFlag = False,
) -> None:
    """Do models look where experts look? Pointing game, energy inside the region, top-k% IoU."""
    from handlens.explain.agreement import agreement_report
    from handlens.explain.api import load_bundle
    from handlens.train.evaluate import resolve_bundle

    ws, catalog = workspace_and_catalog(ctx)
    try:
        report = agreement_report(load_bundle(resolve_bundle(ws, bundle)), catalog, dataset_name=dataset,
                                  method=method, layer=layer, fraction=fraction, subset=subset)
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
    stdout.print(f"verdict: {report['verdict']['sentence']}", markup=False)
    for name, words in report["per_class_verdicts"].items():
        stdout.print(f"  {name}: {words}", markup=False)


# --------------------------------------------------------------------------- augment-preview


@app.command("augment-preview")
@handle_errors
def augment_preview_cmd(
    ctx: typer.Context,
    dataset: Annotated[str, typer.Argument(help="Dataset to sample images from.")],
    *,
    policy: Annotated[str, typer.Option("--policy", help="basic, a preset (natural-photo, xray, thin-section, "
                                        "microscopy) or a policy .yaml file.")] = "basic",
    n: Annotated[int, typer.Option("--n", min=1, max=256, help="How many images.")] = 16,
    size: Annotated[int, typer.Option("--size", min=16, help="Input size the images are resized to first.")] = 224,
    seed: SeedOption = 0,
    out: Annotated[Path, typer.Option("--out", help="Where to write the grid PNG.")] = Path("augment-preview.png"),
    as_json: JsonFlag = False,
) -> None:
    """See what the network sees: originals beside their augmented versions, in one grid."""
    from handlens.explain.render import grid
    from handlens.transforms.preview import augment_preview

    ws, images = _labelled_images(ctx, dataset)
    preview = augment_preview(images, policy=policy, n=n, size=size, seed=seed, cache_dir=ws.cache_dir)
    panels, titles = preview.panels()
    grid(panels, titles, columns=8).save(out)
    uniform = preview.nearly_uniform
    report = {"out": str(out.resolve()), "policy": policy, "images": len(preview.picks), "nearly_uniform": uniform}
    if as_json:
        emit_json(report)
        return
    stdout.print(f"{len(preview.picks)} originals and their '{policy}' augmentations: {report['out']}")
    warn([f"{len(uniform)} augmented samples are nearly uniform (all-black or blank patches?), e.g. {uniform[0]}"]
         if uniform else [])


def _labelled_images(ctx: typer.Context, dataset: str) -> tuple[Any, list[Any]]:
    """The workspace and the labelled images of ``dataset`` (its only labelset)."""
    from handlens.data.queries import find_dataset, find_labelset, labelled_images

    ws, catalog = workspace_and_catalog(ctx)
    try:
        with catalog.session() as session:
            ds = find_dataset(session, dataset)
            return ws, labelled_images(session, find_labelset(session, ds, None))
    finally:
        catalog.close()
