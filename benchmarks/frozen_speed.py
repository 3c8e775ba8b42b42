"""Frozen-backbone speed against the hand-written baseline, in one run, on the lithology thin sections.

In a fresh temporary workspace: ``handlens import`` the 1,525 images of ``../shared/data/lithology/train``,
``handlens split lith --ratios 0.7,0.15,0.15 --seed 1``, export that split's file lists to JSON, then time
as subprocesses, each as a user types it:

(a) the baseline, ``benchmarks/baseline_logreg.py TREE --split split.json`` (no handlens: packaged
    EfficientNet-Lite0 features + StandardScaler + LogisticRegression, C picked on val);
(b) ``handlens train --dataset lith --tracking none`` (the defaults) then ``handlens evaluate BUNDLE
    --split test`` (``--json`` added to read the figure), wall time of both commands together.

Both run twice: *cold* (handlens's workspace has no cached features or decoded images yet; import has
read every file, so the OS page cache is warm for both sides alike) and *warm* (a second run, the same
workspace: handlens reuses what the first run cached). Reported: test macro-F1 of each, wall times and the
ratio handlens / baseline (target <= 1.0), plus import + split time apart (the baseline has no such step).

    python benchmarks/frozen_speed.py                       # ~a few minutes on 2 cores
    python benchmarks/frozen_speed.py --no-warm --keep      # one pass; keep the workspace to look at
    python benchmarks/frozen_speed.py --data TREE --out results.json

The figures change as the frozen train path changes: re-run it after each change. Run one benchmark at
a time (the machine's cores are shared).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent
LITHOLOGY = ROOT.parent.parent / "shared" / "data" / "lithology" / "train"
BASELINE = ROOT / "baseline_logreg.py"
DEFAULT_OUT = ROOT / "results" / "frozen_speed.json"
DATASET = "lith"
RATIOS = "0.7,0.15,0.15"
SEED = 1


@dataclass
class Timed:
    """One finished command: its wall time and what it printed on stdout."""

    argv: list[str]
    wall_s: float
    stdout: str

    @property
    def last_line(self) -> str:
        lines = [line for line in self.stdout.splitlines() if line.strip()]
        return lines[-1].strip() if lines else ""


def handlens_exe() -> str:
    """The ``handlens`` command beside this interpreter (the venv's), else the one on PATH."""
    beside = Path(sys.executable).with_name("handlens")
    found = str(beside) if beside.is_file() else shutil.which("handlens")
    if not found:
        raise SystemExit("no `handlens` command found: run from the project's venv (.venv/bin/python)")
    return found


def timed(argv: list[str], *, log: Path) -> Timed:
    """Run ``argv``, stderr appended to ``log``; stop the benchmark with the log's tail if it fails."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("a") as err:
        err.write(f"\n$ {' '.join(argv)}\n")
        err.flush()
        start = time.perf_counter()
        proc = subprocess.run(argv, stdout=subprocess.PIPE, stderr=err, text=True, check=False)
        wall = time.perf_counter() - start
    if proc.returncode != 0:
        tail = log.read_text()[-3000:]
        raise SystemExit(f"command failed ({proc.returncode}): {' '.join(argv)}\n{proc.stdout[-2000:]}\n{tail}")
    return Timed(argv=argv, wall_s=round(wall, 2), stdout=proc.stdout)


def parse_json(stdout: str) -> Any:
    """The JSON document a ``--json`` command printed (anything before its first brace is ignored)."""
    return json.loads(stdout[stdout.index("{"):])


def prepare(ws: Path, source: Path, *, log: Path) -> dict[str, Any]:
    """Import ``source`` as dataset ``lith``, split it 0.7/0.15/0.15 seed 1, export the split to JSON."""
    hl = handlens_exe()
    imported = timed([hl, "--workspace", str(ws), "import", str(source), "--dataset", DATASET], log=log)
    split = timed([hl, "--workspace", str(ws), "split", DATASET, "--ratios", RATIOS, "--seed", str(SEED)], log=log)
    split_file = ws / "split.json"
    members = export_split(ws)
    split_file.write_text(json.dumps(members, indent=1) + "\n")
    return {"import_s": imported.wall_s, "split_s": split.wall_s, "split_file": str(split_file),
            "n": {name: len(paths) for name, paths in members.items()}}


def export_split(ws: Path) -> dict[str, list[str]]:
    """The newest split of ``lith`` as {train, val, test: [paths]} (through handlens's own loader)."""
    from handlens.core.workspace import Workspace
    from handlens.data.catalog import open_catalog
    from handlens.train.data import load_split_data

    catalog = open_catalog(Workspace.open(ws).db_url)
    try:
        data = load_split_data(catalog, DATASET)
    finally:
        catalog.close()
    labels = {Path(p).parent.name for s in data.subsets.values() for p in s.paths}
    if labels != set(data.classes):
        raise SystemExit(f"labels {sorted(data.classes)} are not the folder names {sorted(labels)}: "
                         "the baseline reads labels from folders")
    return {name: list(data.subsets[name].paths) for name in ("train", "val", "test")}


def run_baseline(tree: Path, split_file: Path, *, out: Path, log: Path, refit: bool = False) -> dict[str, Any]:
    """The baseline script on exactly handlens's split: its wall time (as a subprocess) and report."""
    argv = [sys.executable, str(BASELINE), str(tree), "--split", str(split_file), "--out", str(out)]
    run = timed([*argv, "--refit"] if refit else argv, log=log)
    report = json.loads(out.read_text())
    return {"wall_s": run.wall_s, "test_macro_f1": round(report["test_macro_f1"], 4), "report": report}


def run_handlens(ws: Path, *, log: Path, train_args: list[str] | None = None) -> dict[str, Any]:
    """``handlens train --dataset lith --tracking none [ARGS]`` then ``handlens evaluate BUNDLE --split test``."""
    hl = handlens_exe()
    train = timed([hl, "--workspace", str(ws), "train", "--dataset", DATASET, "--tracking", "none",
                   *(train_args or [])], log=log)
    bundle = train.last_line
    if not Path(bundle).is_dir():
        raise SystemExit(f"`handlens train` did not end with a bundle path; its last line: {bundle!r}")
    ev = timed([hl, "--workspace", str(ws), "evaluate", bundle, "--split", "test", "--json"], log=log)
    report = parse_json(ev.stdout)
    return {"wall_s": round(train.wall_s + ev.wall_s, 2), "train_s": train.wall_s, "evaluate_s": ev.wall_s,
            "test_macro_f1": round(report["macro_f1"], 4), "test_accuracy": round(report["accuracy"], 4),
            "n_test": report["n"], "bundle": bundle, "train_stdout": train.stdout.strip().splitlines()[-8:]}


def machine() -> dict[str, Any]:
    """Where and when the figures were measured (the load average: the cores are shared)."""
    import torch

    rev = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                         text=True, check=False).stdout.strip()
    dirty = bool(subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--", "../src"],
                                capture_output=True, text=True, check=False).stdout.strip())
    return {"cpu_count": os.cpu_count(), "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
            "python": platform.python_version(), "torch": torch.__version__,
            "cuda": torch.cuda.is_available(), "git": rev + (" (src modified)" if dirty else ""),
            "when": dt.datetime.now(dt.UTC).isoformat(timespec="seconds")}


