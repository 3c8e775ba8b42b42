"""The run config: one pydantic model, read from YAML with ``key=value`` overrides, saved with every run."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from handlens.core.errors import InputError


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DataConfig(_Section):
    dataset: str = ""
    labelset: str | None = None
    split: str | None = Field(None, description="split name; default: the dataset's newest split")
    fold: int = 0
    balance: Literal["none", "oversample", "sampler", "downsample"] = Field(
        "none", description="oversample minority classes (each copy augmented anew), a weighted sampler, or "
        "downsample to data.per_class images per class; class weights (auto) are then off")
    per_class: int | None = Field(None, ge=1, description="downsample: images kept per class; oversample: "
                                  "target per class (default: the largest class)")

    @model_validator(mode="after")
    def _per_class_needed(self) -> DataConfig:
        if self.balance == "downsample" and not self.per_class:
            raise ValueError("data.balance=downsample needs data.per_class=N (images kept per class)")
        if self.per_class and self.balance in ("none", "sampler"):
            raise ValueError(f"data.per_class={self.per_class} has no effect with data.balance={self.balance}: "
                             "use data.balance=downsample (keep N per class) or oversample (grow to N per class)")
        return self


class RoiConfig(_Section):
    source: Literal["none", "annotations", "threshold"] = "none"
    method: Literal["otsu", "fixed"] = "otsu"
    value: float = Field(128.0, ge=0, le=255)
    invert: bool = Field(False, description="the dark side is the specimen (e.g. a dark rock on a bright slide)")
    clean_radius: int = Field(0, ge=0, le=64)


class PatchesConfig(_Section):
    enabled: bool = False
    size: int = Field(224, ge=8, description="patch side in working-image pixels (before scale)")
    scale: tuple[float, float] = Field((0.75, 1.25), description="random zoom factor range of the patch side")
    per_image: int = Field(4, ge=1, description="random patches per image per epoch")
    min_roi: float = Field(0.5, ge=0, le=1, description="least foreground share of a patch (with a ROI)")
    max_side: int = Field(1024, ge=0, description="working image's longer side (0: full resolution)")
    grid_max: int = Field(16, ge=1, description="most grid patches per image for validation and prediction")


class PreprocessConfig(_Section):
    size: int | None = Field(None, description="input size; default: the backbone's")
    resize: Literal["shorter-crop", "stretch", "letterbox"] = "shorter-crop"
    normalize: Literal["backbone", "unit", "minmax", "percentile", "dataset"] = Field(
        "backbone", description="backbone mean/std, /255, per-image min-max, per-image percentile clipping, "
        "or per-dataset statistics from the train split")
    clip_percentiles: tuple[float, float] = (1.0, 99.0)
    morphology: list[dict[str, Any]] = Field(default_factory=list, description="threshold/erosion/dilation/"
                                             "opening/closing steps, e.g. [{op: opening, radius: 2}]")
    roi: RoiConfig = RoiConfig()
    patches: PatchesConfig = PatchesConfig()

    @field_validator("morphology")
    @classmethod
    def _morphology_steps(cls, value: list[dict[str, Any]]) -> list[dict[str, Any]]:
        from handlens.transforms.morphology import check_steps

        try:
            return check_steps(value)
        except InputError as exc:
            raise ValueError(str(exc)) from None

    @field_validator("clip_percentiles")
    @classmethod
    def _percentiles(cls, value: tuple[float, float]) -> tuple[float, float]:
        if not 0 <= value[0] < value[1] <= 100:
            raise ValueError("write [low, high] with 0 <= low < high <= 100, e.g. [1, 99]")
        return value


class AugmentConfig(_Section):
    policy: str = Field("auto", description="auto (basic for a learning backbone; none for a frozen one on "
                        "cached features without train.views), none, basic, a preset (natural-photo, xray, "
                        "thin-section, microscopy) or a policy .yaml file")
    hflip: bool = True
    vflip: bool = False
    crop_scale: float = Field(0.8, gt=0, le=1, description="random resized crop: smallest area share")
    mixup: float = Field(0.0, ge=0, description="mixup Beta(alpha, alpha) alpha; 0 is off (Zhang et al. 2018)")
    cutmix: float = Field(0.0, ge=0, description="cutmix alpha; 0 is off (Yun et al. 2019)")
    mix_p: float = Field(0.5, ge=0, le=1, description="share of batches mixed when mixup/cutmix are on")

    @field_validator("policy")
    @classmethod
    def _known_policy(cls, value: str) -> str:
        if value not in ("auto", "none", "basic"):
            from handlens.transforms.policy import load_policy

            try:
                load_policy(value)
            except InputError as exc:
                raise ValueError(str(exc)) from None
        return value


class ModelConfig(_Section):
    backbone: str = "efficientnet_lite0"
    weights: str = "packaged"
    freeze: str = "frozen"
    head: Literal["auto", "linear", "mlp", "logistic"] = Field(
        "auto", description="auto (logistic for a frozen backbone on cached features, else linear), linear, mlp, "
        "or logistic: L-BFGS logistic regression on cached features, its L2 strength chosen by cross-validation")
    logistic_c: float | None = Field(None, gt=0, description="model.head=logistic only: this inverse L2 strength "
                                     "instead of one chosen by cross-validation on the training images (a study "
                                     "sets it to the C its folds chose)")
    hidden: int = 256
    dropout: float = Field(0.0, ge=0, lt=1)
    freeze_norm: bool = False
    pool: Literal["avg", "texture"] = Field("avg", description="avg, or texture: mean+std of two stages")


class TrainConfig(_Section):
    epochs: int = Field(10, ge=1)
    batch_size: int = Field(32, ge=1)
    optimizer: Literal["adamw", "sgd"] = "adamw"
    lr: float = Field(1e-3, gt=0)
    body_lr_mult: float = Field(1.0, gt=0, description="discriminative LR: backbone LR = lr x this")
    weight_decay: float = Field(1e-4, ge=0)
    momentum: float = 0.9
    schedule: Literal["cosine", "step", "plateau", "none"] = "cosine"
    warmup_epochs: int = Field(0, ge=0)
    step_size: int = Field(5, ge=1)
    gamma: float = 0.1
    loss: Literal["ce", "focal"] = "ce"
    focal_gamma: float = 2.0
    class_weights: Literal["auto", "none"] | list[float] = "auto"
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    monitor: str = "val_macro_f1"
    monitor_mode: Literal["max", "min"] = "max"
    early_stopping: int = Field(0, ge=0, description="patience in epochs; 0 turns early stopping off")
    seed: int = 0
    overfit_batches: int = Field(0, ge=0)
    feature_cache: Literal["auto", "on", "off"] = "auto"
    views: int = Field(0, ge=0, description="augmented views per image cached for frozen backbones")
    workers: int | None = None
    loader_workers: int | None = Field(None, ge=0, description="processes that cut patches and augment batches "
                                       "beside training (default 0: in-process, batched ops on all cores)")
    progress: bool = True
    devices: int = Field(1, ge=1, description="training processes on each machine: one per GPU where there are "
                         "GPUs, else CPU processes (gloo); more than one trains with DDP, the batch size is per "
                         "process")
    nodes: int = Field(1, ge=1, description="machines of a multi-node DDP run, each started with the same command "
                       "(torchrun, srun, or MASTER_ADDR/MASTER_PORT/NODE_RANK set)")
    strategy: Literal["auto", "ddp"] = Field("auto", description="auto: one process, or DDP when train.devices x "
                                             "train.nodes > 1; ddp: DDP, asked for explicitly")

    @model_validator(mode="after")
    def _strategy_has_effect(self) -> TrainConfig:
        if self.strategy == "ddp" and self.devices * self.nodes == 1:
            raise ValueError("train.strategy=ddp has no effect with one process (train.devices=1, train.nodes=1): "
                             "set train.devices=N to train with N processes on this machine, or drop train.strategy")
        return self

    @field_validator("feature_cache", mode="before")
    @classmethod
    def _yaml_booleans(cls, value: Any) -> Any:
        """``feature_cache: off`` in a YAML file arrives as False."""
        return {True: "on", False: "off"}.get(value, value) if isinstance(value, bool) else value


class TrackingConfig(_Section):
    backend: Literal["mlflow", "tensorboard", "none"] = "mlflow"
    experiment: str = "handlens"
    name: str = Field("", max_length=80, description="a name that tells this run apart in the viewer and the "
                      "tracker (default: what differs from the other runs)")
    probes: int = Field(0, ge=0, le=64, description="validation images whose Grad-CAM overlays and map drift "
                        "(Spearman of each map with the previous epoch's) are logged each epoch of a run whose "
                        "backbone learns; 0 is off")
    histograms: bool = Field(False, description="also log weight and gradient histograms each epoch "
                             "(tracking.backend=tensorboard)")

    @model_validator(mode="after")
    def _logged_somewhere(self) -> TrackingConfig:
        if self.probes and self.backend == "none":
            raise ValueError(f"tracking.probes={self.probes} logs to a tracker: set tracking.backend=tensorboard "
                             "or mlflow, or tracking.probes=0")
        if self.histograms and self.backend != "tensorboard":
            raise ValueError(f"tracking.histograms has no effect with tracking.backend={self.backend}: "
                             "histograms are drawn by TensorBoard; set tracking.backend=tensorboard")
        return self


class RunConfig(_Section):
    data: DataConfig = DataConfig()
    preprocess: PreprocessConfig = PreprocessConfig()
    augment: AugmentConfig = AugmentConfig()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    tracking: TrackingConfig = TrackingConfig()

    @field_validator("model")
    @classmethod
    def _freeze_is_valid(cls, value: ModelConfig) -> ModelConfig:
        from handlens.models.freeze import FreezeSpec

        FreezeSpec.parse(value.freeze)
        return value

    @model_validator(mode="after")
    def _probes_need_images(self) -> RunConfig:
        """Probes and histograms live in Lightning's loop over images: a frozen backbone's head trained on
        cached features has neither (an InputError, not a ValueError: it names two sections)."""
        if self.tracking.probes or self.tracking.histograms:
            from handlens.transforms.augment import policy_for

            if on_cached_features(self, policy_for(self.augment)):
                asked = f"tracking.probes={self.tracking.probes}" if self.tracking.probes else "tracking.histograms"
                raise InputError(f"{asked} has no effect with model.freeze={self.model.freeze}: the head trains on "
                                 "cached features, no image goes through the model; use model.freeze=partial:2 "
                                 "(or full) or train.feature_cache=off, or drop it")
        return self

    @model_validator(mode="after")
    def _processes_need_lightning(self) -> RunConfig:
        """A frozen backbone's head on cached features trains in one process without Lightning (in seconds):
        more processes would change nothing there (an InputError: it names two sections)."""
        processes = self.train.devices * self.train.nodes
        if processes > 1:
            from handlens.transforms.augment import policy_for

            if on_cached_features(self, policy_for(self.augment)):
                asked = (f"train.devices={self.train.devices}" if self.train.nodes == 1
                         else f"train.devices={self.train.devices} x train.nodes={self.train.nodes}")
                raise InputError(f"{asked} has no effect with model.freeze={self.model.freeze}: the head trains on "
                                 "cached features in one process, without Lightning (DDP does not apply); use "
                                 "model.freeze=partial:2 (or full) or train.feature_cache=off to train the model "
                                 f"on {processes} processes, or drop train.devices")
        return self

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


#: YAML 1.1 reads these as booleans; in an override they are words (pydantic still reads them for bools)
YAML_BOOLEAN_WORDS = frozenset({"on", "off", "yes", "no", "y", "n"})


def parse_value(text: str) -> Any:
    """``key=value`` values are YAML scalars or lists: 0.01, true, null, [1, 2], cosine, off."""
    if text.strip().lower() in YAML_BOOLEAN_WORDS:
        return text.strip()
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``section.key=value`` overrides to a nested dict."""
    for item in overrides:
        if "=" not in item:
            raise InputError(f"override {item!r}: write it as section.key=value, e.g. train.lr=0.01")
        key, value = item.split("=", 1)
        parts = key.strip().split(".")
        node = data
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise InputError(f"override {item!r}: {part} is not a section")
        node[parts[-1]] = parse_value(value)
    return data


