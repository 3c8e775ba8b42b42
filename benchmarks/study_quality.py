"""Model quality of a study against the hand-written baseline and the defaults, in one run, on one split.

In a fresh temporary workspace the lithology thin sections (``../shared/data/lithology/train``) are imported
and split 0.7/0.15/0.15 with seed 1 (as in ``frozen_speed.py``); then each chosen arm runs as a subprocess,
as a user types it, and is scored on that split's test images:

* ``baseline``: ``benchmarks/baseline_logreg.py`` on exactly that split (C picked on val, trained on train;
  its ``--refit`` figure, refitted on train+val, is reported beside it);
* ``train``: ``handlens train --dataset lith --tracking none`` + ``handlens evaluate BUNDLE --split test``;
* ``quick``: ``handlens study run --dataset lith --preset quick --budget 15m`` + ``handlens evaluate WINNER
  --split test`` (WINNER: the study's last stdout line);
* ``thorough``: the same with ``--preset thorough --budget 45m``.

Targets: quick >= baseline + 0.05 test macro-F1; thorough >= 0.88 test macro-F1. Arms run in the order
given, in one workspace (as one user would work): a later arm may reuse features an earlier one cached, so
its wall time is the time a user waits at that point, not from scratch.

    python benchmarks/study_quality.py                                  # all four arms (about 1h15)
    python benchmarks/study_quality.py --arms baseline,train            # the arms that need no study
    python benchmarks/study_quality.py --arms quick --quick-budget 5m   # a shorter study
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path
from typing import Any

from frozen_speed import (  # the shared steps: import + split + export, the baseline arm, the train arm
    DATASET,
    LITHOLOGY,
    finish_workspace,
    handlens_exe,
    machine,
    parse_json,
    prepare,
    run_baseline,
    run_handlens,
    timed,
    write_result,
)

ROOT = Path(__file__).resolve().parent
DEFAULT_OUT = ROOT / "results" / "study_quality.json"
ARMS = ("baseline", "train", "quick", "thorough")
QUICK_MARGIN = 0.05  # quick must beat the baseline by this much test macro-F1
THOROUGH_FLOOR = 0.88  # thorough must reach this test macro-F1


def run_study(ws: Path, preset: str, budget: str, *, log: Path) -> dict[str, Any]:
    """``handlens study run --dataset lith --preset P --budget B``, then evaluate its winner on test."""
    hl = handlens_exe()
    study = timed([hl, "--workspace", str(ws), "study", "run", "--dataset", DATASET, "--preset", preset,
                   "--budget", budget], log=log)
    winner = study.last_line
    if not Path(winner).is_dir():
        raise SystemExit(f"`handlens study run` did not end with a bundle path; its last line: {winner!r}")
    ev = timed([hl, "--workspace", str(ws), "evaluate", winner, "--split", "test", "--json"], log=log)
    report = parse_json(ev.stdout)
    return {"wall_s": round(study.wall_s + ev.wall_s, 2), "study_s": study.wall_s, "evaluate_s": ev.wall_s,
            "budget": budget, "test_macro_f1": round(report["macro_f1"], 4),
            "test_accuracy": round(report["accuracy"], 4), "n_test": report["n"], "bundle": winner,
            "study_stdout": study.stdout.strip().splitlines()[-15:]}


def verdicts(arms: dict[str, dict[str, Any]]) -> dict[str, str]:
    """The two targets in words, where the arms they need were run."""
    out = {}
    base = arms.get("baseline", {}).get("test_macro_f1")
    if "quick" in arms and base is not None:
        need = round(base + QUICK_MARGIN, 4)
        got = arms["quick"]["test_macro_f1"]
        words = "meets" if got >= need else "misses"
        out["quick"] = f"{words} the target: {got:.4f} vs >= {need:.4f} (baseline + {QUICK_MARGIN})"
    if "thorough" in arms:
        got = arms["thorough"]["test_macro_f1"]
        words = "meets" if got >= THOROUGH_FLOOR else "misses"
        out["thorough"] = f"{words} the target: {got:.4f} vs >= {THOROUGH_FLOOR}"
    for arm in ("quick", "thorough"):
        out.setdefault(arm, "not judged: " + ("the arm was not run" if arm not in arms else "no baseline arm"))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated, in order: any of {', '.join(ARMS)}")
    parser.add_argument("--quick-budget", default="15m", help="--budget of the quick study (default 15m)")
    parser.add_argument("--thorough-budget", default="45m", help="--budget of the thorough study (default 45m)")
    parser.add_argument("--data", type=Path, default=LITHOLOGY, help="folder-per-class tree (default: lithology)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="where to write the JSON results")
    parser.add_argument("--keep", action="store_true", help="keep the temporary workspace (its path is printed)")
    args = parser.parse_args()
    chosen = [a.strip() for a in args.arms.split(",") if a.strip()]
    unknown = sorted(set(chosen) - set(ARMS))
    if unknown or not chosen:
        raise SystemExit(f"--arms {args.arms!r}: choose from {', '.join(ARMS)}")
    if not args.data.is_dir():
        raise SystemExit(f"{args.data} is not a folder; give --data TREE (a folder of class folders)")
    info = machine()
    ws = Path(tempfile.mkdtemp(prefix="handlens-study-quality-"))
    log = ws / "commands.log"
    try:
        result: dict[str, Any] = {"machine": info, "data": str(args.data), "workspace": str(ws),
                                  "prepare": prepare(ws, args.data, log=log), "order": chosen}
        split_file = Path(result["prepare"]["split_file"])
        arms: dict[str, dict[str, Any]] = {}
        for arm in chosen:
            if arm == "baseline":
                arms[arm] = run_baseline(args.data, split_file, out=ws / "baseline.json", log=log, refit=True)
                arms[arm]["refit_test_macro_f1"] = round(arms[arm]["report"]["refit_test_macro_f1"], 4)
            elif arm == "train":
                arms[arm] = run_handlens(ws, log=log)
            else:
                budget = args.quick_budget if arm == "quick" else args.thorough_budget
                arms[arm] = run_study(ws, arm, budget, log=log)
            if "baseline" in arms and arm != "baseline":
                arms[arm]["delta_macro_f1_vs_baseline"] = round(
                    arms[arm]["test_macro_f1"] - arms["baseline"]["test_macro_f1"], 4)
            print(f"{arm:9} test macro-F1 {arms[arm]['test_macro_f1']:.4f}  wall {arms[arm]['wall_s']:.1f}s"
                  + (f"  delta vs baseline {arms[arm]['delta_macro_f1_vs_baseline']:+.4f}"
                     if "delta_macro_f1_vs_baseline" in arms[arm] else ""), flush=True)
        result["arms"] = arms
        result["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
        result["verdicts"] = verdicts(arms)
        for arm, words in result["verdicts"].items():
            print(f"{arm}: {words}")
        write_result(result, args.out)
    finally:
        finish_workspace(ws, keep=args.keep)


if __name__ == "__main__":
    main()
