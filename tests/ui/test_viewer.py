"""The viewer in a real browser (Debian's chromium via Playwright) against the real service on loopback."""

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (apt-get install chromium); "
                                                         ".ci/run installs it")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def shots(tmp_path_factory) -> Path:
    """Where the tests photograph the pages (the README's screenshots come from docs/screenshots.py)."""
    return tmp_path_factory.mktemp("screenshots")


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    from handlens.core.workspace import Workspace
    from handlens.data.catalog import open_catalog
    from handlens.data.importer import import_path
    from handlens.data.splits import make_split
    from handlens.train.run import train
    from tests.conftest import colour_tree, tiny_config

    root = tmp_path_factory.mktemp("viewer")
    ws = Workspace.open(root / "ws")
    catalog = open_catalog(ws.db_url)
    import_path(catalog, colour_tree(root / "colours", size=64), "colours", workers=1)
    make_split(catalog, "colours", ratios="0.5,0.25,0.25", seed=0)
    catalog.close()
    train(tiny_config(), ws)
    train(tiny_config("train.epochs=1", "train.seed=1"), ws)  # a second model, for Compare
    url, process, log = start_service(ws.root, root)
    yield url, root
    process.terminate()
    process.wait(timeout=10)
    log.close()


@pytest.fixture(scope="module")
def page(service):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=[
            "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync"])
        # bypass_csp: Playwright's wait_for_function evaluates its predicate in the page, which the viewer's CSP
        # (no eval) forbids; test_the_viewer_runs_under_its_content_security_policy loads it with the CSP on
        page = browser.new_page(viewport={"width": 1200, "height": 800}, bypass_csp=True)
        requests, problems = [], []
        page.on("request", lambda r: requests.append(r.url))
        page.on("pageerror", lambda e: problems.append(str(e)))
        page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
        page.problems = problems
        page.goto(service[0])
        yield page, service, requests
        browser.close()


def test_inspect_changes_the_overlay_with_the_class_and_shows_probabilities(page, shots):
    page, (url, _), requests = page
    try:
        page.wait_for_function("document.querySelector('#heat').src.startsWith('data:image/png')", timeout=30_000)
    except Exception:
        status = page.evaluate("document.querySelector('#status').textContent")
        raise AssertionError(f"no overlay; status {status!r}; page errors {page.problems}") from None
    assert page.locator("#probs .bar").count() == 3
    assert page.locator("#split-badge").inner_text() in ("train", "val", "test")
    # readable: right or wrong beside the prediction, and what the colours mean
    assert page.locator("#right-wrong").inner_text() in ("✓ right", "✗ wrong")
    assert "evidence for" in page.locator("#legend").inner_text()
    assert not page.locator("#layer").is_disabled()
    first = page.locator("#heat").get_attribute("src")
    model_options = page.locator("#model option").count()
    assert model_options == 2
    shown = page.locator("#heat").get_attribute("data-target")
    other = next(c for c in ("blue", "green", "red") if c != shown)
    page.select_option("#target", other)
    page.wait_for_function(f"document.querySelector('#heat').src !== {first!r}", timeout=30_000)
    assert page.locator("#heat").get_attribute("data-target") == other
    page.locator("#opacity").evaluate("e => { e.value = 0.2; e.oninput(); }")
    assert page.locator("#heat").evaluate("e => getComputedStyle(e).opacity") == "0.2"
    page.locator("#show-map").uncheck()
    assert page.locator("#heat").evaluate("e => getComputedStyle(e).opacity") == "0"
    page.locator("#show-map").check()
    name = page.locator("#image-name").inner_text()
    second = page.evaluate("state.images[1].id")
    request = urllib.request.Request(f"{url}/api/v1/images/{second}/regions", method="POST",
                                     data=json.dumps({"polygons": [[[2, 2], [30, 2], [30, 30]]]}).encode(),
                                     headers={"Content-Type": "application/json"})
    assert urllib.request.urlopen(request).status == 201  # an expert region on the next image
    page.locator("#stage").focus()
    page.keyboard.press("ArrowRight")
    page.wait_for_function(f"document.querySelector('#image-name').textContent !== {name!r}", timeout=10_000)
    page.wait_for_selector("#regions polygon", state="attached", timeout=10_000)  # its outline is drawn
    page.locator("#stage").hover()
    page.mouse.wheel(0, -300)  # zoom in on the image
    assert "scale(1.2" in page.locator("#layers").evaluate("e => e.style.transform") or \
        "scale(1.44" in page.locator("#layers").evaluate("e => e.style.transform")
    page.screenshot(path=str(shots / "viewer-inspect.png"))
    assert all(r.startswith(url) or r.startswith("data:") for r in requests), "the viewer reached outside the service"


