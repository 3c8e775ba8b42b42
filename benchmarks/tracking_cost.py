"""What tracking probes cost a fine-tune epoch (issue 13): Grad-CAM overlays, map drift, graph, histograms.

Three runs of the same full fine-tune, through ``handlens.train.run.train`` with the TensorBoard tracker:
``tracking.probes=0`` (the default), ``tracking.probes=N``, and ``tracking.probes=N tracking.histograms=true``.
Reported per arm: seconds per epoch (train + validation, from the run's history) and the seconds the probe
callback itself spent in each epoch (timed inside it). The headline is the probes' share of *their own*
epoch, ``probe / (epoch - probe)``: both are timed within the same minute, so it holds on a machine whose
cores other jobs share, where the epochs of two runs can differ by 2x; the ratio of the later epochs to the
plain run's is reported too, with the load average, to read with that in mind. The first epoch also
traces the model graph, so it is reported apart. Probes cost a fixed amount per epoch (N images, whatever
the training set), so the share falls as the training set grows. Target: <= 10% of an epoch, else the
probes stay opt-in (they are: ``tracking.probes`` defaults to 0).

Data: the lithology thin sections beside the project (``../shared/data/lithology/train``) when present,
else the embedded textures demo; images are decoded once into the workspace cache before timing.

    python benchmarks/tracking_cost.py                   # efficientnet_lite0 (packaged), 160 images, 16 probes
    python benchmarks/tracking_cost.py --quick           # tiny_cnn, a smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))  # the sibling benchmark scripts
LITHOLOGY = ROOT.parent.parent / "shared" / "data" / "lithology" / "train"
DEFAULT_OUT = ROOT / "results" / "tracking_cost.json"


def make_dataset(ws: Any, limit: int, source: Path | None) -> str:
    """Import up to ``limit`` images (balanced over classes) and split 80/20 (train/val); the dataset name."""
    from train_speed import make_dataset as imported

    return imported(ws, limit, source, ratios="0.8,0.2")


def run_arm(ws: Any, overrides: list[str]) -> tuple[Any, list[float]]:
    """One run; its result and the probe callback's seconds per epoch (empty without a callback)."""
    import handlens.train.probes as probes
    from handlens.train.config import load_config
    from handlens.train.run import train

    made: list[Any] = []
    original = probes.probe_callback

    def keep(*args: Any, **kwargs: Any) -> Any:
        callback = original(*args, **kwargs)
        made.append(callback)
        return callback

    probes.probe_callback = keep  # _fit_lightning imports it at call time: it gets this wrapper
    try:
        cfg = load_config(None, ["data.dataset=bench", "tracking.backend=tensorboard", "train.progress=false",
                                 "augment.policy=none", *overrides])
        result = train(cfg, ws)
    finally:
        probes.probe_callback = original
    return result, (made[0].seconds if made and made[0] is not None else [])


def summarise(result: Any, probe_seconds: list[float], plain: list[float] | None) -> dict[str, Any]:
    """An arm's epoch and probe seconds, the probes' share of their own epochs (the epoch's seconds include
    the probing: it runs before the epoch is recorded) and the later epochs' ratio to the plain run."""
    epochs = [h["epoch_seconds"] for h in result.history]
    out: dict[str, Any] = {"epoch_seconds": [round(s, 3) for s in epochs],
                           "probe_seconds": [round(s, 3) for s in probe_seconds]}
    if plain is not None and probe_seconds:
        shares = [p / max(1e-9, e - p) for p, e in zip(probe_seconds, epochs, strict=True)]
        later = shares[1:] or shares
        out["probe_share_per_epoch"] = [round(s, 4) for s in shares]
        out["probe_share_first_epoch"] = round(shares[0], 4)  # includes the graph trace
        out["probe_share_later_epochs"] = round(sum(later) / len(later), 4)
        mean_later = lambda values: sum(values[1:] or values) / len(values[1:] or values)  # noqa: E731
        out["epoch_ratio_later_vs_plain_run"] = round(mean_later(epochs) / mean_later(plain), 3)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=160)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--probes", type=int, default=16)
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--quick", action="store_true", help="tiny_cnn on few images, for a smoke run")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    if args.quick:
        args.images, args.epochs, args.backbone = 60, 2, "tiny_cnn"

    import torch

    from handlens.core.workspace import Workspace
    from handlens.models.backbones import BACKBONES

    started = time.perf_counter()
    torch.set_num_threads(os.cpu_count() or 1)
    source = LITHOLOGY if LITHOLOGY.is_dir() else None
    weights = "packaged" if BACKBONES.get(args.backbone).packaged_weights else "none"
    results: dict[str, Any] = {
        "machine": {"cpu_count": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__},
        "data": str(source) if source else "embedded textures demo", "backbone": args.backbone,
        "weights": weights, "epochs": args.epochs, "probes": args.probes,
        "load_average_1min": {"start": round(os.getloadavg()[0], 2)},
    }
    tmp = Path(tempfile.mkdtemp(prefix="handlens-tracking-cost-"))
    try:
        ws = Workspace.open(tmp / "ws")
        make_dataset(ws, args.images, source)
        common = [f"model.backbone={args.backbone}", f"model.weights={weights}", "model.freeze=full",
                  f"train.epochs={args.epochs}", "train.batch_size=32", "train.lr=0.0005", "train.schedule=none"]
        run_arm(ws, [*common, "train.epochs=1"])  # warm the decode cache and the allocator
        plain, _ = run_arm(ws, common)
        probed, probe_s = run_arm(ws, [*common, f"tracking.probes={args.probes}"])
        both, both_s = run_arm(ws, [*common, f"tracking.probes={args.probes}", "tracking.histograms=true"])
        plain_epochs = [h["epoch_seconds"] for h in plain.history]
        results["train_images"] = len(json.loads((plain.bundle / "bundle.json").read_text())
                                      ["split_membership"]["train"])
        results["arms"] = {
            "plain": summarise(plain, [], None),
            "probes": summarise(probed, probe_s, plain_epochs),
            "probes_histograms": summarise(both, both_s, plain_epochs),
        }
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    results["seconds_total"] = round(time.perf_counter() - started, 1)
    results["load_average_1min"]["end"] = round(os.getloadavg()[0], 2)

    print(f"data: {results['data']}  backbone: {args.backbone} ({weights})  train images: "
          f"{results['train_images']}  epochs: {args.epochs}  probes: {args.probes}  load average: "
          f"{results['load_average_1min']} on {os.cpu_count()} cores")
    for name, arm in results["arms"].items():
        line = f"  {name:<18} epoch s {arm['epoch_seconds']}"
        if arm["probe_seconds"]:
            line += (f"  probe s {arm['probe_seconds']}\n{'':21}share of its own epoch: first "
                     f"{arm['probe_share_first_epoch']:.1%} (graph traced), later {arm['probe_share_later_epochs']:.1%}"
                     f" (target <= 10%); later epochs vs the plain run {arm['epoch_ratio_later_vs_plain_run']}x")
        print(line)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print(f"results written to {args.out}  ({results['seconds_total']} s)")


if __name__ == "__main__":
    main()
