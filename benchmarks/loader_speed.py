"""Loader speed: images/s delivered to the model for 224x224 training with the thin-section policy.

handlens: the training loader itself (``handlens.train.run.build_train_loader``): working images
decoded once into the workspace cache (the first epoch pays for it), random ROI-free 224-px patches
(zoom 0.75-1.25) cut from them, the thin-section policy run on each batch by the augmentation engine
(``transforms.engine``: turns and flips folded into cutting the patch, the any-angle rotation one
``grid_sample``, brightness/contrast/blur one pass), in-process by default, then normalisation in
place, as the training step does. Plain: ``torchvision.datasets.ImageFolder`` + a ``transforms.v2`` pipeline doing
the same steps per image (decode, random square crop of the same pixel size resized to 224, right-angle
turn, any-angle bilinear rotation p=0.5, both flips, brightness p=0.5, contrast p=0.5, blur p=0.1, to float,
normalise) — what a user would otherwise write. Same images, batch size, worker count, in one run.

    python benchmarks/loader_speed.py                 # ../shared/data/lithology/train, 4 epochs
    python benchmarks/loader_speed.py --quick         # 150 images, 3 epochs

Target: later epochs >= 3x the plain loader.
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
DEFAULT_OUT = ROOT / "results" / "loader_speed.json"


def handlens_epochs(ws: Any, dataset: str, *, epochs: int, batch: int, workers: int) -> tuple[list[float], int, float]:
    """Samples/s per epoch (the first includes decoding into the cold cache) and the decode seconds."""
    import numpy as np
    import torch

    from handlens.data.catalog import open_catalog
    from handlens.models.backbones import BACKBONES
    from handlens.train.config import load_config
    from handlens.train.data import load_split_data
    from handlens.train.patch_data import RandomPatchDataset
    from handlens.train.run import apply_policy_preprocess, build_preprocess, build_train_loader
    from handlens.transforms.augment import build_augmenter, policy_for
    from handlens.transforms.cache import decode_working_many
    from handlens.transforms.patches import PatchSpec

    cfg = load_config(None, [f"data.dataset={dataset}", "augment.policy=thin-section", f"train.batch_size={batch}",
                             f"train.loader_workers={workers}", "model.backbone=resnet18"])
    apply_policy_preprocess(cfg, policy_for(cfg.augment).preprocess)
    preprocess = build_preprocess(cfg, BACKBONES.get("resnet18"))
    catalog = open_catalog(ws.db_url)
    subset = load_split_data(catalog, dataset).subsets["train"]
    catalog.close()
    spec = PatchSpec.from_dict(preprocess.patches)
    rates = []
    started = time.perf_counter()
    images = decode_working_many(subset.paths, spec.max_side, [], sha256s=subset.sha256s, cache_dir=ws.cache_dir)
    decode_seconds = time.perf_counter() - started
    dataset_ = RandomPatchDataset(images, subset.targets, spec, preprocess.size, rois=None, order=None, seed=0)
    loader = build_train_loader(cfg, dataset_, build_augmenter(cfg.augment), subset.targets,
                                generator=torch.Generator().manual_seed(0))
    for epoch in range(epochs):
        if epoch:
            started = time.perf_counter()
        count = 0
        for x, _ in loader:
            x = preprocess.normalize_batch(x, in_place=True)  # as the training step does
            assert x.dtype == torch.float32 and x.shape[-1] == preprocess.size and np.isfinite(float(x[0, 0, 0, 0]))
            count += len(x)
        rates.append(count / (time.perf_counter() - started))
        print(f"  handlens epoch {epoch + 1}: {rates[-1]:7.1f} img/s ({count} patches)", flush=True)
    return rates, len(subset), decode_seconds


def plain_epochs(paths: list[str], epochs: int, batch: int, workers: int) -> list[float]:
    import torch
    from torchvision import datasets
    from torchvision.transforms import v2

    # the same pixel sizes as handlens' patches: a 168..280-px square (224 x 0.75..1.25) of a ~500x380
    # image is 15..41% of its area
    transform = v2.Compose([
        v2.PILToTensor(),
        v2.RandomResizedCrop(224, scale=(0.15, 0.41), ratio=(1.0, 1.0), antialias=True),
        v2.RandomChoice([v2.RandomRotation((a, a)) for a in (0, 90, 180, 270)]),
        v2.RandomApply([v2.RandomRotation(180, interpolation=v2.InterpolationMode.BILINEAR)], p=0.5),  # as ours
        v2.RandomHorizontalFlip(), v2.RandomVerticalFlip(),
        v2.RandomApply([v2.ColorJitter(brightness=0.15)], p=0.5),
        v2.RandomApply([v2.ColorJitter(contrast=0.15)], p=0.5),
        v2.RandomApply([v2.GaussianBlur(5, (0.1, 0.8))], p=0.1),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
    ])
    folder = datasets.ImageFolder(str(Path(paths[0]).parent.parent), transform=transform)
    wanted = {str(Path(p).resolve()) for p in paths}
    indices = [i for i, (p, _) in enumerate(folder.samples) if str(Path(p).resolve()) in wanted]
    subset = torch.utils.data.Subset(folder, indices)
    loader = torch.utils.data.DataLoader(subset, batch_size=batch, shuffle=True, num_workers=workers,
                                         persistent_workers=workers > 0, drop_last=True)
    rates = []
    for epoch in range(epochs):
        started = time.perf_counter()
        count = 0
        for x, _ in loader:
            count += len(x)
        rates.append(count / (time.perf_counter() - started))
        print(f"  plain    epoch {epoch + 1}: {rates[-1]:7.1f} img/s ({count} images)", flush=True)
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", type=Path, default=LITHOLOGY)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--workers", type=int, default=0, help="handlens loader workers (default 0: in-process)")
    parser.add_argument("--plain-workers", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--limit", type=int, default=0, help="at most this many images (0: all)")
    parser.add_argument("--upscale", type=int, default=0, help="re-save each image as a JPEG (q90) with this longer "
                        "side, like a full-resolution scan (both loaders then decode large files)")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    if args.quick:
        args.limit, args.epochs = args.limit or 150, 3
    if not args.source.is_dir():
        raise SystemExit(f"{args.source} not found: give --source a folder-per-class tree")

    import torch

    from handlens.core.workspace import Workspace
    from handlens.data.catalog import open_catalog
    from handlens.data.importer import import_path
    from handlens.data.splits import make_split
    from handlens.train.data import load_split_data
    from handlens.train.run import quiet_lightning

    quiet_lightning()
    torch.set_num_threads(os.cpu_count() or 1)
    tmp = Path(tempfile.mkdtemp(prefix="handlens-loader-"))
    try:
        ws = Workspace.open(tmp / "ws")
        source = args.source
        if args.limit or args.upscale:  # a balanced subset (linked, or re-saved large) in a tree of its own
            from PIL import Image

            source = tmp / "subset"
            classes = sorted(p for p in args.source.iterdir() if p.is_dir())
            for folder in classes:
                (source / folder.name).mkdir(parents=True)
                files = sorted(folder.iterdir())
                for f in files[: args.limit // len(classes)] if args.limit else files:
                    if not args.upscale:
                        shutil.copyfile(f, source / folder.name / f.name)  # links out of the tree are refused
                        continue
                    with Image.open(f) as img:
                        k = args.upscale / max(img.size)
                        big = img.convert("RGB").resize((round(img.width * k), round(img.height * k)), Image.BICUBIC)
                        big.save(source / folder.name / f"{f.stem}.jpg", quality=90)
        catalog = open_catalog(ws.db_url)
        import_path(catalog, source, "bench", workers=os.cpu_count())
        make_split(catalog, "bench", ratios="0.9,0.1", seed=0)
        paths = load_split_data(catalog, "bench").subsets["train"].paths
        catalog.close()
        print(f"{len(paths)} training images from {args.source}; batch {args.batch}; loader workers: handlens "
              f"{args.workers}, plain {args.plain_workers}")
        ours, n_images, decode_seconds = handlens_epochs(ws, "bench", epochs=args.epochs, batch=args.batch,
                                                         workers=args.workers)
        plain = plain_epochs(paths, args.epochs, args.batch, args.plain_workers)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    later_ours, later_plain = sum(ours[1:]) / len(ours[1:]), sum(plain[1:]) / len(plain[1:])
    result = {
        "benchmark": "loader_speed", "source": str(args.source), "images": n_images, "epochs": args.epochs,
        "batch": args.batch, "workers": args.workers, "plain_workers": args.plain_workers, "policy": "thin-section",
        "input": 224, "upscaled_to": args.upscale or None,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__},
        "handlens_img_s": [round(r, 1) for r in ours], "plain_img_s": [round(r, 1) for r in plain],
        "handlens_decode_s": round(decode_seconds, 2),
        "first_epoch_ratio": round(ours[0] / plain[0], 2),
        "later_epochs_ratio": round(later_ours / later_plain, 2), "target_later_ratio": 3.0,
    }
    print(f"first epoch: handlens {ours[0]:.0f} img/s (decoding {decode_seconds:.1f}s included) vs plain "
          f"{plain[0]:.0f} img/s = {result['first_epoch_ratio']}x")
    print(f"later epochs: handlens {later_ours:.0f} img/s vs plain {later_plain:.0f} img/s = "
          f"{result['later_epochs_ratio']}x (target >= 3x)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
