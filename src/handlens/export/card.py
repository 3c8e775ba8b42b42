"""``MODEL_CARD.md``: what an exported model is, what it was trained and judged on, and where it stops.

After Mitchell et al., "Model Cards for Model Reporting" (FAT* 2019), kept to what a bundle can vouch for:
the data (dataset, labelset, split, how many images), the metrics it recorded (per subset, the CV estimate
of a study's refit, ``handlens evaluate`` reports in its run folder), trust verdicts where they exist
(``handlens trust --json`` / ``handlens audit --json`` reports given to the export, or a ``trust`` key in
the manifest), intended use and limits (stated from the bundle's own facts: its classes, its preprocessing,
whether maps can be drawn in a browser), and the package versions of training and of the export. Nothing is
invented: a fact the bundle does not record is said to be missing.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from handlens.core.errors import InputError, NotFoundError

# ----------------------------------------------------------------------------------------------- trust

def _verdicts_of(report: dict[str, Any]) -> list[tuple[str, str]]:
    """(check, sentence) pairs from a ``handlens trust --json`` or ``handlens audit --json`` document."""
    if isinstance(report.get("verdicts"), list):  # an audit
        return [(str(v.get("check")), str(v.get("verdict"))) for v in report["verdicts"] if isinstance(v, dict)]
    found = []
    verdict = report.get("verdict")
    if isinstance(verdict, dict) and verdict.get("sentence"):
        found.append((f"faithfulness ({report.get('method', '?')}, {report.get('n_inputs', '?')} "
                      f"{report.get('inputs', 'inputs')})", str(verdict["sentence"])))
    if report.get("sanity_verdict"):
        found.append(("sanity (parameter randomisation)", str(report["sanity_verdict"])))
    shortcuts = report.get("shortcuts")
    if isinstance(shortcuts, dict) and shortcuts.get("verdict"):
        found.append(("map energy", str(shortcuts["verdict"])))
    return found


def read_trust(paths: Sequence[str | Path]) -> list[dict[str, Any]]:
    """The trust reports the card quotes: each ``{"source": file, "verdicts": [(check, sentence), ...]}``."""
    reports = []
    for item in paths:
        path = Path(item)
        if not path.is_file():
            raise NotFoundError(f"--trust {path}: no such file; write one with `handlens audit RUN --json > "
                                "audit.json` or `handlens trust RUN IMAGES --json > trust.json`")
        try:
            body = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise InputError(f"--trust {path} is not a JSON report ({exc})") from None
        verdicts = _verdicts_of(body) if isinstance(body, dict) else []
        if not verdicts:
            raise InputError(f"--trust {path} holds no verdicts; give the JSON of `handlens audit --json` or "
                             "`handlens trust --json`")
        reports.append({"source": path.name, "verdicts": verdicts})
    return reports


# ------------------------------------------------------------------------------------------------ parts

def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3f}"
    return "—" if value is None else str(value)


def _data(manifest: dict[str, Any]) -> list[str]:
    lines = ["## Data", ""]
    lines.append(f"- dataset **{_fmt(manifest.get('dataset'))}**, labelset **{_fmt(manifest.get('labelset'))}**, "
                 f"split **{_fmt(manifest.get('split'))}** (fold {manifest.get('fold', 0)})")
    membership = manifest.get("split_membership") or {}
    if membership:
        counts = ", ".join(f"{subset} {len(ids)}" for subset, ids in membership.items())
        lines.append(f"- images per subset: {counts}")
    trained = manifest.get("training_sha256") or []
    if trained:
        lines.append(f"- it learnt from, or was selected on, {len(trained)} distinct images (train and val; their "
                     "SHA-256 are in the bundle)")
    study = manifest.get("study")
    if isinstance(study, dict) and study.get("refitted"):
        lines.append(f"- refitted by study **{study.get('name')}** on its whole train+val pool of "
                     f"{study.get('images_seen', '?')} images; {study.get('test_images_held_out', '?')} test images "
                     "were held out of the search and the refit")
    sampled = ((manifest.get("config") or {}).get("data") or {}).get("per_class")
    if sampled:
        lines.append(f"- training used at most {sampled} images per class")
    return [*lines, ""]


def _metric_rows(metrics: dict[str, Any]) -> list[str]:
    rows = []
    for subset, values in metrics.items():
        if isinstance(values, dict) and "accuracy" in values:
            rows.append(f"| {subset} | {_fmt(values.get('n'))} | {_fmt(values.get('accuracy'))} | "
                        f"{_fmt(values.get('macro_f1'))} | {_fmt(values.get('roc_auc'))} |")
    return rows


def _evaluations(run_dir: Path) -> list[str]:
    """Rows for the ``handlens evaluate`` reports kept beside the bundle."""
    rows = []
    for report in sorted(run_dir.glob("eval_report_*.json")):
        try:
            body = json.loads(report.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            continue
        if not isinstance(body, dict):
            continue
        leak = (body.get("leakage") or {}).get("verdict", "")
        rows.append(f"| {body.get('source', report.stem)} | {_fmt(body.get('n'))} | {_fmt(body.get('accuracy'))} | "
                    f"{_fmt(body.get('macro_f1'))} | {leak} |")
    return rows


def _metrics(bundle: Any, trust: list[dict[str, Any]]) -> list[str]:
    manifest = bundle.manifest
    metrics = manifest.get("metrics") or {}
    lines = ["## Metrics", ""]
    rows = _metric_rows(metrics)
    if rows:
        lines += ["Recorded at training, per subset of the split:", "",
                  "| subset | images | accuracy | macro-F1 | ROC AUC |", "|---|---|---|---|---|", *rows]
        if metrics.get("best_epoch") is not None:
            lines += ["", f"The weights are those of epoch {metrics['best_epoch']} (best on the monitored metric)."]
    else:
        lines.append("The bundle records no per-subset metrics.")
    study = manifest.get("study")
    if isinstance(study, dict) and study.get("cv_mean") is not None:
        std = f" ± {study['cv_std']:.3f}" if isinstance(study.get("cv_std"), (int, float)) else ""
        grouped = ", grouped" if study.get("grouped") else ""
        lines += ["", f"**Cross-validation estimate** (study {study.get('name')}, trial {study.get('trial')}): "
                      f"{study.get('objective', 'objective')} {study['cv_mean']:.3f}{std} over {study.get('cv')} "
                      f"folds × {study.get('repeats', 1)} repeat(s){grouped}. This, not a single split, is the "
                      "estimate to quote for a small dataset."]
    evaluations = _evaluations(Path(bundle.path).parent)
    if evaluations:
        lines += ["", "Evaluations (`handlens evaluate` reports in the run folder):", "",
                  "| source | images | accuracy | macro-F1 | copies of training images |", "|---|---|---|---|---|",
                  *evaluations]
    lines += ["", "### Trust verdicts", ""]
    stored = manifest.get("trust")
    reports = list(trust) + ([{"source": "bundle.json", "verdicts": _verdicts_of(stored)}]
                             if isinstance(stored, dict) and _verdicts_of(stored) else [])
    if reports:
        for report in reports:
            lines += [f"From {report['source']}:", ""]
            lines += [f"- **{check}**: {sentence}" for check, sentence in report["verdicts"]]
            lines.append("")
    else:
        lines += ["No trust check is recorded for this model: run `handlens audit RUN --json > audit.json` and "
                  "export again with `--trust audit.json` to put its verdicts here.", ""]
    return lines


def _limits(bundle: Any, *, model: Any, parity: dict[str, Any]) -> list[str]:
    """Intended use and the limits that follow from the bundle's own facts."""
    manifest, pre = bundle.manifest, bundle.preprocess
    classes = ", ".join(bundle.classes)
    lines = ["## Intended use and limits", "",
             f"- Intended use: sorting images like those of dataset {_fmt(manifest.get('dataset'))} into "
             f"{len(bundle.classes)} classes ({classes}), as an aid to an expert who checks the answer; not to "
             "decide alone.",
             "- Every image gets one of these classes: an image of something else (another specimen type, a blank "
             "slide, a photo of a label) still gets a confident answer. There is no 'none of these'.",
             "- It knows what its training images showed: other microscopes, stains, scanners, magnifications "
             "or lighting can lower its accuracy without warning; judge it on your own images first "
             "(`handlens evaluate`).",
             f"- Inputs must be prepared exactly as `preprocess.json` says ({pre.size}×{pre.size}, {pre.resize}, "
             f"{pre.interpolation}, normalisation {pre.normalize}); another resize or normalisation changes the "
             "answers."]
    if pre.morphology:
        ops = ", ".join(str(step.get("op")) for step in pre.morphology)
        lines.append(f"- The images pass through morphology steps ({ops}) before the model: a consumer must "
                     "reproduce them (scikit-image's operators with a disk footprint), or its predictions differ.")
    if pre.patches:
        side = (pre.patches or {}).get("size", pre.size)
        lines.append(f"- It was trained on {side}-pixel patches of images scaled to a longer side of "
                     f"{pre.working_side}: it predicts an image as the mean over its grid patches "
                     "(`preprocess.json` → patches), never the whole image squeezed to the input.")
    if model.maps:
        lines.append(f"- In-browser maps: Grad-CAM on layer {model.feature_layer}, computed from the `features` "
                     "output and the head weights in `preprocess.json`; they show where the model looked, not why, "
                     "and are coarse (one value per feature-map cell).")
    else:
        lines.append(f"- {model.maps_note[0].upper()}{model.maps_note[1:]}.")
    if ((manifest.get("config") or {}).get("train") or {}).get("overfit_batches"):
        lines.append("- **This is a sanity run** (`--overfit-batches`): it was trained to memorise a few batches, "
                     "not to generalise. Do not use it.")
    if not parity.get("passed", True):
        lines.append(f"- onnxruntime's logits differ from torch's by up to {parity['max_abs_logits']:.2g} on the "
                     "export's check inputs: compare predictions before relying on this file.")
    return [*lines, ""]