def ratio(a: float, b: float) -> float:
    return round(a / b, 3) if b else float("nan")


def write_result(result: dict[str, Any], out: Path) -> None:
    """The results JSON (its folder made on first use), and where it went."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


def finish_workspace(ws: Path, *, keep: bool) -> None:
    """Keep the temporary workspace (saying where) or remove it."""
    if keep:
        print(f"workspace kept: {ws}")
    else:
        shutil.rmtree(ws, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=LITHOLOGY, help="folder-per-class tree (default: lithology)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="where to write the JSON results")
    parser.add_argument("--no-warm", action="store_true", help="skip the warm second run")
    parser.add_argument("--keep", action="store_true", help="keep the temporary workspace (its path is printed)")
    args = parser.parse_args()
    if not args.data.is_dir():
        raise SystemExit(f"{args.data} is not a folder; give --data TREE (a folder of class folders)")
    info = machine()
    ws = Path(tempfile.mkdtemp(prefix="handlens-frozen-speed-"))
    log = ws / "commands.log"
    try:
        result: dict[str, Any] = {"machine": info, "data": str(args.data), "workspace": str(ws),
                                  "prepare": prepare(ws, args.data, log=log)}
        split_file = Path(result["prepare"]["split_file"])
        for phase in ("cold", "warm")[: 1 if args.no_warm else 2]:
            base = run_baseline(args.data, split_file, out=ws / f"baseline_{phase}.json", log=log)
            ours = run_handlens(ws, log=log)
            result[phase] = {"baseline": base, "handlens": ours,
                             "ratio_handlens_vs_baseline": ratio(ours["wall_s"], base["wall_s"]),
                             "delta_macro_f1_handlens_minus_baseline":
                                 round(ours["test_macro_f1"] - base["test_macro_f1"], 4)}
            print(f"{phase}: baseline {base['wall_s']:.1f}s macro-F1 {base['test_macro_f1']:.4f} | handlens "
                  f"train {ours['train_s']:.1f}s + evaluate {ours['evaluate_s']:.1f}s = {ours['wall_s']:.1f}s "
                  f"macro-F1 {ours['test_macro_f1']:.4f} | ratio {result[phase]['ratio_handlens_vs_baseline']}",
                  flush=True)
        cold = result["cold"]
        result["ratio_cold_with_import_and_split"] = ratio(
            cold["handlens"]["wall_s"] + result["prepare"]["import_s"] + result["prepare"]["split_s"],
            cold["baseline"]["wall_s"])
        result["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
        result["target"] = "ratio_handlens_vs_baseline <= 1.0"
        result["verdict"] = ("meets the target" if cold["ratio_handlens_vs_baseline"] <= 1.0
                             else "misses the target") + " (cold run)"
        print(f"import {result['prepare']['import_s']:.1f}s + split {result['prepare']['split_s']:.1f}s; "
              f"cold ratio {cold['ratio_handlens_vs_baseline']}: {result['verdict']}")
        write_result(result, args.out)
    finally:
        finish_workspace(ws, keep=args.keep)


if __name__ == "__main__":
    main()
