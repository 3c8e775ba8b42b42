"""Request and response models of the API: what OpenAPI shows is what the routes return."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictFloat, StrictInt


class ValidationProblem(BaseModel):
    loc: list[str | int]
    msg: str
    type: str


class ErrorBody(BaseModel):
    """Every error: a sentence saying what went wrong and how to fix it, or (422 on a malformed request) the
    list of bad fields."""

    detail: str | list[ValidationProblem]


#: the error answers every route may give (declared so the schema matches the responses)
ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorBody, "description": text} for status, text in (
        (400, "a Host this service is not reached by"), (403, "a mutation without the key or from another site"),
        (404, "no such resource"), (409, "the stored file or bundle changed or is damaged"),
        (413, "too large: bytes, pixels or nesting"), (415, "not an image this service reads"),
        (422, "a bad parameter or image"), (503, "busy: retry shortly"), (504, "took longer than the time limit"))}


class Status(BaseModel):
    status: str


class Ready(BaseModel):
    status: str
    models: int
    loaded: list[str]


class DatasetSummary(BaseModel):
    name: str
    images: int
    labelsets: dict[str, int] = Field(description="labelset name -> number of classes")
    splits: list[str]
    created_at: str | None


class LabelsetSummary(BaseModel):
    name: str
    classes: list[str]
    counts: dict[str, int]


class ImageItem(BaseModel):
    id: int
    name: str
    width: int
    height: int
    label: str
    subset: str | None


class ImageList(BaseModel):
    dataset: str
    labelset: str
    split: str | None
    total: int
    offset: int
    items: list[ImageItem]


class SplitMembership(BaseModel):
    split: str
    fold: int
    subset: str


class RegionSummary(BaseModel):
    id: int
    kind: str
    label: str | None
    polygons: Any = None
    has_mask: bool = Field(description="a mask region: its picture is GET /api/v1/regions/{id}/mask.png")


class ImageDetail(BaseModel):
    id: int
    name: str
    dataset_id: int
    width: int
    height: int
    format: str
    sha256: str
    group: str | None
    labels: dict[str, str]
    splits: list[SplitMembership]
    regions: list[RegionSummary]


class RegionIn(BaseModel):
    model_config = ConfigDict(allow_inf_nan=False, extra="forbid")

    label: str | None = Field(None, max_length=200)
    polygons: list[Annotated[list[Annotated[list[StrictFloat | StrictInt], Field(min_length=2, max_length=2)]],
                             Field(min_length=3, max_length=10_000)]] = Field(
        ..., min_length=1, max_length=100, description="[[[x, y], ...], ...] in image pixels, inside the image")


class RegionCreated(BaseModel):
    id: int
    image_id: int
    kind: str
    label: str | None


class ModelSummary(BaseModel):
    id: str
    kind: Literal["classifier", "detector"] = Field("classifier", description="classifier: predict, explain, "
                                                   "browse; detector: finds boxes (POST .../detect)")
    name: str = Field("", description="the run's --name, else what differs from the other models of its dataset "
                      "and labelset (e.g. 'pool=gem · size=320'), else its id")
    damaged: str | None = Field(None, description="why the bundle cannot be loaded; null for a usable model")
    backbone: str | None = None
    freeze: str | None = None
    frozen: bool = False
    dataset: str | None = None
    labelset: str | None = None
    split: str | None = None
    classes: list[str] = Field(default_factory=list)
    layers: list[str | None] = Field(default_factory=list)
    patch_trained: bool = False
    metrics: dict[str, dict[str, float | int | None]] = Field(default_factory=dict, description="per subset: a "
                                                              "classifier's accuracy, macro_f1, roc_auc, n; a "
                                                              "detector's val map_50 (mAP@0.5), map, f1, images")
    runtime: str | None = Field(None, description="what serves its predictions while it is loaded: 'torch', "
                                "'onnx' (onnxruntime; explanations run on torch), or 'torch (onnx export failed: "
                                "...)'; null when it is not loaded now")


class ModelDetail(ModelSummary):
    metrics: dict[str, Any] = Field(default_factory=dict)  # type: ignore[assignment]  # in full, per subset
    split_membership: dict[str, Any] = Field(default_factory=dict)
    preprocess: dict[str, Any] | None = None
    config: dict[str, Any] = Field(default_factory=dict)


class ExplainerInfo(BaseModel):
    name: str
    description: str
    uses_layer: bool
    signed: bool
    expensive: bool
    params: dict[str, Any] = Field(default_factory=dict, description="JSON schema of the method's parameters")


class ClassProbability(BaseModel):
    model_config = ConfigDict(populate_by_name=True)

    class_: str = Field(alias="class")
    probability: float


class Prediction(BaseModel):
    model: str
    image_sha256: str
    image_id: int | None
    label: str
    confidence: float
    top: list[ClassProbability]
    probabilities: dict[str, float]


class MapAnswer(BaseModel):
    """What every answer about one image's map says first: which model, image, method, layer and class."""

    model: str
    image_sha256: str
    image_id: int | None
    method: str
    layer: str | None
    target: str