def test_moving_on_never_shows_the_previous_images_overlay(page):
    """Until the new image's answer arrives, its name never sits beside the previous image's overlay or bars."""
    import time

    page, _, _ = page
    page.click("header nav button[data-page=inspect]")
    page.wait_for_function("document.querySelector('#heat').src.startsWith('data:image/png')", timeout=30_000)
    read = "[document.getElementById('image-name').textContent, document.getElementById('heat').src || '', " \
           "document.getElementById('probs').textContent]"
    old_name, old_src, old_bars = page.evaluate(read)
    page.locator("#stage").focus()
    page.keyboard.press("ArrowRight")
    deadline, moved = time.time() + 30, False
    while time.time() < deadline:
        name, src, bars = page.evaluate(read)
        if name != old_name:
            moved = True
            assert src != old_src and (bars != old_bars or not bars), "a stale overlay beside the new image"
            if src:
                break
        time.sleep(0.01)
    assert moved and src.startswith("data:image/png")


def test_browse_grid_confusion_and_top_losses(page, shots):
    page, _, _ = page
    page.click("header nav button[data-page=browse]")
    page.wait_for_selector("#grid figure")
    # predictions are computed once on the server (no "predict shown"), then every filter covers all images
    page.wait_for_selector("#grid figure.right, #grid figure.wrong", timeout=30_000)
    page.wait_for_function("document.querySelectorAll('#confusion td').length === 9", timeout=30_000)
    page.wait_for_function("document.querySelectorAll('#losses li').length > 0", timeout=30_000)
    assert page.locator("#pred-state").text_content().startswith("predictions: stored for ")
    page.select_option("#f-split", "test")
    page.wait_for_function("document.getElementById('covers').textContent.endsWith(' of 12 images')")
    assert page.locator("#grid figure").count() == 12
    cell = page.locator("#confusion tr").nth(1).locator("td").first  # truth blue, predicted blue
    count = int(cell.text_content())
    cell.click()
    page.wait_for_function(f"document.getElementById('covers').textContent.endsWith(' of {count} images')")
    captions = page.locator("#grid figcaption").all_text_contents()
    assert len(captions) == count and all(c == "blue → blue ✓" for c in captions), captions
    page.screenshot(path=str(shots / "viewer-browse.png"))


def test_a_slow_answer_for_an_older_filter_never_overwrites_the_newer_page(page):
    """The answer to a browse request made before the filter changed is held until the newer request's page
    is shown, then released: the page stays the newer filter's (it was overwritten before, which made the
    thousand-image test fail when predictions finished while a name filter was typed)."""
    page, _, _ = page
    page.click("header nav button[data-page=browse]")
    for select in ("#f-class", "#f-result", "#f-pred", "#f-split"):  # as the earlier tests left them: all
        page.select_option(select, "")
    page.wait_for_function("/^1-\\d+ of 48 images$/.test(document.getElementById('covers').textContent)",
                           timeout=30_000)
    held = []

    def hold_the_older(route):
        if "q=no_such_image" in route.request.url:
            held.append(route)
        else:
            route.continue_()

    page.route("**/browse?*", hold_the_older)
    try:
        page.fill("#f-name", "no_such_image")
        page.dispatch_event("#f-name", "change")
        deadline = time.monotonic() + 10
        while not held and time.monotonic() < deadline:
            page.wait_for_timeout(50)
        assert held, "the name filter's browse request was never made"
        page.fill("#f-name", "")
        page.select_option("#f-split", "test")  # the newer request: its page is shown while the older is held
        page.wait_for_function("document.getElementById('covers').textContent === '1-12 of 12 images'")
        page.evaluate("""() => { window.coversShown = [];
            new MutationObserver(() => window.coversShown.push(document.getElementById('covers').textContent))
                .observe(document.getElementById('covers'), { childList: true, characterData: true, subtree: true });
        }""")
        with page.expect_response(lambda r: "q=no_such_image" in r.url):
            held[0].continue_()
        page.wait_for_timeout(300)  # the older answer's JSON parsed and (before the fix) drawn
        assert "0 of 0 images" not in page.evaluate("window.coversShown")
        assert page.locator("#covers").text_content() == "1-12 of 12 images"
        assert page.locator("#grid figure").count() == 12
    finally:
        page.unroute("**/browse?*")
        page.select_option("#f-split", "")
        page.wait_for_function("document.getElementById('covers').textContent === '1-48 of 48 images'")


