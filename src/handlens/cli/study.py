"""``handlens study``: find the best honest model by cross-validated search, refit and (optionally) ensemble."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import typer

from handlens.cli.context import workspace
from handlens.cli.options import JSON_OPTION, flags_model
from handlens.cli.output import emit_json, handle_errors, stdout, table
from handlens.core.errors import InputError

study_app = typer.Typer(help="Studies: cross-validated search over run configs; the winner is refitted.",
                        no_args_is_help=True)


def parse_budget(text: str | None) -> float | None:
    """``20m``, ``1h30m``, ``90s`` or plain seconds -> seconds."""
    if text is None:
        return None
    cleaned = text.strip().lower()
    if re.fullmatch(r"\d+(\.\d+)?", cleaned):
        return float(cleaned)
    parts = re.findall(r"(\d+(?:\.\d+)?)\s*([hms])", cleaned)
    if not parts or "".join(f"{n}{u}" for n, u in parts) != cleaned.replace(" ", ""):
        raise InputError(f"--budget {text!r}: write a wall time like 20m, 1h30m, 90s or 600 (seconds)")
    return sum(float(n) * {"h": 3600, "m": 60, "s": 1}[u] for n, u in parts)


@study_app.command("run")
@handle_errors
def run_cmd(
    ctx: typer.Context,
    overrides: list[str] | None = typer.Argument(None, help="key=value run-config overrides for every trial."),
    *,
    dataset: str | None = typer.Option(None, "--dataset", help="Dataset name."),
    labelset: str | None = typer.Option(None, "--labelset", help="Labelset (default: the split's)."),
    split: str | None = typer.Option(None, "--split", help="Split name (default: the newest)."),
    space: Path | None = typer.Option(None, "--space", help="Search space YAML file."),
    preset: str | None = typer.Option(None, "--preset", help="A shipped space: quick (frozen, cheap; the default) "
                                      "or thorough (adds partial and full fine-tuning)."),
    sampler: str = typer.Option("tpe", "--sampler", help="grid, random, tpe or gp."),
    pruner: str = typer.Option("median", "--pruner",
                               help="median (by epoch in the first fold, then by fold), hyperband (by fold) or none."),
    trials: int | None = typer.Option(None, "--trials", min=1, help="Trials to finish (default: the whole grid, "
                                      "else 20, or as many as the budget allows)."),
    budget: str | None = typer.Option(None, "--budget", help="Wall time, e.g. 20m: no trial starts that would "
                                      "not fit."),
    cv: int = typer.Option(5, "--cv", min=2, help="Stratified (grouped when the split is) folds over train+val."),
    repeats: int = typer.Option(1, "--repeats", min=1, help="Repeat the K folds with new shuffles."),
    objective: str = typer.Option("val_macro_f1", "--objective", help="val_macro_f1 or val_accuracy."),
    one_se: bool = typer.Option(False, "--one-se", help="Pick the cheapest config within one standard error "
                                "of the best CV mean."),
    ensemble: int = typer.Option(1, "--ensemble", min=1, help="Average the top K refitted trials in one bundle."),
    name: str | None = typer.Option(None, "--name", help="Study name (default: DATASET-SPACE-TIME)."),
    workers: int = typer.Option(1, "--workers", min=1, help="Parallel worker processes on this machine."),
    config: Path | None = typer.Option(None, "--config", help="Run config YAML every trial starts from."),
    tracking: str = typer.Option("mlflow", "--tracking", help="mlflow (default), tensorboard or none."),
    seed: int = typer.Option(0, "--seed", help="Seed of the folds and the sampler."),
    resume: str | None = typer.Option(None, "--resume", help="Continue study NAME (its trials are kept)."),
    as_json: bool = JSON_OPTION,
) -> None:
    """Run a study; the last line printed is the winning (refitted) bundle's path."""
    from handlens.search.study import StudyConfig, run_study

    cfg = _study_config(StudyConfig, _given(ctx), dataset=dataset or "", labelset=labelset, split=split,
                        name=resume or name,
                        space=str(space) if space else None, preset=preset, sampler=sampler, pruner=pruner,
                        trials=trials, budget=parse_budget(budget), cv=cv, repeats=repeats, objective=objective,
                        one_se=one_se, ensemble=ensemble, workers=workers, config=str(config) if config else None,
                        overrides=list(overrides or []), tracking=tracking, seed=seed, resume=bool(resume))
    result = run_study(cfg, workspace(ctx))
    if as_json:
        emit_json(result.to_dict())
        return
    _print_study(result)
    stdout.print(f"refit:    {_refit_line(result.refit)}")
    stdout.print(f"time:     {result.seconds / 60:.1f} min, {result.feature_passes} feature pass(es) of the pool")
    print(result.bundle, flush=True)


def _given(ctx: typer.Context) -> set[str]:
    """The options given on the command line (or by environment), not left at their defaults."""
    sources = {name: ctx.get_parameter_source(name) for name in ctx.params}  # click's ParameterSource
    return {name for name, source in sources.items() if source is not None and source.name not in ("DEFAULT",
                                                                                                 "DEFAULT_MAP")}


def _study_config(model: Any, given: set[str], **values: Any) -> Any:
    """The StudyConfig of the flags; on --resume only the flags given (the others keep the study's own, and one
    given that differs from the study's is refused: a default value too, e.g. --cv 5 on a study made with 3)."""
    if values.get("resume"):
        values = {k: v for k, v in values.items() if k in ("name", "resume") or k in given}
    return flags_model(model, **values)


def _epochs(n: Any) -> str:
    return f"{n} epoch" if n == 1 else f"{n} epochs"