class RegionShare(BaseModel):
    energy: float = Field(description="share of the map's positive energy in the region")
    area: float = Field(description="share of the image's pixels the region covers")
    flagged: bool


class Shortcuts(BaseModel):
    """Where the map's energy sits (handlens.explain.shortcuts): outside the specimen/ROI, on letterbox padding,
    in the border band, each beside the share of pixels it covers."""

    verdict: str = Field(description="shortcut warning, no shortcut sign, or empty map")
    sentence: str
    unseen: float = Field(description="share of the image the model never saw (outside a centre crop)")
    warnings: list[str]
    border: RegionShare | None = None
    outside_roi: RegionShare | None = Field(None, description="null: no expert region or ROI for this image")
    padding: RegionShare | None = None


class Explanation(MapAnswer):
    signed: bool
    shortcuts: Shortcuts | None = None
    probabilities: dict[str, float]
    map_shape: list[int]
    seconds: float
    cached: bool
    overlay_png: str | None = Field(None, description="base64 PNG of the map over the image (output png/both)")
    map: list[list[float]] | None = Field(None, description="the raw map (output array/both)")


class TrustAnswer(MapAnswer):
    """One image's map judged against a random map: the words of the viewer's badge and the numbers behind."""

    verdict: str = Field(description="faithful, not better than random, or worse than random")
    sentence: str = Field(description="e.g. 'faithful · deletion 0.21 vs random 0.42'")
    deletion_auc: float
    random_deletion_auc: float
    insertion_auc: float
    random_insertion_auc: float
    steps: int
    seconds: float
    cached: bool


class DetectedBox(BaseModel):
    """One box found on the image, in the image's own pixels; with a classifier, its label, and with a method,
    its map."""

    box: list[float] = Field(description="x0, y0, x1, y1")
    score: float = Field(description="the detector's confidence")
    detected: str = Field(description="the detector's class")
    crop: list[int] = Field(description="x0, y0, x1, y1: the box grown by the margin, clipped to the image; what "
                            "the classifier saw")
    label: str | None = Field(None, description="the classifier's class (null without a classifier)")
    probabilities: dict[str, float] | None = None
    explained: bool = Field(False, description="false without a method, or past the service's limit on boxes "
                            "explained per image (the highest-scoring boxes are explained first)")
    map_png: str | None = Field(None, description="base64 RGBA PNG of this box's map over its crop (draw it "
                                "stretched to the crop), at most 96 px on its long side: the colour ramp for an "
                                "unsigned map; green for, red against, as strong as the evidence, for a signed one")


class Detection(BaseModel):
    """The boxes a detector finds on one image, each classified and explained when a classifier (and method)
    is given."""

    model: str
    classifier: str | None
    method: str | None
    image_sha256: str
    image_id: int | None
    size: list[int] = Field(description="the image's width and height, the pixels boxes are in")
    tiles: int = Field(description="tiles the detector looked at")
    score_threshold: float
    margin: float
    signed: bool = Field(description="the maps are signed (for and against the box's label)")
    count: int
    explained: int = Field(description="boxes with a map")
    boxes: list[DetectedBox]
    seconds: float
    cached: bool
    overlay_png: str | None = Field(None, description="base64 PNG of the image with every box, its label and its "
                                    "map drawn in (overlay=true), at most 1024 px on its long side")


OUTPUTS = Literal["png", "array", "both"]


#: the body of predict and explain: a multipart upload, or JSON naming a catalog image
IMAGE_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {"schema": {"type": "object", "properties": {
                "file": {"type": "string", "format": "binary"}, "method": {"type": "string"},
                "layer": {"type": "string"}, "target": {"type": "string"},
                "output": {"type": "string", "enum": ["png", "array", "both"]},
                "params": {"type": "string", "description": "the method's parameters as a JSON object"}},
                "required": ["file"]}},
            "application/json": {"schema": {"type": "object", "properties": {
                "image_id": {"type": "integer", "minimum": 1, "maximum": 2**53}, "method": {"type": "string"},
                "layer": {"type": "string"}, "target": {"type": "string"},
                "output": {"type": "string", "enum": ["png", "array", "both"]},
                "params": {"type": "object"}}, "required": ["image_id"]}},
        },
    }
}