def test_upload_and_compare(page, tmp_path, shots):
    from PIL import Image

    page, _, _ = page
    picture = tmp_path / "red.png"
    Image.new("RGB", (64, 64), (200, 40, 40)).save(picture)
    page.click("header nav button[data-page=upload]")
    page.set_input_files("#file", str(picture))
    page.wait_for_function("document.querySelector('#upload-overlay').src.startsWith('data:image/png')",
                           timeout=30_000)
    assert page.locator("#upload-probs .bar").count() == 3
    page.screenshot(path=str(shots / "viewer-upload.png"))
    bad = tmp_path / "notes.png"
    bad.write_bytes(b"%PDF-1.4 not an image")
    page.set_input_files("#file", str(bad))
    page.wait_for_function("document.querySelector('#upload-error').textContent.includes('415')", timeout=10_000)
    page.click("header nav button[data-page=compare]")
    page.click("#cmp-go")
    page.wait_for_function("document.querySelector('#cmp-left').src.startsWith('data:') && "
                           "document.querySelector('#cmp-right').src.startsWith('data:')", timeout=30_000)
    page.screenshot(path=str(shots / "viewer-compare.png"))


def test_the_viewer_runs_under_its_content_security_policy(page):
    """With the CSP enforced (scripts, styles, connections from the service only), the viewer loads its models,
    draws an overlay, then the trust badge in words, and the browser reports no violation."""
    import time

    shared, (url, _), _ = page
    strict = shared.context.browser.new_page(viewport={"width": 1200, "height": 800})  # CSP not bypassed
    try:
        messages = []
        strict.on("console", lambda m: messages.append(m.text))
        strict.on("pageerror", lambda e: messages.append(str(e)))
        answer = strict.goto(url)
        assert "script-src 'self'" in answer.headers["content-security-policy"]
        deadline = time.time() + 60
        overlay = "(document.getElementById('heat') || {}).src || ''"
        while time.time() < deadline and not strict.evaluate(overlay):
            time.sleep(0.2)
        assert strict.evaluate("document.getElementById('model').options.length") > 0
        assert strict.evaluate(overlay), messages
        # the trust badge comes after the overlay, in words
        badge = "document.getElementById('trust-badge').textContent"
        while time.time() < deadline and (not strict.evaluate(badge) or "checking" in strict.evaluate(badge)):
            time.sleep(0.2)
        assert strict.evaluate(badge).split(" · ")[0] in ("faithful", "not better than random",
                                                          "worse than random"), strict.evaluate(badge)
        assert " vs random " in strict.evaluate(badge)
        # beside it, where the map's energy sits, in the API's words
        shortcuts = strict.evaluate("document.getElementById('shortcuts').textContent")
        assert shortcuts.split(" · ")[0] in ("shortcut warning", "no shortcut sign", "empty map"), shortcuts
        assert not [m for m in messages if "Content Security Policy" in m], messages
    finally:
        strict.close()


