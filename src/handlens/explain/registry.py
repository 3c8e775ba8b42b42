"""The explainer registry: one source for CLI choices, API enums, parameter checks and budgets.

Every method declares, beside its name and description:

* ``params``: a pydantic model of the parameters it takes (types, bounds, defaults, descriptions),
  with ``extra="forbid"``, so that a typo (``stpes=2``) is an error naming the allowed names instead
  of a silent default. :func:`parse_params` is the one place where raw values (keywords of a library
  call, strings of ``--param key=value``, JSON of a request) become such a model.
* ``cost``: the model evaluations one explanation takes per image (:class:`ExplainCost`), so that a
  service can bound any method's work with :func:`check_budget` without naming the method.

Fields marked *tuning* (``json_schema_extra={"tuning": True}``) change memory use or speed, never the
map; a service may refuse them (``tuning=False``) so that a request cannot ask for more memory.

This module imports no torch: the code of a method loads when it runs.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_validator

from handlens.core.errors import InputError
from handlens.core.registry import Registry

#: IG's internal batch is sized so that its extra memory stays under this budget.
DEFAULT_MEMORY_BUDGET_MB = 500.0


def _not_bool(value: Any) -> Any:
    """Refuse true/false where a number is meant (pydantic's lax mode would read ``True`` as 1)."""
    if isinstance(value, bool):
        raise ValueError("give a number, not true/false")
    return value


# the bounds come before the validator so that they reach the JSON schema (minimum, exclusiveMinimum...)
Count = Annotated[int, Field(ge=1), BeforeValidator(_not_bool)]
Share = Annotated[float, Field(gt=0, le=1), BeforeValidator(_not_bool)]
Megabytes = Annotated[float, Field(gt=0), BeforeValidator(_not_bool)]


def _tuning(default: Any, description: str) -> Any:
    """A field that changes memory use or speed only, never the map."""
    return Field(default, description=description, json_schema_extra={"tuning": True})


# --------------------------------------------------------------------------- parameter models


class ExplainParams(BaseModel):
    """Base of every method's parameters: unknown names are refused, values are checked and coerced
    in lax mode (``"32"`` becomes 32, as ``--param steps=32`` arrives)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    @classmethod
    def tuning_fields(cls) -> list[str]:
        return [name for name, info in cls.model_fields.items()
                if isinstance(info.json_schema_extra, dict) and info.json_schema_extra.get("tuning")]

    @classmethod
    def public_fields(cls) -> list[str]:
        tuning = set(cls.tuning_fields())
        return [name for name in cls.model_fields if name not in tuning]


class NoParams(ExplainParams):
    """Saliency and closed-form CAM: nothing to choose."""


class GradientCamParams(ExplainParams):
    """Grad-CAM, Grad-CAM++, HiResCAM, XGradCAM, LayerCAM."""

    class_chunk: Count = _tuning(256, "target=all: classes per batched backward pass (memory, not the maps)")


class ScoreCamParams(ExplainParams):
    max_channels: Count | None = Field(None, description="explain with the most active channels only, one "
                                                         "masked forward pass each (unset: every channel)")
    batch_size: Count = _tuning(64, "masked inputs per forward pass")


class IntegratedGradientsParams(ExplainParams):
    steps: Count = Field(50, description="points on the straight path from the baseline to the image")
    baseline: Literal["black", "blur", "noise"] = Field("black", description="the reference input the path "
                                                                             "starts from")
    memory_budget_mb: Megabytes = _tuning(DEFAULT_MEMORY_BUDGET_MB, "extra memory the step batches may use")
    internal_batch: Count | None = _tuning(None, "path points per batch (unset: sized to memory_budget_mb)")


class SmoothGradParams(ExplainParams):
    samples: Count = Field(20, description="noisy copies averaged")
    noise: Share = Field(0.15, description="noise standard deviation, as a share of the input's value range")


class GradientShapParams(ExplainParams):
    samples: Count = Field(20, description="random points between baselines and the image")


class OcclusionParams(ExplainParams):
    window: Count | None = Field(None, description="side of the blanked square in pixels "
                                                   "(unset: 1/8 of the input width, at least 4)")
    stride: Count | None = Field(None, description="pixels between window positions, at most window "
                                                   "(unset: half the window, at least 2)")
    batch_size: Count = _tuning(64, "occluded inputs per forward pass")

    @model_validator(mode="after")
    def _stride_within_window(self) -> OcclusionParams:
        if self.window is not None and self.stride is not None and self.stride > self.window:
            raise ValueError(f"occlusion needs stride <= window: stride {self.stride} > window {self.window} "
                             "leaves pixels never occluded")
        return self


def occlusion_geometry(window: int | None, stride: int | None, *, height: int, width: int) -> tuple[int, int]:
    """The window and stride occlusion uses on an input of ``height`` x ``width`` (defaults from its width)."""
    window = window or max(4, width // 8)
    stride = stride or min(window, max(2, window // 2))
    if window > min(height, width):
        raise InputError(f"occlusion needs window <= the input size ({min(height, width)}): window {window} is "
                         f"larger than the {width}x{height} input")
    if stride > window:
        raise InputError(f"occlusion needs stride <= window: stride {stride} > window {window} leaves pixels "
                         "never occluded")
    return window, stride


# --------------------------------------------------------------------------- costs and budgets


@dataclass(frozen=True)
class ExplainCost:
    """Model evaluations one explanation takes *per image*, for one target class.

    A backward pass here is one input's gradient (CAMs stop theirs at the layer). ``bounded`` is False
    when the count depends on the model (Score-CAM over all of a layer's channels): the figures are then
    a lower bound, and :func:`check_budget` bounds the parameter that drives them.
    """

    forward_passes: int
    backward_passes: int = 0
    bounded: bool = True

    @property
    def passes(self) -> int:
        return self.forward_passes + self.backward_passes


@dataclass(frozen=True)
class ExplainBudget:
    """Most model evaluations a caller allows per image; None: no limit of that kind."""

    forward_passes: int | None = None
    backward_passes: int | None = None
    passes: int | None = None  # forward and backward together

    def forward_room(self) -> int | None:
        """The most forward passes any explanation may take under this budget."""
        limits = [v for v in (self.forward_passes, self.passes) if v is not None]
        return min(limits) if limits else None


InputSize = int | tuple[int, int]  # a square side, or (height, width)


def _hw(input_size: InputSize) -> tuple[int, int]:
    return (input_size, input_size) if isinstance(input_size, int) else (int(input_size[0]), int(input_size[1]))


def _one_backward(_params: Any, *, input_size: InputSize) -> ExplainCost:
    return ExplainCost(forward_passes=1, backward_passes=1)


def _one_forward(_params: Any, *, input_size: InputSize) -> ExplainCost:
    return ExplainCost(forward_passes=1)


def _scorecam_cost(params: ScoreCamParams, *, input_size: InputSize) -> ExplainCost:
    """One forward for the activations, then one masked forward per channel kept."""
    if params.max_channels is None:
        return ExplainCost(forward_passes=1, bounded=False)
    return ExplainCost(forward_passes=1 + params.max_channels)


def _scorecam_fit(params: ScoreCamParams, budget: ExplainBudget) -> ScoreCamParams:
    """Without ``max_channels``, keep as many channels as the budget's forward passes allow."""
    room = budget.forward_room()
    if params.max_channels is not None or room is None:
        return params
    return params.model_copy(update={"max_channels": max(1, room - 1)})


def _ig_cost(params: IntegratedGradientsParams, *, input_size: InputSize) -> ExplainCost:
    """The target's forward, a forward and backward per step, and two forwards for the convergence delta."""
    return ExplainCost(forward_passes=params.steps + 3, backward_passes=params.steps)


def _saliency_cost(_params: Any, *, input_size: InputSize) -> ExplainCost:
    return ExplainCost(forward_passes=2, backward_passes=1)


def _sampled_cost(params: SmoothGradParams | GradientShapParams, *, input_size: InputSize) -> ExplainCost:
    """The target's forward, then a forward and backward per sample."""
    return ExplainCost(forward_passes=params.samples + 1, backward_passes=params.samples)


def occlusion_windows(params: OcclusionParams, *, input_size: InputSize) -> int:
    """Window positions on the input, counted as Captum does: ceil((side - window) / stride) + 1 per axis."""
    height, width = _hw(input_size)
    window, stride = occlusion_geometry(params.window, params.stride, height=height, width=width)
    return math.prod(math.ceil((side - window) / stride) + 1 for side in (height, width))


def _occlusion_cost(params: OcclusionParams, *, input_size: InputSize) -> ExplainCost:
    """The target's forward, Captum's forward of the intact input, and one forward per window position."""
    return ExplainCost(forward_passes=2 + occlusion_windows(params, input_size=input_size))


# --------------------------------------------------------------------------- the registry


RunFn = Callable[..., Any]  # (model, inputs, classes, layer, *, layer_name, target, params, mean, std)
CostFn = Callable[..., ExplainCost]  # (params, *, input_size) -> ExplainCost


@dataclass(frozen=True)
class ExplainerSpec:
    name: str
    description: str
    run: RunFn
    uses_layer: bool  # CAM methods explain a layer; attribution methods explain pixels
    params: type[ExplainParams]  # what the method takes; see parse_params
    cost: CostFn  # model evaluations per image; see ExplainCost
    signed: bool = False
    expensive: bool = False  # many forward/backward passes per image (budgets apply in the service)
    all_classes: bool = False  # supports target="all" in one pass
    #: bounds a parameter left unbounded (cost not ``bounded``) to a budget; None: nothing to bound
    fit: Callable[[Any, ExplainBudget], Any] | None = None
    budget_hint: str = ""  # how to make it cheaper, for the over-budget message

    def validate_params(self, raw: Mapping[str, Any] | ExplainParams | None = None, *,
                        tuning: bool = True) -> ExplainParams:
        """``raw`` checked against this method's parameters (see :func:`parse_params`)."""
        return _validate(self, raw, tuning=tuning)

    def params_schema(self, *, tuning: bool = True) -> dict[str, Any]:
        """The parameters' JSON schema (``additionalProperties: false``); without ``tuning``, the fields a
        service refuses are left out."""
        schema = self.params.model_json_schema()
        if not tuning:
            for name in self.params.tuning_fields():
                schema.get("properties", {}).pop(name, None)
        return schema


EXPLAINERS: Registry[ExplainerSpec] = Registry("explanation method")


def explainer(method: str) -> ExplainerSpec:
    """The spec of ``method``; an unknown name is an :class:`InputError` that lists the known ones."""
    if method in EXPLAINERS:
        return EXPLAINERS.get(method)
    close = difflib.get_close_matches(str(method), EXPLAINERS.names(), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise InputError(f"unknown explanation method {method!r}{hint}; choose one of: {', '.join(EXPLAINERS.names())}")


def parse_params(method: str, raw: Mapping[str, Any] | ExplainParams | None = None, *,
                 tuning: bool = True) -> ExplainParams:
    """``raw`` parameters of ``method`` as its validated model, defaults filled in.

    Raises :class:`InputError` naming the bad key and the allowed ones (with a close match where there
    is one), or the value and its bound. Values are coerced in lax mode: ``"32"`` is read as 32. With
    ``tuning=False`` (a service), memory and speed knobs are refused as unknown. An instance of the
    method's model is accepted as it is.
    """
    return explainer(method).validate_params(raw, tuning=tuning)


def _validate(spec: ExplainerSpec, raw: Mapping[str, Any] | ExplainParams | None, *, tuning: bool) -> ExplainParams:
    model = spec.params
    if isinstance(raw, BaseModel):
        if not isinstance(raw, model):
            raise InputError(f"the parameters are {type(raw).__name__}; {spec.name} takes {model.__name__} "
                             f"(parse_params({spec.name!r}, ...) makes them)")
        if tuning or not set(raw.model_dump(exclude_unset=True)) & set(model.tuning_fields()):
            return raw
        raw = raw.model_dump(exclude_unset=True)
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise InputError(f"{spec.name} parameters must be an object of name: value, e.g. {{\"steps\": 32}}; "
                         f"got {type(raw).__name__}")
    allowed = model.public_fields() + (model.tuning_fields() if tuning else [])
    for key in raw:
        if key not in allowed:
            raise InputError(_unknown_message(spec.name, str(key), allowed))
    try:
        return model.model_validate(dict(raw))
    except ValidationError as error:
        raise InputError(_invalid_message(spec.name, model, error)) from None


def _unknown_message(method: str, key: str, allowed: list[str]) -> str:
    if not allowed:
        return f"unknown parameter {key!r}: {method} takes no parameters"
    close = difflib.get_close_matches(key, allowed, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return f"unknown parameter {key!r} for {method}{hint}; allowed: {', '.join(allowed)}"


def _invalid_message(method: str, model: type[ExplainParams], error: ValidationError) -> str:
    problems = []
    for item in error.errors():
        name = ".".join(str(part) for part in item["loc"] if isinstance(part, str))
        message = str(item["msg"]).removeprefix("Value error, ")
        if name in model.model_fields:
            field = model.model_fields[name]
            about = f" ({field.description})" if field.description else ""
            problems.append(f"{name}={item['input']!r}: {message}{about}")
        else:
            problems.append(message)
    return f"{method} parameters: " + "; ".join(problems)


def check_budget(method: str, params: Mapping[str, Any] | ExplainParams | None, *, input_size: InputSize,
                 budget: ExplainBudget, tuning: bool = False) -> ExplainParams:
    """``params`` validated, and refused with :class:`InputError` (naming the limit) when one image's
    explanation at ``input_size`` would take more passes than ``budget`` allows.

    Returns the parameters to run with: a parameter left unbounded (Score-CAM without ``max_channels``)
    is bounded to what the budget allows. Tuning knobs are refused unless ``tuning``.
    """
    spec = explainer(method)
    chosen = spec.validate_params(params, tuning=tuning)
    cost = spec.cost(chosen, input_size=input_size)
    if not cost.bounded and spec.fit is not None:
        chosen = spec.fit(chosen, budget)
        cost = spec.cost(chosen, input_size=input_size)
    hint = f"; {spec.budget_hint}" if spec.budget_hint else ""
    if not cost.bounded and budget.forward_room() is not None:
        raise InputError(f"{method}'s cost depends on the model with these parameters; bound it{hint}")
    for kind, needed, limit in (("forward", cost.forward_passes, budget.forward_passes),
                                ("backward", cost.backward_passes, budget.backward_passes),
                                ("", cost.passes, budget.passes)):
        if limit is not None and needed > limit:
            what = f"{kind} passes" if kind else "passes in all"
            raise InputError(f"{method} with {_shown(chosen)} needs about {needed} {what} per image, over the "
                             f"limit of {limit}{hint}")
    return chosen


def _shown(params: ExplainParams) -> str:
    values = {k: v for k, v in params.model_dump().items() if k in params.public_fields()}
    return ", ".join(f"{k}={v}" for k, v in values.items()) or "its defaults"


# --------------------------------------------------------------------------- the methods


def _register() -> None:
    """Register every method. Names, models and costs only: the code (torch, Captum) loads when one runs."""

    def gradient(method: str) -> RunFn:
        def run(model: Any, inputs: Any, classes: list[str], layer: Any, *, layer_name: str, target: Any,
                params: GradientCamParams, **_affine: Any) -> Any:
            from handlens.explain import cam

            return cam.gradient_cam(model, inputs, classes, layer, layer_name=layer_name, method=method,
                                    target=target, class_chunk=params.class_chunk)

        return run

    descriptions = {
        "gradcam": "Grad-CAM: gradient-weighted class activation map (Selvaraju et al. 2017)",
        "gradcam++": "Grad-CAM++: better for several instances of a class (Chattopadhay et al. 2018)",
        "hirescam": "HiResCAM: element-wise gradient x activation (Draelos & Carin 2020)",
        "xgradcam": "XGradCAM: axiom-based channel weights (Fu et al. 2020)",
        "layercam": "LayerCAM: fine-grained maps at early layers (Jiang et al. 2021)",
    }
    for name, text in descriptions.items():
        EXPLAINERS.register(name, ExplainerSpec(name, text, gradient(name), uses_layer=True, all_classes=True,
                                                params=GradientCamParams, cost=_one_backward))

    def scorecam(model: Any, inputs: Any, classes: list[str], layer: Any, *, layer_name: str, target: Any,
                 params: ScoreCamParams, **_affine: Any) -> Any:
        from handlens.explain import cam

        return cam.score_cam(model, inputs, classes, layer, layer_name=layer_name, target=target,
                             batch_size=params.batch_size, max_channels=params.max_channels)

    EXPLAINERS.register("scorecam", ExplainerSpec(
        "scorecam", "Score-CAM: gradient-free, one masked forward pass per channel (Wang et al. 2020)", scorecam,
        uses_layer=True, expensive=True, params=ScoreCamParams, cost=_scorecam_cost, fit=_scorecam_fit,
        budget_hint="ask for fewer max_channels"))

    def closed(model: Any, inputs: Any, classes: list[str], layer: Any, *, layer_name: str, target: Any,
               params: NoParams, **_affine: Any) -> Any:
        from handlens.explain import cam

        return cam.closed_form_cam(model, inputs, classes, layer, layer_name=layer_name, target=target)

    EXPLAINERS.register("cam", ExplainerSpec(
        "cam", "CAM: closed form from the linear head, final layer only (Zhou et al. 2016)", closed,
        uses_layer=True, all_classes=True, params=NoParams, cost=_one_forward))

    def pixel(function: str, *, affine: bool) -> RunFn:
        """Run ``attribution.<function>`` with the model's fields; ``affine`` methods also get mean/std
        (their baselines are made in pixel space)."""

        def run(model: Any, inputs: Any, classes: list[str], layer: Any, *, layer_name: str, target: Any,
                params: ExplainParams, mean: tuple[float, ...], std: tuple[float, ...]) -> Any:
            from handlens.explain import attribution

            extra = {"mean": mean, "std": std} if affine else {}
            return getattr(attribution, function)(model, inputs, classes, target, **params.model_dump(), **extra)

        return run

    pixel_methods: tuple[tuple[str, str, bool, bool, type[ExplainParams], CostFn, str], ...] = (
        ("integrated_gradients", "Integrated Gradients: path integral from a baseline (Sundararajan et al. 2017)",
         True, True, IntegratedGradientsParams, _ig_cost, "ask for fewer steps"),
        ("saliency", "Saliency: input-gradient magnitude (Simonyan et al. 2014)", False, False, NoParams,
         _saliency_cost, ""),
        ("smoothgrad", "SmoothGrad: saliency averaged over noisy copies (Smilkov et al. 2017)", False, True,
         SmoothGradParams, _sampled_cost, "ask for fewer samples"),
        ("gradient_shap", "GradientSHAP: expected gradients (Lundberg & Lee 2017)", True, True, GradientShapParams,
         _sampled_cost, "ask for fewer samples"),
        ("occlusion", "Occlusion: score drop under a sliding patch (Zeiler & Fergus 2014)", True, True,
         OcclusionParams, _occlusion_cost, "use a larger window or stride"),
    )
    for name, text, signed, expensive, model, cost, hint in pixel_methods:
        affine = name in ("integrated_gradients", "gradient_shap")
        EXPLAINERS.register(name, ExplainerSpec(name, text, pixel(name, affine=affine), uses_layer=False,
                                                signed=signed, expensive=expensive, params=model, cost=cost,
                                                budget_hint=hint))


_register()
