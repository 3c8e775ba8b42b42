"""Experiment tracking: MLflow (default, a local store in the workspace), TensorBoard, or none.

Trackers log a run's flattened config as params, per-epoch metrics with the epoch as step, and
artifacts (confusion matrix image, the model bundle). The registry feeds ``--tracking`` choices.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Protocol

from handlens.core.names import flatten  # noqa: F401  (re-exported: train and search use it)
from handlens.core.registry import Registry


class Tracker(Protocol):
    uri: str

    def start(self, run_name: str, params: dict[str, Any], *, started_at: float | None = None) -> None: ...
    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...
    def log_artifact(self, path: Path) -> None: ...
    def log_image(self, name: str, image: Any, step: int) -> None: ...
    def log_histogram(self, name: str, values: Any, step: int) -> None: ...
    def log_graph(self, model: Any, example: Any) -> None: ...
    def finish(self, status: str) -> None: ...


class NoTracker:
    uri = ""

    def start(self, run_name: str, params: dict[str, Any], *, started_at: float | None = None) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        pass

    def log_artifact(self, path: Path) -> None:
        pass

    def log_image(self, name: str, image: Any, step: int) -> None:
        pass

    def log_histogram(self, name: str, values: Any, step: int) -> None:
        pass

    def log_graph(self, model: Any, example: Any) -> None:
        pass

    def finish(self, status: str) -> None:
        pass


class MlflowTracker:
    """MLflow with a SQLite store and artifacts inside the workspace; never phones home."""

    def __init__(self, root: Path, experiment: str) -> None:
        self.root = root
        self.experiment = experiment
        self.uri = f"sqlite:///{root / 'mlflow.db'}"
        self.run_id: str | None = None
        self._client: Any = None

    def start(self, run_name: str, params: dict[str, Any], *, started_at: float | None = None) -> None:
        """Open the run; ``started_at`` (epoch seconds) is when the work began, so that the run's duration
        includes what came before the tracker opened (decoding, feature extraction)."""
        os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")  # offline tool: no telemetry lookups
        import logging

        logging.getLogger("alembic").setLevel(logging.WARNING)
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        logging.getLogger("mlflow").setLevel(logging.WARNING)  # its import set INFO: "Creating initial tables..."

        self.root.mkdir(parents=True, exist_ok=True)
        self._client = MlflowClient(tracking_uri=self.uri)
        found = self._client.get_experiment_by_name(self.experiment)
        experiment_id = found.experiment_id if found else self._client.create_experiment(
            self.experiment, artifact_location=(self.root / "artifacts").resolve().as_uri())
        label = str(params.get("tracking.name") or "")  # the user's --name, beside the run id
        self.run_id = self._client.create_run(
            experiment_id, run_name=f"{label} ({run_name})" if label else run_name,
            start_time=int(started_at * 1000) if started_at else None).info.run_id
        items = [Param(k, str(v)[:6000]) for k, v in params.items()]
        for start in range(0, len(items), 100):
            self._client.log_batch(self.run_id, params=items[start:start + 100])

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self._client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()])

    def log_artifact(self, path: Path) -> None:
        if path.is_dir():
            self._client.log_artifacts(self.run_id, str(path), artifact_path=path.name)
        else:
            self._client.log_artifact(self.run_id, str(path))

    def log_image(self, name: str, image: Any, step: int) -> None:
        """An (H, W, 3) uint8 image as a time-stepped MLflow image (artifacts under ``images/``, a step slider
        in the run's page)."""
        self._client.log_image(self.run_id, image, key=name, step=step)

    def log_histogram(self, name: str, values: Any, step: int) -> None:
        """MLflow has no histograms: nothing is logged (``tracking.histograms`` asks for TensorBoard)."""

    def log_graph(self, model: Any, example: Any) -> None:
        """MLflow has no graph view: nothing is logged."""

    def finish(self, status: str) -> None:
        if self._client is not None and self.run_id is not None:
            self._client.set_terminated(self.run_id, status={"finished": "FINISHED", "failed": "FAILED"}.get(
                status, "KILLED"))


class TensorboardTracker:
    """Event files under ``<workspace>/runs/tensorboard/<run>``: ``tensorboard --logdir`` shows them."""

    def __init__(self, root: Path, experiment: str) -> None:
        self.root = root / "tensorboard"
        self.uri = str(self.root)
        self._writer: Any = None
        self._dir: Path | None = None

    def start(self, run_name: str, params: dict[str, Any], *, started_at: float | None = None) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self._dir = self.root / run_name
        self._writer = SummaryWriter(log_dir=str(self._dir))
        self._writer.add_text("config", "\n".join(f"    {k}: {v}" for k, v in params.items()))

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        for key, value in metrics.items():
            self._writer.add_scalar(key, value, step)
        self._writer.flush()

    def log_artifact(self, path: Path) -> None:
        if path.suffix == ".png":
            import numpy as np
            from PIL import Image

            self._writer.add_image(path.stem, np.asarray(Image.open(path).convert("RGB")), dataformats="HWC")

    def log_image(self, name: str, image: Any, step: int) -> None:
        self._writer.add_image(name, image, step, dataformats="HWC")

    def log_histogram(self, name: str, values: Any, step: int) -> None:
        self._writer.add_histogram(name, values, step)

    def log_graph(self, model: Any, example: Any) -> None:
        """The traced graph; a model the tracer cannot follow gets a text note instead (the run goes on)."""
        try:
            self._writer.add_graph(model, example)
        except Exception as exc:  # data-dependent control flow, unsupported ops: tracing is best effort
            self._writer.add_text("graph", f"the model graph could not be traced: {type(exc).__name__}: {exc}")

    def finish(self, status: str) -> None:
        if self._writer is not None:
            self._writer.close()


TRACKERS: Registry[Any] = Registry("tracking backend")
TRACKERS.register("mlflow", MlflowTracker)
TRACKERS.register("tensorboard", TensorboardTracker)
TRACKERS.register("none", lambda root, experiment: NoTracker())


def create_tracker(backend: str, runs_dir: Path, experiment: str) -> Tracker:
    return TRACKERS.get(backend)(runs_dir, experiment)


def log_evaluation(runs_dir: Path, bundle: Path | str, report: dict[str, Any], *, subset: str) -> str | None:
    """Add an evaluation's metrics (``eval_<subset>_accuracy``, ``..._macro_f1``, ``..._roc_auc``) to the MLflow
    run that trained ``bundle``, when it was tracked with MLflow in this workspace; that run's id, or None."""
    import json

    try:
        manifest = json.loads((Path(bundle) / "bundle.json").read_text())
    except (OSError, ValueError):
        return None
    tracking = manifest.get("tracking") or {}
    if tracking.get("backend") != "mlflow" or not tracking.get("run_id") or not (runs_dir / "mlflow.db").is_file():
        return None
    from mlflow.tracking import MlflowClient

    tracker = MlflowTracker(runs_dir, "")
    tracker._client = MlflowClient(tracking_uri=tracker.uri)
    tracker.run_id = str(tracking["run_id"])
    values = {f"eval_{subset}_{key}": report[key] for key in ("accuracy", "macro_f1", "roc_auc")
              if isinstance(report.get(key), (int, float))}
    tracker.log_metrics(values, step=0)
    return tracker.run_id