def test_a_pixel_method_greys_out_the_layer_and_a_signed_map_says_which_colour_is_for(page):
    page, _, _ = page
    page.click("header nav button[data-page=inspect]")
    methods = page.locator("#method option").all_text_contents()
    assert "saliency" in methods
    page.select_option("#method", "saliency")
    page.wait_for_function("document.getElementById('layer').disabled", timeout=10_000)
    if "integrated_gradients" in methods:  # a signed method: its legend names both colours
        page.select_option("#method", "integrated_gradients")
        page.wait_for_function("document.getElementById('legend').textContent.includes('against')",
                               timeout=60_000)
    page.select_option("#method", "gradcam")
    page.wait_for_function("!document.getElementById('layer').disabled", timeout=10_000)


def test_the_runs_page_lists_runs_sorts_them_and_compares_two_runs_maps(page, shots):
    page, _, _ = page
    page.click("header nav button[data-page=inspect]")
    page.wait_for_function("document.querySelector('#heat').src.startsWith('data:image/png')", timeout=30_000)
    page.click("header nav button[data-page=runs]")
    page.wait_for_selector("#runs-table tr[data-id]")
    assert page.locator("#runs-table tr[data-id]").count() == 2
    names = page.locator("#runs-table tr[data-id] td:nth-child(2)").all_text_contents()
    assert len(set(names)) == 2, names  # told apart by what differs (epochs, seed), not one label twice
    page.click("#runs-table th[data-key=epochs]")  # sorted by epochs, descending
    epochs = page.locator("#runs-table tr[data-id] td:nth-child(7)").all_text_contents()
    assert epochs == sorted(epochs, reverse=True)
    assert page.locator("#runs-go").is_disabled()
    for box in page.locator("#runs-table input[type=checkbox]").all():
        box.check()
    page.click("#runs-go")
    page.wait_for_function("[...document.querySelectorAll('#runs-compare figure img')].length === 2 && "
                           "[...document.querySelectorAll('#runs-compare figure img')].every(i => "
                           "i.src.startsWith('data:image/png'))", timeout=60_000)
    page.wait_for_function("[...document.querySelectorAll('#runs-compare .badge')].every(b => "
                           "!b.textContent.startsWith('checking'))", timeout=60_000)
    badges = page.locator("#runs-compare .badge").all_text_contents()
    assert all(b.split(" · ")[0] in ("faithful", "not better than random", "worse than random") for b in badges)
    assert all("predicts " in t for t in page.locator("#runs-compare .pred").all_text_contents())
    page.screenshot(path=str(shots / "viewer-runs.png"))


def test_the_jobs_page_queues_a_run_watches_it_live_and_opens_it_in_inspect(page, shots):
    """The service's own local worker runs the job; the row follows it through server-sent events."""
    page, _, _ = page
    page.click("header nav button[data-page=jobs]")
    page.fill("#job-backbone", "tiny_cnn")
    page.select_option("#job-weights", "none")
    page.select_option("#job-freeze", "full")
    page.fill("#job-epochs", "3")
    page.select_option("#job-policy", "none")
    page.click("#job-submit")
    page.wait_for_function("document.querySelector('#job-message').textContent.startsWith('queued train job')",
                           timeout=20_000)
    page.wait_for_selector("#jobs-table tr[data-job]")
    page.wait_for_function("[...document.querySelectorAll('#jobs-table tr[data-job] td')].some(td => "
                           "td.textContent.startsWith('epoch '))", timeout=120_000)  # live progress
    page.wait_for_function("document.querySelector('#jobs-table tr[data-job] td:nth-child(3)').textContent === "
                           "'finished'", timeout=120_000)
    assert "epoch 3/3" in page.locator("#jobs-table tr[data-job] td:nth-child(4)").text_content()
    page.screenshot(path=str(shots / "viewer-jobs.png"))
    page.click("#jobs-table tr[data-job] button")  # Open in Inspect
    page.wait_for_function("!document.querySelector('#page-inspect').hidden", timeout=20_000)
    job = page.evaluate("fetch('/api/v1/jobs').then(r => r.json())")[0]
    assert page.eval_on_selector("#model", "s => s.value") == job["result"]["run_id"]
    page.click("header nav button[data-page=jobs]")
    page.fill("#job-backbone", "no_such_net")  # a job that fails says why, in its row
    page.click("#job-submit")
    page.wait_for_function("document.querySelector('#jobs-table tr[data-job] td:nth-child(3)').textContent === "
                           "'failed'", timeout=120_000)
    assert "no_such_net" in page.locator("#jobs-table tr[data-job] td:nth-child(4)").first.text_content()


