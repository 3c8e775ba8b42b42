"""Browsing a model's dataset: every image, paged and filtered on the server with stored predictions."""

from __future__ import annotations

import asyncio
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query

from handlens.serve.deps import LoadedModelDep, StateDep
from handlens.serve.schemas import ERRORS, BrowsePage, PredictionsState

router = APIRouter(prefix="/api/v1", tags=["models"], responses=ERRORS)


def _rows(state: Any, model: Any, labelset: str | None, subset: str | None) -> tuple[str, str | None, list[Any]]:
    from handlens.data.queries import browse_rows

    manifest = model.bundle.manifest
    with state.catalog.session() as session:
        return browse_rows(session, dataset=manifest["dataset"], labelset=labelset or manifest.get("labelset"),
                           split=manifest.get("split"), subset=subset)


@router.get("/models/{model_id}/browse")
async def browse(model_id: str, model: LoadedModelDep, state: StateDep, *, labelset: str | None = None,
                 label: str | None = None, subset: Annotated[str | None, Query(pattern="^(train|val|test)$")] = None,
                 result: Literal["right", "wrong"] | None = None, predicted: str | None = None,
                 min_confidence: Annotated[float, Query(ge=0, le=1)] = 0.0,
                 q: Annotated[str | None, Query(max_length=200)] = None,
                 offset: Annotated[int, Query(ge=0, le=10_000_000)] = 0,
                 limit: Annotated[int, Query(ge=1, le=500)] = 100,
                 sort: Literal["id", "loss"] = "id") -> BrowsePage:
    """A page of the images of the model's dataset under a labelset, filtered by class, subset of the model's
    split, name (``q``) and, once the model's predictions are stored (``POST .../predictions``), by result,
    predicted class and confidence (``sort=loss``: the highest losses first). ``total`` and ``covers`` count every
    image that matches, never a sample."""
    from handlens.serve.predictions import browse_page, confusion

    def work() -> tuple[str, str | None, Any, Any, dict[str, Any]]:  # off the event loop: it walks every row
        name, split, rows = _rows(state, model, labelset, subset)
        scored = state.predictions.get(model, name)
        matrix = confusion(rows, scored, list(model.bundle.classes))
        shown = [{k: r[k] for k in ("id", "name", "label", "subset")} for r in rows if not label or r["label"] == label]
        page = browse_page(shown, scored, result=result, predicted=predicted, min_confidence=min_confidence, q=q,
                           offset=offset, limit=limit, sort=sort)
        return name, split, _state(scored, rows), matrix, page

    name, split, predictions_state, matrix, page = await asyncio.get_running_loop().run_in_executor(
        state.io_pool, work)
    return BrowsePage(model=model_id, labelset=name, split=split, **page, confusion=matrix,
                      classes=list(model.bundle.classes),
                      predictions=predictions_state)


@router.post("/models/{model_id}/predictions")
async def predictions(model_id: str, model: LoadedModelDep, state: StateDep,
                      labelset: str | None = None) -> PredictionsState:
    """Score every labelled image of the model's dataset once, in the background (stored in the workspace cache
    by the model's weights); the state says how far it is. Browsing filters by result once it is ready."""
    name = labelset or model.bundle.manifest.get("labelset") or "default"
    loop = asyncio.get_running_loop()
    scored = await loop.run_in_executor(state.io_pool, state.predictions.get, model, name)  # may read the file
    if scored.state != "computing":  # a poll while it runs reads no rows; a stored one tops up new images
        _, _, rows = await loop.run_in_executor(state.io_pool, _rows, state, model, labelset, None)
        roots = await loop.run_in_executor(state.io_pool, _roots, state, model)
        scored = state.predictions.start(model, name, rows, roots)
    return _state(scored)


def _roots(state: Any, model: Any) -> Any:
    """The folders the model's dataset was imported from: every file scored must still lie inside one."""
    from handlens.data.importer import dataset_roots
    from handlens.data.queries import find_dataset

    with state.catalog.session() as session:
        return dataset_roots(session, find_dataset(session, model.bundle.manifest["dataset"]).id)


def _state(scored: Any, rows: list[dict[str, Any]] | None = None) -> PredictionsState:
    """The predictions' state; ``stale`` when ``rows`` holds images added since they were stored."""
    missing = len(scored.missing(rows)) if rows is not None and scored.state == "ready" else 0
    return PredictionsState(state="stale" if missing else scored.state, done=scored.done,
                            of=missing or scored.of, error=scored.error, skipped=len(scored.skipped),
                            skipped_examples=scored.skipped[:5])
