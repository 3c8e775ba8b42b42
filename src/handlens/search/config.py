"""What ``handlens study run`` is asked to do: a model of its own, so that a study job's config is validated
where it is submitted (the service) without importing the study's machinery."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class StudyConfig(BaseModel):
    """What ``handlens study run`` is asked to do."""

    model_config = ConfigDict(extra="forbid")

    dataset: str = ""
    labelset: str | None = None
    split: str | None = None
    name: str | None = None
    space: str | None = Field(None, description="a search space YAML file")
    preset: str | None = Field(None, description="a shipped space: quick or thorough")
    sampler: Literal["grid", "random", "tpe", "gp"] = "tpe"
    pruner: Literal["median", "hyperband", "none"] = "median"
    trials: int | None = Field(None, ge=1, description="trials to finish (default: the grid, else 20)")
    budget: float | None = Field(None, gt=0, description="wall-time budget in seconds")
    cv: int = Field(5, ge=2)
    repeats: int = Field(1, ge=1)
    objective: Literal["val_macro_f1", "val_accuracy"] = "val_macro_f1"
    one_se: bool = Field(False, description="pick the cheapest config within one standard error of the best")
    ensemble: int = Field(1, ge=1, description="average the top K refitted trials in one bundle")
    workers: int = Field(1, ge=1)
    seed: int = 0
    config: str | None = Field(None, description="a run config YAML every trial starts from")
    overrides: list[str] = Field(default_factory=list, description="key=value run-config overrides for all trials")
    resume: bool = False
    tracking: Literal["mlflow", "tensorboard", "none"] = "mlflow"