def test_browse_pages_past_a_thousand_images_with_exact_counts(page, tmp_path):
    """The last test of the module: it adds 1,100 images to the service's catalog."""
    import numpy as np
    from PIL import Image

    from handlens.data.catalog import open_catalog
    from handlens.data.importer import import_path

    page, (_, root), _ = page
    tree = tmp_path / "many"
    rng = np.random.default_rng(0)
    for i in range(1100):
        label = ("red", "green", "blue")[i % 3]
        (tree / label).mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(tree / label / f"many_{i:04d}.png")
    catalog = open_catalog(f"sqlite:///{root / 'ws' / 'handlens.db'}")
    try:
        imported = import_path(catalog, tree, "colours", workers=1)
    finally:
        catalog.close()
    assert imported.added == 1100, imported
    page.click("header nav button[data-page=browse]")
    page.select_option("#f-split", "")
    page.select_option("#f-class", "")
    page.select_option("#f-pred", "")
    try:
        page.wait_for_function("document.getElementById('covers').textContent === '1-100 of 1148 images'",
                               timeout=30_000)
    except Exception:
        raise AssertionError(f"covers: {page.locator('#covers').text_content()!r}; {page.problems}") from None
    for _ in range(11):
        before = page.locator("#covers").text_content()
        page.click("#page-next")
        page.wait_for_function(f"document.getElementById('covers').textContent !== {before!r}")
    assert page.locator("#covers").text_content() == "1101-1148 of 1148 images"
    assert page.locator("#grid figure").count() == 48 and page.locator("#page-next").is_disabled()
    page.fill("#f-name", "many_1099")
    page.dispatch_event("#f-name", "change")
    page.wait_for_function("document.getElementById('covers').textContent === '1-1 of 1 images'")


@pytest.mark.parametrize(("path", "rendered"), [("/docs", ".swagger-ui .opblock"),
                                                ("/redoc", "[data-section-id]")])
def test_the_api_docs_render_with_the_network_off(page, path, rendered):
    """Swagger UI and ReDoc come from installed packages: with every request to another host refused, they
    render the API, under their pages' CSP, with no violation."""
    shared, (url, _), _ = page
    context = shared.context.browser.new_context()
    outside = []

    def only_the_service(route):
        if route.request.url.startswith(url):
            route.continue_()
        else:
            outside.append(route.request.url)
            route.abort()

    context.route("**/*", only_the_service)
    docs = context.new_page()
    messages = []
    docs.on("console", lambda m: messages.append(m.text))
    try:
        docs.goto(url + path)
        docs.wait_for_selector(rendered, timeout=30_000)
        assert "predict" in docs.content()
        # ReDoc's footer logo points at cdn.redoc.ly: the page's CSP blocks it before any request is made
        blocked = [m for m in messages if "Content Security Policy" in m and "cdn.redoc.ly/redoc/logo" not in m]
        assert outside == [] and not blocked, (outside, messages)
    finally:
        context.close()


def start_service(workspace, root):
    """``handlens serve`` on ``workspace`` in a subprocess (its log in ``root``), once it answers /livez."""
    port = free_port()
    log = (root / "service.log").open("w")
    process = subprocess.Popen([sys.executable, "-m", "handlens.cli.main", "--workspace", str(workspace), "serve",
                                "--port", str(port)], stdout=log, stderr=subprocess.STDOUT,
                               env={**os.environ, "PYTHONUNBUFFERED": "1"})
    url = f"http://127.0.0.1:{port}"
    for _ in range(120):
        try:
            urllib.request.urlopen(f"{url}/livez", timeout=1)
            return url, process, log
        except OSError:
            time.sleep(0.25)
    process.kill()
    pytest.fail(f"the service did not start: {(root / 'service.log').read_text()[-2000:]}")


