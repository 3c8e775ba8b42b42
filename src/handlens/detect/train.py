"""``handlens detect train``: a detector trained on the catalog's boxes, best checkpoint by val mAP, resumable.

A plain PyTorch loop (a detector's losses come out of torchvision's model itself): AdamW with a linear warm-up and
cosine decay per step, random tiles of the working images (``detect.data``), and after each epoch sliced inference
on the whole val images scored by COCO mAP (``detect.metrics``). The best epoch's weights become the bundle: by
COCO's mAP@[.5:.95] (ties to mAP@0.5), which also rewards tight boxes; mAP@0.5 alone sits at 0.99-1.00 for most
epochs of an easy collection, so choosing on it picks noise. The val-best F1 score threshold becomes the bundle's
default cut. After each epoch ``last.pt`` (weights, optimiser, schedule, history; plain tensors and numbers, read
back with ``weights_only=True``) lets ``--resume RUN`` continue a killed run where it stopped.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from handlens.core.errors import ConflictError, InputError, NotFoundError
from handlens.core.workspace import Workspace
from handlens.detect.config import DetectTrainConfig
from handlens.detect.data import TileDataset, auto_scale, collate, load_working, split_images, working_overlap
from handlens.detect.infer import Detections, sliced_detect
from handlens.detect.metrics import best_threshold, detection_f1, mean_average_precision
from handlens.detect.model import DetectorNet, apply_freeze, build_detector, load_body_weights

CONFIG_FILE = "detect.yaml"
LAST_FILE = "last.pt"
BEST_FILE = "best.safetensors"
HISTORY_FILE = "history.jsonl"
#: detections kept per val image for mAP (a low cut: mAP integrates over all scores)
EVAL_THRESHOLD = 0.05
WARMUP_STEPS = 50


@dataclass
class DetectRunResult:
    run_id: str
    run_dir: Path
    bundle: Path
    epochs: int
    best_epoch: int
    metrics: dict[str, Any]
    seconds: float
    resumed: bool = False
    stopped: str | None = None  # why training stopped before its last epoch (its time budget)
    timings: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"run_id": self.run_id, "run_dir": str(self.run_dir), "bundle": str(self.bundle),
                "epochs": self.epochs, "best_epoch": self.best_epoch, "metrics": self.metrics,
                "seconds": round(self.seconds, 2), "resumed": self.resumed, "stopped": self.stopped,
                "timings": {k: round(v, 2) for k, v in self.timings.items()}}


@dataclass
class _Data:
    classes: list[str]
    labelset: str
    split: dict[str, list[Any]]
    scale: float
    overlap: float
    train: Any
    val: list[Any]


def _prepare_data(cfg: DetectTrainConfig, ws: Workspace) -> _Data:
    from handlens.data.boxes import boxed_images, resolve_box_labelset
    from handlens.data.catalog import open_catalog

    catalog = open_catalog(ws.db_url)
    try:
        labelset = resolve_box_labelset(catalog, cfg.dataset, cfg.labelset)
        images = boxed_images(catalog, cfg.dataset, labelset)
    finally:
        catalog.close()
    classes = sorted({name for img in images for name in img.labels})
    split = split_images(images, val_share=cfg.val_share, seed=cfg.seed)
    if not any(img.boxes for img in split["train"]):
        raise InputError("no train image has a box: import more boxes, or lower --val-share")
    scale = auto_scale(split["train"], cfg.target_box) if cfg.scale == "auto" else float(cfg.scale)
    overlap = working_overlap(images, scale=scale, tile=cfg.tile, least=cfg.overlap)
    train = TileDataset(load_working(split["train"], classes, scale), tile=cfg.tile, per_image=cfg.tiles_per_image,
                        flips=cfg.flips, seed=cfg.seed)
    return _Data(classes, labelset, split, scale, overlap, train, split["val"])


def _schedule(optimizer: Any, total_steps: int) -> Any:
    def factor(step: int) -> float:
        if step < WARMUP_STEPS:
            return (step + 1) / WARMUP_STEPS
        progress = (step - WARMUP_STEPS) / max(1, total_steps - WARMUP_STEPS)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _validate(net: DetectorNet, data: _Data, cfg: DetectTrainConfig) -> tuple[dict[str, float], list[Detections]]:
    from handlens.transforms.preprocess import load_rgb

    found = [sliced_detect(net, np.asarray(load_rgb(img.path)), scale=data.scale, tile=cfg.tile, overlap=data.overlap,
                           classes=data.classes, score_threshold=EVAL_THRESHOLD, nms_iou=cfg.nms_iou)
             for img in data.val]
    return mean_average_precision(found, data.val, data.classes), found


def _atomic_torch_save(state: dict[str, Any], path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    torch.save(state, tmp)
    os.replace(tmp, path)


def _save_best(net: DetectorNet, path: Path) -> None:
    from safetensors.torch import save_file

    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    save_file({k: v.detach().contiguous() for k, v in net.state_dict().items()}, str(tmp))
    os.replace(tmp, path)


def _open_run(cfg: DetectTrainConfig | None, ws: Workspace, resume: str | None,
              run_id: str | None) -> tuple[str, Path, DetectTrainConfig, dict[str, Any] | None]:
    from handlens.train.run import new_run_id

    if resume is None and run_id is not None and (ws.runs_dir / run_id / CONFIG_FILE).is_file():
        resume = run_id  # a job delivered again: continue its run
    if resume is None:
        if cfg is None:
            raise InputError("give a config (dataset, backbone...) or --resume RUN")
        run_id = run_id or new_run_id()
        run_dir = ws.runs_dir / run_id
        run_dir.mkdir(parents=True, exist_ok=False)
        (run_dir / CONFIG_FILE).write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
        return run_id, run_dir, cfg, None
    run_dir = ws.runs_dir / resume
    if not (run_dir / CONFIG_FILE).is_file():
        raise NotFoundError(f"no detector run {resume!r} in {ws.runs_dir}; see the run ids `handlens detect train` "
                            "printed")
    if (run_dir / "bundle" / "bundle.json").is_file():
        raise ConflictError(f"detector run {resume} already finished; its bundle is {run_dir / 'bundle'}")
    saved = DetectTrainConfig.model_validate(yaml.safe_load((run_dir / CONFIG_FILE).read_text()))
    last = run_dir / LAST_FILE
    state = torch.load(last, map_location="cpu", weights_only=True) if last.is_file() else None
    return resume, run_dir, saved, state


def train_detector(cfg: DetectTrainConfig | None, workspace: Workspace | None = None, *, resume: str | None = None,
                   run_id: str | None = None, progress: bool | None = None,
                   should_stop: Callable[[], str | bool | None] | None = None,
                   epoch_hook: Callable[[dict[str, Any]], None] | None = None) -> DetectRunResult:
    """Train (or ``resume``) a detector as ``cfg`` says; the bundle is ``<run>/bundle`` (``kind: detector``)."""
    from handlens.train.run import seed_everything, training_threads

    ws = workspace or Workspace.open()
    started = time.perf_counter()
    run_id, run_dir, cfg, state = _open_run(cfg, ws, resume, run_id)
    loud = sys.stderr.isatty() if progress is None else progress
    torch.set_num_threads(training_threads())
    seed_everything(cfg.seed)
    timings: dict[str, float] = {}
    data = _prepare_data(cfg, ws)
    timings["data"] = time.perf_counter() - started
    net = build_detector(cfg.architecture, cfg.backbone, classes=len(data.classes), tile=cfg.tile,
                         channels=cfg.fpn_channels)
    weights_info = load_body_weights(net, cfg.backbone, cfg.weights)
    counts = apply_freeze(net, cfg.freeze)
    params = [p for p in net.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    loader = torch.utils.data.DataLoader(data.train, batch_size=cfg.batch_size, shuffle=True, collate_fn=collate,
                                         num_workers=cfg.workers, drop_last=len(data.train) > cfg.batch_size,
                                         generator=torch.Generator().manual_seed(cfg.seed))
    scheduler = _schedule(optimizer, cfg.epochs * max(1, len(loader)))
    history: list[dict[str, Any]] = []
    first_epoch, best = 1, {"epoch": 0, "map_50": -1.0, "map": -1.0}
    if state is not None:
        net.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        history, best, first_epoch = list(state["history"]), dict(state["best"]), int(state["epoch"]) + 1
    stopped = None
    for epoch in range(first_epoch, cfg.epochs + 1):
        reason = should_stop() if should_stop is not None else None
        if reason:  # a job's cancel: keep last.pt, write no bundle
            from handlens.train.run import RunInterrupted

            raise RunInterrupted(f"detector run {run_id} stopped before epoch {epoch}: {reason}; `handlens detect "
                                 f"train --resume {run_id}` continues it")
        if cfg.max_minutes is not None and history:
            pace = max(h["seconds"] for h in history)  # the slowest epoch: a loaded machine's pace swings
            if time.perf_counter() - started + pace > cfg.max_minutes * 60:
                stopped = f"budget: {cfg.max_minutes:g} min would be passed by epoch {epoch}"
                break
        record = _epoch(net, loader, optimizer=optimizer, scheduler=scheduler, data=data, cfg=cfg, epoch=epoch)
        history.append(record)
        if (record["map"], record["map_50"]) > (best["map"], best["map_50"]):
            best = {"epoch": epoch, "map_50": record["map_50"], "map": record["map"]}
            _save_best(net, run_dir / BEST_FILE)
        _atomic_torch_save({"model": net.state_dict(), "optimizer": optimizer.state_dict(),
                            "scheduler": scheduler.state_dict(), "history": history, "best": best, "epoch": epoch},
                           run_dir / LAST_FILE)
        with (run_dir / HISTORY_FILE).open("a") as handle:
            handle.write(json.dumps(record) + "\n")
        if loud:
            print(f"epoch {epoch}/{cfg.epochs}: loss {record['loss']:.3f}, val mAP@0.5 {record['map_50']:.3f}, "
                  f"mAP {record['map']:.3f} ({record['seconds']:.0f} s)", file=sys.stderr, flush=True)
        if epoch_hook is not None:
            epoch_hook({"epoch": epoch, "epochs": cfg.epochs, **record})
    if best["epoch"] == 0:
        raise InputError(f"detector run {run_id} stopped before its first epoch ended ({stopped}); "
                         f"`handlens detect train --resume {run_id}` continues it")
    bundle = _finish(net, run_dir, cfg, data, best=best, counts=counts, weights_info=weights_info, run_id=run_id,
                     history=history, timings=timings)
    timings["total"] = time.perf_counter() - started
    return DetectRunResult(run_id=run_id, run_dir=run_dir, bundle=bundle, epochs=len(history),
                           best_epoch=int(best["epoch"]), metrics=json.loads((bundle / "bundle.json").read_text())[
                               "metrics"], seconds=timings["total"], resumed=state is not None, stopped=stopped,
                           timings=timings)


def _epoch(net: DetectorNet, loader: Any, *, optimizer: Any, scheduler: Any, data: _Data, cfg: DetectTrainConfig,
           epoch: int) -> dict[str, Any]:
    started = time.perf_counter()
    data.train.epoch = epoch  # the epoch's tiles and their order depend on (seed, epoch) only: a resume redraws them
    loader.generator.manual_seed(cfg.seed * 100003 + epoch)
    net.train()
    losses = []
    for images, targets in loader:
        parts = net(images, targets)
        loss = sum(parts.values())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in net.parameters() if p.requires_grad], 10.0)
        optimizer.step()
        scheduler.step()
        losses.append(float(loss.detach()))
    trained = time.perf_counter() - started
    scores, _ = _validate(net, data, cfg)
    return {"epoch": epoch, "loss": float(np.mean(losses)) if losses else float("nan"), **scores,
            "train_seconds": round(trained, 2), "seconds": round(time.perf_counter() - started, 2)}


def _finish(net: DetectorNet, run_dir: Path, cfg: DetectTrainConfig, data: _Data, *, best: dict[str, Any],
            counts: dict[str, int], weights_info: dict[str, Any], run_id: str, history: list[dict[str, Any]],
            timings: dict[str, float]) -> Path:
    from safetensors.torch import load_file

    from handlens.models.bundle import save_bundle

    net.load_state_dict(load_file(str(run_dir / BEST_FILE)))
    started = time.perf_counter()
    scores, found = _validate(net, data, cfg)
    cut = best_threshold(found, data.val) if cfg.calibrate else {"f1": 0.0}
    chosen = "val-best F1 at IoU 0.5"
    if cut["f1"] == 0:  # not calibrated, or no threshold finds any val box: keep the configured cut
        cut = detection_f1(found, data.val, threshold=cfg.score_threshold)
        chosen = "as configured" if not cfg.calibrate else "as configured (no threshold found a val box)"
    timings["calibrate"] = time.perf_counter() - started
    manifest = {
        "kind": "detector", "architecture": cfg.architecture, "backbone": cfg.backbone, "classes": data.classes,
        "input": {"scale": data.scale, "tile": cfg.tile, "overlap": data.overlap,
                  "mean": list(net.detector.transform.image_mean), "std": list(net.detector.transform.image_std)},
        "fpn_channels": cfg.fpn_channels, "score_threshold": cut["threshold"], "nms_iou": cfg.nms_iou,
        "freeze": cfg.freeze, "weights": weights_info.get("source"), "run_id": run_id, "dataset": cfg.dataset,
        "labelset": data.labelset, "config": cfg.model_dump(mode="json"),
        "metrics": {"val": {**scores, "f1": cut["f1"], "precision": cut["precision"], "recall": cut["recall"],
                            "images": len(data.val), "boxes": sum(len(img.boxes) for img in data.val)},
                    "best_epoch": best["epoch"], "epochs": len(history), "parameters": counts,
                    "score_threshold": {"value": cut["threshold"],
                                        "chosen": chosen}},
        "split_membership": {name: [img.image_id for img in imgs] for name, imgs in data.split.items()},
        "training_sha256": sorted({img.sha256 for img in data.split["train"]}),
    }
    return save_bundle(run_dir / "bundle", net, manifest)
