"""Stored predictions for browsing: every labelled image of a model's dataset scored once, then filtered on the
server (correct / misclassified, confidence, predicted class) with counts that say what they cover.

Scoring in the browser covered the 200 images it had asked about, so "misclassified" silently meant "of
those". Here a model's predictions over its whole dataset are computed once in the background (decoded
through the workspace's decode cache, in batches, under the model's lock), kept in memory and on disk in
the workspace cache keyed by the model's weights, so a restart or a second replica reads them back.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

#: images decoded and scored per step (the lock is released between steps: predictions of users go first)
STEP = 64


@dataclass
class Scored:
    """One model's predictions under one labelset: image id -> (predicted class, its probability, the true
    class's probability); or the progress of computing them."""

    state: str = "none"  # none, computing, ready, failed
    done: int = 0
    of: int = 0
    error: str = ""
    skipped: list[str] = field(default_factory=list)  # "name: why" of files gone or changed since import
    skipped_ids: set[int] = field(default_factory=set)

    def missing(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The rows neither scored nor skipped: images added since the predictions were stored."""
        return [r for r in rows if r["id"] not in self.by_id and r["id"] not in self.skipped_ids]
    by_id: dict[int, tuple[str, float, float]] = field(default_factory=dict)


class PredictionStore:
    """Predictions per (model weights, labelset), computed once in a background thread each."""

    def __init__(self, cache_dir: Path) -> None:
        self.root = cache_dir / "predictions"
        self._lock = threading.Lock()
        self._scored: dict[str, Scored] = {}

    def key(self, model: Any, labelset: str) -> str:
        """The weights and the labelset, as a file name (the labelset hashed: a name is never a path)."""
        import hashlib

        return f"{model.sha256[:24]}-{hashlib.sha256(labelset.encode()).hexdigest()[:16]}"

    def get(self, model: Any, labelset: str) -> Scored:
        key = self.key(model, labelset)
        with self._lock:
            found = self._scored.get(key)
            if found is not None:
                return found
        stored = self._read(key)
        if stored is not None:
            with self._lock:
                self._scored.setdefault(key, stored)
                return self._scored[key]
        return Scored()

    def start(self, model: Any, labelset: str, rows: list[dict[str, Any]], roots: Any = None) -> Scored:
        """Begin scoring ``rows`` (browse rows: id, path, sha256, label, bytes, mtime_ns) unless it is under way
        or done; the state. Each file is checked as the service checks every file it reads (inside ``roots``,
        unchanged since import): one that is not is skipped and named, never decoded."""
        key = self.key(model, labelset)
        with self._lock:
            found = self._scored.get(key)
            if found is not None and found.state == "computing":
                return found
            if found is not None and found.state == "ready":  # images added since: score only those
                rows = found.missing(rows)
                if not rows:
                    return found
                scored, scored.state, scored.done, scored.of = found, "computing", 0, len(rows)
            else:
                scored = self._scored[key] = Scored(state="computing", of=len(rows))
        threading.Thread(target=self._compute, args=(model,), kwargs={"key": key, "rows": rows, "scored": scored,
                                                                      "roots": roots},
                         daemon=True, name=f"predictions-{key}").start()
        return scored

    def _compute(self, model: Any, *, key: str, rows: list[dict[str, Any]], scored: Scored, roots: Any) -> None:
        from handlens.transforms.cache import decode_many, decode_working_many

        bundle = model.bundle
        predicts = getattr(model, "predicts", bundle)  # the ONNX predictor when onnxruntime serves the model
        classes = list(bundle.classes)
        cache_dir = self.root.parent
        try:
            for start in range(0, len(rows), STEP):
                part = _checked(rows[start:start + STEP], roots, scored)
                paths, shas = [r["path"] for r in part], [r["sha256"] for r in part]
                if bundle.patch_trained:
                    decoded: Any = decode_working_many(paths, bundle.preprocess.working_side,
                                                       bundle.preprocess.morphology, sha256s=shas, cache_dir=cache_dir)
                    with model.lock:
                        probs = predicts.predict_working(decoded)
                else:
                    decoded = decode_many(paths, bundle.preprocess, sha256s=shas, cache_dir=cache_dir)
                    with model.lock:
                        probs = predicts.predict_arrays(decoded)
                for row, p in zip(part, probs, strict=True):
                    best = int(np.argmax(p))
                    truth = float(p[classes.index(row["label"])]) if row["label"] in classes else 0.0
                    scored.by_id[int(row["id"])] = (classes[best], round(float(p[best]), 5), round(truth, 5))
                scored.done = min(len(rows), start + STEP)
            scored.state = "ready"
            self._write(key, scored)
        except Exception as exc:  # a file gone or unreadable: said in the answer, browsing goes on
            scored.state, scored.error = "failed", f"{type(exc).__name__}: {exc}"

    def _read(self, key: str) -> Scored | None:
        path = self.root / f"{key}.json"
        try:
            body = json.loads(path.read_text())
            by_id = {int(i): (str(v[0]), float(v[1]), float(v[2])) for i, v in body["by_id"].items()}
            skipped = [str(x) for x in body.get("skipped", [])]
            skipped_ids = {int(i) for i in body.get("skipped_ids", [])}
        except (OSError, ValueError, KeyError, TypeError, IndexError):
            return None
        return Scored(state="ready", done=len(by_id), of=len(by_id), by_id=by_id, skipped=skipped,
                      skipped_ids=skipped_ids)

    def _write(self, key: str, scored: Scored) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.root / f"{key}.json.tmp"
        tmp.write_text(json.dumps({"by_id": {str(i): list(v) for i, v in scored.by_id.items()},
                                   "skipped": scored.skipped, "skipped_ids": sorted(scored.skipped_ids)}))
        tmp.replace(self.root / f"{key}.json")


def _checked(part: list[dict[str, Any]], roots: Any, scored: Scored) -> list[dict[str, Any]]:
    """The rows whose files are still the ones imported (their real paths in ``path``); the others named in
    ``scored.skipped``. An image already in the decode cache is not read again, but a moved file is still
    refused: the check is on the catalog's word, not the cache's."""
    from handlens.core.errors import HandlensError
    from handlens.data.imaging import verify_catalog_file

    kept = []
    for row in part:
        try:
            real = verify_catalog_file(row["path"], sha256=row["sha256"], size=row.get("bytes"),
                                       mtime_ns=row.get("mtime_ns"), root=roots)
        except HandlensError as exc:
            scored.skipped.append(f"{row['name']}: {exc}")
            scored.skipped_ids.add(int(row["id"]))
            continue
        kept.append({**row, "path": str(real)})
    return kept


def browse_page(rows: list[dict[str, Any]], scored: Scored, *, result: str | None, predicted: str | None,
                min_confidence: float, q: str | None, offset: int, limit: int, sort: str = "id") -> dict[str, Any]:
    """Filter catalog ``rows`` (id, name, label, subset) by name and, with predictions, by result, predicted
    class and confidence; ``sort`` ``loss`` puts the highest losses first. The page and the exact counts it
    covers."""
    needs = bool(result or predicted or min_confidence > 0 or sort == "loss")
    ready = scored.state == "ready"
    if needs and (not ready or scored.missing(rows)):
        waiting = len(scored.missing(rows)) if ready else scored.of - scored.done
        return {"total": 0, "offset": offset, "items": [], "complete": False,
                "covers": f"waiting for predictions ({waiting} images not scored yet)"}
    text = (q or "").lower()
    kept = []
    for row in rows:
        if text and text not in row["name"].lower():
            continue
        found = scored.by_id.get(row["id"]) if ready else None
        item = {**row, "predicted": found[0] if found else None, "confidence": found[1] if found else None,
                "correct": (found[0] == row["label"]) if found else None,
                "loss": round(-float(np.log(max(found[2], 1e-9))), 4) if found else None}
        if result and (found is None or item["correct"] != (result == "right")):
            continue
        if predicted and (found is None or found[0] != predicted):
            continue
        if min_confidence > 0 and (found is None or found[1] < min_confidence):
            continue
        kept.append(item)
    if sort == "loss":  # the highest losses first; an image not scored (skipped) has none to rank
        kept = sorted((item for item in kept if item["loss"] is not None), key=lambda item: -item["loss"])
    page = kept[offset:offset + limit]
    first = offset + 1 if page else 0
    return {"total": len(kept), "offset": offset, "items": page, "complete": True,
            "covers": f"{first}-{offset + len(page)} of {len(kept)} images" if page else f"0 of {len(kept)} images"}


def confusion(rows: list[dict[str, Any]], scored: Scored, classes: list[str]) -> list[list[int]] | None:
    """Truth x predicted counts over ``rows`` from the stored predictions (None until they are ready)."""
    if scored.state != "ready":
        return None
    index = {c: i for i, c in enumerate(classes)}
    matrix = [[0] * len(classes) for _ in classes]
    for row in rows:
        found = scored.by_id.get(row["id"])
        if found and row["label"] in index and found[0] in index:
            matrix[index[row["label"]]][index[found[0]]] += 1
    return matrix
