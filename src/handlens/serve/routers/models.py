"""Model resources: the workspace's bundles (damaged ones listed as damaged), their evaluations, the
explainers, and predictions (micro-batched; on torch or onnxruntime, ``runtime`` says which while loaded)."""

from __future__ import annotations

import json
from typing import Annotated, Any

import numpy as np
from fastapi import APIRouter, Query

from handlens.serve.deps import LoadedModelDep, RequestImageDep, StateDep
from handlens.serve.schemas import ERRORS, IMAGE_BODY, ExplainerInfo, ModelDetail, ModelSummary, Prediction

router = APIRouter(prefix="/api/v1", tags=["models"], responses=ERRORS)


#: what a model's summary shows of its metrics, per subset, by kind (a detector's: mAP@0.5 first)
SUMMARY_METRICS = {"classifier": ("accuracy", "macro_f1", "roc_auc", "n"),
                   "detector": ("map_50", "map", "f1", "images")}


def model_summary(model_id: str, manifest: dict[str, Any]) -> ModelSummary:
    from handlens.models.bundle import explainable_layers
    from handlens.serve.pool import model_kind

    metrics = manifest.get("metrics") or {}
    kind = model_kind(manifest)
    if kind == "detector":  # boxes, not an image's class: no layers, no preprocessing, no split of its own
        return ModelSummary(
            id=model_id, kind="detector", backbone=manifest.get("backbone"), freeze=manifest.get("freeze"),
            frozen=str(manifest.get("freeze", "")).startswith("frozen"), dataset=manifest.get("dataset"),
            labelset=manifest.get("labelset"), classes=list(manifest.get("classes") or []),
            metrics=_summarised(metrics, SUMMARY_METRICS[kind]))
    layers = explainable_layers(manifest.get("layers") or {})
    return ModelSummary(
        id=model_id, backbone=manifest.get("backbone"), freeze=manifest.get("freeze"),
        frozen=str(manifest.get("freeze", "")).startswith("frozen"), dataset=manifest.get("dataset"),
        labelset=manifest.get("labelset"), split=manifest.get("split"), classes=list(manifest.get("classes") or []),
        layers=[manifest.get("default_layer"), *[n for n in layers if n != manifest.get("default_layer")]],
        patch_trained=bool((manifest.get("preprocess") or {}).get("patches")),
        metrics=_summarised(metrics, SUMMARY_METRICS[kind]))


def _summarised(metrics: dict[str, Any], keys: tuple[str, ...]) -> dict[str, dict[str, Any]]:
    """The val and test subsets' ``keys`` (numbers only: a damaged value is shown as null, not a 500)."""
    def number(value: Any) -> Any:
        return value if isinstance(value, int | float) and not isinstance(value, bool) else None

    return {s: {k: number(metrics[s].get(k)) for k in keys} for s in ("val", "test")
            if isinstance(metrics.get(s), dict)}


def as_dict(manifest: Any) -> dict[str, Any]:
    return manifest if isinstance(manifest, dict) else manifest.model_dump(mode="json")


@router.get("/models")
def models(state: StateDep) -> list[ModelSummary]:
    """Every bundle of the workspace, classifiers and detectors (``kind``); a damaged one is listed with
    ``damaged`` saying why, and hides no other."""
    out, usable = [], {}
    for entry in state.pool.manifests():
        if entry.damaged or entry.manifest is None:
            out.append(ModelSummary(id=entry.model_id, damaged=entry.damaged or "unreadable"))
            continue
        manifest = as_dict(entry.manifest)
        if is_sanity_run(manifest):
            continue  # an --overfit-batches run checks that the model can learn: it is not a model to use
        usable[entry.model_id] = manifest
        out.append(model_summary(entry.model_id, manifest))
    names = model_names(usable)
    return [m.model_copy(update={"name": names.get(m.id, m.id), "runtime": state.pool.runtime_of(m.id)})
            for m in out]


def model_names(manifests: dict[str, dict[str, Any]]) -> dict[str, str]:
    """Names that tell models apart (``core.names``), among the models of the same kind, dataset and labelset."""
    from handlens.core.names import run_names

    groups: dict[tuple[Any, Any, Any], dict[str, dict[str, Any]]] = {}
    for model_id, manifest in manifests.items():
        group = (manifest.get("kind") or "classifier", manifest.get("dataset"), manifest.get("labelset"))
        groups.setdefault(group, {})[model_id] = manifest
    names: dict[str, str] = {}
    for group in groups.values():
        names.update(run_names({i: m.get("config") or {} for i, m in group.items()},
                               {i: m["study"] for i, m in group.items() if isinstance(m.get("study"), dict)}))
    return names


def is_sanity_run(manifest: dict[str, Any]) -> bool:
    return bool(((manifest.get("config") or {}).get("train") or {}).get("overfit_batches"))


@router.get("/models/{model_id}")
def model(model_id: str, state: StateDep) -> ModelDetail:
    """One model in full: its metrics per subset, split membership, preprocessing (a classifier's) and config."""
    manifest = state.pool.manifest(model_id, kind=None)
    given = str(((manifest.get("config") or {}).get("tracking") or {}).get("name") or "")
    return ModelDetail(**{**model_summary(model_id, manifest).model_dump(), "name": given or model_id,
                          "metrics": manifest.get("metrics") or {},
                          "split_membership": manifest.get("split_membership") or {},
                          "preprocess": manifest.get("preprocess"), "config": manifest.get("config") or {},
                          "runtime": state.pool.runtime_of(model_id)})


@router.get("/models/{model_id}/evaluations")
def evaluations(model_id: str, state: StateDep) -> list[dict[str, Any]]:
    """The model's final metrics per subset (from training) and every `handlens evaluate` report."""
    from handlens.serve.pool import bundle_dir

    run_dir = bundle_dir(state.workspace.runs_dir, model_id).parent
    metrics = state.pool.manifest(model_id, kind=None).get("metrics") or {}
    out = [{"source": f"training: {subset}", **values} for subset, values in metrics.items()
           if isinstance(values, dict)]
    for report in sorted(run_dir.glob("eval_report_*.json")):
        try:
            data = json.loads(report.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(data, dict):
            out.append({k: v for k, v in data.items() if k not in ("bundle", "confusion_png")})
    return out


@router.get("/explainers")
def explainers() -> list[ExplainerInfo]:
    """The registered explanation methods, each with the JSON schema of its parameters."""
    from handlens.explain.registry import EXPLAINERS

    out = []
    for name in EXPLAINERS.names():
        spec = EXPLAINERS.get(name)
        schema = spec.params_schema(tuning=False)  # the service refuses memory/speed knobs
        out.append(ExplainerInfo(name=name, description=spec.description, uses_layer=spec.uses_layer,
                                 signed=spec.signed, expensive=spec.expensive, params=schema))
    return out


@router.post("/models/{model_id}/predict", openapi_extra=IMAGE_BODY)
async def predict(model_id: str, image: RequestImageDep, model: LoadedModelDep,
                  top_k: Annotated[int, Query(ge=1, le=100)] = 3) -> Prediction:
    assert model.batcher is not None
    probs = await model.batcher.submit(image.array)
    classes = model.bundle.classes
    order = np.argsort(-probs)[: min(top_k, len(classes))]
    return Prediction(model=model_id, image_sha256=image.sha256, image_id=image.image_id,
                      label=classes[int(order[0])], confidence=float(probs[order[0]]),
                      top=[{"class": classes[int(i)], "probability": float(probs[i])} for i in order],
                      probabilities={c: float(p) for c, p in zip(classes, probs, strict=True)})

