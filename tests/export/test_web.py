"""The offline web page (``handlens export --format web``): the folder it writes, how it fails without
onnxruntime-web, the bundles it refuses, and the page itself in Debian's chromium against a loopback static
server with the network cut after the first load: the same pixels, probabilities and CAM as Python, a reload
that works offline, refused non-images and oversized images, the time per image (wasm, ORT, torch), and a
patch-trained bundle tiled in the page as the service tiles it (its probabilities and its stitched map)."""

from __future__ import annotations

import dataclasses
import functools
import http.server
import json
import shutil
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import typer
from typer.testing import CliRunner

from handlens.cli import exporting
from handlens.cli.app import main as app_main
from handlens.core.errors import InputError
from handlens.export import web
from handlens.export.onnx import MODEL_FILE, PREPROCESS_FILE, cam_from_outputs
from handlens.export.web import ORT_FILES, check_page_can_preprocess, export_web, find_ort_dist
from tests.conftest import colour_tree, split_workspace, tiny_config, write_image

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DIST = web.repo_web_folder() / "node_modules" / "onnxruntime-web" / "dist"
HAVE_ORT = all((DIST / name).is_file() for name in ORT_FILES)
needs_ort = pytest.mark.skipif(not HAVE_ORT, reason=f"needs onnxruntime-web in {DIST.parent.parent.parent}: run "
                                                    "`npm ci` in web/ (make does it where npm is installed)")
needs_browser = pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (apt-get install chromium)")
runner = CliRunner()