@pytest.fixture(scope="module")
def detect_service(sigma_workspace, sigma_classifier, tmp_path_factory):
    """The service on a copy of the sigma demo's workspace (its tiny detector and crop classifier)."""
    root = tmp_path_factory.mktemp("viewer-detect")
    shutil.copytree(sigma_workspace["workspace"].root, root / "ws")
    url, process, log = start_service(root / "ws", root)
    yield url, sigma_workspace, sigma_classifier.parent.name
    process.terminate()
    process.wait(timeout=10)
    log.close()


def test_inspect_draws_a_detectors_boxes_with_their_labels_and_maps(page, detect_service, shots):
    """A detector chosen beside the model: each image's boxes drawn over it with their labels and scores, each
    box's map inside it (under the opacity slider); detectors are never offered where a classifier is needed."""
    url, sigma, classifier = detect_service
    detector, scenes = sigma["detector_run"], sigma["demo"].scenes
    shared, _, _ = page  # the module's browser (one Playwright per module), a context of this test's own
    # bypass_csp: wait_for_function evaluates in the page (see the page fixture); the CSP has its own test
    context = shared.context.browser.new_context(viewport={"width": 1200, "height": 800}, bypass_csp=True)
    page = context.new_page()
    problems = []
    page.on("pageerror", lambda e: problems.append(str(e)))
    page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
    try:
        page.goto(url)
        page.wait_for_function("document.getElementById('detector').options.length === 2", timeout=30_000)
        for select in ("#model", "#cmp-a", "#cmp-b", "#box-classifier"):
            assert detector not in page.locator(f"{select} option").evaluate_all("o => o.map(x => x.value)")
        assert page.locator(".detect-only").first.is_hidden()
        page.select_option("#dataset", scenes)
        page.wait_for_function("document.getElementById('image-name').textContent.startsWith('sigma_')",
                               timeout=30_000)
        page.select_option("#detector", detector)
        assert page.locator(".detect-only").first.is_visible() and page.locator("#target").is_disabled()
        page.fill("#box-score", "0")  # the tiny detector's scores are low: every box it finds
        page.select_option("#box-classifier", classifier)  # labelled and explained (gradcam) from here
        boxes = "document.querySelectorAll('#box-outlines rect').length"
        for _ in range(3):  # the first scene may hold no box the tiny detector finds: the next ones do
            try:
                page.wait_for_function(f"{boxes} > 0", timeout=20_000)
                break
            except Exception:
                name = page.locator("#image-name").inner_text()
                page.locator("#stage").focus()
                page.keyboard.press("ArrowRight")
                page.wait_for_function(f"document.getElementById('image-name').textContent !== {name!r}")
        count = page.evaluate(boxes)
        assert count > 0, (page.locator("#status").inner_text(), problems)
        page.wait_for_function(f"document.querySelectorAll('#box-maps image').length === {count}")
        labels = page.locator("#box-outlines text").all_text_contents()
        assert len(labels) == count and all(t.split(" ")[0] in ("cw", "ccw") for t in labels), labels
        assert all(0 <= float(t.split(" ")[1]) <= 1 for t in labels)
        assert page.locator("#box-list li").count() == count
        assert page.locator("#predicted").inner_text() == f"{count} box{'' if count == 1 else 'es'}"
        assert not page.locator("#heat").get_attribute("src")  # no whole-image map under the boxes
        page.locator("#opacity").evaluate("e => { e.value = 0.2; e.oninput(); }")
        assert page.locator("#box-maps").evaluate("e => getComputedStyle(e).opacity") == "0.2"
        page.locator("#show-map").uncheck()
        assert page.locator("#box-maps").evaluate("e => getComputedStyle(e).opacity") == "0"
        page.locator("#show-map").check()
        page.screenshot(path=str(shots / "viewer-detect.png"))
        page.select_option("#box-classifier", "")  # boxes only: the detector's class, no maps, no method
        page.wait_for_function("[...document.querySelectorAll('#box-outlines text')].length > 0 && "
                               "[...document.querySelectorAll('#box-outlines text')].every(t => "
                               "t.textContent.startsWith('sigma-clast '))", timeout=20_000)
        assert page.locator("#box-maps image").count() == 0 and page.locator("#method").is_disabled()
        assert not problems, problems
    finally:
        context.close()