def _refit_line(refit: dict[str, Any]) -> str:
    if "members" in refit:
        return "ensemble of " + ", ".join(f"trial {m['trial']} ({_epochs(m['epochs'])})" for m in refit["members"])
    if not refit:
        return "-"
    chosen = "".join(f", {k}={v:g}" if isinstance(v, float) else f", {k}={v}"
                     for k, v in (refit.get("chosen_on_folds") or {}).items())
    return (f"trial {refit['trial']} retrained on all train+val images for {_epochs(refit['epochs'])}"
            f"{chosen + ' (chosen on the folds)' if chosen else ''} (run {refit['run_id']})")


def _print_study(result: Any, top: int | None = None) -> None:
    """The trials table (``top``: the best N by CV mean, else every trial in order), importances, verdict."""
    from handlens.search.study import params_line, scored_trials

    trials = result.trials
    if top:
        trials = sorted(scored_trials(trials), key=lambda t: -t.cv_mean)[:top]
    rows = []
    for t in trials:
        cv = f"{t.cv_mean:.3f} ± {t.cv_std:.3f}" if t.cv_mean is not None else "-"
        if t.cv_mean is not None and t.status != "complete":  # a pruned or failed trial's folds so far
            cv += " (partial)"
        rows.append([t.number, params_line(t.params), cv, t.epochs if t.epochs is not None else "-",
                     f"{t.seconds:.1f}s" if t.seconds is not None else "-", t.status, t.run_id or "-",
                     t.note[:60]])
    shown = f"the best {len(trials)} of {len(result.trials)} trials" if top else f"{len(trials)} trials"
    columns = ["trial", "parameters", "CV", "epochs", "time", "status", "run", "note"]
    stdout.print(table(f"Study {result.name}: {shown}, CV mean ± std over folds", columns, rows,
                       justify_numbers=False))
    if result.importances:
        stdout.print("parameter importances: " + ", ".join(f"{k} {v:.2f}" for k, v in result.importances.items()))
    stdout.print(f"verdict:  {result.verdict}")
    if result.bundle:
        stdout.print(f"bundle:   {result.bundle}")


@study_app.command("show")
@handle_errors
def show_cmd(ctx: typer.Context, name: str = typer.Argument(..., help="Study name."),
             top: int | None = typer.Option(None, "--top", min=1, help="Only the best N trials by CV mean."),
             as_json: bool = JSON_OPTION) -> None:
    """The trials of a study: parameters, CV mean ± std, epochs, time, status, run id; parameter importances."""
    from handlens.search.study import show_study

    result = show_study(name, workspace(ctx))
    if as_json:
        emit_json(result.to_dict())
        return
    _print_study(result, top)


@study_app.command("list")
@handle_errors
def list_cmd(ctx: typer.Context, as_json: bool = JSON_OPTION) -> None:
    """Every study in this workspace's storage."""
    from handlens.search.study import list_studies

    studies = list_studies(workspace(ctx))
    if as_json:
        emit_json(studies)
        return
    rows = [[s["name"], s["dataset"], s["space"], s["sampler"], _cv_words(s), _refit_words(s), _trial_words(s),
             s["best_cv_mean"] if s["best_cv_mean"] is not None else "-", s["bundle"] or "-"] for s in studies]
    stdout.print(table("Studies", ["name", "dataset", "space", "sampler", "cv", "refit", "trials", "best CV",
                                   "bundle"], rows, justify_numbers=False))


def _cv_words(study: dict[str, Any]) -> str:
    if not study.get("cv"):
        return "-"
    return f"{study['cv']}-fold" + (f" x{study['repeats']}" if (study.get("repeats") or 1) > 1 else "")


def _refit_words(study: dict[str, Any]) -> str:
    words = f"ensemble of {study['ensemble']}" if (study.get("ensemble") or 1) > 1 else "winner"
    return words + (", one-se" if study.get("one_se") else "")


def _trial_words(study: dict[str, Any]) -> str:
    words = ", ".join(f"{n} {k}" for k, n in sorted(study["trials"].items()))
    return words + (f" ({study['copies']} same as an earlier trial)" if study.get("copies") else "")


@study_app.command("export")
@handle_errors
def export_cmd(ctx: typer.Context, name: str = typer.Argument(..., help="Study name."), *,
               csv: bool = typer.Option(False, "--csv", help="CSV: one row per trial."),
               as_json: bool = typer.Option(False, "--json", help="JSON: the whole study."),
               out: Path | None = typer.Option(None, "--out", help="Write to this file instead of stdout.")) -> None:
    """Export a study's trials as CSV or JSON."""
    from handlens.search.study import export_study

    if csv == as_json:
        raise InputError("choose one of --csv or --json")
    text = export_study(name, workspace(ctx), fmt="csv" if csv else "json")
    if out is not None:
        out.write_text(text)
        stdout.print(f"wrote {out}")
    else:
        print(text, end="" if text.endswith("\n") else "\n")


@study_app.command("work")
@handle_errors
def work_cmd(ctx: typer.Context, name: str = typer.Argument(..., help="Study name."),
             budget: str | None = typer.Option(None, "--budget", help="Wall time for this worker, e.g. 30m."),
             trials: int | None = typer.Option(None, "--trials", min=1, help="Trials to finish in the study.")) -> None:
    """Join a study (e.g. on a PostgreSQL catalog shared by several machines) and run its trials."""
    from handlens.search.study import work_study

    done = work_study(name, workspace(ctx), budget=parse_budget(budget), trials=trials)
    stdout.print(f"worker finished {done} trial(s) of study {name}; refit the winner with "
                 f"`handlens study run --resume {name}`")
