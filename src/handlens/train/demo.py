"""The main job on embedded data, offline: build a demo dataset, import, split, then train, evaluate, predict.

Two steps, so a caller can show what was imported before the (longer) training starts:
``prepare_demo`` builds the dataset into the workspace, imports it and splits it once (an existing split
is kept, so running the demo again changes nothing); ``train_demo`` trains the demo model on it
(EfficientNet-Lite0 with its packaged ImageNet weights, frozen), evaluates it on the test subset and
predicts two test images.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from handlens.core.workspace import Workspace

if TYPE_CHECKING:  # train.run imports Lightning: not for a demo run with --no-train
    from handlens.data.importer import ImportReport
    from handlens.train.run import RunResult

#: the demo split's train,val,test shares
DEMO_RATIOS = "0.6,0.2,0.2"


@dataclass(frozen=True)
class DemoData:
    """A demo dataset in the catalog: where its images were built, its import report, stats and split."""

    workspace: Workspace
    dataset: str
    images: Path
    report: ImportReport
    stats: dict[str, Any]
    split: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return {"workspace": str(self.workspace.root), "catalog": self.workspace.db_url, "images": str(self.images),
                "import": self.report.to_dict(), "stats": self.stats, "split": self.split}


@dataclass(frozen=True)
class DemoTraining:
    """The demo model's run, its test metrics (accuracy, macro-F1, n) and two test predictions."""

    result: RunResult
    evaluation: dict[str, Any]
    predictions: list[dict[str, Any]]

    def to_dict(self) -> dict[str, Any]:
        return {"train": self.result.to_dict(), "evaluate": self.evaluation, "predictions": self.predictions}


def prepare_demo(workspace: Workspace, name: str = "textures", *, seed: int = 0) -> DemoData:
    """Build the embedded demo dataset ``name`` under the workspace, import it and split it (the newest split
    is kept when there is one). Deterministic from ``seed``."""
    from handlens.data.catalog import open_catalog
    from handlens.data.demo import DEMO_DATASETS
    from handlens.data.importer import import_path
    from handlens.data.queries import find_dataset, find_labelset, latest_split
    from handlens.data.splits import make_split, split_summary
    from handlens.data.stats import dataset_stats

    demo = DEMO_DATASETS.get(name)
    catalog = open_catalog(workspace.db_url)
    try:
        manifest = demo.build(workspace.demo_dir / demo.name, seed=seed)
        report = import_path(catalog, manifest, demo.name)
        with catalog.session() as session:
            ds = find_dataset(session, demo.name)
            labelset = find_labelset(session, ds, None)
            stats = dataset_stats(session, ds, labelset)
            existing = latest_split(session, ds, labelset)
            summary = split_summary(existing, ds.name, labelset.name) if existing else None
        if summary is None:
            summary = make_split(catalog, demo.name, None, ratios=DEMO_RATIOS, seed=seed, group_by=demo.group_by,
                                 name="demo")
    finally:
        catalog.close()
    return DemoData(workspace=workspace, dataset=demo.name, images=manifest.parent, report=report, stats=stats,
                    split=summary)


def demo_recipe(epochs: int | None = None) -> str:
    """The demo model in words (what ``train_demo`` trains with these ``epochs``)."""
    how = f"a linear head for {epochs} epochs" if epochs else "the default logistic head"
    return f"efficientnet_lite0 (packaged ImageNet weights, frozen) with {how}"


def train_demo(workspace: Workspace, dataset: str, *, seed: int = 0, epochs: int | None = None) -> DemoTraining:
    """Train the demo model on ``dataset``'s newest split, evaluate it on the test subset, predict the first and
    last test images. ``epochs``: train a linear head by gradient for that many epochs (the default logistic
    head on cached features has none)."""
    from handlens.models.bundle import load_bundle
    from handlens.train.config import load_config
    from handlens.train.evaluate import evaluate
    from handlens.train.run import train

    head = [f"train.epochs={epochs}", "model.head=linear"] if epochs else []
    cfg = load_config(None, [f"data.dataset={dataset}", "model.backbone=efficientnet_lite0", "model.weights=packaged",
                             "model.freeze=frozen", f"train.seed={seed}", *head])
    result = train(cfg, workspace)
    report = evaluate(result.bundle, workspace, subset="test")
    bundle = load_bundle(result.bundle)
    members = bundle.manifest["split_membership"]["test"]
    paths = _image_paths(workspace, members)
    predictions = [p.to_dict() for p in bundle.predict([paths[members[0]], paths[members[-1]]], top_k=2)]
    return DemoTraining(result=result, evaluation={k: report[k] for k in ("accuracy", "macro_f1", "n")},
                        predictions=predictions)


def _image_paths(workspace: Workspace, image_ids: list[int]) -> dict[int, str]:
    """Catalog image id -> path, for ``image_ids``."""
    from handlens.data.catalog import Image, open_catalog

    catalog = open_catalog(workspace.db_url)
    try:
        with catalog.session() as session:
            return {row.id: row.path for row in session.query(Image).filter(Image.id.in_(image_ids))}
    finally:
        catalog.close()
