"""The job kinds: their config models, queues and how they stop, without the code that runs them.

A kind declares its config model (``extra="forbid"``: a typo is refused at submit time, never at run time on
a worker) and the queue its jobs go to. The service validates and queues with this module alone; the
function that runs a kind (:mod:`handlens.jobs.runs`, one library call each) is imported only by workers, so
the service never imports Lightning.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
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
    from handlens.detect.config import DetectTrainConfig
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
        JobKind("detect-train", DetectTrainConfig, "train", cooperative_cancel=True,
                description="train a detector on a dataset's boxes"),
        JobKind("import-urls", UrlImportConfig, "import", cooperative_cancel=True,
                description="download a URL manifest into a dataset", path_fields=("manifest", "dest")),
    ):
        JOB_KINDS.register(kind.name, kind)


_register()


def validate_config(kind: str, config: dict[str, Any]) -> BaseModel:
    """The kind's config model from ``config``; a bad key or value is a clear :class:`InputError` now."""
    from pydantic import ValidationError

    from handlens.core.errors import NotFoundError

    try:
        spec = JOB_KINDS.get(kind)
    except NotFoundError as exc:  # a bad request, not a missing resource
        raise InputError(str(exc)) from None
    try:
        return spec.config.model_validate(config)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in err['loc']) or '(config)'}: {err['msg']}"
                             for err in exc.errors()[:8])
        raise InputError(f"bad {kind} job config: {problems}") from None


def _is_run_id(name: str, value: str) -> bool:
    return name == "bundle" and "/" not in value and "\\" not in value and not value.startswith((".", "~"))


def _policy_file(value: str) -> bool:
    """``augment.policy`` names a file (not a preset): it has a suffix or any path syntax."""
    return value not in ("auto", "none", "basic") and bool(
        Path(value).suffix or any(c in value for c in "/\\~") or value.startswith("."))


#: run-config keys whose value may name a file read by the service or a worker, and how to tell
RUN_FILE_KEYS: dict[str, Callable[[str], bool]] = {
    "augment.policy": _policy_file,
    "model.weights": lambda value: value not in ("none", "imagenet", "packaged"),
}


def _pinned(value: str, *, what: str, root: Any, confine: bool) -> str:
    from handlens.core.workspace import resolve_inside

    if not confine:
        return str(Path(value).expanduser().resolve())
    try:
        return str(resolve_inside(Path(root), value))
    except InputError:  # the value is not echoed: the answer must not tell which server paths exist
        raise InputError(f"{what} names a file outside the workspace; over the API a job reads and writes only "
                         "inside it (put the file in the workspace, or submit with `handlens jobs submit` on the "
                         "machine)") from None


def pin_raw_paths(kind: str, config: dict[str, Any], *, root: Any, confine: bool) -> dict[str, Any]:
    """The files a run config names (``augment.policy`` files, ``model.weights`` files; a study's ``overrides``
    of them), pinned like :func:`pin_paths` *before* validation (validating a run config reads its policy file).
    """
    import copy

    out = copy.deepcopy(config)
    if kind == "train":
        for key, is_file in RUN_FILE_KEYS.items():
            section, field = key.split(".")
            value = (out.get(section) or {}).get(field) if isinstance(out.get(section), dict) else None
            if isinstance(value, str) and is_file(value):
                out[section][field] = _pinned(value, what=f"train job: {key}", root=root, confine=confine)
    elif kind == "detect-train":
        value = out.get("weights")
        if isinstance(value, str) and RUN_FILE_KEYS["model.weights"](value):
            out["weights"] = _pinned(value, what="detect-train job: weights", root=root, confine=confine)
    elif kind == "study" and isinstance(out.get("overrides"), list):
        pinned = []
        for item in out["overrides"]:
            key, sep, value = str(item).partition("=")
            if sep and key.strip() in RUN_FILE_KEYS and RUN_FILE_KEYS[key.strip()](value.strip()):
                what = f"study job: override {key.strip()}"
                item = f"{key}={_pinned(value.strip(), what=what, root=root, confine=confine)}"
            pinned.append(item)
        out["overrides"] = pinned
    return out


def pin_paths(kind: str, config: BaseModel, *, root: Any, confine: bool) -> BaseModel:
    """The config with its files and folders as absolute paths, fixed where it is submitted (a worker on another
    machine has another current folder). ``confine`` (the service): relative to the workspace ``root`` and
    refused outside it (symlinks resolved), so a client can make a worker read or write only inside the
    workspace; a bare run id (``bundle=RUN``) is then the workspace's run. Otherwise (the CLI) relative to the
    current folder, and a bare run id stays as it is."""
    pinned: dict[str, str] = {}
    for name in JOB_KINDS.get(kind).path_fields:
        value = getattr(config, name, None)
        if not value:
            continue
        if _is_run_id(name, str(value)):
            if confine:
                pinned[name] = _pinned(f"runs/{value}", what=f"{kind} job: {name}", root=root, confine=True)
            continue
        pinned[name] = _pinned(str(value), what=f"{kind} job: {name}", root=root, confine=confine)
    return config.model_copy(update=pinned) if pinned else config
