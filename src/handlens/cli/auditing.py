"""``handlens audit``: one self-contained HTML report of every trust check on a model, to send to a colleague."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from handlens.cli.context import workspace
from handlens.cli.options import BundleArg, JsonFlag, MethodOption
from handlens.cli.output import emit_json, handle_errors, stderr, stdout

app = typer.Typer()


@app.command("audit")
@handle_errors
def audit_cmd(
    ctx: typer.Context,
    bundle: BundleArg,
    *,
    subset: Annotated[str, typer.Option("--split", help="Subset of the model's split to judge: train, val or "
                                        "test.")] = "test",
    out: Annotated[Path, typer.Option("--out", help="The HTML report to write.")] = Path("audit.html"),
    method: MethodOption = "gradcam",
    layer: Annotated[str | None, typer.Option("--layer", help="Layer for CAM methods (default: the model's last "
                                              "feature map).")] = None,
    sample: Annotated[int, typer.Option("--sample", min=1, max=500, help="Images whose maps are drawn and "
                                        "judged (the worst first, then spread over the classes).")] = 24,
    worst: Annotated[int, typer.Option("--worst", min=0, max=100, help="Worst cases shown with their "
                                       "maps.")] = 6,
    steps: Annotated[int, typer.Option("--steps", min=2, max=100, help="Points on the faithfulness "
                                       "curves.")] = 20,
    as_json: JsonFlag = False,
) -> None:
    """Can this model be trusted? Baselines, copies, map energy, burned-in marks and faithfulness, in one page."""
    from handlens.audit.html import render
    from handlens.audit.report import audit

    if subset not in ("train", "val", "test"):
        raise typer.BadParameter(f"{subset!r}: choose train, val or test", param_hint="--split")
    if not as_json:
        stderr.print(f"auditing {bundle} on its {subset} images (maps for {sample})...")
    report = audit(bundle, workspace(ctx), subset=subset, sample=sample, worst=worst, method=method, layer=layer,
                   steps=steps)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".tmp")
    partial.write_text(render(report), encoding="utf-8")
    partial.replace(out)  # a killed audit never leaves half a page
    if as_json:
        emit_json({**report.to_dict(), "html": str(out)})
        return
    stdout.print(f"{report.source}: accuracy {report.accuracy:.3f}, macro-F1 {report.macro_f1:.3f} "
                 f"({report.images} images)", markup=False)
    for check, sentence in report.verdicts():
        stdout.print(f"{check}: {sentence}", markup=False)
    stdout.print(f"report: {out}")
