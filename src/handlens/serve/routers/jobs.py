"""Jobs: queue a training run, a study, an evaluation, an explanation of a split or a URL import; watch it
(server-sent events), cancel it. Submitting and cancelling are mutations: the API-key rule applies."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query
from fastapi import Path as PathParam
from fastapi.responses import StreamingResponse

from handlens.serve.deps import JsonBody, StateDep, require_key
from handlens.serve.schemas import ERRORS, JobIn, JobKindOut, JobOut

router = APIRouter(prefix="/api/v1", tags=["jobs"], responses=ERRORS)
#: how often the events stream looks at the job's row
EVENT_POLL_SECONDS = 0.5
#: a comment line this often keeps proxies from closing a quiet stream
KEEPALIVE_SECONDS = 15.0


#: a job id as :func:`handlens.jobs.api.new_job_id` makes them
JobId = Annotated[str, PathParam(max_length=64, pattern=r"^job-[0-9A-Za-z-]+$", description="a job id")]
#: entries of a list kept in an answer (an import's skipped URLs...): the rest is in the job's log
MAX_LIST = 50


def _public(value: Any, root: Path) -> Any:
    """A job's config, result or error as a client may see it: paths inside the workspace made relative to it,
    any other absolute path cut to its name (:func:`handlens.serve.app.public_message`), long lists capped."""
    from handlens.serve.app import public_message

    if isinstance(value, dict):
        return {k: _public(v, root) for k, v in value.items()}
    if isinstance(value, list):
        return [_public(v, root) for v in value[:MAX_LIST]]
    if isinstance(value, str):
        text = value.replace(f"{root}/", "").replace(str(root), ".")
        return public_message(text, [root])
    return value


def _out(job: Any, root: Path) -> JobOut:
    data = job.to_dict()
    data.pop("log_path", None)  # a path on the worker's machine: not the client's business
    data["result"] = {k: v for k, v in data["result"].items() if k != "state"}
    for key in ("config", "result", "progress", "error"):
        data[key] = _public(data[key], root)
    return JobOut(**data)


def _validated(body: Any) -> JobIn:
    from pydantic import ValidationError

    from handlens.core.errors import InputError

    try:
        return JobIn.model_validate(body)
    except ValidationError as exc:
        raise InputError("; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'body'}: {e['msg']}"
                                   for e in exc.errors()[:5])) from None


@router.get("/job-kinds")
def job_kinds() -> list[JobKindOut]:
    """The kinds of job and the JSON schema of each one's config (what the viewer's form is built from)."""
    from handlens.jobs.specs import JOB_KINDS

    return [JobKindOut(name=name, queue=JOB_KINDS.get(name).queue, description=JOB_KINDS.get(name).description,
                       config_schema=JOB_KINDS.get(name).config.model_json_schema()) for name in JOB_KINDS]


@router.post("/jobs", status_code=202, dependencies=[Depends(require_key)],
             openapi_extra={"requestBody": {"required": True, "content": {
                 "application/json": {"schema": JobIn.model_json_schema()}}}})
async def submit(body: JsonBody, state: StateDep) -> JobOut:
    """Queue a job (202 with its id); its config is validated now, so a typo is a 422 here, not a failed job."""
    from handlens.jobs.api import submit_job

    job_in = _validated(body)
    if job_in.kind == "import-urls":  # over the API: public addresses only, unless the operator allows more
        job_in.config["public_only"] = not state.settings.allow_private_urls
    job = await asyncio.get_running_loop().run_in_executor(
        state.io_pool, lambda: submit_job(job_in.kind, job_in.config, workspace=state.workspace,
                                          catalog=state.catalog, broker=state.settings.broker_url,
                                          confine=True))
    return _out(job, state.workspace.root)


@router.get("/jobs")
def list_all(state: StateDep, status: Annotated[str | None, Query(description="only jobs in this status")] = None,
             limit: Annotated[int, Query(ge=1, le=1000)] = 100) -> list[JobOut]:
    from handlens.jobs.api import list_jobs

    return [_out(job, state.workspace.root) for job in list_jobs(catalog=state.catalog, status=status, limit=limit)]


@router.get("/jobs/{job_id}")
def show(job_id: JobId, state: StateDep) -> JobOut:
    from handlens.jobs.api import get_job

    return _out(get_job(job_id, catalog=state.catalog), state.workspace.root)


@router.post("/jobs/{job_id}/cancel", dependencies=[Depends(require_key)])
def cancel(job_id: JobId, state: StateDep) -> JobOut:
    """Cancel a job: a queued one at once; a running one stops within one epoch, its checkpoint kept."""
    from handlens.jobs.api import cancel_job

    return _out(cancel_job(job_id, catalog=state.catalog), state.workspace.root)


@router.get("/jobs/{job_id}/events", response_class=StreamingResponse,
            responses={200: {"content": {"text/event-stream": {}}}})
def job_events(job_id: JobId, state: StateDep) -> StreamingResponse:
    """Server-sent events until the job ends: ``status`` (queued, running, ..., with the result at the end) and
    ``progress`` (epoch, epochs, metrics, eta_seconds)."""
    from handlens.jobs.api import get_job

    get_job(job_id, catalog=state.catalog)  # an unknown id is a 404 now, not an empty stream
    return StreamingResponse(_stream(state, job_id), media_type="text/event-stream",
                             headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})


async def _stream(state: Any, job_id: str) -> AsyncIterator[str]:
    """Polls the job's row: one short query in asyncio's default threads (not the I/O pool, where image decodes
    queue: a watcher must not wait behind them), then an async sleep; a watcher holds no thread."""
    from handlens.jobs import store
    from handlens.jobs.api import changes

    last: tuple[Any, ...] | None = None
    quiet = 0.0
    while True:
        job = await asyncio.to_thread(store.fetch, state.catalog, job_id)
        found, last = changes(job, last)
        for event in found:
            data = _public(event["data"], state.workspace.root)
            yield f"event: {event['event']}\ndata: {json.dumps(data, default=str)}\n\n"
        quiet = 0.0 if found else quiet + EVENT_POLL_SECONDS
        if job.status in store.TERMINAL:
            return
        if quiet >= KEEPALIVE_SECONDS:
            quiet = 0.0
            yield ": keep-alive\n\n"
        await asyncio.sleep(EVENT_POLL_SECONDS)
