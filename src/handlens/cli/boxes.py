"""``handlens boxes import`` and ``boxes stats``: boxes on catalog images (``handlens.data.boxes``)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from handlens.cli.context import workspace_and_catalog
from handlens.cli.options import DatasetArg, JsonFlag
from handlens.cli.output import emit_json, fmt, handle_errors, stdout, table, warn

boxes_app = typer.Typer(help="Boxes on catalog images: regions to find, each with one label per labelset.",
                        no_args_is_help=True)


@boxes_app.command("import")
@handle_errors
def boxes_import_cmd(
    ctx: typer.Context,
    dataset: Annotated[str, typer.Argument(help="Dataset whose images the boxes are on.")],
    file: Annotated[Path, typer.Argument(help="COCO JSON, labelme JSON (or a folder of them), or CSV "
                                         "path,x0,y0,x1,y1,label[,labelset].")],
    *,
    fmt_: Annotated[str, typer.Option("--format", help="auto, coco, labelme or csv.")] = "auto",
    labelset: Annotated[str, typer.Option("--labelset", help="Labelset of the COCO category, labelme label or "
                                          "CSV label.")] = "default",
    as_json: JsonFlag = False,
) -> None:
    """Import boxes; bad rows (outside the image, degenerate, unknown image) are reported and skipped."""
    from handlens.data.boxes import import_boxes

    _, catalog = workspace_and_catalog(ctx)
    try:
        report = import_boxes(catalog, dataset, file, fmt=fmt_, labelset=labelset)
    finally:
        catalog.close()
    if as_json:
        emit_json(report.to_dict())
        return
    print_box_import(report)


def print_box_import(report: Any) -> None:
    """Skipped rows (the first 25), labels per labelset, then one line that sums the import up."""

    if report.skipped:
        rows = [[str(s.reason), str(s.where), str(s.image), str(s.detail)] for s in report.skipped[:25]]
        stdout.print(table("Skipped", ["reason", "where", "image", "detail"], rows, justify_numbers=False))
        if len(report.skipped) > 25:
            stdout.print(f"... and {len(report.skipped) - 25} more (use --json for all)")
    for labelset, counts in report.labels.items():
        stdout.print(table(f"Labelset '{labelset!s}'", ["class", "boxes"],
                           [[str(c), n] for c, n in counts.items()]))
    reasons = ", ".join(f"{n:,} {reason.replace('_', ' ')}" for reason, n in report.skipped_by_reason().items())
    stdout.print(f"Dataset '{report.dataset!s}' ({report.format}): {report.added:,} boxes added, "
                 f"{report.labelled:,} labels added and {report.relabelled:,} changed on boxes already there, "
                 f"{report.unchanged:,} unchanged, {len(report.skipped):,} skipped"
                 + (f" ({reasons})" if reasons else ""))


@boxes_app.command("stats")
@handle_errors
def boxes_stats_cmd(ctx: typer.Context, dataset: DatasetArg, as_json: JsonFlag = False) -> None:
    """Boxes per class in each labelset, box sizes, boxes per image and images without boxes."""
    from handlens.data.boxes import box_stats

    _, catalog = workspace_and_catalog(ctx)
    try:
        stats = box_stats(catalog, dataset)
    finally:
        catalog.close()
    if as_json:
        emit_json(stats)
        return
    print_box_stats(stats)


def _spread(values: dict[str, Any]) -> str:
    if values["min"] is None:
        return "-"
    return f"{fmt(values['min'])}/{fmt(values['median'])}/{fmt(values['max'])}"


def print_box_stats(stats: dict[str, Any]) -> None:
    """The tables of :func:`handlens.data.boxes.box_stats` (also for ``stats`` to show under its own)."""

    for name, info in stats["labelsets"].items():
        rows = [[str(c), n] for c, n in info["classes"].items()]
        if info["unlabelled"]:
            rows.append(["(no label)", info["unlabelled"]])
        stdout.print(table(f"Boxes, labelset '{name!s}'", ["class", "boxes"], rows))
    stdout.print(table(f"Boxes in '{stats['dataset']!s}': {stats['boxes']:,}", ["measure", "min/med/max"],
                       [["width px", _spread(stats["width"])], ["height px", _spread(stats["height"])],
                        ["area px²", _spread(stats["area"])],
                        ["boxes per image (with boxes)", _spread(stats["boxes_per_image"])]]))
    stdout.print(f"{stats['images_with_boxes']:,} of {stats['images']:,} images have boxes")
    warn([f"{stats['images_without_boxes']:,} images have no boxes"] if stats["boxes"] and
         stats["images_without_boxes"] else [])