#: the body of detect: the image only (its options are query parameters)
DETECT_BODY: dict[str, Any] = {"requestBody": {"required": True, "content": {
    "multipart/form-data": {"schema": {"type": "object", "properties": {
        "file": {"type": "string", "format": "binary"}}, "required": ["file"]}},
    "application/json": {"schema": {"type": "object", "properties": {
        "image_id": {"type": "integer", "minimum": 1, "maximum": 2**53}}, "required": ["image_id"]}}}}}


MAX_TRUST_STEPS = 50
#: the body of trust: predict/explain's, with the curves' steps
TRUST_BODY: dict[str, Any] = {"requestBody": {"required": True, "content": {
    kind: {"schema": {**body["schema"], "properties": {
        **{k: v for k, v in body["schema"]["properties"].items() if k != "output"},
        "steps": {"type": "integer", "minimum": 2, "maximum": MAX_TRUST_STEPS,
                  "description": "points on the deletion and insertion curves (default 20)"}}}}
    for kind, body in IMAGE_BODY["requestBody"]["content"].items()}}}


class PredictionsState(BaseModel):
    state: Literal["none", "computing", "ready", "stale", "failed"] = Field(
        description="stale: images were added since the predictions were stored (POST predictions scores them)")
    done: int
    of: int
    error: str = ""
    skipped: int = Field(0, description="files gone or changed since import: never decoded, not scored")
    skipped_examples: list[str] = Field(default_factory=list)


class BrowseItem(BaseModel):
    id: int
    name: str
    label: str
    subset: str | None
    predicted: str | None = Field(None, description="the stored prediction (null until predictions are ready)")
    confidence: float | None = None
    correct: bool | None = None
    loss: float | None = Field(None, description="-log of the true class's probability")


class BrowsePage(BaseModel):
    """A page of a model's dataset, filtered on the server over every image, with what the counts cover."""

    model: str
    labelset: str
    split: str | None
    total: int = Field(description="images matching every filter (exact, over the whole dataset)")
    offset: int
    covers: str = Field(description="e.g. '1-100 of 568 images', or why the page waits")
    complete: bool = Field(description="false while a filter needs predictions that are still being computed")
    items: list[BrowseItem]
    predictions: PredictionsState
    confusion: list[list[int]] | None = Field(None, description="truth x predicted over the subset filter, from "
                                              "the stored predictions")
    classes: list[str]


class RunRow(BaseModel):
    """One model on the runs page."""

    id: str
    name: str
    dataset: str | None
    labelset: str | None
    backbone: str | None
    freeze: str | None
    pool: str | None
    size: int | None
    epochs: int | None
    cv_mean: float | None = Field(None, description="the study's cross-validated macro-F1 of the trial refitted")
    cv_std: float | None = None
    study: str | None = None
    trial: int | None = None
    val_macro_f1: float | None = None
    test_macro_f1: float | None = None
    seconds: float | None = Field(None, description="training time, feature extraction included")
    started_at: str | None = None


class StudySummary(BaseModel):
    name: str
    dataset: str | None
    space: str | None = None
    sampler: str | None = None
    trials: dict[str, int]
    best_cv_mean: float | None
    bundle: str | None = None
    created_at: str | None = None


class TrialOut(BaseModel):
    number: int
    status: str
    params: dict[str, Any]
    cv_mean: float | None
    cv_std: float | None
    run_id: str | None


class StudyDetail(BaseModel):
    name: str
    verdict: str
    winner: int | None
    bundle: str | None
    importances: dict[str, float]
    trials: list[TrialOut]


class JobIn(BaseModel):
    """A job to queue: its kind and that kind's config (a run config for ``train``, a study's for ``study``...)."""

    model_config = ConfigDict(extra="forbid")

    kind: str = Field(..., description="train, study, evaluate, explain or import-urls (GET /api/v1/job-kinds)")
    config: dict[str, Any] = Field(default_factory=dict)


class JobOut(BaseModel):
    id: str
    kind: str
    status: Literal["queued", "running", "finished", "failed", "cancelled"]
    queue: str
    executor: str
    config: dict[str, Any]
    attempts: int
    worker: str | None
    cancel_requested: bool
    created_at: str
    started_at: str | None
    finished_at: str | None
    progress: dict[str, Any]
    result: dict[str, Any]
    error: str | None


class JobKindOut(BaseModel):
    name: str
    queue: str
    description: str
    config_schema: dict[str, Any]