def _versions(manifest: dict[str, Any]) -> list[str]:
    from handlens.export.onnx import export_versions

    trained, exported = manifest.get("versions") or {}, export_versions()
    names = list(dict.fromkeys([*trained, *exported]))
    rows = [f"| {name} | {trained.get(name, '—')} | {exported.get(name, '—')} |" for name in names]
    return ["## Package versions", "", "| package | training | export |", "|---|---|---|", *rows, ""]


def model_card(bundle: Any, *, model: Any, parity: dict[str, Any], trust: list[dict[str, Any]] | None = None) -> str:
    """The Markdown card of an exported bundle (``model``: the :class:`~handlens.export.onnx.OnnxModel`)."""
    manifest = bundle.manifest
    name = manifest.get("run_id") or Path(bundle.path).name
    head = manifest.get("head") or {}
    lines = [f"# Model card: {name}", "",
             f"A {manifest.get('backbone')} image classifier of {len(bundle.classes)} classes, exported by handlens "
             f"on {datetime.now(UTC).date().isoformat()} from the bundle trained on "
             f"{str(manifest.get('created_at', '?'))[:10]}.", "",
             "## Model", "",
             "| | |", "|---|---|",
             f"| backbone | {manifest.get('backbone')} (weights {manifest.get('weights') or '—'}, freeze "
             f"{manifest.get('freeze', 'full')}) |",
             f"| head | {head.get('type', 'linear')}, pool {head.get('pool', 'avg')} |",
             f"| classes | {', '.join(bundle.classes)} |",
             f"| input | `input` float32 NCHW, {bundle.preprocess.size}×{bundle.preprocess.size}"
             f" RGB, batch {'any' if model.dynamic_batch else 1} |",
             f"| outputs | {', '.join(f'`{o}`' for o in model.outputs)} |",
             f"| weights SHA-256 | `{manifest.get('weights_sha256') or '—'}` |",
             f"| export | {model.exporter} exporter, opset {model.opset}; max abs logit difference from torch "
             f"{parity.get('max_abs_logits', float('nan')):.2g} on {parity.get('images', 0)} check inputs |", ""]
    if model.fallback:
        lines += [f"The TorchScript exporter was used: {model.fallback}.", ""]
    lines += _data(manifest)
    lines += _metrics(bundle, trust or [])
    lines += _limits(bundle, model=model, parity=parity)
    lines += _versions(manifest)
    return "\n".join(lines)
