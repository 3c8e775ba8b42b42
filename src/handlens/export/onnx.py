"""A bundle as an ONNX model that runs without handlens: ``model.onnx``, ``preprocess.json`` and ``MODEL_CARD.md``.

``model.onnx`` takes the normalised (N, 3, S, S) float32 batch the bundle's module takes (input ``input``)
and gives ``logits`` and, for bundles whose explanation layer is average-pooled straight into one linear
layer (``handlens.explain.cam.linear_head``: a CNN backbone declared ``closed_form_cam``, ``pool=avg``, a
linear or logistic head), ``features``: that layer's activation (N, K, h, w), exactly what Grad-CAM reads.
The map of class c is then ``relu(sum_k W[c, k] * features[k] / (h w))`` upsampled bilinearly
(``align_corners=False``) to the input: Grad-CAM's own numbers for such a head, since the gradient of the
logit with respect to the map is ``W[c] / (h w)`` everywhere (:func:`cam_from_outputs` is that formula in
NumPy; ``preprocess.json`` carries ``W``). Other bundles (an MLP head, texture pooling, a ViT, ConvNeXt,
VGG, an ensemble) export ``logits`` only, and the card says that in-browser maps are not available.

The activation is taken by a forward hook on the explanation layer (``explain.base.capture_activation``,
the hook Grad-CAM itself uses), not by recomposing ``forward_features`` and the head: whatever the
backbone, the output is the layer's own tensor. The model is exported in eval mode with the dynamo
exporter (``torch.onnx.export(dynamo=True)``, opset 18 or later); where that fails, or for an older
``--opset``, with the TorchScript exporter (``dynamo=False``). Every export is checked against torch on
a few fixed inputs (max |logit difference|, recorded in ``preprocess.json`` and the card).

An operator neither exporter can translate is one :class:`ExportError` naming the operator and the named
layer it sits in, and saying whether ``--logits-only`` avoids it. A damaged bundle fails in the bundle
loader, with its own message.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from handlens.core.errors import InputError

#: what ``preprocess.json`` describes; a consumer refuses a format it does not know
EXPORT_FORMAT = "handlens-onnx"
EXPORT_FORMAT_VERSION = 1
MODEL_FILE = "model.onnx"
PREPROCESS_FILE = "preprocess.json"
CARD_FILE = "MODEL_CARD.md"
INPUT_NAME = "input"
#: opset 18 is the dynamo exporter's lowest and runs in onnxruntime (and onnxruntime-web) releases since 1.14
DEFAULT_OPSET = 18
DYNAMO_MIN_OPSET = 18
#: fp32 parity the export is held to (max |logit difference| against torch)
PARITY_TOLERANCE = 1e-4
#: the tile overlap the service and ``handlens explain`` use for a patch-trained model (``explain.tiles``)
TILE_OVERLAP = 0.25
FORMATS = ("onnx",)


class ExportError(InputError):
    """The bundle loads but cannot be written as ONNX as asked (an operator the exporters cannot translate)."""


@dataclass
class OnnxModel:
    """An exported model in memory: its serialised bytes and how it was made."""

    data: bytes
    exporter: str  # "dynamo" or "torchscript"
    opset: int
    dynamic_batch: bool
    outputs: list[str]  # ["logits"] or ["logits", "features"]
    feature_layer: str | None  # the explanation layer whose activation ``features`` is
    maps: bool  # CAM can be computed from the outputs (a pool + linear head)
    maps_note: str  # why there are no maps (empty when there are)
    fallback: str | None = None  # why the dynamo exporter was not used


@dataclass
class ExportResult:
    """What ``export_bundle`` wrote and measured."""

    out: Path
    files: list[Path]
    model: OnnxModel
    parity: dict[str, Any]
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        m = self.model
        return {"out": str(self.out), "files": [str(f) for f in self.files], "exporter": m.exporter,
                "opset": m.opset, "dynamic_batch": m.dynamic_batch, "outputs": m.outputs,
                "feature_layer": m.feature_layer, "maps": m.maps, "maps_note": m.maps_note, "fallback": m.fallback,
                "parity": self.parity, "warnings": self.warnings}


# ------------------------------------------------------------------------------------------- which outputs

def cam_head(bundle: Any) -> tuple[Any, str]:
    """The head's one linear layer, whose (C, K) weight turns the explanation layer's map into CAM, or None
    and why not (the rule of ``explain.cam.linear_head``, which Grad-CAM's closed form uses)."""
    from torch import nn

    from handlens.explain.cam import linear_head

    module = bundle.module
    if linear_head(module, getattr(module, "default_layer", None)) is not None:
        return next(m for m in module.head.modules() if isinstance(m, nn.Linear)), ""
    manifest = bundle.manifest
    head = manifest.get("head") or {}
    if manifest.get("ensemble"):
        why = "it is an ensemble (its prediction averages several models)"
    elif head.get("pool", "avg") != "avg":
        why = f"its head pools by {head.get('pool')} statistics, not a plain average"
    elif head.get("type") == "mlp":
        why = "its head is an MLP, not one linear layer"
    else:
        why = (f"its backbone {manifest.get('backbone')} does not average-pool its explanation layer straight into "
               "the head (a transformer's class token, a norm after the pooling, an MLP classifier)")
    return None, (f"in-browser maps are not available for this model: {why}, so the map cannot be computed from "
                  "the exported outputs; the export gives logits only")


# ----------------------------------------------------------------------------------------------- export

def _wrapper(module: Any, store: dict[str, Any] | None) -> Any:
    """The module to export: the bundle's model, returning (logits, the hooked activation) or logits."""
    from torch import nn

    class Exported(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = module

        def forward(self, x: Any) -> Any:
            logits = self.model(x)
            if store is None:
                return logits
            return logits, store.pop("activation")

    return Exported().eval()


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """The exporters' deprecation and tracer warnings are about torch, not about the user's model; so is the
    TorchScript exporter's dump of its whole graph to stderr when it fails (its log switch reads a function
    as True, so the dump cannot be turned off: the logging call is muted for the block instead)."""
    import logging

    import torch

    loggers = [logging.getLogger(name) for name in ("torch.onnx", "onnxscript", "torch.export", "torch._dynamo")]
    levels = [logger.level for logger in loggers]
    dump = getattr(torch._C, "_jit_onnx_log", None)
    try:
        for logger in loggers:
            logger.setLevel(logging.ERROR)
        if dump is not None:
            torch._C._jit_onnx_log = lambda *_args: None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)
        if dump is not None:
            torch._C._jit_onnx_log = dump


def _example(bundle: Any, batch: int) -> Any:
    import torch

    size = bundle.preprocess.size
    return torch.zeros((batch, 3, size, size), dtype=torch.float32)


def _run_exporter(bundle: Any, *, dynamo: bool, opset: int, dynamic_batch: bool, features: bool) -> bytes:
    """One exporter's serialised model (``features``: with the explanation layer's activation output)."""
    import torch

    from handlens.explain.base import capture_activation

    names = ["logits", "features"] if features else ["logits"]
    example = _example(bundle, 2 if dynamic_batch else 1)  # 1 would be specialised as a constant
    layer = bundle.module.layer(bundle.module.default_layer) if features else None
    with contextlib.ExitStack() as stack:
        store = stack.enter_context(capture_activation(layer)) if layer is not None else None
        stack.enter_context(torch.no_grad())
        stack.enter_context(_quiet())
        wrapper = _wrapper(bundle.module, store)
        if dynamo:
            shapes = ({0: torch.export.Dim("batch", min=1)},) if dynamic_batch else None
            program = torch.onnx.export(wrapper, (example,), None, dynamo=True, opset_version=opset,
                                        input_names=[INPUT_NAME], output_names=names, dynamic_shapes=shapes,
                                        verbose=False)
            proto = program.model_proto
            written = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
            if written != opset:  # the exporter fell back to another opset instead of failing
                raise ExportError(f"the dynamo exporter wrote opset {written}, not {opset}")
            return proto.SerializeToString()
        axes = {name: {0: "batch"} for name in [INPUT_NAME, *names]} if dynamic_batch else None
        buffer = io.BytesIO()
        torch.onnx.export(wrapper, (example,), buffer, dynamo=False, opset_version=opset, input_names=[INPUT_NAME],
                          output_names=names, dynamic_axes=axes, do_constant_folding=True, verbose=False)
        return buffer.getvalue()


def _export_either(bundle: Any, *, opset: int, dynamic_batch: bool, features: bool) -> tuple[bytes, str, str | None]:
    """(model bytes, exporter, why dynamo was not used): dynamo first, TorchScript where it fails. Raises the
    exporters' errors (a list in an ExceptionGroup) when both fail."""
    errors: list[BaseException] = []
    fallback = None
    if opset >= DYNAMO_MIN_OPSET:
        try:
            return _run_exporter(bundle, dynamo=True, opset=opset, dynamic_batch=dynamic_batch,
                                 features=features), "dynamo", None
        except Exception as exc:  # any exporter failure: the TorchScript exporter may still manage
            errors.append(exc)
            fallback = f"the dynamo exporter failed: {_first_line(exc)}"
    else:
        fallback = f"the dynamo exporter writes opset {DYNAMO_MIN_OPSET} or later; --opset {opset} asked for older"
    try:
        return _run_exporter(bundle, dynamo=False, opset=opset, dynamic_batch=dynamic_batch,
                             features=features), "torchscript", fallback
    except Exception as exc:
        errors.append(exc)
        raise ExceptionGroup("both ONNX exporters failed", errors) from None


def to_onnx(bundle: Any, *, opset: int = DEFAULT_OPSET, dynamic_batch: bool = False,
            logits_only: bool = False) -> OnnxModel:
    """``bundle`` (a loaded :class:`~handlens.models.bundle.Bundle`) as an ONNX model in memory: outputs
    ``logits`` and, unless ``logits_only`` or the head is not pool + linear, ``features``; a batch of 1, or
    any batch with ``dynamic_batch``. Raises :class:`ExportError` for an operator no exporter translates."""
    linear, note = cam_head(bundle)
    maps = linear is not None and not logits_only
    if linear is not None and logits_only:
        note = "in-browser maps are not available for this export: it was made with --logits-only"
    try:
        data, exporter, fallback = _export_either(bundle, opset=opset, dynamic_batch=dynamic_batch, features=maps)
    except ExceptionGroup as group:
        raise _explain_failure(bundle, list(group.exceptions), opset=opset, features=maps) from None
    data = _with_metadata(data, bundle)
    layer = bundle.module.default_layer if maps else None
    return OnnxModel(data=data, exporter=exporter, opset=opset, dynamic_batch=dynamic_batch,
                     outputs=["logits", "features"] if maps else ["logits"], feature_layer=layer, maps=maps,
                     maps_note="" if maps else note, fallback=fallback)


def _with_metadata(data: bytes, bundle: Any) -> bytes:
    """The model with handlens' facts in its metadata (classes, weights hash), checked by ``onnx.checker``."""
    import onnx

    proto = onnx.load_from_string(data)
    manifest = bundle.manifest
    props = {"handlens.format": f"{EXPORT_FORMAT}/{EXPORT_FORMAT_VERSION}",
             "handlens.classes": json.dumps(list(bundle.classes)),
             "handlens.backbone": str(manifest.get("backbone")),
             "handlens.run_id": str(manifest.get("run_id") or ""),
             "handlens.weights_sha256": str(manifest.get("weights_sha256") or "")}
    onnx.helper.set_model_props(proto, props)
    proto.doc_string = f"handlens {manifest.get('backbone')} classifier of {', '.join(bundle.classes)}"
    onnx.checker.check_model(proto)
    return proto.SerializeToString()


# ---------------------------------------------------------------------------------- unsupported operators

_OPERATOR_PATTERNS = (
    re.compile(r"No ONNX function found for <OpOverload\(op='([\w.]+)'"),
    re.compile(r"target=torch\.ops\.([\w.]+)"),
    re.compile(r"unrecognized namespace ([\w]+::[\w]+)"),
    re.compile(r"operator '?([\w]+::[\w]+)'? to ONNX"),
)


def _first_line(exc: BaseException) -> str:
    """The first line of an exporter's error, without its terminal colours."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return (lines[0] if lines else type(exc).__name__)[:300]


def _chain(errors: Sequence[BaseException]) -> Iterator[BaseException]:
    for error in errors:
        seen: set[int] = set()
        current: BaseException | None = error
        while current is not None and id(current) not in seen:
            seen.add(id(current))
            yield current
            current = current.__cause__ or current.__context__


def failed_operator(errors: Sequence[BaseException]) -> str | None:
    """The operator the exporters could not translate (``namespace.name``), read from their errors."""
    text = "\n".join(str(error) for error in _chain(errors))
    for pattern in _OPERATOR_PATTERNS:
        found = pattern.search(text)
        if found:
            name = found.group(1).replace("::", ".")
            return re.sub(r"\.default$", "", name)
    return None


def operator_module(bundle: Any, operator: str) -> str | None:
    """The module path (in the bundle's model) of the first call of ``operator``, from ``torch.export``'s graph."""
    import torch

    try:
        with _quiet(), torch.no_grad():
            program = torch.export.export(_wrapper(bundle.module, None), (_example(bundle, 1),), strict=False)
    except Exception:  # the graph itself cannot be captured: no module to name
        return None
    for node in program.graph.nodes:
        if node.op == "call_function" and str(node.target).startswith(operator):
            stack = list((node.meta.get("nn_module_stack") or {}).values())
            if stack:
                path = str(stack[-1][0])
                return path.removeprefix("model.") if path != "model" else ""
    return None


def layer_of(layers: dict[str, str], module_path: str) -> str | None:
    """The named layer (``stage2``) holding ``module_path`` (``backbone.stages.1.4``): the longest match."""
    best = None
    for name, path in layers.items():
        if (module_path == path or module_path.startswith(path + ".")) and (best is None or
                                                                           len(path) > len(layers[best])):
            best = name
    return best


def _explain_failure(bundle: Any, errors: list[BaseException], *, opset: int, features: bool) -> ExportError:
    """One message for an export both exporters refused: the operator, its layer, what to try."""
    name = f"model {bundle.manifest.get('run_id') or bundle.path}"
    operator = failed_operator(errors)
    if operator is None:
        reasons = "; ".join(dict.fromkeys(_first_line(e) for e in errors))
        also = "--logits-only (no explanation output), " if features else ""
        return ExportError(f"{name} cannot be exported to ONNX (opset {opset}): {reasons}. Try {also}another "
                           f"--opset (default {DEFAULT_OPSET}), or a backbone that exports (tiny_cnn, "
                           "efficientnet_lite0, resnet18)")
    module_path = operator_module(bundle, operator)
    layers = getattr(bundle.module, "layers", {}) or {}
    layer = layer_of(layers, module_path) if module_path else None
    where = (f" in layer {layer} ({module_path})" if layer and module_path != layers.get(layer)
             else f" in layer {layer}" if layer else f" in module {module_path}" if module_path else "")
    text = f"{name} cannot be exported to ONNX: operator {operator}{where} has no ONNX translation at opset {opset}"
    if features:
        try:
            _export_either(bundle, opset=opset, dynamic_batch=False, features=False)
        except ExceptionGroup:
            pass
        else:
            return ExportError(f"{text} with the explanation output; export it with --logits-only (logits only: "
                               "predictions in the browser, no maps)")
    return ExportError(f"{text}; --logits-only does not avoid it ({layer or module_path or 'it'} is on the path to "
                       "the logits): try another --opset or a newer torch, or train a backbone that exports "
                       "(tiny_cnn, efficientnet_lite0, resnet18)")


# ------------------------------------------------------------------------------------------ CAM and parity

def _bilinear_matrix(out: int, size: int) -> np.ndarray:
    """(out, size) weights of 1-D linear interpolation with ``align_corners=False`` (PyTorch's convention)."""
    matrix = np.zeros((out, size), dtype=np.float64)
    scale = size / out
    for i in range(out):
        source = max((i + 0.5) * scale - 0.5, 0.0)
        low = min(int(source), size - 1)
        high = min(low + 1, size - 1)
        weight = source - low
        matrix[i, low] += 1.0 - weight
        matrix[i, high] += weight
    return matrix


def cam_from_outputs(features: np.ndarray, weight: np.ndarray, size: int | tuple[int, int] | None = None,
                     targets: Sequence[int] | None = None) -> np.ndarray:
    """CAM from an export's outputs: ``features`` (N, K, h, w) and the head weight (C, K) of ``preprocess.json``
    -> (N, C, H, W) maps (or (N, H, W) for one class per image, ``targets``), ``relu(W . features / (h w))``
    upsampled bilinearly (``align_corners=False``) to ``size`` (default: the feature map's own). For a
    pool + linear head these are handlens' Grad-CAM maps of that layer."""
    features = np.asarray(features, dtype=np.float64)
    weight = np.asarray(weight, dtype=np.float64)
    h, w = features.shape[-2:]
    if targets is None:
        cam = np.einsum("ck,nkhw->nchw", weight, features) / (h * w)
    else:
        cam = np.einsum("nk,nkhw->nhw", weight[list(targets)], features) / (h * w)
    cam = np.maximum(cam, 0.0)
    if size is None:
        return cam.astype(np.float32)
    height, width = (size, size) if isinstance(size, int) else size
    rows, cols = _bilinear_matrix(height, h), _bilinear_matrix(width, w)
    return (rows @ cam @ cols.T).astype(np.float32)


def parity_inputs(bundle: Any, count: int = 4, seed: int = 0) -> Any:
    """A fixed normalised batch for the export's own check: smooth gradients plus noise, as uint8 images through
    the bundle's normalisation (no image files needed)."""
    import torch

    size = bundle.preprocess.size
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 255, size, dtype=np.float32)
    images = []
    for index in range(count):
        base = (ramp[None, :, None] * (index % 2) + ramp[:, None, None] * (1 - index % 2)) * np.ones((1, 1, 3))
        images.append(np.clip(base * 0.6 + rng.normal(0, 40, (size, size, 3)) + 40 * index, 0, 255))
    batch = torch.from_numpy(np.stack(images).astype(np.uint8)).permute(0, 3, 1, 2)
    return bundle.preprocess.normalize_batch(batch)


def torch_outputs(bundle: Any, inputs: Any, *, features: bool) -> list[np.ndarray]:
    """The bundle's own logits (and explanation-layer activation) for ``inputs``: the reference of parity."""
    import torch

    from handlens.explain.base import capture_activation

    layer = bundle.module.layer(bundle.module.default_layer) if features else None
    with contextlib.ExitStack() as stack:
        store = stack.enter_context(capture_activation(layer)) if layer is not None else {}
        stack.enter_context(torch.inference_mode())
        logits = bundle.module(inputs)
        out = [logits.float().numpy()]
        if features:
            out.append(store["activation"].float().numpy())
    return out


def check_parity(bundle: Any, model: OnnxModel, inputs: Any) -> dict[str, Any]:
    """Max |difference| between onnxruntime's and torch's outputs for ``inputs`` (one image at a time when the
    batch is fixed at 1)."""
    import onnxruntime as ort

    try:
        session = ort.InferenceSession(model.data, providers=["CPUExecutionProvider"])
    except Exception as exc:  # an opset or operator newer than this onnxruntime
        raise ExportError(f"onnxruntime {ort.__version__} cannot load the exported model (opset {model.opset}): "
                          f"{_first_line(exc)}; export with a lower --opset (default {DEFAULT_OPSET})") from None
    reference = torch_outputs(bundle, inputs, features=model.maps)
    array = np.ascontiguousarray(inputs.numpy(), dtype=np.float32)
    if model.dynamic_batch:
        got = session.run(model.outputs, {INPUT_NAME: array})
    else:
        rows = [session.run(model.outputs, {INPUT_NAME: array[i:i + 1]}) for i in range(len(array))]
        got = [np.concatenate([row[j] for row in rows]) for j in range(len(model.outputs))]
    report = {"images": len(array), "max_abs_logits": float(np.abs(got[0] - reference[0]).max()),
              "tolerance": PARITY_TOLERANCE}
    if model.maps:
        report["max_abs_features"] = float(np.abs(got[1] - reference[1]).max())
    report["passed"] = bool(report["max_abs_logits"] < PARITY_TOLERANCE)
    return report


# --------------------------------------------------------------------------------------- preprocess.json

def _floats(values: Any) -> list[Any]:
    """float32 values as JSON numbers that read back to the same float32 (9 significant digits)."""
    array = np.asarray(values, dtype=np.float32)
    if array.ndim == 1:
        return [float(f"{v:.9g}") for v in array.tolist()]
    return [_floats(row) for row in array]


def patch_section(preprocess: Any) -> dict[str, Any] | None:
    """How a patch-trained model sees an image, as ``Bundle.predict_working`` and ``explain.tiles`` do it."""
    if not preprocess.patches:
        return None
    from handlens.transforms.patches import PatchSpec

    settings = dict(preprocess.patches)
    spec = PatchSpec.from_dict(settings)
    return {
        "trained_on_patches": True,
        "patch_size": spec.size,
        "working_side": preprocess.working_side,
        "model_input": preprocess.size,
        "working_image": "decode upright (EXIF orientation applied) as RGB, scale so the longer side is working_side "
                         "(bicubic; never enlarged; 0 keeps full resolution), then the morphology steps",
        "prediction": {
            "grid": "side = min(h, w, patch_size); rows = ceil(h / side), cols = ceil(w / side); tops = "
                    "round(linspace(0, h - side, rows)) (one row: (h - side) // 2), lefts likewise; every "
                    "(top, left) pair, rows first (numpy rounding: half to even)",
            "roi": settings.get("roi"),
            "min_roi": spec.min_roi,
            "roi_rule": "with roi.source threshold: keep the boxes whose foreground share is at least min_roi "
                        "(none: the one with the largest share)",
            "grid_max": spec.grid_max,
            "thinning": "more than grid_max boxes: keep indices round(linspace(0, n - 1, grid_max))",
            "patch_resize": "each box resized to model_input x model_input, bilinear with antialiasing "
                            "(torchvision resize, antialias=True); normalised one patch at a time",
            "average": "the image's probabilities are the mean over its grid patches of softmax(logits)",
        },
        "explanation": {
            "tile": "patch_size (at most the working image's shorter side)",
            "overlap": TILE_OVERLAP,
            "origins": "stride = max(1, round(tile * (1 - overlap))); 0, stride, ... up to length - tile, plus "
                       "length - tile where the last tile would stop short of the edge",
            "tile_resize": "bicubic (PIL) to model_input",
            "target": "the class of the image-level prediction",
            "stitch": "each tile's map resized bilinearly to the tile, weighted by a cross-fade window "
                      "outer(r, r), r[i] = min(i + 0.5, tile - i - 0.5) / (tile / 2), summed and divided by the "
                      "summed weights; then resized bilinearly to the image",
        },
    }


def preprocess_spec(bundle: Any, model: OnnxModel, parity: dict[str, Any]) -> dict[str, Any]:
    """``preprocess.json``: everything a consumer needs to feed ``model.onnx`` and read its outputs."""
    manifest, pre = bundle.manifest, bundle.preprocess
    size, batch = pre.size, ("batch" if model.dynamic_batch else 1)
    spec: dict[str, Any] = {
        "format": EXPORT_FORMAT, "format_version": EXPORT_FORMAT_VERSION, "model": MODEL_FILE,
        "input": {"name": INPUT_NAME, "shape": [batch, 3, size, size], "dtype": "float32", "layout": "NCHW",
                  "channels": "RGB"},
        "size": size, "resize": pre.resize, "interpolation": pre.interpolation,
        "mean": list(pre.mean), "std": list(pre.std), "normalize": pre.normalize,
        "clip_percentiles": list(pre.clip_percentiles), "morphology": list(pre.morphology),
        "pixels": _pixel_rule(pre),
        "classes": list(bundle.classes), "labelset": manifest.get("labelset"), "dataset": manifest.get("dataset"),
        "outputs": {"logits": {"shape": [batch, len(bundle.classes)],
                               "probabilities": "softmax over the classes, in the order of classes"}},
        "patches": patch_section(pre),
    }
    linear, _ = cam_head(bundle)
    if model.maps:
        module = bundle.module
        activation = torch_outputs(bundle, _example(bundle, 1), features=True)[1]
        spec["outputs"]["features"] = {"layer": model.feature_layer, "module": module.layers.get(model.feature_layer),
                                       "shape": [batch, *activation.shape[1:]]}
        spec["cam"] = {"available": True, "layer": model.feature_layer, "method": "gradcam",
                       "formula": "map_c = relu(sum_k weight[c][k] * features[k] / (h * w)), upsampled bilinearly "
                                  "(align_corners=false) to size x size; equal to handlens' Grad-CAM on this layer",
                       "weight": _floats(linear.weight.detach().numpy()),
                       "bias": _floats(linear.bias.detach().numpy()) if linear.bias is not None else None}
    else:
        spec["cam"] = {"available": False, "reason": model.maps_note}
    spec["bundle"] = {"run_id": manifest.get("run_id"), "backbone": manifest.get("backbone"),
                      "head": manifest.get("head"), "weights_sha256": manifest.get("weights_sha256")}
    spec["export"] = {"exporter": model.exporter, "opset": model.opset, "dynamic_batch": model.dynamic_batch,
                      "fallback": model.fallback, "parity": parity, "versions": export_versions()}
    return spec


def _pixel_rule(pre: Any) -> str:
    """In words, what becomes of a 0..255 pixel before it enters the model."""
    resize = {"shorter-crop": "scale the shorter side to size and centre-crop", "stretch": "resize to size x size",
              "letterbox": "fit inside size x size and pad with black, centred"}[pre.resize]
    norm = {"backbone": "(x / 255 - mean) / std per channel", "dataset": "(x / 255 - mean) / std per channel",
            "unit": "x / 255",
            "minmax": "per image, (x - min) / (max - min) over all pixels and channels (0 when flat)",
            "percentile": "per image, clip to the clip_percentiles of all pixels and channels (linear "
                          "interpolation) and scale to 0..1"}[pre.normalize]
    return f"decode upright as RGB; {resize} ({pre.interpolation}); then {norm}"


def export_versions() -> dict[str, str]:
    versions = {}
    for name in ("handlens", "torch", "timm", "onnx", "onnxscript", "onnxruntime", "numpy"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[name] = metadata.version(name)
    return versions


# --------------------------------------------------------------------------------------------- the files

def _write_atomic(path: Path, data: bytes) -> None:
    """Write ``path`` whole or not at all (a killed export never leaves half a model)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def load(source: Any) -> Any:
    """A loaded bundle from a bundle directory (the bundle loader's own errors for a damaged one), or as given."""
    if isinstance(source, (str, Path)):
        from handlens.models.bundle import load_bundle

        return load_bundle(source)
    return source


def export_bundle(source: Any, out: str | Path, *, fmt: str = "onnx", opset: int = DEFAULT_OPSET,
                  dynamic_batch: bool = False, logits_only: bool = False,
                  trust: Sequence[str | Path] = ()) -> ExportResult:
    """Write ``model.onnx``, ``preprocess.json`` and ``MODEL_CARD.md`` for ``source`` (a bundle directory or a
    loaded bundle) into ``out``. ``trust``: JSON reports of ``handlens trust --json`` / ``handlens audit
    --json`` whose verdicts the card quotes."""
    from handlens.export.card import model_card, read_trust

    if fmt not in FORMATS:
        raise InputError(f"--format {fmt!r}: choose one of {', '.join(FORMATS)}")
    import onnx

    newest = onnx.defs.onnx_opset_version()
    if not 7 <= opset <= newest:
        raise InputError(f"--opset {opset}: choose 7..{newest} (onnx {onnx.__version__}); the default is "
                         f"{DEFAULT_OPSET}")
    reports = read_trust(trust)
    bundle = load(source)
    model = to_onnx(bundle, opset=opset, dynamic_batch=dynamic_batch, logits_only=logits_only)
    parity = check_parity(bundle, model, parity_inputs(bundle))
    notes = [] if parity["passed"] else [
        f"onnxruntime's logits differ from torch's by up to {parity['max_abs_logits']:.2g} on the check inputs "
        f"(tolerance {PARITY_TOLERANCE:g}); compare predictions before relying on the export"]
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out} is a file; give a folder for {MODEL_FILE}, {PREPROCESS_FILE} and {CARD_FILE}")
    out.mkdir(parents=True, exist_ok=True)
    spec = preprocess_spec(bundle, model, parity)
    files = [out / MODEL_FILE, out / PREPROCESS_FILE, out / CARD_FILE]
    _write_atomic(files[0], model.data)
    _write_atomic(files[1], (json.dumps(spec, indent=1) + "\n").encode())
    _write_atomic(files[2], model_card(bundle, model=model, parity=parity, trust=reports).encode())
    return ExportResult(out=out, files=files, model=model, parity=parity, warnings=notes)
