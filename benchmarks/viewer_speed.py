"""Viewer speed: browsing a 10,000-image catalog, the trust badge and the first view of a 224-px model's
Grad-CAM, and switching the class of an image already seen, in a real browser.

In a fresh temporary workspace, with the real ``handlens`` commands (import, split, train) and the real service
(``handlens serve`` on a free loopback port, default settings, reached at 127.0.0.1):

1. *Browse*: ``tiles10k``, 10,000 16x16 PNGs in 3 class folders (``--images``), and a tiny model
   (``tiny_cnn``, random init, fully trained for 1 epoch). After one warm-up request (which loads the model),
   ``--requests`` (30) each of ``GET /api/v1/models/{id}/browse?limit=100`` and
   ``GET /api/v1/images?dataset=tiles10k&limit=100``: p50 / p95 (target: first page <= 300 ms). Then
   ``POST .../predictions``, polled every 0.7 s as the viewer does until ``ready`` (the time to score every
   image), and the first page of misclassified images, ``browse?result=wrong&limit=100`` (5% of the images
   carry another class's colour), and the first page again, now with predictions, timed the same way.
2. *Trust badge and first view*: ``photos224``, 4 classes of 256x256 images, and a frozen packaged
   EfficientNet-Lite0 (224-px input, logistic head). After a warm-up image (model and explainer copy loaded),
   ``--trust-images`` (10) distinct images each get ``POST .../explain`` (``{"image_id": N, "method":
   "gradcam"}``: the *first view*, uncached) then ``POST .../trust`` (the same, default steps: the badge,
   uncached). p50 of each (targets: badge <= 2 s on 2 cores; first view <= 1x one forward+backward of the
   model on one image, timed in-process with torch on the same bundle right after, the service idle: the
   input's gradient through the whole network, p50 of 10 after 2 warm-ups). Beside it, one forward batch of the
   21 images a badge curve scores (it runs 4: deletion and insertion, of the map and of a random map).
3. *Class switch in the browser*: Debian's chromium (headless, through Playwright; never downloaded) opens the
   viewer, which shows ``photos224`` first (datasets sort by name). On each of ``--switch-images`` (3) images,
   once its first overlay and trust badge are shown, the *Class* select (``#target``) is set to every class in
   turn (first time: computed on the server), then to every class again (second time: answered from the
   server's explanation cache: the image "already seen"). Each switch is timed in the page with
   ``performance.now()`` from the change event until ``#heat``'s ``src`` changes (a MutationObserver), and until
   the new overlay is decoded. The trust badge of each map is awaited before the next switch, so a badge still
   computing never competes with the switch measured. p50 of each (target: already seen <= 50 ms). The
   viewer's own explain and trust requests are timed too (Playwright's request timing).

The load average is recorded at the start and the end (the cores are shared). Under 6 minutes on 2 cores.
Loopback only. Run one benchmark at a time.

    .venv/bin/python benchmarks/viewer_speed.py
    .venv/bin/python benchmarks/viewer_speed.py --images 2000 --requests 10 --trust-images 3 --switch-images 2
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from frozen_speed import handlens_exe, machine, timed, write_result
from serve_load import OPENER, Service, percentile

ROOT = Path(__file__).resolve().parent
DEFAULT_OUT = ROOT / "results" / "viewer_speed.json"
BIG, SMALL = "tiles10k", "photos224"  # SMALL sorts first: the viewer opens on it
BIG_CLASSES = ("red", "green", "blue")
MISLABELLED = 0.05
POLL_S = 0.7  # as the viewer polls POST .../predictions
TRUST_STEPS = 20  # the trust endpoint's default steps: deletion and insertion, map and random map
SMALL_CLASSES = {"red": (200, 40, 40), "green": (40, 200, 40), "blue": (40, 40, 200), "yellow": (200, 200, 40)}
TARGETS = {"browse_first_page_ms": 300.0, "trust_badge_s": 2.0, "first_view_vs_forward_backward": 1.0,
           "class_switch_seen_p50_ms": 50.0}
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


# ------------------------------------------------------------------ data and models

def big_tree(root: Path, count: int) -> Path:
    """``count`` distinct 16x16 PNGs, round-robin over 3 class folders, each class its own dominant colour but
    for ``MISLABELLED`` of them (another class's colour: the model gets those wrong, so ``result=wrong`` has a
    full first page)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    colours = np.array([(200, 40, 40), (40, 200, 40), (40, 40, 200)], dtype=np.float32)
    for label in BIG_CLASSES:
        (root / label).mkdir(parents=True, exist_ok=True)
    for i in range(count):
        k = i % 3
        shown = (k + 1 + int(rng.integers(0, 2))) % 3 if rng.random() < MISLABELLED else k
        pixels = colours[shown][None, None] * rng.uniform(0.6, 1.0) + rng.normal(0, 40, (16, 16, 3))
        Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(root / BIG_CLASSES[k] / f"t{i:05d}.png")
    return root


