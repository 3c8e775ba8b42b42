"""``import-urls`` against a loopback server that injects faults: 500s, 429 with Retry-After, a timeout, a
truncated body (resumed with Range), corrupt images, redirects (one off loopback, refused), 404s, a server that
trickles bytes (cancel, attempt deadline).

Every connection the code opens is checked to go to 127.0.0.1 (``loopback_only``), and the server records
each request's Host header. The ``public_only`` tests fake a public internet (``fake_internet``): chosen names
resolve to chosen addresses, and a connection to a fake public address reaches the loopback server instead, so
what the code would have sent to loopback shows as hits on the server's ``/secret`` paths.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import socket
import threading
import time
from collections import Counter
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import typer
from pydantic import ValidationError
from sqlalchemy import select
from typer.testing import CliRunner

from handlens.core.errors import InputError
from handlens.core.workspace import Workspace
from handlens.data import urls
from handlens.data.catalog import Dataset, Image, Label, Labelset, UrlItem, open_catalog
from handlens.data.urls import (
    ATTRIBUTION_FILE,
    PUBLIC_ONLY_PREFIX,
    ImportUrlsInterrupted,
    UrlImportConfig,
    UrlReason,
    address_class,
    address_kind,
    import_urls,
    make_config,
    retry_after_seconds,
)
from tests.conftest import textured


def image_bytes(seed: int, fmt: str = "PNG", size: tuple[int, int] = (48, 40)) -> bytes:
    buffer = io.BytesIO()
    textured(seed, size).save(buffer, format=fmt)
    return buffer.getvalue()


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass
class Seen:
    path: str
    headers: dict[str, str]
    at: float


class FaultServer:
    """A ThreadingHTTPServer on 127.0.0.1:0; ``routes[path](handler, hit_number)`` answers each GET."""

    def __init__(self) -> None:
        self.routes: dict[str, Any] = {}
        self.hits: Counter[str] = Counter()
        self.seen: list[Seen] = []
        self.lock = threading.Lock()
        self.active = self.most_active = 0
        state = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                with state.lock:
                    state.hits[self.path] += 1
                    hit = state.hits[self.path]
                    state.seen.append(Seen(self.path, dict(self.headers), time.monotonic()))
                route = state.routes.get(self.path)
                if route is None:
                    self.send_error(404, "no such image")
                    return
                route(self, hit)

            def log_message(self, *_args: Any) -> None:
                pass

        class Server(ThreadingHTTPServer):
            daemon_threads = True
            request_queue_size = 64

            def handle_error(self, *_args: Any) -> None:  # a client that timed out closed the socket: fine
                pass

        self.httpd = Server(("127.0.0.1", 0), Handler)
        self.port = self.httpd.server_address[1]
        self.base = f"http://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def requests_for(self, path: str) -> list[Seen]:
        return [s for s in self.seen if s.path == path]


def send(handler: BaseHTTPRequestHandler, body: bytes, *, status: int = 200, kind: str = "image/png",
         headers: dict[str, str] | None = None) -> None:
    handler.send_response(status)
    handler.send_header("Content-Type", kind)
    handler.send_header("Content-Length", str(len(body)))
    for name, value in (headers or {}).items():
        handler.send_header(name, value)
    handler.end_headers()
    handler.wfile.write(body)


def serve(body: bytes, kind: str = "image/png"):
    return lambda handler, _hit: send(handler, body, kind=kind)


def fail_first(times: int, status: int, body: bytes, headers: dict[str, str] | None = None):
    def route(handler: BaseHTTPRequestHandler, hit: int) -> None:
        if hit <= times:
            send(handler, b"try later", status=status, kind="text/plain", headers=headers)
        else:
            send(handler, body)
    return route


def slow_first(seconds: float, body: bytes):
    def route(handler: BaseHTTPRequestHandler, hit: int) -> None:
        if hit == 1:
            time.sleep(seconds)
        send(handler, body)
    return route


def truncated_then_ranged(body: bytes, etag: str = '"v1"'):
    """First answer: the full Content-Length, half the bytes, then the connection closes. With Range: a 206."""
    def route(handler: BaseHTTPRequestHandler, _hit: int) -> None:
        asked = handler.headers.get("Range")
        if asked is None or handler.headers.get("If-Range") not in (None, etag):
            handler.send_response(200)
            handler.send_header("Content-Length", str(len(body)))
            handler.send_header("ETag", etag)
            handler.end_headers()
            handler.wfile.write(body[:len(body) // 2])
            handler.wfile.flush()
            handler.close_connection = True
            return
        start = int(asked.split("=")[1].rstrip("-"))
        send(handler, body[start:], status=206, headers={"Content-Range": f"bytes {start}-{len(body) - 1}/{len(body)}",
                                                         "ETag": etag})
    return route


def redirect(location: str):
    def route(handler: BaseHTTPRequestHandler, _hit: int) -> None:
        handler.send_response(302)
        handler.send_header("Location", location)
        handler.send_header("Content-Length", "0")
        handler.end_headers()
    return route


@pytest.fixture
def server():
    srv = FaultServer()
    yield srv
    srv.close()


@pytest.fixture
def loopback_only(monkeypatch):
    """Every outgoing connection is recorded; one to anything but 127.0.0.1 fails the test."""
    opened: list[tuple[str, int]] = []
    real = socket.create_connection

    def guarded(address, *args, **kwargs):
        opened.append(address)
        assert address[0] == "127.0.0.1", f"connection to {address} attempted"
        return real(address, *args, **kwargs)

    monkeypatch.setattr(socket, "create_connection", guarded)
    return opened


def workspace(tmp_path: Path) -> Workspace:
    return Workspace.open(tmp_path / "ws")


def write_manifest(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def config(manifest: Path, **overrides: Any) -> UrlImportConfig:
    values = {"manifest": str(manifest), "dataset": "rocks", "timeout": 0.5, "retries": 3, "backoff": 0.01,
              "concurrency": 8, "per_host": 8, **overrides}
    return UrlImportConfig(**values)


def ledger(ws: Workspace, dataset: str = "rocks") -> dict[str, UrlItem]:
    catalog = open_catalog(ws.db_url)
    try:
        with catalog.session() as session:
            return {item.url.rsplit("/", 1)[-1] if "/ok/" not in item.url else item.url.split("/ok/")[1]: item
                    for item in session.scalars(select(UrlItem).join(Dataset).where(Dataset.name == dataset))}
    finally:
        catalog.close()


def catalog_labels(ws: Workspace, dataset: str = "rocks") -> dict[str, tuple[str, str | None]]:
    """file name -> (label in 'default', group)."""
    catalog = open_catalog(ws.db_url)
    try:
        with catalog.session() as session:
            rows = session.execute(select(Image.path, Label.label, Image.group).join(Label, Label.image_id == Image.id)
                                   .join(Labelset, Labelset.id == Label.labelset_id).join(Dataset)
                                   .where(Dataset.name == dataset, Labelset.name == "default"))
            return {Path(path).name: (label, group) for path, label, group in rows}
    finally:
        catalog.close()


# --------------------------------------------------------------------------- the whole fault matrix


def test_a_manifest_of_faults_ends_exact_and_a_rerun_fetches_nothing(tmp_path, server, loopback_only):
    a, b, c = image_bytes(1), image_bytes(2, "JPEG"), image_bytes(3)
    flaky, limited, slow, cut = image_bytes(4), image_bytes(5), image_bytes(6), image_bytes(7, size=(160, 120))
    corrupt = image_bytes(8)[:300]
    server.routes.update({
        "/ok/a.png": serve(a), "/ok/b.jpg": serve(b, "image/jpeg"), "/ok/c.png": serve(c), "/same": serve(a),
        "/flaky": fail_first(2, 500, flaky), "/ratelimit": fail_first(1, 429, limited, {"Retry-After": "1"}),
        "/slow": slow_first(1.2, slow), "/truncate": truncated_then_ranged(cut), "/corrupt": serve(corrupt),
        "/page": serve(b"<html>not an image</html>", "text/html"), "/redirect": redirect("/ok/c.png"),
        "/offsite": redirect("http://203.0.113.7/x.jpg"),
    })
    base = server.base
    manifest = write_manifest(tmp_path / "urls.csv", [
        "url,label,labelset,group,license,attribution",
        f"{base}/ok/a.png,granite,,s1,CC-BY-4.0,Alice",
        f"{base}/ok/b.jpg,basalt,,s2,CC0,Bob",
        f"{base}/flaky,granite,,,CC-BY-4.0,Carol",
        f"{base}/ratelimit,basalt,,,CC0,Dan",
        f"{base}/slow,granite,,,CC0,Eve",
        f'{base}/truncate,basalt,,,CC0,"Frank, the photographer"',
        f"{base}/corrupt,granite,,,CC0,",
        f"{base}/page,granite,,,,",
        f"{base}/redirect,basalt,,,CC0,Gus",
        f"{base}/offsite,basalt,,,CC0,",
        f"{base}/missing,granite,,,CC0,",
        f"{base}/same,basalt,,,CC0,",
        "file:///etc/passwd,granite",
        f"ftp://127.0.0.1:{server.port}/x.png,granite",
        ",granite",
        f"{base}/nolabel,",
        f"{base}/badls,granite,bad/name",
        f"{base}/ok/a.png,basalt",
    ])
    ws = workspace(tmp_path)
    seen_progress: list[tuple[int, int]] = []
    report = import_urls(config(manifest), ws, progress=lambda done, total: seen_progress.append((done, total)))

    rows = ledger(ws)
    expect = {  # name: (status, attempts, http_status)
        "b.jpg": ("downloaded", 1, 200), "flaky": ("downloaded", 3, 200), "ratelimit": ("downloaded", 2, 200),
        "slow": ("downloaded", 2, 200), "truncate": ("downloaded", 2, 206), "redirect": ("downloaded", 1, 200),
        "corrupt": ("refused", 1, 200), "page": ("refused", 1, 200), "offsite": ("refused", 1, 302),
        "missing": ("failed", 1, 404),
    }
    for name, (status, attempts, code) in expect.items():
        assert (rows[name].status, rows[name].attempts, rows[name].http_status) == (status, attempts, code), name
    # the same bytes at two URLs: one image, the other URL a duplicate pointing at it
    assert {rows["a.png"].status, rows["same"].status} == {"downloaded", "duplicate"}
    kept, copy = sorted((rows["a.png"], rows["same"]), key=lambda r: r.status != "downloaded")
    assert copy.image_id == kept.image_id is not None and copy.sha256 == kept.sha256 == sha(a)
    for name, body in (("b.jpg", b), ("flaky", flaky), ("truncate", cut), ("redirect", c)):
        row = rows[name]
        assert row.sha256 == sha(body) and row.bytes == len(body) and row.last_error is None
        assert Path(row.path).read_bytes() == body  # the resumed file is whole and correct
        assert Path(row.path).name == f"{sha(body)[:16]}.{'jpg' if name == 'b.jpg' else 'png'}"
    assert rows["corrupt"].last_error.startswith("not a usable image (corrupt_or_truncated)")
    assert "not_an_image" in rows["page"].last_error and rows["page"].path is None
    assert "203.0.113.7" in rows["offsite"].last_error and "refused" in rows["offsite"].last_error
    assert "404" in rows["missing"].last_error and rows["missing"].sha256 is None

    # resume: the second request for the truncated file asked for the rest, conditionally
    first, second = server.requests_for("/truncate")
    assert "Range" not in first.headers
    assert second.headers["Range"] == f"bytes={len(cut) // 2}-" and second.headers["If-Range"] == '"v1"'
    # Retry-After: 1 was honoured; the 500s were retried with a short backoff
    gap = [s.at for s in server.requests_for("/ratelimit")]
    assert gap[1] - gap[0] >= 0.95
    assert server.hits["/flaky"] == 3 and server.hits["/slow"] == 2 and server.hits["/ok/c.png"] == 1

    # the catalog holds the 7 images with their labels and groups, as `import` records them
    labels = catalog_labels(ws)
    assert len(labels) == 7
    assert labels[Path(rows["b.jpg"].path).name] == ("basalt", "s2")
    assert labels[Path(rows["truncate"].path).name] == ("basalt", None)
    assert labels[Path(rows["redirect"].path).name] == ("basalt", None)

    # bad rows were reported and skipped, the rest went on
    reasons = report.skipped_by_reason()
    assert reasons[UrlReason.BAD_ROW] == 5 and reasons[UrlReason.REPEATED_URL] == 1
    assert reasons[UrlReason.REDIRECT] == 1 and reasons[UrlReason.DUPLICATE] == 1
    assert reasons["corrupt_or_truncated"] == 1 and reasons["not_an_image"] == 1 and reasons[UrlReason.HTTP] == 1
    bad = {s.detail for s in report.skipped if s.reason == UrlReason.BAD_ROW}
    assert any("'file'" in d for d in bad) and any("'ftp'" in d for d in bad) and any("labelset" in d for d in bad)
    data = report.to_dict()
    assert data["counts"] == {"pending": 0, "downloaded": 7, "duplicate": 1, "failed": 1, "refused": 3}
    assert data["downloaded"] == 7 and data["added"] == 7 and data["images_per_second"] > 0
    assert data["class_counts"] == {"default": {"basalt": 4, "granite": 3}}
    assert seen_progress[-1] == (12, 12)
    json.dumps(data, default=str)  # what the job stores

    # ATTRIBUTION.csv: one row per downloaded image, file names relative to the download folder
    attribution = Path(report.attribution)
    assert attribution.name == ATTRIBUTION_FILE and attribution.parent == ws.root / "downloads" / "rocks"
    lines = list(csv.DictReader(attribution.open(encoding="utf-8")))
    assert len(lines) == 7
    by_file = {line["file"]: line for line in lines}
    truncated = by_file[Path(rows["truncate"].path).name]
    assert truncated["attribution"] == "Frank, the photographer" and truncated["license"] == "CC0"
    assert truncated["url"] == f"{base}/truncate" and truncated["sha256"] == sha(cut)
    assert not list(attribution.parent.glob("*.part"))

    # a rerun downloads nothing; --retry-failed asks again for the failed URL only
    hits = Counter(server.hits)
    again = import_urls(config(manifest), ws)
    assert server.hits == hits and again.attempted == 0 and again.nothing_new and again.failed_earlier == 1
    assert any("--retry-failed" in w for w in again.warnings)
    retried = import_urls(config(manifest, retry_failed=True), ws)
    assert retried.attempted == 1 and server.hits["/missing"] == hits["/missing"] + 1
    assert Counter({k: v for k, v in server.hits.items() if k != "/missing"}) == \
        Counter({k: v for k, v in hits.items() if k != "/missing"})
    assert ledger(ws)["missing"].attempts == 2 and ledger(ws)["missing"].status == "failed"

    # only 127.0.0.1 was ever connected to, and every request named it as its host
    assert loopback_only and all(address[0] == "127.0.0.1" for address in loopback_only)
    assert {s.headers["Host"] for s in server.seen} == {f"127.0.0.1:{server.port}"}


# --------------------------------------------------------------------------- scheduling, caps, licences


def test_downloads_from_one_host_never_exceed_per_host(tmp_path, server, loopback_only):
    def route(body: bytes):
        def answer(handler: BaseHTTPRequestHandler, _hit: int) -> None:
            with server.lock:
                server.active += 1
                server.most_active = max(server.most_active, server.active)
            time.sleep(0.15)
            with server.lock:
                server.active -= 1
            send(handler, body)
        return answer

    for i in range(6):
        server.routes[f"/p/{i}"] = route(image_bytes(10 + i))
    manifest = write_manifest(tmp_path / "m.csv", ["url,label", *(f"{server.base}/p/{i},c{i % 2}" for i in range(6))])
    report = import_urls(config(manifest, concurrency=8, per_host=2), workspace(tmp_path))
    assert report.downloaded == 6
    assert server.most_active == 2  # two at once (it did parallelise), never three


def test_max_per_class_backfills_failures_and_the_licence_filter_is_decided_each_run(tmp_path, server, loopback_only):
    for name, seed in (("a2", 21), ("a3", 22), ("a4", 23), ("b1", 24)):
        server.routes[f"/{name}"] = serve(image_bytes(seed))
    base = server.base
    manifest = write_manifest(tmp_path / "m.csv", [
        "url,label,license",
        f"{base}/a1,A,CC-BY",  # 404: its place goes to the next A
        f"{base}/a2,A,CC-BY",
        f"{base}/a3,A,CC0",
        f"{base}/a4,A,CC0",
        f"{base}/b1,B,All rights reserved",
    ])
    ws = workspace(tmp_path)
    report = import_urls(config(manifest, max_per_class=2, min_per_class=2, license_filter="^CC"), ws)
    rows = ledger(ws)
    assert {n: rows[n].status for n in ("a1", "a2", "a3", "a4", "b1")} == \
        {"a1": "failed", "a2": "downloaded", "a3": "downloaded", "a4": "pending", "b1": "refused"}
    assert server.hits["/a4"] == 0 and server.hits["/b1"] == 0  # capped and filtered rows are never requested
    assert rows["b1"].last_error.startswith("licence filter: ")
    assert report.skipped_by_reason()[UrlReason.CAPPED] == 1 and report.skipped_by_reason()[UrlReason.LICENCE] == 1
    assert report.below_min == {"default": {"B": 0}}
    assert any("'B'" in w and "--min-per-class 2" in w for w in report.warnings)

    # without the cap and the filter: the capped row and the row the filter refused are downloaded now
    again = import_urls(config(manifest), ws)
    rows = ledger(ws)
    assert rows["a4"].status == rows["b1"].status == "downloaded" and again.downloaded == 2
    assert server.hits["/a1"] == 1 and server.hits["/a2"] == 1  # failed and done rows untouched


def test_a_stop_request_keeps_the_ledger_and_a_rerun_continues(tmp_path, server, loopback_only):
    for i in range(4):
        server.routes[f"/s/{i}"] = serve(image_bytes(30 + i))
    manifest = write_manifest(tmp_path / "m.csv", ["url,label", *(f"{server.base}/s/{i},x" for i in range(4))])
    ws = workspace(tmp_path)
    finished: list[int] = []
    with pytest.raises(ImportUrlsInterrupted) as stopped:
        import_urls(config(manifest, concurrency=1, per_host=1), ws,
                    progress=lambda done, _total: finished.append(done),
                    should_stop=lambda: "cancelled by the user" if finished else None)
    assert stopped.value.report.interrupted and stopped.value.report.stop_reason == "cancelled by the user"
    assert "run the same command again" in str(stopped.value) and stopped.value.exit_code == 130
    statuses = Counter(item.status for item in ledger(ws).values())
    assert statuses == Counter({"downloaded": 1, "pending": 3})
    report = import_urls(config(manifest), ws)
    assert report.downloaded == 3 and all(server.hits[f"/s/{i}"] == 1 for i in range(4))


def test_an_oversized_body_is_refused_and_its_part_removed(tmp_path, server, loopback_only):
    server.routes["/big"] = serve(image_bytes(40, size=(200, 200)))
    manifest = write_manifest(tmp_path / "m.csv", ["url,label", f"{server.base}/big,x"])
    ws = workspace(tmp_path)
    import_urls(config(manifest, max_bytes=1000), ws)
    row = ledger(ws)["big"]
    assert row.status == "refused" and "max_bytes" in row.last_error
    assert not list((ws.root / "downloads" / "rocks").glob("*.part"))


# --------------------------------------------------------------------------- pieces


def test_address_classes_and_retry_after():
    assert address_class("127.0.0.1") == address_class("::1") == address_class("::ffff:127.0.0.1") == "loopback"
    assert address_class("169.254.1.1") == address_class("fe80::1") == "link-local"
    assert address_class("10.1.2.3") == address_class("192.168.0.1") == address_class("203.0.113.7") == "private"
    assert address_class("8.8.8.8") == "public"
    assert retry_after_seconds("1") == 1.0 and retry_after_seconds(None) is None and retry_after_seconds("soon") is None
    assert retry_after_seconds("Mon, 01 Jan 2001 00:00:00 GMT") == 0.0  # a date in the past: at once


def test_config_refuses_typos_bad_regexes_and_contradictions(tmp_path):
    with pytest.raises(ValidationError):
        UrlImportConfig(manifest="m.csv", dataset="d", concurency=3)
    with pytest.raises(InputError, match="not a valid regular expression"):
        make_config(manifest="m.csv", dataset="d", license_filter="(")
    with pytest.raises(InputError, match="labelset"):
        make_config(manifest="m.csv", dataset="d", labelset="a/b")
    with pytest.raises(InputError, match="exceeds --max-per-class"):
        make_config(manifest="m.csv", dataset="d", min_per_class=5, max_per_class=2)
    assert make_config(manifest="m.csv", dataset="d", labelset=None).labelset == "default"


def test_a_manifest_without_a_url_column_is_one_clear_error(tmp_path):
    manifest = write_manifest(tmp_path / "m.csv", ["path,label", "a.png,x"])
    with pytest.raises(InputError, match="lacks column"):
        import_urls(UrlImportConfig(manifest=str(manifest), dataset="d"), workspace(tmp_path))


def test_the_cli_command_prints_a_summary_last_and_one_json_document(tmp_path, server, loopback_only):
    from handlens.cli import urls as urls_cli

    server.routes["/ok/one.png"] = serve(image_bytes(50))
    manifest = write_manifest(tmp_path / "m.csv", ["url,label,license,attribution",
                                                   f"{server.base}/ok/one.png,x,CC0,Ann", f"{server.base}/gone,x,,"])
    app = typer.Typer()

    @app.callback()
    def main(ctx: typer.Context) -> None:
        ctx.obj = {"workspace": tmp_path / "ws", "db": None}

    app.add_typer(urls_cli.app)
    runner = CliRunner()
    result = runner.invoke(app, ["import-urls", str(manifest), "--dataset", "d", "--timeout", "2", "--json"])
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    assert document["counts"]["downloaded"] == 1 and document["counts"]["failed"] == 1
    result = runner.invoke(app, ["import-urls", str(manifest), "--dataset", "d"])
    assert result.exit_code == 0, result.output
    last = result.stdout.strip().splitlines()[-1]
    assert last.startswith("Dataset 'd': 0 downloaded this run") and "1 downloaded" in last and "1 failed" in last
    result = runner.invoke(app, ["import-urls", str(manifest), "--dataset", "d", "--license-filter", "("])
    assert result.exit_code == 2 and "regular expression" in result.output


def test_embedded_and_unspecified_addresses_take_the_class_they_reach():
    loopback = ["0.0.0.0", "0.1.2.3", "::", "::ffff:0.0.0.0", "::ffff:127.0.0.1", "::127.0.0.1", "::ffff:0:127.0.0.1",
                "64:ff9b::127.0.0.1", "2002:7f00:1::1"]
    assert {a: address_class(a) for a in loopback} == dict.fromkeys(loopback, "loopback")
    assert address_kind("0.0.0.0") == address_kind("::") == address_kind("0.1.2.3") == "unspecified"
    assert address_class("64:ff9b::169.254.169.254") == address_class("2002:a9fe:a9fe::") == "link-local"
    assert address_class("::10.0.0.1") == address_class("2002:c0a8:101::1") == address_class("64:ff9b::10.1.1.1") \
        == address_class("64:ff9b:1::808:808") == "private"
    assert address_class("64:ff9b::8.8.8.8") == address_class("2002:808:808::1") == address_class("::8.8.8.8") \
        == address_class("2606:4700::1111") == "public"
    assert address_kind("224.0.0.1") == address_kind("ff02::1") == "multicast"
    assert address_kind("240.0.0.1") == address_kind("::ffff:240.0.0.1") == "reserved"
    assert address_kind("100.64.0.1") == address_kind("fc00::1") == address_kind("64:ff9b:1::1") == "private"
    assert address_kind("fe80::1%eth0") == "link-local"


# --------------------------------------------------------------------------- public_only and the redirect rule

PUBLIC, PUBLIC_2 = "93.184.216.34", "2606:2800:220:1:248:1893:25c8:1946"


@pytest.fixture
def fake_internet(monkeypatch, server):
    """``names[host]`` is what ``host`` resolves to (other names resolve for real: localhost, literals); a connection
    to a fake address (``rerouted``) reaches the loopback server. Every address connected to is recorded."""
    names: dict[str, tuple[str, ...]] = {}
    rerouted = {PUBLIC, PUBLIC_2, "10.0.0.5"}
    opened: list[str] = []
    real_resolve, real_connect = urls.resolve, socket.create_connection

    def resolve(host: str, port: int) -> tuple[str, ...]:
        return names[host] if host in names else real_resolve(host, port)

    def connect(address, *args, **kwargs):
        opened.append(address[0])
        if address[0] in rerouted:
            address = ("127.0.0.1", server.port)
        return real_connect(address, *args, **kwargs)

    monkeypatch.setattr(urls, "resolve", resolve)
    monkeypatch.setattr(socket, "create_connection", connect)
    return names, opened


def test_public_only_refuses_every_non_public_hop_without_connecting(tmp_path, server, fake_internet):
    names, opened = fake_internet
    names.update({"images.example": (PUBLIC,), "cdn.example": (PUBLIC_2,), "myhost.internal": ("127.0.1.1",),
                  "rebind.example": (PUBLIC, "127.0.0.1"), "metadata.example": ("169.254.169.254",)})
    port = server.port
    secret = image_bytes(60)
    local = {"ip": f"127.0.0.1:{port}", "name": f"localhost:{port}", "decimal": f"2130706433:{port}",
             "v6": f"[::1]:{port}", "mapped": f"[::ffff:127.0.0.1]:{port}", "zero": f"0.0.0.0:{port}",
             "nat64": f"[64:ff9b::7f00:1]:{port}", "own": f"myhost.internal:{port}",
             "rebind": f"rebind.example:{port}", "metadata": "169.254.169.254", "meta-name": "metadata.example"}
    for name in local:
        server.routes[f"/secret/{name}"] = serve(secret)
        server.routes[f"/hop/{name}"] = redirect(f"http://{local[name]}/secret/{name}")
    server.routes.update({"/ok.png": serve(image_bytes(61)), "/hop/cdn": redirect(f"http://cdn.example:{port}/b.png"),
                          "/b.png": serve(image_bytes(62))})
    manifest = write_manifest(tmp_path / "m.csv", [
        "url,label", f"http://images.example:{port}/ok.png,x", f"http://images.example:{port}/hop/cdn,x",
        *(f"http://{host}/secret/{name},x" for name, host in local.items()),
        *(f"http://images.example:{port}/hop/{name},x" for name in local),
    ])
    ws = workspace(tmp_path)
    report = import_urls(config(manifest, public_only=True), ws)

    assert not [path for path in server.hits if path.startswith("/secret/")]  # nothing reached loopback
    assert set(opened) == {PUBLIC, PUBLIC_2}
    catalog = open_catalog(ws.db_url)
    try:
        with catalog.session() as session:
            rows = {item.url: item for item in session.scalars(select(UrlItem))}
    finally:
        catalog.close()
    assert rows[f"http://images.example:{port}/ok.png"].status == "downloaded"
    assert rows[f"http://images.example:{port}/hop/cdn"].status == "downloaded"  # public to public is followed
    kinds = {"zero": "unspecified", "metadata": "link-local", "meta-name": "link-local"}
    for name, host in local.items():
        for url in (f"http://{host}/secret/{name}", f"http://images.example:{port}/hop/{name}"):
            row = rows[url]
            assert row.status == "refused" and row.attempts == 1, url
            assert row.last_error.startswith(PUBLIC_ONLY_PREFIX) and kinds.get(name, "loopback") in row.last_error
            assert "--allow-private-urls" in row.last_error and "not requested" in row.last_error
    assert rows[f"http://127.0.0.1:{port}/secret/ip"].last_error.startswith(
        f"{PUBLIC_ONLY_PREFIX}127.0.0.1 is loopback")
    assert "rebind.example resolves to 127.0.0.1, which is loopback" in \
        rows[f"http://rebind.example:{port}/secret/rebind"].last_error
    assert rows[f"http://images.example:{port}/hop/ip"].http_status == 302
    reasons = report.skipped_by_reason()
    assert reasons[UrlReason.NOT_PUBLIC] == len(local) and reasons[UrlReason.REDIRECT] == len(local)


def test_a_public_only_refusal_is_decided_again_on_the_next_run(tmp_path, server, loopback_only):
    server.routes["/a.png"] = serve(image_bytes(63))
    manifest = write_manifest(tmp_path / "m.csv", ["url,label", f"{server.base}/a.png,x"])
    ws = workspace(tmp_path)
    import_urls(config(manifest, public_only=True), ws)
    assert ledger(ws)["a.png"].status == "refused" and server.hits["/a.png"] == 0 and not loopback_only
    import_urls(config(manifest, public_only=True), ws)  # still refused, still not requested
    assert ledger(ws)["a.png"].status == "refused" and server.hits["/a.png"] == 0
    import_urls(config(manifest), ws)  # an operator allowed private addresses
    assert ledger(ws)["a.png"].status == "downloaded" and server.hits["/a.png"] == 1


def test_a_redirect_must_stay_in_the_class_every_origin_address_shares(tmp_path, server, fake_internet):
    names, opened = fake_internet
    names.update({"mixed.example": (PUBLIC, "127.0.0.1"), "lan.example": ("10.0.0.5",),
                  "images.example": (PUBLIC,)})
    port = server.port
    server.routes.update({
        "/secret": serve(image_bytes(64)),
        "/mixed": redirect(f"http://127.0.0.1:{port}/secret"),  # public + loopback origin: no union any more
        "/lan-zero": redirect(f"http://0.0.0.0:{port}/secret"),  # private origin: 0.0.0.0 is loopback, not private
        "/lan-mapped": redirect(f"http://[::ffff:0.0.0.0]:{port}/secret"),
        "/nat64": redirect(f"http://[64:ff9b::7f00:1]:{port}/secret"),  # public origin: NAT64 of loopback
        "/sixtofour": redirect(f"http://[2002:7f00:1::1]:{port}/secret"),
        "/compatible": redirect(f"http://[::127.0.0.1]:{port}/secret"),
    })
    origins = {"/mixed": "mixed.example", "/lan-zero": "lan.example", "/lan-mapped": "lan.example",
               "/nat64": "images.example", "/sixtofour": "images.example", "/compatible": "images.example"}
    manifest = write_manifest(tmp_path / "m.csv", ["url,label", *(f"http://{host}:{port}{path},x"
                                                                  for path, host in origins.items())])
    ws = workspace(tmp_path)
    import_urls(config(manifest), ws)
    assert server.hits["/secret"] == 0 and set(opened) <= {PUBLIC, "10.0.0.5"}
    rows = ledger(ws)
    for path in origins:
        row = rows[path.lstrip("/")]
        assert row.status == "refused" and "refused" in row.last_error and row.http_status == 302, path
    assert "more than one class" in rows["mixed"].last_error


# --------------------------------------------------------------------------- slow servers


def trickle(body: bytes, *, every: float, first: int = 1):
    """A full Content-Length, ``first`` bytes at once, then one byte every ``every`` seconds; with Range: a quick
    206 of the rest."""
    def route(handler: BaseHTTPRequestHandler, _hit: int) -> None:
        asked = handler.headers.get("Range")
        if asked is not None:
            start = int(asked.split("=")[1].rstrip("-"))
            send(handler, body[start:], status=206,
                 headers={"Content-Range": f"bytes {start}-{len(body) - 1}/{len(body)}", "ETag": '"t1"'})
            return
        handler.send_response(200)
        handler.send_header("Content-Length", str(len(body)))
        handler.send_header("ETag", '"t1"')
        handler.end_headers()
        try:
            handler.wfile.write(body[:first])
            handler.wfile.flush()
            for i in range(first, min(len(body), first + 20)):
                time.sleep(every)
                handler.wfile.write(body[i:i + 1])
                handler.wfile.flush()
        except OSError:  # the client went away
            pass
        handler.close_connection = True
    return route


@pytest.mark.parametrize("every", [2.0, 8.0], ids=["trickling", "silent"])  # silent: only cutting the socket helps
def test_a_cancel_is_honoured_while_a_server_trickles_bytes(tmp_path, server, loopback_only, every):
    server.routes["/drip"] = trickle(image_bytes(70), every=every)
    manifest = write_manifest(tmp_path / "m.csv", ["url,label", f"{server.base}/drip,x"])
    ws = workspace(tmp_path)
    started = time.monotonic()
    with pytest.raises(ImportUrlsInterrupted):
        import_urls(config(manifest, timeout=10), ws,
                    should_stop=lambda: "cancelled" if time.monotonic() - started > 1.0 else None)
    assert time.monotonic() - started < 3.0
    assert ledger(ws)["drip"].status == "pending"
    parts = list((ws.root / "downloads" / "rocks").glob("*.part"))
    assert len(parts) == 1 and parts[0].stat().st_size >= 1  # kept for a Range resume


def test_an_attempt_past_its_deadline_fails_and_the_next_run_resumes_with_range(tmp_path, server, loopback_only):
    body = image_bytes(71)
    server.routes["/drip"] = trickle(body, every=0.3, first=len(body) // 2)
    manifest = write_manifest(tmp_path / "m.csv", ["url,label", f"{server.base}/drip,x"])
    ws = workspace(tmp_path)
    started = time.monotonic()
    import_urls(config(manifest, timeout=10, attempt_deadline=1.0, retries=1), ws)
    assert time.monotonic() - started < 3.0
    row = ledger(ws)["drip"]
    assert row.status == "failed" and "attempt_deadline" in row.last_error
    (part,) = (ws.root / "downloads" / "rocks").glob("*.part")
    kept = part.stat().st_size
    assert len(body) // 2 <= kept < len(body)

    import_urls(config(manifest, retry_failed=True), ws)
    row = ledger(ws)["drip"]
    assert row.status == "downloaded" and Path(row.path).read_bytes() == body
    first, second = server.requests_for("/drip")
    assert "Range" not in first.headers and second.headers["Range"] == f"bytes={kept}-"
    assert second.headers["If-Range"] == '"t1"'


def test_config_takes_public_only_and_an_attempt_deadline():
    assert UrlImportConfig(manifest="m.csv", dataset="d").public_only is False
    assert UrlImportConfig(manifest="m.csv", dataset="d").attempt_deadline == 600
    with pytest.raises(InputError, match="attempt_deadline"):
        make_config(manifest="m.csv", dataset="d", attempt_deadline=0)
