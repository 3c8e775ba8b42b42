"""The ``export`` command: a bundle as files that run without handlens (ONNX model, preprocessing, model card)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from handlens.cli.context import workspace
from handlens.cli.options import BundleArg, JsonFlag
from handlens.cli.output import emit_json, handle_errors, stderr, stdout, warn

app = typer.Typer()


@app.command("export")
@handle_errors
def export_cmd(
    ctx: typer.Context,
    bundle: BundleArg,
    *,
    fmt: Annotated[str, typer.Option("--format", help="What to write: onnx (model.onnx, preprocess.json, "
                                     "MODEL_CARD.md) or web (those and an offline page: index.html, "
                                     "onnxruntime-web, a service worker and a web app manifest).")] = "onnx",
    out: Annotated[Path | None, typer.Option("--out", help="Folder to write (default: ./<run id>-onnx or "
                                             "./<run id>-web).")] = None,
    opset: Annotated[int, typer.Option("--opset", min=7, help="ONNX opset (18 or later uses the dynamo exporter; "
                                       "older ones the TorchScript exporter).")] = 18,
    dynamic_batch: Annotated[bool, typer.Option("--dynamic-batch", help="Any batch size (default: one image "
                                                "at a time).")] = False,
    logits_only: Annotated[bool, typer.Option("--logits-only", help="Export the logits only, without the "
                                              "explanation layer's features (no in-browser maps).")] = False,
    trust: Annotated[list[Path] | None, typer.Option("--trust", help="JSON of `handlens audit --json` or "
                                                     "`handlens trust --json` whose verdicts the model card quotes "
                                                     "(repeatable).")] = None,
    ort_dir: Annotated[Path | None, typer.Option("--ort-dir", help="--format web: an unpacked onnxruntime-web "
                                                 "dist folder (default: web/node_modules of the source "
                                                 "checkout, installed by `npm ci` there).")] = None,
    as_json: JsonFlag = False,
) -> None:
    """Export a model to ONNX with its preprocessing and a model card, checked against torch; or as an offline
    web page (--format web) that predicts and draws class activation maps in the browser."""
    from handlens.core.errors import InputError
    from handlens.export.onnx import export_bundle
    from handlens.train.evaluate import resolve_bundle

    if fmt not in ("onnx", "web"):
        raise InputError(f"--format {fmt!r}: choose one of onnx, web")
    if fmt == "web" and dynamic_batch:
        raise InputError("--dynamic-batch: a web export sets the batch axis itself (dynamic for a patch-trained "
                         "model, whose patches run together; one image otherwise): leave it out for --format web")
    if ort_dir is not None and fmt != "web":
        raise InputError("--ort-dir is for --format web")
    path = resolve_bundle(workspace(ctx), bundle)
    if out is None:
        out = Path(f"{path.parent.name if path.name == 'bundle' else path.name}-{fmt}")
    if not as_json:
        stderr.print(f"exporting {path} to {fmt}...")
    if fmt == "web":
        from handlens.export.web import export_web

        result = export_web(path, out, opset=opset, logits_only=logits_only, trust=list(trust or []),
                            ort_dir=ort_dir)
    else:
        result = export_bundle(path, out, fmt=fmt, opset=opset, dynamic_batch=dynamic_batch,
                               logits_only=logits_only, trust=list(trust or []))
    if as_json:
        emit_json(result.to_dict())
        return
    model, parity = result.model, result.parity
    stdout.print(f"{out}: {', '.join(f.name for f in result.files)}", markup=False)
    stdout.print(f"outputs {', '.join(model.outputs)}; {model.exporter} exporter, opset {model.opset}; "
                 f"max |logit difference| from torch {parity['max_abs_logits']:.2g} on {parity['images']} inputs",
                 markup=False)
    if model.fallback:
        stdout.print(f"TorchScript exporter used: {model.fallback}", markup=False)
    if not model.maps:
        stdout.print(model.maps_note, markup=False)
    if fmt == "web":
        stdout.print(f"serve {out} from any static server (e.g. `python -m http.server -d {out}`) and open it; "
                     "after the first load it works offline", markup=False)
    warn(result.warnings)
