"""The job kinds: their config models, queues and how they stop, without the code that runs them.

A kind declares its config model (``extra="forbid"``: a typo is refused at submit time, never at run time on
a worker) and the queue its jobs go to. The service validates and queues with this module alone; the
function that runs a kind (:mod:`handlens.jobs.runs`, one library call each) is imported only by workers, so
the service never imports Lightning.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from handlens.core.errors import InputError
from handlens.core.registry import Registry
from handlens.core.workspace import Workspace


@dataclass
class JobContext:
    """What a running job may use: its id, the workspace, progress reporting and the cancel check."""

    job_id: str
    workspace: Workspace
    report: Callable[..., None]
    should_stop: Callable[[], str | None]
    #: ids a kind fixes on its first attempt (a run id, a study name) so that a redelivery resumes them
    state: dict[str, Any]
    remember: Callable[[str, Any], None]


@dataclass(frozen=True)
class JobKind:
    name: str
    config: type[BaseModel]
    queue: str
    #: stops at an epoch boundary when asked (cooperative); other kinds are interrupted
    cooperative_cancel: bool = False
    description: str = ""
    #: config fields that name files or folders: over the API they must lie inside the workspace
    path_fields: tuple[str, ...] = ()


JOB_KINDS: Registry[JobKind] = Registry("job kind")


class EvaluateJob(BaseModel):
    """``handlens evaluate`` as a job."""

    model_config = ConfigDict(extra="forbid")
    bundle: str = Field(description="bundle path or run id")
    dataset: str | None = None
    subset: Literal["train", "val", "test"] = "test"
    split: str | None = None
    images: str | None = Field(None, description="a folder-per-class tree outside the catalog")
    tta: bool = False


class ExplainJob(BaseModel):
    """``handlens explain BUNDLE --split SUBSET`` as a job: every image of one subset, with an index."""

    model_config = ConfigDict(extra="forbid")
    bundle: str = Field(description="bundle path or run id")
    subset: Literal["train", "val", "test"] = "test"
    method: str = "gradcam"
    layer: str | None = None
    target: str = "pred"
    dataset: str | None = None
    out: str | None = Field(None, description="output folder (default: the job's folder)")
    formats: list[Literal["png", "npy", "geojson"]] = Field(default_factory=lambda: ["png", "npy"], min_length=1,
                                                             description="what to write per image and class")
    top: float = Field(0.2, gt=0, le=1, description="geojson: outline the top share of each map's pixels")


def _register() -> None:
    from handlens.data.urls import UrlImportConfig
    from handlens.search.config import StudyConfig
    from handlens.train.config import RunConfig

    for kind in (
        JobKind("train", RunConfig, "train", cooperative_cancel=True,
                description="train a classifier from a run config"),
        JobKind("study", StudyConfig, "train", description="a study: search, cross-validate, refit",
                path_fields=("space", "config")),
        JobKind("evaluate", EvaluateJob, "explain", description="metrics of a bundle on a subset",
                path_fields=("bundle", "images")),
        JobKind("explain", ExplainJob, "explain", description="explain every image of a subset",
                path_fields=("bundle", "out")),
        JobKind("import-urls", UrlImportConfig, "import", cooperative_cancel=True,
                description="download a URL manifest into a dataset", path_fields=("manifest", "dest")),
    ):
        JOB_KINDS.register(kind.name, kind)


_register()


def validate_config(kind: str, config: dict[str, Any]) -> BaseModel:
    """The kind's config model from ``config``; a bad key or value is a clear :class:`InputError` now."""
    from pydantic import ValidationError

    spec = JOB_KINDS.get(kind)
    try:
        return spec.config.model_validate(config)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in err['loc']) or '(config)'}: {err['msg']}"
                             for err in exc.errors()[:8])
        raise InputError(f"bad {kind} job config: {problems}") from None


def _is_run_id(name: str, value: str) -> bool:
    return name == "bundle" and "/" not in value and "\\" not in value and not value.startswith(".")


def pin_paths(kind: str, config: BaseModel, *, root: Any, confine: bool) -> BaseModel:
    """The config with its files and folders as absolute paths, fixed where it is submitted (a worker on another
    machine has another current folder). ``confine`` (the service): relative to the workspace ``root`` and
    refused outside it (symlinks resolved), so a client can make a worker read or write only inside the
    workspace; otherwise (the CLI) relative to the current folder. A bare run id (``bundle=RUN``) stays."""
    from pathlib import Path

    from handlens.core.workspace import resolve_inside

    pinned: dict[str, str] = {}
    for name in JOB_KINDS.get(kind).path_fields:
        value = getattr(config, name, None)
        if not value or _is_run_id(name, str(value)):
            continue
        if not confine:
            pinned[name] = str(Path(value).expanduser().resolve())
            continue
        try:
            pinned[name] = str(resolve_inside(Path(root), str(value)))
        except InputError:
            raise InputError(f"{kind} job: {name}={value!r} is outside the workspace; over the API a job reads "
                             "and writes only inside it (put the file in the workspace, or submit with "
                             "`handlens jobs submit` on the machine)") from None
    return config.model_copy(update=pinned) if pinned else config