def small_tree(root: Path, per_class: int) -> Path:
    """4 classes of 256x256 images: a dominant colour, noise and a brighter square somewhere."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(1)
    for label, colour in SMALL_CLASSES.items():
        (root / label).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pixels = np.array(colour, np.float32)[None, None] * rng.uniform(0.7, 1.0) + rng.normal(0, 25, (256, 256, 3))
            x, y = rng.integers(0, 160, 2)
            pixels[y:y + 96, x:x + 96] += 50
            Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(root / label / f"{label}_{i:03d}.png")
    return root


def prepare(tmp: Path, args: argparse.Namespace, log: Path) -> dict[str, Any]:
    """Both datasets imported and split, both models trained, with the commands' wall times."""
    exe, ws = handlens_exe(), str(tmp / "ws")
    walls: dict[str, float] = {}
    started = time.perf_counter()
    big = big_tree(tmp / "tiles", args.images)
    small = small_tree(tmp / "photos", args.per_class)
    walls["write_images_s"] = round(time.perf_counter() - started, 2)
    print(f"wrote {args.images} + {4 * args.per_class} images in {walls['write_images_s']} s", flush=True)
    runs = {}
    for name, tree, ratios, overrides in (
            (BIG, big, "0.4,0.1,0.5", ["model.backbone=tiny_cnn", "model.weights=none", "model.freeze=full",
                                        "train.epochs=1", "train.batch_size=64", "train.lr=0.01"]),
            (SMALL, small, "0.5,0.25,0.25", ["model.backbone=efficientnet_lite0", "model.weights=packaged",
                                             "model.freeze=frozen"])):
        walls[f"{name}_import_s"] = timed([exe, "--workspace", ws, "import", str(tree), "--dataset", name],
                                          log=log).wall_s
        walls[f"{name}_split_s"] = timed([exe, "--workspace", ws, "split", name, "--ratios", ratios, "--seed", "0"],
                                         log=log).wall_s
        trained = timed([exe, "--workspace", ws, "train", f"data.dataset={name}", *overrides, "tracking.backend=none",
                         "train.progress=false"], log=log)
        walls[f"{name}_train_s"] = trained.wall_s
        runs[name] = trained.stdout.strip().splitlines()[-1]  # the bundle's path
        print(f"{name}: import {walls[f'{name}_import_s']} s, split {walls[f'{name}_split_s']} s, "
              f"train {trained.wall_s} s -> {runs[name]}", flush=True)
    return {"walls": walls, "bundles": runs, "workspace": Path(ws)}


# ------------------------------------------------------------------ HTTP

def request(url: str, body: dict[str, Any] | None = None, *, method: str | None = None) -> tuple[int, Any, float]:
    """Status, parsed JSON answer and seconds taken; status 0 when no answer came."""
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method or ("POST" if data is not None else "GET"),
                                 headers={"Content-Type": "application/json"} if data is not None else {})
    started = time.perf_counter()
    try:
        with OPENER.open(req, timeout=120) as answer:
            raw, status = answer.read(), answer.status
    except urllib.error.HTTPError as exc:
        raw, status = exc.read(), exc.code
    except OSError as exc:
        return 0, str(exc), time.perf_counter() - started
    elapsed = time.perf_counter() - started
    try:
        return status, json.loads(raw), elapsed
    except ValueError:
        return status, raw[:200], elapsed


def ok(url: str, body: dict[str, Any] | None = None, **kw: Any) -> tuple[Any, float]:
    status, answer, elapsed = request(url, body, **kw)
    if status != 200:
        raise SystemExit(f"{url} answered {status}: {str(answer)[:500]}")
    return answer, elapsed