def cli() -> typer.Typer:
    """The export command under the app's global options (as tests/export/test_onnx.py builds it)."""
    app = typer.Typer()
    app.callback()(app_main)
    app.add_typer(exporting.app)
    return app


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A tiny_cnn bundle trained on the colour dataset (the real training path)."""
    from handlens.train.run import train

    root = tmp_path_factory.mktemp("webtrain")
    ws = split_workspace(root, colour_tree(root / "colours", per_class=6))
    return Path(train(tiny_config("train.epochs=1"), ws).bundle)


@pytest.fixture(scope="module")
def site(trained, tmp_path_factory) -> Path:
    if not HAVE_ORT:
        pytest.skip("needs onnxruntime-web: run `npm ci` in web/")
    out = tmp_path_factory.mktemp("site") / "page"
    export_web(trained, out)
    return out


# ------------------------------------------------------------------------------------------- no browser

def test_without_onnxruntime_web_the_export_says_how_to_get_it(monkeypatch, tmp_path):
    (tmp_path / "web").mkdir()
    (tmp_path / "web" / "package.json").write_text("{}")
    monkeypatch.setattr(web, "repo_web_folder", lambda: tmp_path / "web")
    with pytest.raises(InputError, match=r"npm ci.* in .*web.*--ort-dir"):
        find_ort_dist()
    with pytest.raises(InputError, match=r"--ort-dir .*no onnxruntime-web dist"):
        find_ort_dist(tmp_path)


@needs_ort
def test_ort_dir_takes_a_package_or_its_dist_folder():
    assert find_ort_dist(DIST) == DIST
    assert find_ort_dist(DIST.parent) == DIST


def test_the_page_refuses_preprocessing_it_does_not_reproduce():
    from handlens.transforms.preprocess import Preprocess

    def bundle(**changes):
        return SimpleNamespace(preprocess=dataclasses.replace(Preprocess(size=32), **changes), manifest={"run_id": "r"},
                               path="p")

    check_page_can_preprocess(bundle())
    check_page_can_preprocess(bundle(patches={"size": 16}))  # the page tiles a patch model itself
    with pytest.raises(InputError, match=r"threshold region of interest.*--format onnx"):
        check_page_can_preprocess(bundle(patches={"size": 16, "roi": {"source": "threshold"}}))
    with pytest.raises(InputError, match="morphology"):
        check_page_can_preprocess(bundle(morphology=[{"op": "clahe"}]))


@needs_ort
def test_the_folder_is_self_contained_and_the_worker_caches_all_of_it(site):
    names = {p.name for p in site.iterdir()}
    assert {"index.html", "app.js", "sw.js", "manifest.webmanifest", MODEL_FILE, PREPROCESS_FILE, *ORT_FILES} <= names
    worker = (site / "sw.js").read_text()
    listed = json.loads(worker.split("const FILES = ", 1)[1].split(";", 1)[0])
    assert set(listed) == names - {"sw.js"} | {"./"}
    assert "__HANDLENS" not in worker
    manifest = json.loads((site / "manifest.webmanifest").read_text())
    assert manifest["start_url"] == "./" and manifest["display"] == "standalone"
    for page in ("index.html", "app.js"):  # nothing from a CDN
        text = (site / page).read_text()
        assert "http://" not in text and "https://" not in text
    assert 'capture="environment"' in (site / "index.html").read_text()


@needs_ort
def test_the_command_writes_the_page(trained, tmp_path):
    out, ws = tmp_path / "w", ["--workspace", str(tmp_path / "ws")]
    result = runner.invoke(cli(), [*ws, "export", str(trained), "--format", "web", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert (out / "index.html").is_file() and (out / "ort-wasm-simd-threaded.wasm").is_file()
    assert "offline" in result.output
    result = runner.invoke(cli(), [*ws, "export", str(trained), "--format", "web", "--ort-dir", str(tmp_path),
                                      "--out", str(tmp_path / "x")])
    assert result.exit_code == 2 and "no onnxruntime-web dist" in result.output


# ---------------------------------------------------------------------------------------------- browser

class Quiet(http.server.SimpleHTTPRequestHandler):
    """``python -m http.server``'s handler as it is (its MIME types: .mjs as JavaScript, .wasm as
    application/wasm), without the request log."""

    def log_message(self, *args):
        pass


class Served:
    """A loopback static server of one folder, in a thread (``with Served(folder) as url``)."""

    def __init__(self, folder: Path) -> None:
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(folder)))

    def __enter__(self) -> str:
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return f"http://127.0.0.1:{self.server.server_address[1]}/"

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def served(site):
    with Served(site) as url:
        yield url


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=[
            "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync"])
        yield chromium
        chromium.close()


@pytest.fixture
def browser_context(browser):
    """A fresh profile per test (its own service worker registrations and online state)."""
    context = browser.new_context()
    yield context
    context.close()


def wait_for(page, expression: str, seconds: float):
    """Poll ``expression`` until it is truthy (``wait_for_function`` evaluates a string in the page, which the
    page's content security policy forbids; ``evaluate`` does not, so the page runs under its own CSP here)."""
    deadline = time.monotonic() + seconds
    while not page.evaluate(expression):
        if time.monotonic() > deadline:
            raise AssertionError(f"{expression} still false after {seconds} s; status: {page.inner_text('#status')}")
        time.sleep(0.05)


def python_reference(bundle_dir: Path, site: Path, image: Path, **preprocess) -> dict:
    """The preprocessed pixels, probabilities and CAM (feature resolution) that Python gives ``image``
    (``preprocess``: changes to the bundle's preprocessing, as the page's preprocess.json was changed)."""
    import onnxruntime as ort
    import torch

    from handlens.models.bundle import load_bundle
    from handlens.transforms.preprocess import preprocess_image

    bundle = load_bundle(bundle_dir)
    pre = dataclasses.replace(bundle.preprocess, **preprocess)
    pixels = preprocess_image(image, pre)
    batch = pre.normalize_batch(torch.from_numpy(pixels).permute(2, 0, 1)[None]).numpy()
    session = ort.InferenceSession(str(site / MODEL_FILE), providers=["CPUExecutionProvider"])
    outputs = session.run(None, {"input": batch})
    probs = np.exp(outputs[0][0] - outputs[0][0].max())
    cam_spec = json.loads((site / PREPROCESS_FILE).read_text())["cam"]
    cam = cam_from_outputs(outputs[1], np.asarray(cam_spec["weight"]))[0] if cam_spec["available"] else None
    return {"pixels": pixels, "probs": probs / probs.sum(), "cam": cam, "input": batch, "bundle": bundle,
            "session": session}


def page_predict(page, image: Path) -> dict:
    page.evaluate("window.handlensResult = null; window.handlensError = null")
    page.set_input_files("#file", str(image))
    wait_for(page, "window.handlensResult || window.handlensError", 30)
    error = page.evaluate("window.handlensError")
    assert error is None, error
    return page.evaluate("window.handlensResult")


def normalised(cam: np.ndarray) -> np.ndarray:
    top = cam.max(axis=(-2, -1), keepdims=True)
    return np.where(top > 0, cam / np.where(top > 0, top, 1), 0)


def assert_matches(got: dict, ref: dict, *, exact: bool = True) -> tuple[float, float]:
    """The page's model input equals Python's (``exact``; else within one level: see the module docstring of
    handlens.export.web on the order of PIL's two passes), its probabilities and normalised CAM within 1e-3."""
    pixels = np.asarray(got["pixels"], dtype=np.uint8).reshape(ref["pixels"].shape)
    diff = np.abs(pixels.astype(int) - ref["pixels"])
    assert diff.max() <= (0 if exact else 1), f"max pixel difference {diff.max()} in {(diff > 0).sum()} values"
    probs = np.asarray(got["probabilities"])
    d_prob = float(np.abs(probs - ref["probs"]).max())
    assert got["predicted"] == int(ref["probs"].argmax())
    assert d_prob < 1e-3
    h, w = got["camShape"]
    cam = np.asarray(got["cam"]).reshape(-1, h, w)
    d_cam = float(np.abs(normalised(cam) - normalised(ref["cam"])).max())
    assert d_cam < 1e-3
    return d_prob, d_cam


@needs_ort
@needs_browser
def test_the_page_predicts_as_python_offline_and_after_an_offline_reload(browser_context, served, *, site, trained,
                                                                         tmp_path):
    images = [write_image(tmp_path / "wide.png", 5, (64, 40)), write_image(tmp_path / "tall.jpg", 6, (30, 52)),
              write_image(tmp_path / "big.png", 7, (150, 110)),  # shrunk 3.4x
              write_image(tmp_path / "huge.png", 8, (500, 331))]  # shrunk 10x: PIL box-reduces it 3x first
    page = browser_context.new_page()
    page.goto(served)
    wait_for(page, "window.handlensReady === true", 60)
    wait_for(page, "navigator.serviceWorker.ready.then((r) => !!r.active)", 30)
    browser_context.set_offline(True)
    deltas = []
    for image in images:
        deltas.append(assert_matches(page_predict(page, image), python_reference(trained, site, image)))
    page.reload()  # no network: the service worker answers every file from its cache
    wait_for(page, "window.handlensReady === true", 60)
    got = page_predict(page, images[0])
    deltas.append(assert_matches(got, python_reference(trained, site, images[0])))
    assert "Offline" in page.inner_text("footer")
    print(f"\nweb page vs Python: max |d probability| {max(d for d, _ in deltas):.2e}, max |d CAM| (normalised) "
          f"{max(c for _, c in deltas):.2e}")

    # the benchmark: the model alone on one image, the page's WebAssembly against ORT-Python and torch
    wasm = page.evaluate("window.handlensBenchmark(30)")
    ref = python_reference(trained, site, images[0])
    ort_ms = timed(lambda: ref["session"].run(None, {"input": ref["input"]}))
    import torch

    batch = torch.from_numpy(ref["input"])
    with torch.inference_mode():
        torch_ms = timed(lambda: ref["bundle"].module(batch))
    print(f"ms per image: wasm {wasm['median']:.2f}, onnxruntime (Python) {ort_ms:.2f}, torch {torch_ms:.2f}")
    page.close()


def timed(call, runs: int = 30) -> float:
    call()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        call()
        times.append((time.perf_counter() - start) * 1000)
    return float(np.median(times))


@needs_ort
@needs_browser
def test_the_page_refuses_non_images_and_oversized_images(browser_context, served, tmp_path):
    page = browser_context.new_page()
    page.goto(served + "?maxPixels=1000")
    wait_for(page, "window.handlensReady === true", 60)
    text = tmp_path / "notes.txt"
    text.write_text("not an image")
    fake = tmp_path / "fake.png"
    fake.write_bytes(b"\x89PNG\r\n\x1a\n this is not a png")
    big = write_image(tmp_path / "big.png", 1, (50, 40))  # 2000 pixels > 1000
    for path, message in ((text, "is not an image"), (fake, "could not be read as an image"),
                          (big, "50 x 40 pixels; the limit")):
        page.evaluate("window.handlensResult = null; window.handlensError = null")
        page.set_input_files("#file", str(path))
        wait_for(page, "window.handlensResult || window.handlensError", 30)
        assert message in page.evaluate("window.handlensError")
        assert message in page.inner_text("#error")
    page.close()


@needs_ort
@needs_browser
@pytest.mark.parametrize("preprocess", [
    {"resize": "shorter-crop", "interpolation": "bicubic", "normalize": "backbone"},
    {"resize": "letterbox", "interpolation": "bicubic", "normalize": "percentile"},
    {"resize": "stretch", "interpolation": "nearest", "normalize": "minmax"},
    {"resize": "letterbox", "interpolation": "bilinear", "normalize": "unit"},
], ids=lambda p: "-".join(p.values()))
def test_every_resize_interpolation_and_normalisation_matches_python(browser_context, site, *, trained, tmp_path,
                                                                    preprocess):
    """The page reads preprocess.json: the same model under other preprocessing gives Python's pixels exactly and
    its probabilities (so its normalisation) within 1e-3."""
    folder = tmp_path / "page"
    shutil.copytree(site, folder)
    spec = json.loads((folder / PREPROCESS_FILE).read_text())
    (folder / PREPROCESS_FILE).write_text(json.dumps({**spec, **preprocess}))
    images = [write_image(tmp_path / "wide.png", 3, (70, 41)), write_image(tmp_path / "tall.png", 4, (40, 66)),
              write_image(tmp_path / "huge.jpg", 9, (700, 420))]
    with Served(folder) as url:
        page = browser_context.new_page()
        page.goto(url)
        wait_for(page, "window.handlensReady === true", 60)
        for image in images:
            d_prob, d_cam = assert_matches(page_predict(page, image), python_reference(trained, folder, image,
                                                                                       **preprocess))
            print(f"\n{image.name} {'-'.join(preprocess.values())}: d probability {d_prob:.1e}, d CAM {d_cam:.1e}")
        page.close()


@needs_ort
@needs_browser
def test_a_bundle_without_maps_shows_probabilities_and_says_why(browser_context, trained, tmp_path):
    folder = tmp_path / "logits"
    export_web(trained, folder, logits_only=True)
    assert json.loads((folder / PREPROCESS_FILE).read_text())["cam"]["available"] is False
    image = write_image(tmp_path / "wide.png", 5, (64, 40))
    with Served(folder) as url:
        page = browser_context.new_page()
        page.goto(url)
        wait_for(page, "window.handlensReady === true", 60)
        got = page_predict(page, image)
        ref = python_reference(trained, folder, image)
        assert got["cam"] is None and got["predicted"] == int(ref["probs"].argmax())
        assert np.abs(np.asarray(got["probabilities"]) - ref["probs"]).max() < 1e-3
        assert "--logits-only" in page.inner_text("#maps-note") and not page.is_visible("#map-controls")
        page.close()


# ------------------------------------------------------------------------------------- patch-trained

PATCH_TRAINING = ["preprocess.patches.enabled=true", "preprocess.patches.size=16", "preprocess.patches.max_side=64",
                  "preprocess.patches.per_image=2", "preprocess.patches.grid_max=4", "preprocess.size=32",
                  "train.epochs=1"]


@pytest.fixture(scope="module")
def patch_trained(tmp_path_factory) -> Path:
    """A tiny_cnn bundle trained on 16-pixel patches of a working image of longer side 64, shown to the model at
    32 pixels (so the page resizes patches up, tiles overlap, and the working image is a downscale)."""
    from handlens.train.run import train

    root = tmp_path_factory.mktemp("patchtrain")
    ws = split_workspace(root, colour_tree(root / "colours", per_class=4, size=48))
    return Path(train(tiny_config(*PATCH_TRAINING), ws).bundle)


@needs_ort
@needs_browser
def test_a_patch_trained_bundle_is_tiled_in_the_page_as_the_service_tiles_it(browser_context, patch_trained,
                                                                             tmp_path):
    """The page's working image and grid patches equal Python's, its probabilities (mean softmax over the grid)
    Bundle.predict_proba's within 1e-3, and its stitched map explain.tiles' Grad-CAM map at the working image's
    resolution, normalised, within 1e-3 (the same tiles, cross-fade and bilinear steps; float32 vs float64)."""
    from handlens.explain.api import load_bundle as load_explainable
    from handlens.explain.tiles import tiled_explain
    from handlens.models.bundle import load_bundle
    from handlens.transforms.preprocess import decode_working

    folder = tmp_path / "page"
    export_web(patch_trained, folder)
    spec = json.loads((folder / PREPROCESS_FILE).read_text())
    assert spec["patches"]["patch_size"] == 16 and spec["input"]["shape"][0] == "batch" and spec["cam"]["available"]
    bundle, explainable = load_bundle(patch_trained), load_explainable(patch_trained)
    images = [write_image(tmp_path / "wide.png", 3, (120, 90)), write_image(tmp_path / "tall.png", 4, (50, 70))]
    with Served(folder) as url:
        page = browser_context.new_page()
        page.goto(url)
        wait_for(page, "window.handlensReady === true", 60)
        for image in images:
            got = page_predict(page, image)
            working = decode_working(image, bundle.preprocess.working_side)
            page_working = np.asarray(got["pixels"], dtype=np.uint8).reshape(working.shape)
            assert np.array_equal(page_working, working)
            grid = page.evaluate("window.handlensGrid.pixels.map((a) => Array.from(a))")
            crops, _, boxes = bundle.grid_patches([working])
            assert page.evaluate("window.handlensGrid.boxes") == [list(b) for b in boxes]
            page_crops = np.asarray(grid, dtype=np.uint8).reshape(len(boxes), 32, 32, 3)
            d_pixel = int(np.abs(page_crops.astype(int) - crops.permute(0, 2, 3, 1).numpy()).max())
            assert d_pixel == 0, f"grid patches differ by up to {d_pixel} levels"
            probs = bundle.predict_proba([image])[0]
            d_prob = float(np.abs(np.asarray(got["probabilities"]) - probs).max())
            assert d_prob < 1e-3 and got["predicted"] == int(probs.argmax()) and got["patches"] == len(boxes)
            ref = tiled_explain(explainable, working, method="gradcam", with_probability_map=False)
            assert ref.target == got["predicted"] and len(got["tiles"]) == len(ref.tiles)
            cam = np.asarray(got["cam"]).reshape(got["camShape"])
            assert cam.shape == working.shape[:2] == ref.heatmap.shape and np.isfinite(cam).all()
            assert cam.max() == pytest.approx(1.0) and cam.min() >= 0
            assert cam.std() > 0.02  # a map with a peak, not a flat field
            heat = ref.heatmap / ref.heatmap.max()
            d_cam = float(np.abs(cam - heat).max())
            assert d_cam < 1e-3
            assert np.unravel_index(cam.argmax(), cam.shape) == np.unravel_index(heat.argmax(), heat.shape)
            print(f"\n{image.name} (patch model, {len(boxes)} patches, {len(ref.tiles)} tiles): d probability "
                  f"{d_prob:.1e}, d CAM (normalised) {d_cam:.1e}, map std {cam.std():.2f}, peak "
                  f"{tuple(int(i) for i in np.unravel_index(cam.argmax(), cam.shape))}")
        page.close()
