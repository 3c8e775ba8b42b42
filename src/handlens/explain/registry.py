"""The explainer registry: one source for CLI choices, API enums and the viewer's method list."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from handlens.core.registry import Registry


@dataclass(frozen=True)
class ExplainerSpec:
    name: str
    description: str
    run: Callable[..., Any]
    uses_layer: bool  # CAM methods explain a layer; attribution methods explain pixels
    signed: bool = False
    expensive: bool = False  # many forward/backward passes per image (budgets apply in the service)
    all_classes: bool = False  # supports target="all" in one pass


EXPLAINERS: Registry[ExplainerSpec] = Registry("explanation method")


def _register() -> None:
    """Register every method. Names and descriptions only: the code (torch, Captum) loads when one runs."""

    def gradient(method: str) -> Callable[..., Any]:
        def run(model: Any, inputs: Any, classes: list[str], layer: Any, layer_name: str, target: Any = "pred",
                **params: Any) -> Any:
            from handlens.explain import cam

            return cam.gradient_cam(model, inputs, classes, layer, layer_name, method, target,
                                    class_chunk=int(params.get("class_chunk", 256)))

        return run

    descriptions = {
        "gradcam": "Grad-CAM: gradient-weighted class activation map (Selvaraju et al. 2017)",
        "gradcam++": "Grad-CAM++: better for several instances of a class (Chattopadhay et al. 2018)",
        "hirescam": "HiResCAM: element-wise gradient x activation (Draelos & Carin 2020)",
        "xgradcam": "XGradCAM: axiom-based channel weights (Fu et al. 2020)",
        "layercam": "LayerCAM: fine-grained maps at early layers (Jiang et al. 2021)",
    }
    for name, text in descriptions.items():
        EXPLAINERS.register(name, ExplainerSpec(name, text, gradient(name), uses_layer=True, all_classes=True))

    def scorecam(model: Any, inputs: Any, classes: list[str], layer: Any, layer_name: str, target: Any = "pred",
                 **params: Any) -> Any:
        from handlens.explain import cam

        return cam.score_cam(model, inputs, classes, layer, layer_name, target,
                             batch_size=int(params.get("batch_size", 64)), max_channels=params.get("max_channels"))

    EXPLAINERS.register("scorecam", ExplainerSpec(
        "scorecam", "Score-CAM: gradient-free, one masked forward pass per channel (Wang et al. 2020)", scorecam,
        uses_layer=True, expensive=True))

    def closed(model: Any, inputs: Any, classes: list[str], layer: Any, layer_name: str, target: Any = "pred",
               **_: Any) -> Any:
        from handlens.explain import cam

        return cam.closed_form_cam(model, inputs, classes, layer, layer_name, target)

    EXPLAINERS.register("cam", ExplainerSpec(
        "cam", "CAM: closed form from the linear head, final layer only (Zhou et al. 2016)", closed,
        uses_layer=True, all_classes=True))

    def pixel(function: str) -> Callable[..., Any]:
        def run(model: Any, inputs: Any, classes: list[str], layer: Any, layer_name: str, target: Any = "pred",
                **params: Any) -> Any:
            from handlens.explain import attribution

            return getattr(attribution, function)(model, inputs, classes, target, **params)

        return run

    for name, function, text, signed, expensive in (
        ("integrated_gradients", "integrated_gradients",
         "Integrated Gradients: path integral from a baseline (Sundararajan et al. 2017)", True, True),
        ("saliency", "saliency", "Saliency: input-gradient magnitude (Simonyan et al. 2014)", False, False),
        ("smoothgrad", "smoothgrad", "SmoothGrad: saliency averaged over noisy copies (Smilkov et al. 2017)",
         False, True),
        ("gradient_shap", "gradient_shap", "GradientSHAP: expected gradients (Lundberg & Lee 2017)", True, True),
        ("occlusion", "occlusion", "Occlusion: score drop under a sliding patch (Zeiler & Fergus 2014)", True, True),
    ):
        EXPLAINERS.register(name, ExplainerSpec(name, text, pixel(function), uses_layer=False, signed=signed,
                                                expensive=expensive))


_register()