def ms_figures(seconds: list[float]) -> dict[str, Any]:
    ordered = sorted(seconds)
    return {"n": len(ordered), "p50_ms": round(1000 * percentile(ordered, 0.5), 1),
            "p95_ms": round(1000 * percentile(ordered, 0.95), 1), "max_ms": round(1000 * ordered[-1], 1)}


def repeated(url: str, count: int) -> tuple[dict[str, Any], Any]:
    """One warm-up GET, then ``count`` timed: their figures and the last answer."""
    answer, first = ok(url)
    times = []
    for _ in range(count):
        answer, elapsed = ok(url)
        times.append(elapsed)
    return {"warm_up_ms": round(1000 * first, 1), **ms_figures(times)}, answer


def model_ids(base: str) -> dict[str, str]:
    models, _ = ok(f"{base}/api/v1/models")
    return {m["dataset"]: m["id"] for m in models}


# ------------------------------------------------------------------ 1. browse

def measure_browse(base: str, model_id: str, args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {"images": args.images}
    browse = f"{base}/api/v1/models/{model_id}/browse"
    out["browse_first_page"], page = repeated(f"{browse}?limit=100", args.requests)
    out["browse_first_page"]["total"] = page["total"]
    out["images_first_page"], listing = repeated(f"{base}/api/v1/images?dataset={BIG}&limit=100", args.requests)
    out["images_first_page"]["total"] = listing["total"]
    print(f"  browse?limit=100: p50 {out['browse_first_page']['p50_ms']} p95 {out['browse_first_page']['p95_ms']} ms"
          f" (warm-up, loads the model: {out['browse_first_page']['warm_up_ms']} ms; total {page['total']})",
          flush=True)
    print(f"  images?limit=100: p50 {out['images_first_page']['p50_ms']} p95 {out['images_first_page']['p95_ms']} ms"
          f" (total {listing['total']})", flush=True)
    started = time.perf_counter()
    answer, _ = ok(f"{browse.replace('/browse', '/predictions')}", method="POST")
    polls = []
    while answer["state"] == "computing" and time.perf_counter() - started < 600:
        time.sleep(POLL_S)
        answer, elapsed = ok(f"{browse.replace('/browse', '/predictions')}", method="POST")
        polls.append(elapsed)
    scoring = time.perf_counter() - started
    if answer["state"] != "ready":
        raise SystemExit(f"predictions did not become ready: {answer}")
    out["predictions"] = {"seconds": round(scoring, 2), "images": answer["of"], "poll_every_s": POLL_S,
                          "polls": len(polls),
                          "poll_p50_ms": round(1000 * statistics.median(polls), 1) if polls else None,
                          "images_per_s": round(answer["of"] / scoring, 1)}
    print(f"  predictions for {answer['of']} images ready in {scoring:.2f} s ({answer['of'] / scoring:.0f} images/s)",
          flush=True)
    out["browse_wrong_first_page"], wrong = repeated(f"{browse}?result=wrong&limit=100", args.requests)
    out["browse_wrong_first_page"]["total"] = wrong["total"]
    out["browse_first_page_with_predictions"], _ = repeated(f"{browse}?limit=100", args.requests)
    print(f"  browse?result=wrong&limit=100: p50 {out['browse_wrong_first_page']['p50_ms']} "
          f"p95 {out['browse_wrong_first_page']['p95_ms']} ms (total {wrong['total']})", flush=True)
    print(f"  browse?limit=100 with predictions: p50 {out['browse_first_page_with_predictions']['p50_ms']} "
          f"p95 {out['browse_first_page_with_predictions']['p95_ms']} ms", flush=True)
    return out


# ------------------------------------------------------------------ 2. trust badge and first view

def measure_trust(base: str, model_id: str, image_ids: list[int]) -> dict[str, Any]:
    explain, trust = (f"{base}/api/v1/models/{model_id}/{what}" for what in ("explain", "trust"))
    warm = image_ids[0]
    warm_explain, warm_explain_s = ok(explain, {"image_id": warm, "method": "gradcam"})
    _, warm_trust_s = ok(trust, {"image_id": warm, "method": "gradcam"})
    rows = []
    for image_id in image_ids[1:]:
        shown, explain_s = ok(explain, {"image_id": image_id, "method": "gradcam"})
        badge, trust_s = ok(trust, {"image_id": image_id, "method": "gradcam"})
        if shown["cached"] or badge["cached"]:
            raise SystemExit(f"image {image_id} was answered from the cache: the figures would not be uncached")
        rows.append({"image_id": image_id, "explain_s": round(explain_s, 4), "explain_server_s": shown["seconds"],
                     "trust_s": round(trust_s, 4), "trust_server_s": badge["seconds"], "verdict": badge["verdict"],
                     "steps": badge["steps"]})
    out = {"warm_up": {"explain_s": round(warm_explain_s, 3), "trust_s": round(warm_trust_s, 3)},
           "explain_method_answered": warm_explain["method"], "layer": warm_explain.get("layer"),
           "images": len(rows), "trust_steps": rows[0]["steps"],
           "first_view_p50_s": round(statistics.median(r["explain_s"] for r in rows), 4),
           "first_view_server_p50_s": round(statistics.median(r["explain_server_s"] for r in rows), 4),
           "trust_p50_s": round(statistics.median(r["trust_s"] for r in rows), 4),
           "trust_max_s": round(max(r["trust_s"] for r in rows), 4),
           "trust_server_p50_s": round(statistics.median(r["trust_server_s"] for r in rows), 4),
           "verdicts": {v: sum(r["verdict"] == v for r in rows) for v in {r["verdict"] for r in rows}},
           "per_image": rows}
    print(f"  first view (explain gradcam, uncached): p50 {out['first_view_p50_s']} s "
          f"(server's own figure {out['first_view_server_p50_s']} s; warm-up {out['warm_up']['explain_s']} s)",
          flush=True)
    print(f"  trust badge (gradcam, {out['trust_steps']} steps, uncached): p50 {out['trust_p50_s']} s, "
          f"max {out['trust_max_s']} s (server's own {out['trust_server_p50_s']} s); verdicts {out['verdicts']}",
          flush=True)
    return out


def forward_backward(bundle_path: str, picture_path: Path, repeats: int = 10) -> dict[str, Any]:
    """One forward+backward (the input's gradient through the whole network) and one forward alone, in-process
    on the bundle, one image at the model's input size: p50 of ``repeats`` after 2 warm-ups. Beside them, one
    batch of ``TRUST_STEPS + 1`` images forward (one curve's points: a trust badge scores 4 curves), in the
    default layout and channels-last (the curves run channels-last batches of 16 since 982ee25): p50 of 3."""
    import numpy as np
    import torch
    from PIL import Image

    from handlens.models.bundle import load_bundle

    bundle = load_bundle(bundle_path)
    picture = np.asarray(Image.open(picture_path).convert("RGB"))
    x = bundle.transform_many([picture])

    def both() -> float:
        started = time.perf_counter()
        inputs = x.clone().requires_grad_(True)
        logits = bundle.module(inputs)
        logits[0, int(logits[0].argmax())].backward()
        return time.perf_counter() - started

    def forward() -> float:
        started = time.perf_counter()
        with torch.inference_mode():
            bundle.module(x)
        return time.perf_counter() - started

    def curve(channels_last: bool) -> float:
        # one curve's steps + 1 images in one no_grad batch: a trust badge scores 4 such curves
        batch = x.expand(TRUST_STEPS + 1, -1, -1, -1).contiguous()
        if channels_last:
            batch = batch.contiguous(memory_format=torch.channels_last)
        started = time.perf_counter()
        with torch.no_grad():
            bundle.module(batch)
        return time.perf_counter() - started

    for _ in range(2):
        both(), forward()
    fb = [both() for _ in range(repeats)]
    fw = [forward() for _ in range(repeats)]
    curve(False), curve(True)
    batch = [curve(False) for _ in range(3)]
    batch_cl = [curve(True) for _ in range(3)]
    return {"input_shape": list(x.shape), "torch_threads": torch.get_num_threads(), "repeats": repeats,
            "forward_backward_p50_s": round(statistics.median(fb), 4),
            "forward_only_p50_s": round(statistics.median(fw), 4),
            f"forward_batch_{TRUST_STEPS + 1}_p50_s": round(statistics.median(batch), 4),
            f"forward_batch_{TRUST_STEPS + 1}_channels_last_p50_s": round(statistics.median(batch_cl), 4),
            "trust_forward_passes": 4 * (TRUST_STEPS + 1)}


# ------------------------------------------------------------------ 3. class switch in the browser

SWITCH_JS = """async (value) => {
  const heat = document.getElementById('heat'), select = document.getElementById('target');
  const before = heat.src;
  const changed = new Promise((resolve) => {
    const observer = new MutationObserver(() => {
      // set, even to the same picture (the predicted class's map is the same as that class's)
      if (heat.src.startsWith('data:image/png')) { observer.disconnect(); resolve(performance.now()); }
    });
    observer.observe(heat, { attributes: true, attributeFilter: ['src'] });
    setTimeout(() => { observer.disconnect(); resolve(null); }, 60000);
  });
  const started = performance.now();
  select.value = value;
  select.dispatchEvent(new Event('change'));
  const at = await changed;
  if (at === null) return null;
  try { await heat.decode(); } catch (e) { /* replaced meanwhile */ }
  return { src_ms: at - started, decoded_ms: performance.now() - started, same: heat.src === before,
           shown: heat.dataset.target, info: document.getElementById('explain-info').textContent };
}"""
SHOWN = "document.querySelector('#heat').src.startsWith('data:image/png')"
BADGE_DONE = "(() => { const b = document.getElementById('trust-badge'); " \
             "return b.textContent !== '' && !b.classList.contains('pending'); })()"


def measure_switches(base: str, model_id: str, classes: list[str], images: int) -> dict[str, Any]:
    from playwright.sync_api import sync_playwright

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        raise SystemExit("needs Debian's chromium (apt-get install chromium): never a downloaded browser")
    first: list[dict[str, Any]] = []
    seen: list[dict[str, Any]] = []
    problems: list[str] = []
    calls: list[tuple[str, dict[str, float]]] = []  # the viewer's explain and trust requests, as it timed them
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, headless=True, args=CHROMIUM_ARGS)
        try:
            # bypass_csp: evaluate runs its function in the page, which the viewer's CSP (no eval) forbids
            page = browser.new_page(viewport={"width": 1200, "height": 800}, bypass_csp=True)
            page.on("pageerror", lambda e: problems.append(str(e)))
            page.on("console", lambda m: problems.append(f"{m.text} ({m.location.get('url')})")
                    if m.type == "error" else None)
            page.on("response", lambda r: problems.append(f"{r.status} {r.url}") if r.status >= 400 else None)
            page.on("requestfinished", lambda r: calls.append((r.url.split("/")[-1], r.timing)) if
                    r.url.endswith(("/explain", "/trust")) else None)
            started = time.perf_counter()
            page.goto(base)
            page.wait_for_function(SHOWN, timeout=120_000)
            load_to_overlay = time.perf_counter() - started
            page.wait_for_function(BADGE_DONE, timeout=120_000)
            load_to_badge = time.perf_counter() - started
            shown = (page.evaluate("document.getElementById('dataset').value"),
                     page.evaluate("document.getElementById('model').value"))
            if shown != (SMALL, model_id):
                raise SystemExit(f"the viewer opened on {shown}, not ({SMALL}, {model_id})")
            page.wait_for_function("document.getElementById('pred-state').textContent.includes('stored')",
                                   timeout=120_000)  # the viewer's own predictions done: nothing else computing
            for index in range(images):
                if index:
                    name = page.locator("#image-name").inner_text()
                    page.select_option("#target", "pred")
                    page.wait_for_function(BADGE_DONE, timeout=120_000)
                    page.locator("#stage").focus()
                    page.keyboard.press("ArrowRight")
                    page.wait_for_function(f"document.getElementById('image-name').textContent !== {name!r}")
                    page.wait_for_function(SHOWN, timeout=120_000)
                    page.wait_for_function(BADGE_DONE, timeout=120_000)
                image = page.locator("#image-name").inner_text()
                for rows in (first, seen):
                    for cls in classes:
                        timing = page.evaluate(SWITCH_JS, cls)
                        if timing is None:
                            raise SystemExit(f"no new overlay within 60 s after switching to {cls} on {image}")
                        rows.append({"image": image, "class": cls, "src_ms": round(timing["src_ms"], 1),
                                     "decoded_ms": round(timing["decoded_ms"], 1), "shown": timing["shown"],
                                     "same_picture": timing["same"],
                                     "cached": "(cached)" in timing["info"]})
                        page.wait_for_function(BADGE_DONE, timeout=120_000)
        finally:
            browser.close()

    def summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
        src = sorted(r["src_ms"] for r in rows)
        decoded = sorted(r["decoded_ms"] for r in rows)
        return {"n": len(rows), "src_p50_ms": round(statistics.median(src), 1),
                "src_p95_ms": round(percentile(src, 0.95), 1), "decoded_p50_ms": round(statistics.median(decoded), 1),
                "answered_from_cache": sum(r["cached"] for r in rows),
                "same_picture_as_before": sum(r["same_picture"] for r in rows),
                "shown_matches_asked": sum(r["shown"] == r["class"] for r in rows)}

    viewer_calls = {kind: [round(t["responseEnd"] - t["requestStart"], 1) for k, t in calls if k == kind
                           and t.get("responseEnd", -1) >= 0 and t.get("requestStart", -1) >= 0]
                    for kind in ("explain", "trust")}
    out = {"images": images, "classes": classes, "load_to_first_overlay_s": round(load_to_overlay, 2),
           "viewer_requests_ms": viewer_calls,
           "load_to_first_badge_s": round(load_to_badge, 2), "first_switch": summary(first),
           "already_seen": summary(seen), "page_problems": problems, "switches": {"first": first, "seen": seen}}
    print(f"  page load -> first overlay {out['load_to_first_overlay_s']} s, -> trust badge "
          f"{out['load_to_first_badge_s']} s", flush=True)
    for label, key in (("first switch (computed)", "first_switch"), ("already seen (cached)", "already_seen")):
        f = out[key]
        print(f"  class switch, {label}: p50 {f['src_p50_ms']} ms (p95 {f['src_p95_ms']}; decoded p50 "
              f"{f['decoded_p50_ms']} ms) over {f['n']}; from cache {f['answered_from_cache']}/{f['n']}", flush=True)
    return out


