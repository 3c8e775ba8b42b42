"""Reading studies as stored: trials, the winner, importances, lists and exports (no training here).

Split from :mod:`handlens.search.study` so that the service's runs page can read studies without importing
what runs them (Lightning): the inference path stays light.
"""

from __future__ import annotations

import json
import os
import threading
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from handlens.core.errors import NotFoundError
from handlens.core.workspace import Workspace

STUDY_TAG = "handlens_study"  # study user attribute marking handlens's own studies


HEARTBEAT_SECONDS = 10


GRACE_SECONDS = int(os.environ.get("HANDLENS_STUDY_GRACE", "60"))


@dataclass
class TrialRow:
    number: int
    status: str  # complete, pruned, failed, running, skipped
    params: dict[str, Any]
    cv_mean: float | None
    cv_std: float | None
    folds: int
    epochs: int | None
    seconds: float | None
    run_id: str | None
    kind: str | None
    note: str = ""
    refit_set: dict[str, Any] = field(default_factory=dict)  # values the folds chose, which the refit uses

    def to_dict(self) -> dict[str, Any]:
        return {"number": self.number, "status": self.status, "params": self.params, "cv_mean": self.cv_mean,
                "cv_std": self.cv_std, "folds": self.folds, "epochs": self.epochs, "seconds": self.seconds,
                "run_id": self.run_id, "kind": self.kind, "note": self.note, "refit_set": self.refit_set}




@dataclass
class StudyResult:
    name: str
    bundle: Path | None
    winner: TrialRow | None
    trials: list[TrialRow]
    importances: dict[str, float]
    seconds: float
    feature_passes: int = 0
    refit: dict[str, Any] = field(default_factory=dict)
    members: list[int] = field(default_factory=list)
    verdict: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "bundle": str(self.bundle) if self.bundle else None,
                "winner": self.winner.to_dict() if self.winner else None,
                "verdict": self.verdict, "refit": self.refit, "ensemble_members": self.members,
                "trials": [t.to_dict() for t in self.trials], "importances": self.importances,
                "seconds": round(self.seconds, 2), "feature_passes": self.feature_passes}


