"""A bundle as an offline web page: ``handlens export BUNDLE --format web --out DIR``.

``DIR`` is a self-contained static folder: ``index.html`` and ``app.js`` (the page), the ONNX export
(``model.onnx``, ``preprocess.json``, ``MODEL_CARD.md``: :func:`handlens.export.onnx.export_bundle`),
onnxruntime-web's WebAssembly build (``ort.wasm.min.js``, ``ort-wasm-simd-threaded.mjs`` and ``.wasm``,
copied from the npm package pinned in the repository's ``web/package.json``, never fetched from a CDN),
a service worker (``sw.js``) that caches every file of the folder on install and answers cache-first,
and a web app manifest: served from any static server, the page works with no network after its first
load and installs as an app on a phone.

The page decodes the image upright (EXIF applied, as :func:`handlens.transforms.preprocess.load_rgb`;
embedded colour profiles ignored, as PIL does), composites alpha on black, and resizes it with PIL's own
resampling in JavaScript (the separable convolution of ``Resample.c`` with its 22-bit fixed-point
coefficients, for bicubic, bilinear and nearest; the box reduce that ``reducing_gap=3`` adds for images
shrunk more than six times), so its model input is the uint8 array that
:func:`~handlens.transforms.preprocess.preprocess_image` makes, not a canvas's approximate scaling; then
``preprocess.json``'s normalisation, NCHW float32. The browser test finds the same pixels, probabilities
within 1e-7 and the same CAM. One known gap: Pillow 13 chooses which of its two passes runs first, and for an
image shrunk along both axes the page's rule for that choice (``verticalFirst`` in ``app.js``) was fitted on
measured shapes: for handlens' resizes (both sides by one factor) right on 297 of 300 random shapes, the
misses all images about twice as tall as wide; where it misses, pixels differ by one level (probabilities
still within 1e-3, the normalised CAM by up to about 1e-2 on a 32-pixel model). The CAM is ``preprocess.json``'s formula
(:func:`~handlens.export.onnx.cam_from_outputs`) in JavaScript.

A static server must give ``.mjs`` as JavaScript and ``.wasm`` as ``application/wasm`` (``python -m
http.server`` does); the service worker needs a secure origin (https, or localhost / 127.0.0.1).

A patch-trained bundle exports its patch model (with a dynamic batch axis, so the page runs its patches in
batches) and the page tiles as the service does (``preprocess.json``'s ``patches`` section): the working image
(longer side ``working_side``, PIL bicubic as :func:`~handlens.transforms.preprocess.decode_working`), the grid
of patches of :meth:`~handlens.models.bundle.Bundle.grid_patches` resized as torchvision's antialiased bilinear
does it on uint8 (torch's int16 fixed-point kernel), probabilities the mean of the patches' softmax; the map
from tiles of the patch size with the service's overlap (0.25, PIL bicubic to the model input), each tile's CAM
stitched with :func:`~handlens.explain.tiles.cross_fade` into one map over the working image, scaled to 1.

Bundles whose preprocessing the page cannot reproduce (morphology steps, a patch model's threshold ROI) are
refused with a message saying so; bundles without in-browser maps get probabilities only.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any

from handlens.core.errors import InputError

#: onnxruntime-web's files the page needs: the WebAssembly-only build and its threaded SIMD runtime
ORT_FILES = ("ort.wasm.min.js", "ort-wasm-simd-threaded.mjs", "ort-wasm-simd-threaded.wasm")
#: the page's own files, copied from the package's ``export/web`` folder
PAGE_FILES = ("index.html", "app.js", "style.css", "icon.svg")
MANIFEST_FILE = "manifest.webmanifest"
WORKER_FILE = "sw.js"
WEB_FOLDER = "web"  # the repository folder of package.json, package-lock.json and node_modules
ORT_PACKAGE = "onnxruntime-web"


def repo_web_folder() -> Path:
    """The repository's ``web/`` folder (where ``npm ci`` installs onnxruntime-web) for a source checkout."""
    return Path(__file__).resolve().parents[3] / WEB_FOLDER


def find_ort_dist(ort_dir: str | Path | None = None) -> Path:
    """The folder holding onnxruntime-web's dist files: ``ort_dir`` when given, else the checkout's
    ``web/node_modules/onnxruntime-web/dist``. Raises :class:`InputError` saying how to get them."""
    if ort_dir is not None:
        folder = Path(ort_dir)
        candidates = [folder, folder / "dist", folder / "node_modules" / ORT_PACKAGE / "dist"]
        for candidate in candidates:
            if all((candidate / name).is_file() for name in ORT_FILES):
                return candidate
        raise InputError(f"--ort-dir {folder}: no onnxruntime-web dist there (it needs {', '.join(ORT_FILES)}); "
                         f"point it at an unpacked {ORT_PACKAGE} package's dist folder")
    web = repo_web_folder()
    dist = web / "node_modules" / ORT_PACKAGE / "dist"
    if all((dist / name).is_file() for name in ORT_FILES):
        return dist
    where = f"run `npm ci` in {web}" if (web / "package.json").is_file() else (
        f"run `npm ci` in the web/ folder of a handlens source checkout (its package.json pins {ORT_PACKAGE})")
    raise InputError(f"--format web needs onnxruntime-web's files ({', '.join(ORT_FILES)}) and found none at "
                     f"{dist}: {where} (`make` does it where npm is installed), or pass --ort-dir DIR pointing to "
                     f"an unpacked {ORT_PACKAGE} dist folder")