# ------------------------------------------------------------------ main

def verdicts(results: dict[str, Any]) -> list[str]:
    lines = []
    browse, trust, switch = results["browse"], results["trust"], results["class_switch"]
    for key, what in (("browse_first_page", "browse first page"), ("images_first_page", "images first page"),
                      ("browse_wrong_first_page", "browse result=wrong first page")):
        f, target = browse[key], TARGETS["browse_first_page_ms"]
        lines.append(f"{what} over {browse['images']} images (target <= {target:.0f} ms): p50 {f['p50_ms']} ms "
                     f"({f['p50_ms'] / target:.2f}x: {'met' if f['p50_ms'] <= target else 'MISSED'}), p95 "
                     f"{f['p95_ms']} ms ({f['p95_ms'] / target:.2f}x: {'met' if f['p95_ms'] <= target else 'MISSED'})")
    target = TARGETS["trust_badge_s"]
    lines.append(f"trust badge (gradcam, {trust['trust_steps']} steps, 224 px): p50 {trust['trust_p50_s']} s "
                 f"(target <= {target} s, ratio {trust['trust_p50_s'] / target:.2f}): "
                 f"{'met' if trust['trust_p50_s'] <= target else 'MISSED'}")
    ratio = trust["first_view_p50_s"] / results["forward_backward"]["forward_backward_p50_s"]
    results["ratios"] = {"browse_p50_vs_target": round(browse["browse_first_page"]["p50_ms"] / 300, 3),
                         "browse_p95_vs_target": round(browse["browse_first_page"]["p95_ms"] / 300, 3),
                         "browse_wrong_p50_vs_target": round(browse["browse_wrong_first_page"]["p50_ms"] / 300, 3),
                         "browse_wrong_p95_vs_target": round(browse["browse_wrong_first_page"]["p95_ms"] / 300, 3),
                         "trust_p50_vs_target": round(trust["trust_p50_s"] / target, 3),
                         "first_view_vs_forward_backward": round(ratio, 3),
                         "class_switch_seen_p50_vs_target": round(switch["already_seen"]["src_p50_ms"] / 50, 3)}
    lines.append(f"first view (explain, through HTTP) {trust['first_view_p50_s']} s vs one forward+backward "
                 f"{results['forward_backward']['forward_backward_p50_s']} s: {ratio:.2f}x (target <= 1x): "
                 f"{'met' if ratio <= 1 else 'MISSED'}")
    f, target = switch["already_seen"], TARGETS["class_switch_seen_p50_ms"]
    lines.append(f"class switch on an image already seen: p50 {f['src_p50_ms']} ms (target <= {target:.0f} ms, "
                 f"ratio {f['src_p50_ms'] / target:.2f}): {'met' if f['src_p50_ms'] <= target else 'MISSED'}")
    return lines


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=10_000, help="catalog images to browse (default 10000)")
    parser.add_argument("--per-class", type=int, default=24, help="224-px dataset: images per class (4 classes)")
    parser.add_argument("--requests", type=int, default=30, help="timed requests per browse figure (default 30)")
    parser.add_argument("--trust-images", type=int, default=10, help="distinct images for the badge (default 10)")
    parser.add_argument("--switch-images", type=int, default=3, help="images whose class is switched (default 3)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary workspace (its path is printed)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="where to write the JSON results")
    args = parser.parse_args()
    if min(args.images, args.requests, args.trust_images, args.switch_images) < 1 or args.images < 30 \
            or args.per_class < 8 or args.trust_images + 1 + args.switch_images > 4 * args.per_class:
        parser.error("counts must be positive (--images >= 30, --per-class >= 8), and --trust-images + 1 + "
                     "--switch-images at most 4 x --per-class")
    return args


def main() -> None:
    args = parse_args()
    wall = time.perf_counter()
    results: dict[str, Any] = {"benchmark": "viewer_speed", "machine": machine(), "targets": TARGETS,
                               "settings": {k: v for k, v in vars(args).items() if k not in ("out", "keep")}}
    tmp = Path(tempfile.mkdtemp(prefix="handlens-viewer-speed-"))
    log = tmp / "commands.log"
    try:
        made = prepare(tmp, args, log)
        results["setup"] = made["walls"]
        with Service(made["workspace"], [], tmp / "serve.log") as service:
            ids = model_ids(service.base)
            results["models"] = {name: ids[name] for name in (BIG, SMALL)}
            loads = results["load_average_by_phase"] = {}
            print(f"browse ({BIG}, {args.images} images, model {ids[BIG]})", flush=True)
            loads["browse"] = [round(x, 2) for x in os.getloadavg()]
            results["browse"] = measure_browse(service.base, ids[BIG], args)
            listing, _ = ok(f"{service.base}/api/v1/images?dataset={SMALL}&limit=1000")
            small_ids = [item["id"] for item in listing["items"]]
            print(f"trust badge and first view ({SMALL}, frozen efficientnet_lite0, model {ids[SMALL]})", flush=True)
            # images from the end of the list: the viewer visits those from the start
            loads["trust"] = [round(x, 2) for x in os.getloadavg()]
            results["trust"] = measure_trust(service.base, ids[SMALL], small_ids[-(args.trust_images + 1):])
            print("forward+backward in-process (the service idle)", flush=True)
            picture = next((tmp / "photos" / "red").glob("*.png"))
            results["forward_backward"] = fb = forward_backward(made["bundles"][SMALL], picture)
            print(f"  one forward+backward {fb['forward_backward_p50_s']} s, forward alone "
                  f"{fb['forward_only_p50_s']} s ({fb['torch_threads']} torch threads, input {fb['input_shape']}); "
                  f"a batch of {TRUST_STEPS + 1} "
                  f"forward {fb[f'forward_batch_{TRUST_STEPS + 1}_p50_s']} s (channels-last "
                  f"{fb[f'forward_batch_{TRUST_STEPS + 1}_channels_last_p50_s']} s), x4 in a badge", flush=True)
            # the viewer computes the model's predictions when it opens: done beforehand, so nothing competes
            _, _ = ok(f"{service.base}/api/v1/models/{ids[SMALL]}/predictions", method="POST")
            while ok(f"{service.base}/api/v1/models/{ids[SMALL]}/predictions", method="POST")[0]["state"] != "ready":
                time.sleep(0.2)
            model, _ = ok(f"{service.base}/api/v1/models/{ids[SMALL]}")
            classes = list(model.get("classes") or SMALL_CLASSES)
            print(f"class switch in chromium ({args.switch_images} images x {len(classes)} classes, twice)",
                  flush=True)
            loads["class_switch"] = [round(x, 2) for x in os.getloadavg()]
            results["class_switch"] = measure_switches(service.base, ids[SMALL], classes, args.switch_images)
    finally:
        if args.keep:
            print(f"workspace kept: {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    results["verdicts"] = verdicts(results)
    results["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    results["wall_s"] = round(time.perf_counter() - wall, 1)
    for line in results["verdicts"]:
        print(line)
    print(f"total {results['wall_s']} s; load average at start {results['machine']['load_average_at_start']}, "
          f"at end {results['load_average_at_end']}")
    write_result(results, args.out)


if __name__ == "__main__":
    main()
