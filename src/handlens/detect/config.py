"""The detector's training config: one pydantic model (a typo is an error), saved beside the run."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

#: the freeze modes of a detector's backbone body: ``frozen`` (only the FPN and head learn), ``partial:N`` (the
#: last N stages of the body learn too), ``full``
FREEZE_PATTERN = re.compile(r"^(frozen|full|partial:[1-9][0-9]*)$")


class DetectTrainConfig(BaseModel):
    """``handlens detect train``. Defaults are what reached the issue's targets on the sigma-clast demo with
    2 CPU cores (see benchmarks/detect_quality.py): FCOS on EfficientNet-Lite0, its last 3 stages trained."""

    model_config = ConfigDict(extra="forbid")

    dataset: str = Field(min_length=1)
    labelset: str | None = None
    backbone: str = "efficientnet_lite0"
    weights: str = "packaged"
    architecture: Literal["fcos", "fasterrcnn"] = "fcos"
    freeze: str = "partial:3"
    epochs: int = Field(12, ge=1, le=1000)
    batch_size: int = Field(4, ge=1, le=64)
    lr: float = Field(1e-3, gt=0, le=1)
    weight_decay: float = Field(1e-4, ge=0, le=1)
    #: tile side in working pixels (the detector's input), and the working scale (working px per image px);
    #: ``auto`` brings the boxes' median longer side to ``target_box`` working pixels
    tile: int = Field(384, ge=64, le=2048)
    scale: float | Literal["auto"] = "auto"
    target_box: int = Field(64, ge=16, le=512)
    overlap: float = Field(0.25, ge=0, lt=1)
    #: random training tiles per train image per epoch (most of them centred near a box)
    tiles_per_image: int = Field(8, ge=1, le=256)
    #: share of the images kept for validation (grouped by the images' groups when they have them)
    val_share: float = Field(0.2, gt=0, lt=1)
    fpn_channels: int = Field(64, ge=8, le=512)
    #: the bundle's default: the score above which a box is reported (the val-best F1 threshold replaces it
    #: when ``calibrate``)
    score_threshold: float = Field(0.3, ge=0, le=1)
    calibrate: bool = True
    nms_iou: float = Field(0.5, gt=0, le=1)
    #: flip and turn training tiles (a detector's classes must not depend on mirror or turn: see the README)
    flips: bool = True
    seed: int = 0
    #: wall-time budget in minutes: no epoch starts that the slowest epoch so far says would not fit
    max_minutes: float | None = Field(None, gt=0)
    workers: int = Field(0, ge=0, le=16)

    @field_validator("freeze")
    @classmethod
    def _freeze(cls, value: str) -> str:
        if not FREEZE_PATTERN.match(value):
            raise ValueError(f"freeze {value!r}: use frozen, partial:N (the last N stages learn) or full")
        return value

    @field_validator("scale")
    @classmethod
    def _scale(cls, value: float | str) -> float | str:
        if value != "auto" and not 0.02 <= float(value) <= 4:
            raise ValueError(f"scale {value}: a factor between 0.02 and 4, or auto")
        return value

    @model_validator(mode="after")
    def _fits_head(self) -> DetectTrainConfig:
        if self.architecture == "fcos" and self.fpn_channels % 32:
            raise ValueError(f"fpn_channels {self.fpn_channels}: FCOS's head normalises in 32 groups, so use a "
                             "multiple of 32 (32, 64, 96...)")
        return self
