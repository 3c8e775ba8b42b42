"""Import speed: images/s for importing a folder of generated JPEGs/PNGs, single worker vs parallel.

Generates two folder-per-class trees in a temporary directory (deterministic, fixed seed):

* ``small``: N images of 224x224, half JPEG, half PNG, in 4 class folders;
* ``large``: N images of 3000x2000, mostly JPEG (quality 90), some PNG, in 4 class folders.

Each set is imported with ``workers=1`` and with ``workers=2`` (``--parallel-workers``), each time into a
fresh SQLite catalog (a re-import into the same catalog would skip every file as unchanged). As a
reference, the same files are also read the way a user would do by hand, single process:
``PIL.Image.open(path).convert("RGB")`` (a full decode) plus ``hashlib.sha256`` of the file's bytes.

Usage::

    python benchmarks/import_speed.py                 # 2000 small + 200 large
    python benchmarks/import_speed.py --quick         # 100 small + 10 large, a smoke run
    python benchmarks/import_speed.py --repeats 3 --out /tmp/import_speed.json

Every figure goes to the JSON file (``--out``); a summary table is printed. Temporary files are removed
at the end. Files are read from the page cache (they were just written), so the figures measure
decoding, hashing and catalog writes, not disk reads.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import io
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from handlens.data.catalog import open_catalog
from handlens.data.importer import import_path

SEED = 20240611
CLASSES = ("basalt", "granite", "limestone", "sandstone")
SMALL_SIZE = (224, 224)  # width, height
LARGE_SIZE = (3000, 2000)
LARGE_PNG_EVERY = 10  # one large image in ten is a PNG, the rest JPEG
LARGE_BASES = 4
JPEG_QUALITY_SMALL = 90
JPEG_QUALITY_LARGE = 90
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "import_speed.json"
BASELINE_KEY = "baseline_pil_full_decode_sha256"
DRAFT_KEY = "reference_pil_jpeg_draft_decode_sha256"


# --------------------------------------------------------------------------- image generation


def _smooth_field(rng: np.random.Generator, width: int, height: int, grid: tuple[int, int]) -> np.ndarray:
    """Smooth random colour field: a coarse random grid upscaled with bicubic interpolation (float32)."""
    gw, gh = grid
    coarse = (rng.random((gh, gw, 3)) * 255).astype(np.uint8)
    up = Image.fromarray(coarse, "RGB").resize((width, height), Image.Resampling.BICUBIC)
    return np.asarray(up, dtype=np.float32)


def _gradient(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """Linear gradient in a random direction, with a random amplitude per channel (float32)."""
    angle = rng.uniform(0, 2 * np.pi)
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    ramp = (np.cos(angle) * xs / width + np.sin(angle) * ys / height).astype(np.float32)
    amplitude = rng.uniform(-60, 60, size=3).astype(np.float32)
    return ramp[:, :, None] * amplitude[None, None, :]


def _textured(rng: np.random.Generator, width: int, height: int, noise_sigma: float) -> np.ndarray:
    """Smoothed noise at two scales + a gradient + a little pixel noise: compresses like a photo."""
    coarse = _smooth_field(rng, width, height, (max(2, width // 32), max(2, height // 32)))
    fine = _smooth_field(rng, width, height, (max(2, width // 6), max(2, height // 6)))
    img = 0.65 * coarse + 0.35 * fine + _gradient(rng, width, height)
    img += rng.normal(0.0, noise_sigma, size=img.shape).astype(np.float32)
    return np.clip(img, 0, 255).astype(np.uint8)


def _save(array: np.ndarray, path: Path, fmt: str, quality: int) -> int:
    img = Image.fromarray(array, "RGB")
    if fmt == "JPEG":
        img.save(path, "JPEG", quality=quality)
    else:
        img.save(path, "PNG")
    return path.stat().st_size


def _prepare_dirs(root: Path) -> None:
    for cls in CLASSES:
        (root / cls).mkdir(parents=True, exist_ok=True)


def generate_small(root: Path, n: int, rng: np.random.Generator) -> dict[str, Any]:
    """``n`` distinct 224x224 images, alternately JPEG and PNG, spread over the class folders."""
    _prepare_dirs(root)
    width, height = SMALL_SIZE
    counts = {"JPEG": 0, "PNG": 0}
    sizes = {"JPEG": 0, "PNG": 0}
    for i in range(n):
        fmt = "JPEG" if i % 2 == 0 else "PNG"
        array = _textured(rng, width, height, noise_sigma=3.0)
        path = root / CLASSES[i % len(CLASSES)] / f"img{i:05d}.{'jpg' if fmt == 'JPEG' else 'png'}"
        sizes[fmt] += _save(array, path, fmt, JPEG_QUALITY_SMALL)
        counts[fmt] += 1
    return {"counts": counts, "bytes": sizes}


def generate_large(root: Path, n: int, rng: np.random.Generator) -> dict[str, Any]:
    """``n`` distinct 3000x2000 images: a few textured bases, varied cheaply (roll, flip, offset, noise)."""
    _prepare_dirs(root)
    width, height = LARGE_SIZE
    bases = [_textured(rng, width, height, noise_sigma=3.0) for _ in range(min(LARGE_BASES, max(1, n)))]
    # A bank of small pixel noise, rolled by a random offset per image, so no two images share bytes.
    noise_bank = np.clip(rng.normal(0.0, 2.0, size=(height, width, 3)), -8, 8).astype(np.int16)
    counts = {"JPEG": 0, "PNG": 0}
    sizes = {"JPEG": 0, "PNG": 0}
    for i in range(n):
        fmt = "PNG" if i % LARGE_PNG_EVERY == LARGE_PNG_EVERY - 1 else "JPEG"
        array = np.roll(bases[i % len(bases)], (int(rng.integers(height)), int(rng.integers(width))), (0, 1))
        if rng.random() < 0.5:
            array = array[:, ::-1]
        if rng.random() < 0.5:
            array = array[::-1, :]
        noise = np.roll(noise_bank, (int(rng.integers(height)), int(rng.integers(width))), (0, 1))
        offset = rng.integers(-10, 11, size=3).astype(np.int16)
        varied = np.clip(array.astype(np.int16) + noise + offset, 0, 255).astype(np.uint8)
        path = root / CLASSES[i % len(CLASSES)] / f"img{i:04d}.{'jpg' if fmt == 'JPEG' else 'png'}"
        sizes[fmt] += _save(varied, path, fmt, JPEG_QUALITY_LARGE)
        counts[fmt] += 1
    return {"counts": counts, "bytes": sizes, "base_images": len(bases)}


# --------------------------------------------------------------------------- measurements


def list_images(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


def time_import(root: Path, workers: int, db_dir: Path, tag: str) -> dict[str, Any]:
    """Import ``root`` into a fresh SQLite catalog with ``workers`` processes; wall time and report."""
    db = db_dir / f"bench-{tag}-w{workers}.db"
    for stale in db_dir.glob(f"{db.name}*"):
        stale.unlink()
    catalog = open_catalog(f"sqlite:///{db}")
    try:
        started = time.perf_counter()
        report = import_path(catalog, root, "bench", workers=workers)
        wall = time.perf_counter() - started
    finally:
        catalog.close()
        for leftover in db_dir.glob(f"{db.name}*"):
            leftover.unlink()
    return {
        "wall_seconds": wall,
        "report_seconds": report.seconds,
        "report_images_per_second": report.images_per_second,
        "scanned": report.scanned,
        "added": report.added,
        "unchanged": report.unchanged,
        "skipped": len(report.skipped),
        "skipped_by_reason": report.skipped_by_reason(),
        "skipped_examples": [vars(s) for s in report.skipped[:5]],
        "duplicates": len(report.duplicates),
        "report_workers": report.workers,
    }


def baseline_full_decode(paths: list[Path]) -> dict[str, Any]:
    """What a user would otherwise do: full decode to RGB plus sha256 of the bytes, one process."""
    started = time.perf_counter()
    for path in paths:
        hashlib.sha256(path.read_bytes()).hexdigest()
        with Image.open(path) as img:
            img.convert("RGB")
    return {"wall_seconds": time.perf_counter() - started}


def reference_draft_decode(paths: list[Path]) -> dict[str, Any]:
    """Same as the baseline but JPEGs decoded in draft mode (1/8 scale), as handlens' probe does."""
    started = time.perf_counter()
    for path in paths:
        data = path.read_bytes()
        hashlib.sha256(data).hexdigest()
        with Image.open(io.BytesIO(data)) as img:
            if img.format == "JPEG":
                img.draft(img.mode, (max(1, img.width // 8), max(1, img.height // 8)))
            img.load()
    return {"wall_seconds": time.perf_counter() - started}


def best_of(repeats: int, run: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Run ``run`` ``repeats`` times; keep the fastest, and every wall time."""
    runs = [run() for _ in range(repeats)]
    best = dict(min(runs, key=lambda r: r["wall_seconds"]))
    best["all_wall_seconds"] = [r["wall_seconds"] for r in runs]
    return best


def with_rates(result: dict[str, Any], n: int, total_bytes: int) -> dict[str, Any]:
    wall = result["wall_seconds"]
    result["images_per_second"] = n / wall if wall > 0 else 0.0
    result["mb_per_second"] = total_bytes / 1e6 / wall if wall > 0 else 0.0
    return result


def measure_set(name: str, root: Path, db_dir: Path, *, repeats: int, parallel: int,
                problems: list[str]) -> dict[str, Any]:
    paths = list_images(root)
    n = len(paths)
    total_bytes = sum(p.stat().st_size for p in paths)
    out: dict[str, Any] = {"images": n, "total_bytes": total_bytes, "total_mb": total_bytes / 1e6}
    for workers in (1, parallel):
        print(f"  [{name}] import, workers={workers} ...", flush=True)
        result = best_of(repeats, lambda w=workers: time_import(root, w, db_dir, name))
        out[f"import_workers_{workers}"] = with_rates(result, n, total_bytes)
        if result["added"] != n or result["skipped"]:
            problems.append(f"{name}, workers={workers}: added {result['added']} of {n}, "
                            f"skipped {result['skipped']} {result['skipped_by_reason']}")
        if result["report_workers"] != workers:
            problems.append(f"{name}: asked for workers={workers}, report says {result['report_workers']}")
    print(f"  [{name}] baseline: PIL full decode + sha256 ...", flush=True)
    out[BASELINE_KEY] = with_rates(best_of(repeats, lambda: baseline_full_decode(paths)), n, total_bytes)
    print(f"  [{name}] reference: PIL draft decode + sha256 ...", flush=True)
    out[DRAFT_KEY] = with_rates(best_of(repeats, lambda: reference_draft_decode(paths)), n, total_bytes)

    single, par = out["import_workers_1"], out[f"import_workers_{parallel}"]
    out["speedup_parallel_vs_single"] = par["images_per_second"] / single["images_per_second"]
    out[f"ratio_parallel_import_vs_{BASELINE_KEY}"] = (
        par["images_per_second"] / out[BASELINE_KEY]["images_per_second"])
    out[f"ratio_single_import_vs_{BASELINE_KEY}"] = (
        single["images_per_second"] / out[BASELINE_KEY]["images_per_second"])
    return out


# --------------------------------------------------------------------------- reporting


def machine_info() -> dict[str, Any]:
    import PIL

    try:
        handlens_version = metadata.version("handlens")
    except metadata.PackageNotFoundError:
        handlens_version = "unknown"
    return {
        "cpu_count": os.cpu_count(),
        "python": sys.version.split()[0],
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "pillow": PIL.__version__,
        "numpy": np.__version__,
        "handlens": handlens_version,
    }


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def summary_table(results: dict[str, Any], parallel: int) -> str:
    header = f"{'set':<22} {'method':<40} {'images/s':>10} {'MB/s':>9} {'wall s':>8} {'added/skip':>11}"
    lines = [header, "-" * len(header)]
    for set_name, res in results.items():
        rows = [
            ("handlens import, workers=1", res["import_workers_1"]),
            (f"handlens import, workers={parallel}", res[f"import_workers_{parallel}"]),
            ("baseline: PIL full decode + sha256", res[BASELINE_KEY]),
            ("reference: PIL JPEG draft + sha256", res[DRAFT_KEY]),
        ]
        label = f"{set_name} ({res['images']})"
        for method, r in rows:
            counts = f"{r['added']}/{r['skipped']}" if "added" in r else "-"
            lines.append(f"{label:<22} {method:<40} {r['images_per_second']:>10.1f} "
                         f"{r['mb_per_second']:>9.1f} {r['wall_seconds']:>8.2f} {counts:>11}")
            label = ""
        lines.append(f"{'':<22} {f'speed-up workers={parallel} / workers=1':<40} "
                     f"{res['speedup_parallel_vs_single']:>9.2f}x")
        lines.append(f"{'':<22} {f'workers={parallel} import / baseline':<40} "
                     f"{res[f'ratio_parallel_import_vs_{BASELINE_KEY}']:>9.2f}x")
        lines.append("")
    return "\n".join(lines).rstrip()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--small", type=int, default=2000, help="number of 224x224 images (default 2000)")
    parser.add_argument("--large", type=int, default=200, help="number of 3000x2000 images (default 200)")
    parser.add_argument("--repeats", type=int, default=1, help="runs per measurement; best is kept")
    parser.add_argument("--parallel-workers", type=int, default=2,
                        help="workers for the parallel import (default 2)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT,
                        help="JSON results file (default benchmarks/results/import_speed.json)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 100 small + 10 large images")
    args = parser.parse_args(argv)
    if args.quick:
        args.small, args.large = 100, 10
    if args.small < 0 or args.large < 0 or args.repeats < 1 or args.parallel_workers < 2:
        parser.error("--small/--large must be >= 0, --repeats >= 1, --parallel-workers >= 2")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    parallel = args.parallel_workers
    load_before = load_average()
    info = machine_info()
    print(f"handlens import speed: {args.small} x 224x224, {args.large} x 3000x2000, "
          f"repeats={args.repeats}, cpu_count={info['cpu_count']}, load before={load_before}", flush=True)

    tmp = Path(tempfile.mkdtemp(prefix="handlens-import-bench-"))
    problems: list[str] = []
    generation: dict[str, Any] = {}
    results: dict[str, Any] = {}
    started = time.perf_counter()
    try:
        rng = np.random.default_rng(SEED)
        sets = []
        for name, n, gen in (("small_224x224", args.small, generate_small),
                             ("large_3000x2000", args.large, generate_large)):
            if n == 0:
                continue
            root = tmp / name
            print(f"generating {n} images for {name} ...", flush=True)
            t0 = time.perf_counter()
            facts = gen(root, n, rng)
            facts["seconds"] = time.perf_counter() - t0
            facts["images"] = n
            facts["total_mb"] = sum(facts["bytes"].values()) / 1e6
            generation[name] = facts
            print(f"  generated in {facts['seconds']:.1f} s, {facts['total_mb']:.1f} MB", flush=True)
            sets.append((name, root))
        db_dir = tmp / "catalogs"
        db_dir.mkdir()
        for name, root in sets:
            print(f"measuring {name} ...", flush=True)
            results[name] = measure_set(name, root, db_dir, repeats=args.repeats, parallel=parallel, problems=problems)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    load_after = load_average()

    doc = {
        "benchmark": "import_speed",
        "created_utc": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "command": [Path(sys.argv[0]).name, *sys.argv[1:]] if argv is None else argv,
        "machine": {**info, "load_average_before": load_before, "load_average_after": load_after},
        "settings": {"small": args.small, "large": args.large, "repeats": args.repeats, "quick": args.quick,
                     "parallel_workers": parallel, "seed": SEED, "classes": list(CLASSES),
                     "jpeg_quality": {"small": JPEG_QUALITY_SMALL, "large": JPEG_QUALITY_LARGE},
                     "large_png_fraction": 1 / LARGE_PNG_EVERY},
        "generation": generation,
        "results": results,
        "problems": problems,
        "total_seconds": time.perf_counter() - started,
        "notes": [
            "images_per_second and mb_per_second use the wall time around import_path (folder scan, "
            "validation, catalog writes, process-pool start-up); report_seconds is the importer's own "
            "timing, which starts after the folder scan.",
            "MB = 10^6 bytes of image files on disk.",
            "Each import runs into a fresh SQLite catalog; catalog creation is not timed.",
            "Files are in the page cache (just written): this measures CPU work, not disk reads.",
            f"{BASELINE_KEY}: one process, per file hashlib.sha256(path.read_bytes()) and "
            "PIL.Image.open(path).convert('RGB'), i.e. a full decode.",
            f"{DRAFT_KEY}: one process, sha256 plus a JPEG draft-mode (1/8 scale) decode, which is how "
            "handlens validates JPEGs; PNGs fully decoded. Shown to explain the gap to the baseline.",
            "Best of --repeats is reported; all_wall_seconds lists every run.",
        ],
    }
    out = args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=2) + "\n")

    print()
    for name, facts in generation.items():
        print(f"generation {name}: {facts['images']} images ({facts['counts']}), {facts['total_mb']:.1f} MB, "
              f"{facts['seconds']:.1f} s (not included below)")
    print(f"machine: cpu_count={info['cpu_count']}, Python {info['python']}, Pillow {info['pillow']}, "
          f"load average before {load_before}, after {load_after}")
    print()
    print(summary_table(results, parallel))
    if problems:
        print("\nPROBLEMS:")
        for problem in problems:
            print(f"  - {problem}")
    print(f"\nresults written to {out}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
