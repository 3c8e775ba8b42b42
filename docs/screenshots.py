"""Make the README's screenshots from the embedded textures demo: a scratch workspace, the demo model and a
second run, a small study, the service, and each viewer page photographed with Debian's chromium.

    .venv/bin/python docs/screenshots.py            # writes docs/viewer-*.png and docs/audit.png

Nothing is downloaded: the demo data is embedded, the weights are packaged, chromium is the system's.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

DOCS = Path(__file__).resolve().parent
HANDLENS = [sys.executable, "-m", "handlens.cli.main"]


def run(ws: Path, *args: str) -> str:
    done = subprocess.run([*HANDLENS, "--workspace", str(ws), *args], check=True, capture_output=True, text=True)
    return done.stdout


def prepare(ws: Path) -> None:
    """The demo (a frozen EfficientNet-Lite0 on the textures), a second named run and a 4-trial study."""
    run(ws, "demo", "textures")
    run(ws, "train", "--dataset", "textures", "--name", "texture pooling, linear head", "model.pool=texture",
        "model.head=linear", "tracking.backend=none")
    space = ws / "space.yaml"
    space.write_text(json.dumps({"space": {"model.head": ["logistic", "linear"], "model.pool": ["avg", "texture"]},
                                 "fixed": {"model.freeze": "frozen"}}))
    run(ws, "study", "run", "--dataset", "textures", "--space", str(space), "--sampler", "grid", "--cv", "3",
        "--name", "heads-and-pools", "--tracking", "none")
    bundle = run(ws, "train", "--dataset", "textures", "--name", "audit", "tracking.backend=none").strip().splitlines()
    run(ws, "audit", bundle[-1], "--out", str(ws / "audit.html"), "--sample", "12", "--worst", "4")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def photograph(ws: Path) -> None:
    from playwright.sync_api import sync_playwright

    port = free_port()
    service = subprocess.Popen([*HANDLENS, "--workspace", str(ws), "serve", "--port", str(port)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(120):
            try:
                urllib.request.urlopen(f"{url}/livez", timeout=1)
                break
            except OSError:
                time.sleep(0.25)
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=shutil.which("chromium"), headless=True,
                                        args=["--no-sandbox", "--disable-gpu"])
            page = browser.new_page(viewport={"width": 1360, "height": 860}, bypass_csp=True)
            page.goto(url)
            page.wait_for_function("document.querySelector('#heat').src.startsWith('data:image/png')", timeout=120_000)
            page.wait_for_function("!document.getElementById('trust-badge').textContent.startsWith('checking') && "
                                   "document.getElementById('trust-badge').textContent", timeout=120_000)
            page.screenshot(path=str(DOCS / "viewer-inspect.png"))
            page.click("header nav button[data-page=browse]")
            page.wait_for_selector("#grid figure.right, #grid figure.wrong", timeout=300_000)
            page.wait_for_function("document.querySelectorAll('#confusion td').length > 0", timeout=60_000)
            page.screenshot(path=str(DOCS / "viewer-browse.png"))
            page.click("header nav button[data-page=upload]")
            sample = next((ws / "demo" / "textures").rglob("*.png"), None) or next(ws.rglob("*.png"))
            page.set_input_files("#file", str(sample))
            page.wait_for_function("document.getElementById('upload-overlay').src.startsWith('data:')", timeout=60_000)
            page.screenshot(path=str(DOCS / "viewer-upload.png"))
            page.click("header nav button[data-page=compare]")
            page.click("#cmp-go")
            page.wait_for_function("document.getElementById('cmp-right').src.startsWith('data:')", timeout=60_000)
            page.screenshot(path=str(DOCS / "viewer-compare.png"))
            page.click("header nav button[data-page=runs]")
            page.wait_for_selector("#runs-table tr[data-id]")
            for box in page.locator("#runs-table input[type=checkbox]").all()[:3]:
                box.check()
            page.click("#runs-go")
            page.wait_for_function("[...document.querySelectorAll('#runs-compare .badge')].length > 1 && "
                                   "[...document.querySelectorAll('#runs-compare .badge')].every(b => "
                                   "!b.textContent.startsWith('checking'))", timeout=180_000)
            page.select_option("#study", "heads-and-pools")
            page.wait_for_selector("#pcoords polyline", timeout=60_000)
            page.screenshot(path=str(DOCS / "viewer-runs.png"), full_page=True)
            report = browser.new_page(viewport={"width": 1200, "height": 1600})
            report.goto((ws / "audit.html").as_uri())
            report.screenshot(path=str(DOCS / "audit.png"))
            browser.close()
    finally:
        service.terminate()
        service.wait(timeout=20)


def main() -> None:
    ws = Path(os.environ.get("HANDLENS_SCREENSHOT_WS") or tempfile.mkdtemp(prefix="handlens-shots-")) / "ws"
    if not (ws / "handlens.db").exists():
        prepare(ws)
    photograph(ws)
    print(f"screenshots written to {DOCS} (workspace {ws})")


if __name__ == "__main__":
    main()
