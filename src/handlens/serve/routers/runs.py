"""Runs and studies of a dataset: the runs page's table, a study's trials and parameter importances."""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter

from handlens.serve.deps import StateDep
from handlens.serve.schemas import ERRORS, RunRow, StudyDetail, StudySummary, TrialOut

router = APIRouter(prefix="/api/v1", tags=["runs"], responses=ERRORS)


def _seconds(run: Any) -> float | None:
    if run is None or run.finished_at is None or run.started_at is None:
        return None
    return round((run.finished_at - run.started_at).total_seconds(), 1)


def run_rows(state: Any, dataset: str | None, labelset: str | None) -> list[RunRow]:
    """Every usable model of the workspace (optionally of one dataset and labelset) with what tells it apart:
    backbone, freeze, pool, input size, the study's CV mean ± std where a study chose it, val and test
    macro-F1, training time. Classifiers only: the page compares their maps (detectors: GET /api/v1/models)."""
    from sqlalchemy import select

    from handlens.data.catalog import Run
    from handlens.serve.routers.models import as_dict, is_sanity_run, model_names

    manifests = {}
    for entry in state.pool.manifests():
        if entry.damaged or entry.manifest is None or entry.kind != "classifier":
            continue
        manifest = as_dict(entry.manifest)
        if is_sanity_run(manifest) or (dataset and manifest.get("dataset") != dataset) or (
                labelset and manifest.get("labelset") != labelset):
            continue
        manifests[entry.model_id] = manifest
    with state.catalog.session() as session:
        runs = {r.id: r for r in session.scalars(select(Run).where(Run.id.in_(list(manifests))))} if manifests else {}
    names = model_names(manifests)
    out = []
    for model_id, manifest in manifests.items():
        cfg = manifest.get("config") or {}
        metrics = manifest.get("metrics") or {}
        study = manifest.get("study") if isinstance(manifest.get("study"), dict) else {}
        out.append(RunRow(
            id=model_id, name=names.get(model_id, model_id), dataset=manifest.get("dataset"),
            labelset=manifest.get("labelset"), backbone=manifest.get("backbone"), freeze=manifest.get("freeze"),
            pool=(manifest.get("head") or {}).get("pool"), size=(manifest.get("preprocess") or {}).get("size"),
            epochs=(cfg.get("train") or {}).get("epochs"), cv_mean=study.get("cv_mean"), cv_std=study.get("cv_std"),
            study=study.get("name"), trial=study.get("trial"),
            val_macro_f1=(metrics.get("val") or {}).get("macro_f1"),
            test_macro_f1=(metrics.get("test") or {}).get("macro_f1"), seconds=_seconds(runs.get(model_id)),
            started_at=runs[model_id].started_at.isoformat() if model_id in runs else None))
    return sorted(out, key=lambda r: r.started_at or "", reverse=True)


@router.get("/runs")
async def runs(state: StateDep, dataset: str | None = None, labelset: str | None = None) -> list[RunRow]:
    """The runs page's table: every model of a dataset and labelset, newest first."""
    return await asyncio.get_running_loop().run_in_executor(state.io_pool, run_rows, state, dataset, labelset)


@router.get("/studies")
async def studies(state: StateDep, dataset: str | None = None) -> list[StudySummary]:
    """Every study of the workspace (optionally of one dataset): trials by status and the best CV mean."""
    from handlens.search.records import list_studies, reading_storage

    def work() -> list[dict[str, Any]]:
        return list_studies(state.workspace, storage=reading_storage(state.workspace.db_url))

    found = await asyncio.get_running_loop().run_in_executor(state.io_pool, work)
    return [StudySummary(**{k: s.get(k) for k in StudySummary.model_fields}) for s in found
            if not dataset or s.get("dataset") == dataset]


@router.get("/studies/{name}")
async def study(name: str, state: StateDep) -> StudyDetail:
    """A study's trials (parameters, CV mean ± std) for parallel coordinates, its parameter importances and its
    verdict."""
    from handlens.search.records import reading_storage, show_study

    def work() -> Any:
        return show_study(name, state.workspace, storage=reading_storage(state.workspace.db_url))

    result = await asyncio.get_running_loop().run_in_executor(state.io_pool, work)
    return StudyDetail(name=result.name, verdict=result.verdict, importances=result.importances,
                       winner=result.winner.number if result.winner else None,
                       bundle=str(result.bundle) if result.bundle else None,
                       trials=[TrialOut(number=t.number, status=t.status, params=t.params, cv_mean=t.cv_mean,
                                        cv_std=t.cv_std, run_id=t.run_id) for t in result.trials])
