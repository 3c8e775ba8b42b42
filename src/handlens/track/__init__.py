"""Experiment tracking: MLflow (default, a local store in the workspace), TensorBoard, or none.

Trackers log a run's flattened config as params, per-epoch metrics with the epoch as step, and
artifacts (confusion matrix image, the model bundle). The registry feeds ``--tracking`` choices.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Protocol

from handlens.core.registry import Registry


class Tracker(Protocol):
    uri: str

    def start(self, run_name: str, params: dict[str, Any]) -> None: ...
    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...
    def log_artifact(self, path: Path) -> None: ...
    def finish(self, status: str) -> None: ...


class NoTracker:
    uri = ""

    def start(self, run_name: str, params: dict[str, Any]) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        pass

    def log_artifact(self, path: Path) -> None:
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

    def start(self, run_name: str, params: dict[str, Any]) -> None:
        os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")  # offline tool: no telemetry lookups
        import logging

        logging.getLogger("alembic").setLevel(logging.WARNING)
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        self.root.mkdir(parents=True, exist_ok=True)
        self._client = MlflowClient(tracking_uri=self.uri)
        found = self._client.get_experiment_by_name(self.experiment)
        experiment_id = found.experiment_id if found else self._client.create_experiment(
            self.experiment, artifact_location=(self.root / "artifacts").resolve().as_uri())
        label = str(params.get("tracking.name") or "")  # the user's --name, beside the run id
        self.run_id = self._client.create_run(experiment_id, run_name=f"{label} ({run_name})" if label
                                              else run_name).info.run_id
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

    def start(self, run_name: str, params: dict[str, Any]) -> None:
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

    def finish(self, status: str) -> None:
        if self._writer is not None:
            self._writer.close()


TRACKERS: Registry[Any] = Registry("tracking backend")
TRACKERS.register("mlflow", MlflowTracker)
TRACKERS.register("tensorboard", TensorboardTracker)
TRACKERS.register("none", lambda root, experiment: NoTracker())


def create_tracker(backend: str, runs_dir: Path, experiment: str) -> Tracker:
    return TRACKERS.get(backend)(runs_dir, experiment)


def flatten(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value
    return out