def open_storage(db_url: str) -> Any:
    """Optuna's RDB storage on the catalog URL, with heartbeats so a killed worker's trial is failed."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.ERROR)  # one line per trial is ours (_progress)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)  # heartbeats: stable enough
    kwargs: dict[str, Any] = {}
    if db_url.startswith("sqlite"):
        kwargs["connect_args"] = {"timeout": 120}  # wait for the other writer instead of "database is locked"
    storage = optuna.storages.RDBStorage(db_url, engine_kwargs=kwargs, heartbeat_interval=HEARTBEAT_SECONDS,
                                         grace_period=GRACE_SECONDS)
    if db_url.startswith("sqlite"):
        _immediate_transactions(storage.engine)
    return storage


def _immediate_transactions(engine: Any) -> None:
    """SQLite ignores ``SELECT ... FOR UPDATE`` and pysqlite begins transactions lazily, so two workers could
    both read a queued trial as WAITING and both take it. ``BEGIN IMMEDIATE`` takes the write lock when the
    transaction starts (SQLAlchemy's documented pysqlite recipe); the busy timeout makes the other wait.
    Commits are ``synchronous=NORMAL``, as the catalog's."""
    from sqlalchemy import event

    @event.listens_for(engine, "connect")
    def _no_implicit_begin(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None
        # as the catalog's own connections: in WAL mode NORMAL is safe from corruption and halves the cost of a
        # commit (a trial's epoch report: 4.4 -> 2.3 ms measured)
        dbapi_connection.execute("PRAGMA synchronous=NORMAL")

    @event.listens_for(engine, "begin")
    def _begin_immediate(connection: Any) -> None:
        connection.exec_driver_sql("BEGIN IMMEDIATE")

    engine.dispose()  # connections made before the listeners are dropped


def study_names(storage: Any) -> list[str]:
    import optuna

    return [s.study_name for s in optuna.study.get_all_study_summaries(storage, include_best_trial=False)]


def load_study(storage: Any, name: str) -> Any:
    import optuna

    names = study_names(storage)
    if name not in names:
        import difflib

        close = difflib.get_close_matches(name, names, 1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise NotFoundError(f"no study {name!r}{hint}; see `handlens study list`")
    return optuna.load_study(study_name=name, storage=storage)


def _row(trial: Any) -> TrialRow:
    attrs = trial.user_attrs
    status = {"fail": "failed"}.get(trial.state.name.lower(), trial.state.name.lower())
    if attrs.get("skipped"):
        status = "skipped"
    chosen = attrs.get("refit_set") or {}
    note = attrs.get("skipped") or attrs.get("error") or attrs.get("pruned_by") or (
        f"same as trial {attrs['duplicate_of']}" if "duplicate_of" in attrs else "") or (
        f"C={chosen['model.logistic_c']:g} chosen on the folds" if "model.logistic_c" in chosen else "")
    seconds = attrs.get("seconds")
    if seconds is None and trial.datetime_start and trial.datetime_complete:
        seconds = (trial.datetime_complete - trial.datetime_start).total_seconds()
    return TrialRow(number=trial.number, status=status, params=dict(trial.params),
                    cv_mean=attrs.get("cv_mean"), cv_std=attrs.get("cv_std"), folds=len(attrs.get("fold_scores", [])),
                    epochs=attrs.get("refit_epochs"), seconds=round(seconds, 2) if seconds is not None else None,
                    run_id=attrs.get("run_id"), kind=attrs.get("kind"), note=str(note), refit_set=dict(chosen))


def trial_rows(study: Any) -> list[TrialRow]:
    return [_row(t) for t in study.get_trials(deepcopy=False)]


COST_ORDER = {"frozen": 0, "partial": 1, "full": 2}


def freeze_cost(params: dict[str, Any]) -> int:
    """How dear a config's freeze is: frozen 0, partial:N 1, full 2 (:data:`COST_ORDER`)."""
    return COST_ORDER.get(str(params.get("model.freeze", "frozen")).split(":")[0], 1)


def _cost(row: TrialRow) -> tuple[int, float]:
    return freeze_cost(row.params), row.seconds or 0.0


def scored_trials(rows: list[TrialRow]) -> list[TrialRow]:
    """Trials that were scored themselves: complete, with a CV mean, not a copy of an earlier trial's score."""
    return [r for r in rows if r.status == "complete" and r.cv_mean is not None and not r.note.startswith("same as")]


def choose(rows: list[TrialRow], *, one_se: bool = False) -> TrialRow | None:
    """The winner by CV mean; with ``one_se``, the cheapest config within one standard error of the best."""
    complete = scored_trials(rows)
    if not complete:
        return None
    best = max(complete, key=lambda r: (r.cv_mean, -(r.cv_std or 0.0)))
    if not one_se:
        return best
    se = (best.cv_std or 0.0) / np.sqrt(max(best.folds, 1))
    near = [r for r in complete if r.cv_mean >= best.cv_mean - se]
    return min(near, key=lambda r: (_cost(r), -r.cv_mean))


def verdict(winner: TrialRow | None, rows: list[TrialRow], *, one_se: bool = False) -> str:
    """In words: how sure the CV is that the winner beats the runner-up; with ``one_se``, whether the
    one-standard-error rule changed the pick (from which trial) or kept the best."""
    if winner is None:
        return "no trial finished"
    best = choose(rows)
    if one_se and best is not None:
        se = (best.cv_std or 0.0) / np.sqrt(max(best.folds, 1))
        if best.number != winner.number:
            return (f"winner trial {winner.number}: CV {winner.cv_mean:.3f} ± {winner.cv_std:.3f}, the cheapest "
                    f"configuration within one standard error ({se:.3f}) of the best, trial {best.number} "
                    f"({best.cv_mean:.3f}; --one-se)")
        rule = f"; --one-se kept it: no cheaper configuration is within one standard error ({se:.3f})"
        return _against_runner_up(winner, rows) + rule
    return _against_runner_up(winner, rows)


def _against_runner_up(winner: TrialRow, rows: list[TrialRow]) -> str:
    others = [r for r in scored_trials(rows) if r.number != winner.number]
    if not others:
        return (f"winner trial {winner.number}: CV {winner.cv_mean:.3f} ± {winner.cv_std:.3f} "
                "(no other trial to compare)")
    runner = max(others, key=lambda r: r.cv_mean)
    gap = winner.cv_mean - runner.cv_mean
    se = (winner.cv_std or 0.0) / np.sqrt(max(winner.folds, 1))
    sure = "clearly better than" if gap > 2 * se else "within noise of"
    return (f"winner trial {winner.number}: CV {winner.cv_mean:.3f} ± {winner.cv_std:.3f}, {sure} the runner-up "
            f"(trial {runner.number}, {runner.cv_mean:.3f}; gap {gap:+.3f}, one standard error {se:.3f})")


def importances(study: Any) -> dict[str, float]:
    """Optuna's parameter importances over the trials that were scored themselves: a trial whose config had
    the same effect as an earlier one's (``same as trial N``: a logistic head's learning rate or epochs, which
    it does not use) carries a copied score, and counted again it would make those keys look important or not
    by how often they were drawn. Computed on an in-memory copy of those trials."""
    import optuna

    complete = [t for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
                if "duplicate_of" not in t.user_attrs and not t.user_attrs.get("skipped")]
    if len(complete) < 3:
        return {}
    scored = optuna.create_study(direction=study.direction)
    scored.add_trials(complete)
    try:
        return {k: round(float(v), 4) for k, v in optuna.importance.get_param_importances(scored).items()}
    except Exception:  # too few distinct values to tell
        return {}


def reading_storage(db_url: str) -> Any:
    """One Optuna storage per catalog URL for readers that come back often (the service's runs page): no
    ``BEGIN IMMEDIATE`` (a read must not queue for the write lock behind a running study or an import) and no
    new engine per request."""
    import optuna

    with _READERS_LOCK:
        if db_url not in _READERS:
            optuna.logging.set_verbosity(optuna.logging.ERROR)
            kwargs: dict[str, Any] = {"connect_args": {"timeout": 30}} if db_url.startswith("sqlite") else {}
            _READERS[db_url] = optuna.storages.RDBStorage(db_url, engine_kwargs=kwargs)
        return _READERS[db_url]


_READERS: dict[str, Any] = {}
_READERS_LOCK = threading.Lock()


def show_study(name: str, workspace: Workspace | None = None, *, storage: Any = None) -> StudyResult:
    """The study's trials, winner and importances as stored (nothing is run)."""
    ws = workspace or Workspace.open()
    storage = storage or open_storage(ws.db_url)
    study = load_study(storage, name)
    if not study.user_attrs.get(STUDY_TAG):
        raise NotFoundError(f"study {name!r} was not made by handlens")
    rows = trial_rows(study)
    one_se = bool((study.user_attrs.get("settings") or {}).get("one_se"))
    winner = choose(rows, one_se=one_se)
    bundle = study.user_attrs.get("bundle")
    return StudyResult(name=name, bundle=Path(bundle) if bundle else None, winner=winner, trials=rows,
                       importances=importances(study), seconds=0.0, verdict=verdict(winner, rows, one_se=one_se))


def list_studies(workspace: Workspace | None = None, *, storage: Any = None) -> list[dict[str, Any]]:
    """Every handlens study in the workspace's storage: name, dataset, how it is cross-validated and refitted,
    trials by status (``copies``: complete trials whose config had the same effect as an earlier one's and
    carry its score), best CV."""
    import optuna

    ws = workspace or Workspace.open()
    storage = storage or open_storage(ws.db_url)
    out = []
    for summary in optuna.study.get_all_study_summaries(storage, include_best_trial=False):
        attrs = summary.user_attrs
        if not attrs.get(STUDY_TAG):
            continue
        study = optuna.load_study(study_name=summary.study_name, storage=storage)
        rows = trial_rows(study)
        best = choose(rows)
        counts: dict[str, int] = {}
        for row in rows:
            counts[row.status] = counts.get(row.status, 0) + 1
        settings = attrs["settings"]
        out.append({"name": summary.study_name, "dataset": settings["dataset"],
                    "space": attrs["space"].get("source", ""), "sampler": settings["sampler"],
                    "cv": settings.get("cv"), "repeats": settings.get("repeats", 1),
                    "ensemble": settings.get("ensemble", 1), "one_se": bool(settings.get("one_se")),
                    "trials": counts, "copies": sum(1 for r in rows if r.note.startswith("same as")),
                    "best_cv_mean": best.cv_mean if best else None,
                    "bundle": attrs.get("bundle"), "created_at": attrs.get("created_at")})
    return out


def export_study(name: str, workspace: Workspace | None = None, *, fmt: str = "json") -> str:
    """A study's trials as CSV (one row per trial, one column per parameter) or the whole study as JSON."""
    import csv
    import io

    result = show_study(name, workspace)
    if fmt == "json":
        return json.dumps(result.to_dict(), indent=2, default=str)
    keys = sorted({k for t in result.trials for k in t.params})
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["trial", "status", *keys, "cv_mean", "cv_std", "folds", "epochs", "seconds", "run_id", "note"])
    for t in result.trials:
        writer.writerow([t.number, t.status, *[t.params.get(k, "") for k in keys], t.cv_mean, t.cv_std, t.folds,
                         t.epochs, t.seconds, t.run_id, t.note])
    return buffer.getvalue()