def check_page_can_preprocess(bundle: Any) -> None:
    """Refuse bundles whose preprocessing the page does not reproduce, with what to do instead."""
    pre = bundle.preprocess
    name = bundle.manifest.get("run_id") or bundle.path
    roi = (pre.patches or {}).get("roi") or {}
    if roi.get("source") == "threshold":
        raise InputError(f"model {name} was trained on patches with a threshold region of interest (only foreground "
                         "patches predict), which the web page does not reproduce; export it with --format onnx and "
                         "run the grid as preprocess.json describes")
    if pre.morphology:
        steps = ", ".join(str(step.get("op", step)) for step in pre.morphology)
        raise InputError(f"model {name} preprocesses with morphology steps ({steps}), which the web page does not "
                         "reproduce; export it with --format onnx")
    if pre.interpolation not in ("bicubic", "bilinear", "nearest"):
        raise InputError(f"model {name} resizes with {pre.interpolation!r}; the web page does bicubic, bilinear "
                         "and nearest; export it with --format onnx")


def _template(name: str) -> bytes:
    return resources.files("handlens.export").joinpath("web", name).read_bytes()


def _manifest(spec: dict[str, Any]) -> dict[str, Any]:
    """The web app manifest: installable, standalone, opening the page itself."""
    backbone = (spec.get("bundle") or {}).get("backbone") or "model"
    classes = spec.get("classes") or []
    return {"name": f"handlens: {backbone} ({', '.join(classes[:4])}{', ...' if len(classes) > 4 else ''})",
            "short_name": "handlens", "description": "Class probabilities and class activation maps, offline",
            "start_url": "./", "scope": "./", "display": "standalone", "background_color": "#111418",
            "theme_color": "#111418",
            "icons": [{"src": "icon.svg", "sizes": "any", "type": "image/svg+xml", "purpose": "any"}]}


def _worker(files: Sequence[str], version: str) -> bytes:
    """``sw.js`` with the folder's file list and a version that changes with any file's content."""
    text = _template(WORKER_FILE).decode()
    text = text.replace("__HANDLENS_FILES__", json.dumps(["./", *files])).replace("__HANDLENS_VERSION__", version)
    return text.encode()


def export_web(source: Any, out: str | Path, *, opset: int | None = None, logits_only: bool = False,
               trust: Sequence[str | Path] = (), ort_dir: str | Path | None = None) -> Any:
    """Write the offline page for ``source`` (a bundle folder or loaded bundle) into ``out``; returns the
    :class:`~handlens.export.onnx.ExportResult` with every file written. ``ort_dir``: an onnxruntime-web dist
    folder (default: the checkout's ``web/node_modules``). The model has a fixed batch of one, except a
    patch-trained model's (a dynamic batch: the page runs an image's patches together)."""
    from handlens.export.onnx import DEFAULT_OPSET, PREPROCESS_FILE, export_bundle, load

    dist = find_ort_dist(ort_dir)  # before the (slow) export: a missing runtime fails at once
    bundle = load(source)
    check_page_can_preprocess(bundle)
    out = Path(out)
    result = export_bundle(bundle, out, opset=opset or DEFAULT_OPSET, dynamic_batch=bool(bundle.preprocess.patches),
                           logits_only=logits_only, trust=trust)
    written = list(result.files)
    for name in PAGE_FILES:
        (out / name).write_bytes(_template(name))
        written.append(out / name)
    for name in ORT_FILES:
        shutil.copyfile(dist / name, out / name)
        written.append(out / name)
    spec = json.loads((out / PREPROCESS_FILE).read_text())
    (out / MANIFEST_FILE).write_text(json.dumps(_manifest(spec), indent=1) + "\n")
    written.append(out / MANIFEST_FILE)
    names = sorted(path.name for path in written)
    digest = hashlib.sha256()
    for name in names:
        digest.update(name.encode() + b"\0" + hashlib.sha256((out / name).read_bytes()).digest())
    (out / WORKER_FILE).write_bytes(_worker(names, digest.hexdigest()[:16]))
    written.append(out / WORKER_FILE)
    result.files = written
    return result
