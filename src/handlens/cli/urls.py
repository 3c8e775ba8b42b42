"""``handlens import-urls``: download a CSV manifest of image URLs into a dataset (``handlens.data.urls``)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from handlens.cli.context import workspace
from handlens.cli.options import JsonFlag
from handlens.cli.output import ProgressBar, emit_json, handle_errors, stdout, table, warn

app = typer.Typer()


@app.command("import-urls")
@handle_errors
def import_urls_cmd(
    ctx: typer.Context,
    manifest: Annotated[Path, typer.Argument(help="CSV manifest: url,label[,labelset][,group][,license]"
                                             "[,attribution].")],
    *,
    dataset: Annotated[str, typer.Option("--dataset", help="Dataset to add the images to (created if new).")],
    labelset: Annotated[str | None, typer.Option("--labelset", help="Labelset of rows without a labelset column "
                                                 "(default 'default').")] = None,
    concurrency: Annotated[int, typer.Option("--concurrency", min=1, max=64, help="Downloads at once, all hosts "
                                             "together.")] = 8,
    per_host: Annotated[int, typer.Option("--per-host", min=1, max=64, help="Downloads at once from one "
                                          "host.")] = 2,
    retry_failed: Annotated[bool, typer.Option("--retry-failed", help="Also try again the URLs that failed in an "
                                               "earlier run (refused ones never are).")] = False,
    min_per_class: Annotated[int | None, typer.Option("--min-per-class", min=1, help="Warn about classes left with "
                                                      "fewer images than this.")] = None,
    max_per_class: Annotated[int | None, typer.Option("--max-per-class", min=1, help="Download at most this many "
                                                      "images per class, in manifest order.")] = None,
    license_filter: Annotated[str | None, typer.Option("--license-filter", help="Regular expression the license "
                                                       "column must match (e.g. '^CC'); other rows are "
                                                       "refused.")] = None,
    dest: Annotated[Path | None, typer.Option("--dest", help="Folder for the files (default "
                                              "WORKSPACE/downloads/DATASET).")] = None,
    timeout: Annotated[float, typer.Option("--timeout", min=0.1, help="Seconds to connect, and for each "
                                           "read.")] = 30.0,
    retries: Annotated[int, typer.Option("--retries", min=1, max=20, help="Attempts per URL in this "
                                         "run.")] = 5,
    as_json: JsonFlag = False,
) -> None:
    """Download images listed by URL, validating each as `import` does; a rerun fetches only what is missing."""
    from handlens.data.urls import import_urls, make_config

    config = make_config(manifest=str(manifest.expanduser().resolve()), dataset=dataset, labelset=labelset,
                         concurrency=concurrency, per_host=per_host, retry_failed=retry_failed,
                         min_per_class=min_per_class, max_per_class=max_per_class, license_filter=license_filter,
                         dest=str(dest.expanduser().resolve()) if dest else None, timeout=timeout, retries=retries)
    with ProgressBar("downloading", enabled=not as_json) as progress:
        report = import_urls(config, workspace(ctx), progress=progress)
    if as_json:
        emit_json(report.to_dict())
        return
    print_url_import(report)


def print_url_import(report: Any) -> None:
    """Skipped URLs, classes per labelset, warnings; the last line sums the run up."""

    if report.skipped:
        rows = [[str(s.reason), str(s.path), str(s.detail)] for s in report.skipped[:25]]
        stdout.print(table("Not downloaded", ["reason", "url", "detail"], rows, justify_numbers=False))
        if len(report.skipped) > 25:
            stdout.print(f"... and {len(report.skipped) - 25} more (use --json for all)")
    for labelset, counts in report.class_counts.items():
        stdout.print(table(f"Labelset '{labelset!s}'", ["class", "images"],
                           [[str(c), n] for c, n in counts.items()]))
    warn([str(w) for w in report.warnings])
    stdout.print(f"attribution: {report.attribution}", markup=False)
    counts = ", ".join(f"{n:,} {status}" for status, n in report.counts.items() if n)
    reasons = ", ".join(f"{n:,} {reason.replace('_', ' ')}" for reason, n in report.skipped_by_reason().items())
    stdout.print(f"Dataset '{report.dataset}': {report.downloaded:,} downloaded this run "
                 f"({report.images_per_second:,.1f} images/s, {report.bytes / 1e6:,.1f} MB in {report.seconds:.1f}s), "
                 f"{report.added:,} added to the catalog. The ledger's {sum(report.counts.values()):,} URLs (of "
                 f"{report.rows:,} manifest rows): {counts or 'none'}"
                 f"{f'. Not downloaded this run: {reasons}' if reasons else ''}.", markup=False)