def load_config(path: Path | None = None, overrides: list[str] | None = None,
                base: dict[str, Any] | None = None) -> RunConfig:
    """YAML file (optional) <- ``base`` (e.g. CLI flags) <- ``key=value`` overrides -> a validated RunConfig."""
    data: dict[str, Any] = {}
    if path is not None:
        try:
            data = yaml.safe_load(Path(path).read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise InputError(f"cannot read run config {path}: {exc}") from exc
        if not isinstance(data, dict):
            raise InputError(f"run config {path} must be a mapping of sections (data, model, train, ...)")
    for section, values in (base or {}).items():
        data.setdefault(section, {}).update({k: v for k, v in values.items() if v is not None})
    apply_overrides(data, overrides or [])
    try:
        return RunConfig.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(_explain_error(e) for e in exc.errors())
        raise InputError(f"invalid run config: {problems}") from None


def _explain_error(error: Any) -> str:
    """A pydantic error in words a user can act on; unknown keys get the nearest valid ones."""
    import difflib

    where = ".".join(str(p) for p in error["loc"])
    if error["type"] != "extra_forbidden":
        return f"{where}: {error['msg']}"
    if len(error["loc"]) == 1:
        sections = list(RunConfig.model_fields)
        return (f"{where}: not a section; write section.key=value with a section among "
                f"{', '.join(sections)} (e.g. train.lr=0.01)")
    section = RunConfig.model_fields.get(str(error["loc"][0]))
    keys = list(section.annotation.model_fields) if section is not None else []  # type: ignore[union-attr]
    close = difflib.get_close_matches(str(error["loc"][-1]), keys, n=1)
    hint = f"did you mean {error['loc'][0]}.{close[0]}?" if close else f"valid keys: {', '.join(keys)}"
    return f"{where}: unknown key; {hint}"


def on_cached_features(cfg: RunConfig, policy: Any = None) -> bool:
    """True when the run trains only a head on fixed backbone features: a frozen backbone, no patch sampling
    and no mixup/cutmix (from ``augment.mixup/cutmix`` or the ``policy``'s batch steps), cache not off."""
    from handlens.models.freeze import FreezeSpec

    if cfg.train.feature_cache == "on":
        return True
    mixing = bool(cfg.augment.mixup or cfg.augment.cutmix) or (policy is not None and bool(policy.batch_steps))
    return (cfg.train.feature_cache == "auto" and FreezeSpec.parse(cfg.model.freeze).mode == "frozen"
            and not cfg.preprocess.patches.enabled and not mixing)
