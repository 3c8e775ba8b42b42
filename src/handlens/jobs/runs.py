"""The code that runs each job kind: one library call each. Imported by workers only (it reaches Lightning)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from handlens.jobs.specs import JobContext


def _job_run_id(ctx: JobContext) -> str:
    """The run id this job trains, fixed at its first attempt: a redelivered job resumes that run."""
    from handlens.train.run import new_run_id

    run_id = ctx.state.get("run_id")
    if run_id is None:
        run_id = new_run_id()
        ctx.remember("run_id", run_id)
    return run_id


def _train(config: Any, ctx: JobContext) -> dict[str, Any]:
    from handlens.train.run import run_finished, train

    run_id = _job_run_id(ctx)
    run_dir = ctx.workspace.runs_dir / run_id
    if run_finished(run_dir):  # the worker died after the run finished, before the job was marked so
        return {"run_id": run_id, "bundle": str(run_dir / "bundle"), "resumed": True}
    epochs = config.train.epochs

    def on_epoch(record: dict[str, Any]) -> None:
        metrics = {k: v for k, v in record.items() if isinstance(v, float) and not k.endswith("_seconds")}
        ctx.report(epoch=record.get("epoch"), epochs=epochs, metrics=metrics, run_id=run_id)

    result = train(config, ctx.workspace, progress=False, epoch_hook=on_epoch, run_id=run_id,
                   should_stop=ctx.should_stop)
    # the epochs it really took (a logistic head fits once; early stopping ends sooner): the last progress agrees
    ctx.report(epoch=result.epochs, epochs=result.epochs, run_id=result.run_id)
    return {"run_id": result.run_id, "bundle": str(result.bundle), "metrics": _summary(result.metrics),
            "epochs": result.epochs, "best_epoch": result.best_epoch, "seconds": round(result.seconds, 2),
            "resumed": result.resumed}


def _summary(metrics: dict[str, Any]) -> dict[str, Any]:
    """The headline numbers of each subset (the full report stays in the run's metrics.json)."""
    return {name: {k: v for k, v in values.items() if k in ("accuracy", "macro_f1", "loss")}
            for name, values in metrics.items() if isinstance(values, dict)}


def _study(config: Any, ctx: JobContext) -> dict[str, Any]:
    from handlens.search.study import run_study

    name = ctx.state.get("study") or config.name or f"{config.dataset}-job-{ctx.job_id[-6:]}"
    if "study" not in ctx.state:
        ctx.remember("study", name)
        config = config.model_copy(update={"name": name})
    else:  # a redelivery: the study exists (unless the first attempt died before creating it)
        from handlens.search.records import open_storage, study_names

        config = config.model_copy(update={"name": name,
                                           "resume": name in study_names(open_storage(ctx.workspace.db_url))})
    ctx.report(message=f"study {name} running")
    result = run_study(config, ctx.workspace)
    out = result.to_dict()
    return {"study": name, "bundle": out["bundle"], "winner": out["winner"], "verdict": out.get("verdict", "")}


def _detect_train(config: Any, ctx: JobContext) -> dict[str, Any]:
    from handlens.detect.train import train_detector

    run_id = _job_run_id(ctx)
    bundle = ctx.workspace.runs_dir / run_id / "bundle"
    if (bundle / "bundle.json").is_file():  # the worker died after the run finished, before the job was marked so
        return {"run_id": run_id, "bundle": str(bundle), "resumed": True}

    def on_epoch(record: dict[str, Any]) -> None:
        metrics = {k: v for k, v in record.items() if k in ("loss", "map_50", "map")}
        ctx.report(epoch=record.get("epoch"), epochs=config.epochs, metrics=metrics, run_id=run_id)

    result = train_detector(config, ctx.workspace, run_id=run_id, progress=False, epoch_hook=on_epoch,
                            should_stop=ctx.should_stop)
    ctx.report(epoch=result.epochs, epochs=result.epochs, run_id=result.run_id)
    val = result.metrics.get("val", {})
    return {"run_id": result.run_id, "bundle": str(result.bundle), "epochs": result.epochs,
            "best_epoch": result.best_epoch, "metrics": {"val": {k: val.get(k) for k in ("map_50", "map", "f1")}},
            "seconds": round(result.seconds, 2), "resumed": result.resumed, "stopped": result.stopped}


def _evaluate(config: Any, ctx: JobContext) -> dict[str, Any]:
    from handlens.train.evaluate import evaluate

    report = evaluate(config.bundle, ctx.workspace, dataset=config.dataset, subset=config.subset,
                      split=config.split, images=Path(config.images) if config.images else None, tta=config.tta)
    return {"bundle": report["bundle"], "accuracy": report.get("accuracy"), "macro_f1": report.get("macro_f1"),
            "report": report["report"], "leakage": report["leakage"].get("verdict"),
            "held_out": (report.get("held_out") or {}).get("verdict")}  # a val score of a refit is not an estimate


def _explain(config: Any, ctx: JobContext) -> dict[str, Any]:
    from handlens.data.catalog import open_catalog
    from handlens.explain.api import load_bundle
    from handlens.explain.output import explain_subset
    from handlens.explain.registry import EXPLAINERS
    from handlens.train.evaluate import resolve_bundle

    EXPLAINERS.get(config.method)  # an unknown method: the registry's error lists the known ones
    loaded = load_bundle(resolve_bundle(ctx.workspace, config.bundle))
    out = Path(config.out) if config.out else ctx.workspace.root / "jobs" / ctx.job_id / "explanations"
    catalog = open_catalog(ctx.workspace.db_url)
    try:
        index = explain_subset(loaded, catalog, config.subset, out, method=config.method, layer=config.layer,
                               target=config.target, dataset=config.dataset, formats=config.formats,
                               top=config.top)
    finally:
        catalog.close()
    return {"images": len(index["images"]), "index": index["index"], "out": str(out)}


def _import_urls(config: Any, ctx: JobContext) -> dict[str, Any]:
    from handlens.data.urls import import_urls

    def progress(done: int, total: int) -> None:
        ctx.report(done=done, total=total, message=f"{done}/{total} items")

    report = import_urls(config, ctx.workspace, progress=progress, should_stop=ctx.should_stop)
    return report.to_dict()



#: kind -> the function that runs one job of it
RUNNERS: dict[str, Callable[[Any, JobContext], dict[str, Any]]] = {
    "train": _train, "study": _study, "evaluate": _evaluate, "explain": _explain, "import-urls": _import_urls,
    "detect-train": _detect_train,
}
