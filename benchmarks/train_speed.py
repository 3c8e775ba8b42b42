"""Training speed, as ratios measured in one run on this machine.

1. Frozen backbone: images/s of training *with* the feature cache (the backbone runs once, then only
   the head trains) vs *without* it (the frozen backbone runs on every image every epoch), both through
   ``handlens.train.run.train``. Target: >= 10x for the epochs after the first.
2. Full fine-tune: images/s of our loop (``train``: Lightning + our module, metrics and all) vs a plain
   hand-written PyTorch loop on the same model, weights, data, batch size and optimiser. Target >= 0.9x.

Data: the lithology thin sections beside the project (``../shared/data/lithology/train``) when present,
else the embedded textures demo. Images are decoded once into the workspace cache before timing, so
both sides of each comparison read the same decoded tensors.

    python benchmarks/train_speed.py                      # defaults: 400 images frozen, 320 fine-tune
    python benchmarks/train_speed.py --quick              # a smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent
LITHOLOGY = ROOT.parent.parent / "shared" / "data" / "lithology" / "train"
DEFAULT_OUT = ROOT / "results" / "train_speed.json"


def make_dataset(ws: Any, limit: int, source: Path | None, ratios: str = "0.9,0.1") -> str:
    """Import up to ``limit`` images (balanced over classes) and split them by ``ratios`` (train, val); returns
    the dataset name."""
    from handlens.data.catalog import open_catalog
    from handlens.data.demo import build_textures
    from handlens.data.importer import import_path
    from handlens.data.splits import make_split

    if source is None or not source.is_dir():
        source = ws.demo_dir / "textures"
        build_textures(source, per_class=max(10, limit // 3 + 1))
    tree = ws.root / "subset"
    classes = sorted(p for p in source.iterdir() if p.is_dir())
    for folder in classes:
        (tree / folder.name).mkdir(parents=True, exist_ok=True)
        files = sorted(f for f in folder.iterdir() if f.is_file())[: limit // len(classes)]
        for f in files:
            shutil.copyfile(f, tree / folder.name / f.name)  # the importer refuses links out of the tree
    catalog = open_catalog(ws.db_url)
    import_path(catalog, tree, "bench", workers=1)
    make_split(catalog, "bench", ratios=ratios, seed=0)
    catalog.close()
    return "bench"


def run_train(ws: Any, overrides: list[str]) -> Any:
    from handlens.train.config import load_config
    from handlens.train.run import train

    cfg = load_config(None, ["data.dataset=bench", "tracking.backend=none", "train.progress=false",
                             "augment.policy=none", *overrides])
    return train(cfg, ws)


def images_per_second(result: Any, n_train: int, batch_size: int = 32, drop_last: bool = True) -> list[float]:
    """Images actually trained on per second (a dropped last partial batch is not counted)."""
    seen = (n_train // batch_size) * batch_size if drop_last and n_train > batch_size else n_train
    return [seen / h["train_seconds"] for h in result.history]


def plain_loop(ws: Any, backbone: str, *, epochs: int, batch_size: int, lr: float) -> list[float]:
    """The loop a user would write by hand: same model, data, batch size and optimiser; no framework."""
    import torch

    from handlens.data.catalog import open_catalog
    from handlens.models.backbones import BACKBONES
    from handlens.models.classifier import create_classifier
    from handlens.train.data import as_tensor_images, load_split_data
    from handlens.transforms.cache import decode_many
    from handlens.transforms.preprocess import normalize_batch

    catalog = open_catalog(ws.db_url)
    data = load_split_data(catalog, "bench")
    catalog.close()
    spec = BACKBONES.get(backbone)
    pre = spec.preprocess()
    train = data.subsets["train"]
    images = as_tensor_images(decode_many(train.paths, pre, sha256s=train.sha256s, cache_dir=ws.cache_dir))
    targets = torch.from_numpy(train.targets)
    torch.manual_seed(0)
    model = create_classifier(backbone, len(data.classes), weights="packaged" if spec.packaged_weights else "none",
                              freeze="full")
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(images, targets), batch_size=batch_size,
                                         shuffle=True, drop_last=len(targets) > batch_size)
    rates = []
    for _ in range(epochs):
        model.train()
        started, seen = time.perf_counter(), 0
        for x, y in loader:
            loss = torch.nn.functional.cross_entropy(model(normalize_batch(x, pre.mean, pre.std)), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            seen += len(y)
        rates.append(seen / (time.perf_counter() - started))
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frozen-images", type=int, default=400)
    parser.add_argument("--finetune-images", type=int, default=320)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for a smoke run")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    if args.quick:
        args.frozen_images, args.finetune_images, args.epochs = 60, 48, 2

    import torch

    from handlens.core.workspace import Workspace

    torch.set_num_threads(os.cpu_count() or 1)
    source = LITHOLOGY if LITHOLOGY.is_dir() else None
    results: dict[str, Any] = {
        "machine": {"cpu_count": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__},
        "data": str(source) if source else "embedded textures demo", "backbone": args.backbone,
        "epochs": args.epochs,
    }
    tmp = Path(tempfile.mkdtemp(prefix="handlens-train-speed-"))
    try:
        # ---- 1. frozen: feature cache on vs off
        ws = Workspace.open(tmp / "frozen")
        make_dataset(ws, args.frozen_images, source)
        # a gradient head on both sides (the frozen default, a logistic head, fits once: it has no later epochs)
        common = [f"model.backbone={args.backbone}", "model.freeze=frozen", "model.head=linear",
                  f"train.epochs={args.epochs}", "train.batch_size=32"]
        run_train(ws, [*common, "train.feature_cache=off", "train.epochs=1"])  # warm the decode cache
        off = run_train(ws, [*common, "train.feature_cache=off"])
        shutil.rmtree(ws.cache_dir / "features", ignore_errors=True)
        on = run_train(ws, [*common, "train.feature_cache=on"])
        n_train = len(json.loads((on.bundle / "bundle.json").read_text())["split_membership"]["train"])
        off_rates = images_per_second(off, n_train)  # images from the decode cache: last batch dropped
        on_rates = images_per_second(on, n_train, drop_last=False)  # cached features: every row
        first_on = n_train / (on.timings["features"] + on.history[0]["train_seconds"])
        later_on = sum(on_rates[1:]) / max(1, len(on_rates) - 1)
        later_off = sum(off_rates[1:]) / max(1, len(off_rates) - 1)
        results["frozen"] = {
            "train_images": n_train,
            "without_cache_images_per_s": [round(r, 1) for r in off_rates],
            "with_cache_first_epoch_images_per_s": round(first_on, 1),
            "with_cache_images_per_s": [round(r, 1) for r in on_rates],
            "feature_seconds": round(on.timings["features"], 2),
            "ratio_later_epochs_cache_vs_none": round(later_on / later_off, 1),
            "ratio_first_epoch_cache_vs_none": round(first_on / off_rates[0], 2),
        }
        # ---- 2. full fine-tune: ours vs a plain loop
        ws = Workspace.open(tmp / "finetune")
        make_dataset(ws, args.finetune_images, source)
        tune = [f"model.backbone={args.backbone}", "model.freeze=full", f"train.epochs={args.epochs}",
                "train.batch_size=32", "train.lr=0.0005", "train.schedule=none"]
        run_train(ws, [*tune, "train.epochs=1"])  # warm the decode cache and the allocator
        ours = run_train(ws, tune)
        n_tune = len(json.loads((ours.bundle / "bundle.json").read_text())["split_membership"]["train"])
        ours_rates = images_per_second(ours, n_tune)
        plain_rates = plain_loop(ws, args.backbone, epochs=args.epochs, batch_size=32, lr=0.0005)
        ours_later = sum(ours_rates[1:]) / max(1, len(ours_rates) - 1)
        plain_later = sum(plain_rates[1:]) / max(1, len(plain_rates) - 1)
        results["finetune"] = {
            "train_images": n_tune,
            "ours_images_per_s": [round(r, 2) for r in ours_rates],
            "plain_loop_images_per_s": [round(r, 2) for r in plain_rates],
            "ratio_ours_vs_plain": round(ours_later / plain_later, 3),
        }
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    f, t = results["frozen"], results["finetune"]
    print(f"data: {results['data']}  backbone: {args.backbone}  epochs: {args.epochs}")
    print(f"frozen, {f['train_images']} train images")
    print(f"  without feature cache        {f['without_cache_images_per_s']} images/s per epoch")
    print(f"  with cache, first epoch      {f['with_cache_first_epoch_images_per_s']} images/s "
          f"(features {f['feature_seconds']} s)")
    print(f"  with cache, epochs           {f['with_cache_images_per_s']} images/s per epoch")
    print(f"  ratio, later epochs          {f['ratio_later_epochs_cache_vs_none']}x   (target >= 10x)")
    print(f"full fine-tune, {t['train_images']} train images")
    print(f"  handlens train               {t['ours_images_per_s']} images/s per epoch")
    print(f"  plain PyTorch loop           {t['plain_loop_images_per_s']} images/s per epoch")
    print(f"  ratio, later epochs          {t['ratio_ours_vs_plain']}x   (target >= 0.9x)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print(f"results written to {args.out}")


if __name__ == "__main__":
    main()
