"""The defects an attack on the service found (issue 12), each refused as it should be."""

import io
import json
import threading
import time
import zlib
from pathlib import Path

import pytest
from PIL import Image

from handlens.serve.app import public_message
from tests.serve.conftest import png_bytes

POLYGLOT = png_bytes() + b"<html><script>fetch('/api/v1/images/1/regions', {method: 'POST'})</script></html>"


def inside_tree(served, name: str) -> Path:
    """A path inside the served dataset's folder (files outside the folders an import read are never served)."""
    folder = served[2] / "colours" / "zz_extra"
    folder.mkdir(exist_ok=True)
    return folder / name


def catalog_row(client, path: Path, *, width=40, height=40, fmt="PNG") -> int:
    """Add a catalog image for ``path`` as import would record it; its id."""
    import hashlib

    from handlens.data.catalog import Dataset
    from handlens.data.catalog import Image as Row

    state = client.app.state.handlens
    stat = path.stat()
    with state.catalog.session() as session:
        dataset = session.query(Dataset).filter_by(name="colours").one()
        row = Row(dataset_id=dataset.id, path=str(path), sha256=hashlib.sha256(path.read_bytes()).hexdigest(),
                  width=width, height=height, mode="RGB", format=fmt, bytes=stat.st_size, mtime_ns=stat.st_mtime_ns)
        session.add(row)
        session.flush()
        return int(row.id)


def test_a_png_html_polyglot_is_served_as_png_and_can_never_run(served):
    """Defect 1: the content type comes from the content, never the name; nosniff and a CSP that runs nothing."""
    client, _, _ = served
    evil = inside_tree(served, "evil.html")
    evil.write_bytes(POLYGLOT)
    answer = client.get(f"/api/v1/images/{catalog_row(client, evil)}/file")
    assert answer.status_code == 200
    assert answer.headers["content-type"] == "image/png"
    assert answer.headers["x-content-type-options"] == "nosniff"
    assert answer.headers["content-security-policy"].startswith("default-src 'none'")
    assert "evil.img" in answer.headers["content-disposition"]  # the download name never suggests a page
    viewer = client.get("/")
    assert "script-src 'self'" in viewer.headers["content-security-policy"]


def test_dns_rebinding_names_and_foreign_origins_are_refused(served):
    """Defect 2: a Host that is not the service's (a rebinding page's name) gets 400, reads included; a
    mutation from another origin gets 403; IP literals, localhost and --allowed-host names are served."""
    client, _, _ = served
    image_id = client.get("/api/v1/images", params={"dataset": "colours", "limit": 1}).json()["items"][0]["id"]
    region = {"polygons": [[[1, 1], [20, 1], [20, 20]]]}
    rebound = {"Host": "attacker.example:8000", "Origin": "http://attacker.example:8000"}
    assert client.post(f"/api/v1/images/{image_id}/regions", json=region, headers=rebound).status_code == 400
    assert client.get("/api/v1/models", headers={"Host": "attacker.example:8000"}).status_code == 400
    for host in ("127.0.0.1:8000", "localhost:8000", "[::1]:8000", "10.0.0.7"):
        assert client.get("/livez", headers={"Host": host}).status_code == 200, host
    foreign = client.post(f"/api/v1/images/{image_id}/regions", json=region,
                          headers={"Host": "127.0.0.1:8000", "Origin": "http://attacker.example:8000"})
    assert foreign.status_code == 403 and "may not change" in foreign.json()["detail"]
    null_origin = client.post(f"/api/v1/images/{image_id}/regions", json=region, headers={"Origin": "null"})
    assert null_origin.status_code == 403
    own = client.post(f"/api/v1/images/{image_id}/regions", json=region,
                      headers={"Host": "127.0.0.1:8000", "Origin": "http://127.0.0.1:8000"})
    assert own.status_code == 201, own.text


def test_a_catalog_file_that_changed_since_import_is_not_served(served, tmp_path):
    """Defect 3: a symlink re-pointed elsewhere (or a file replaced by a non-image) is refused with 409."""
    client, run_id, _ = served
    real = inside_tree(served, "real.png")
    real.write_bytes(png_bytes())
    link = inside_tree(served, "link.png")
    link.symlink_to(real)
    image_id = catalog_row(client, link)
    assert client.get(f"/api/v1/images/{image_id}/file").status_code == 200
    secret = tmp_path / "secret.txt"
    secret.write_text("root:x:0:0:secret\n")
    link.unlink()
    link.symlink_to(secret)
    for path in (f"/api/v1/images/{image_id}/file", f"/api/v1/images/{image_id}/thumbnail"):
        answer = client.get(path)
        assert answer.status_code == 409 and b"root:" not in answer.content, path
        assert "outside its dataset's folder" in answer.json()["detail"]
        assert str(tmp_path) not in answer.json()["detail"]  # names, never the server's paths
    replaced = inside_tree(served, "replaced.png")
    replaced.write_bytes(png_bytes())
    replaced_id = catalog_row(client, replaced)
    replaced.write_bytes(b"not an image any more, and longer than before")
    answer = client.get(f"/api/v1/images/{replaced_id}/thumbnail")
    assert answer.status_code == 409 and "changed since it was imported" in answer.json()["detail"]
    predict = client.post(f"/api/v1/models/{run_id}/predict", json={"image_id": image_id})
    assert predict.status_code == 409


def test_json_bodies_are_bounded_in_size_and_nesting(served):
    """Defect 4: a big JSON body gets 413 from its length, a deeply nested one 413, never 500."""
    client, run_id, _ = served
    big = json.dumps({f"k{i}": i for i in range(200_000)})
    answer = client.post(f"/api/v1/models/{run_id}/predict", content=big, headers={"Content-Type": "application/json"})
    assert answer.status_code == 413 and "JSON limit" in answer.json()["detail"]
    deep = "[" * 100_000 + "]" * 100_000
    answer = client.post(f"/api/v1/models/{run_id}/predict", content=deep,
                         headers={"Content-Type": "application/json"})
    assert answer.status_code == 413 and "nested too deeply" in answer.json()["detail"]
    nested = '{"image_id": 1, "params": {"a": ' + "[" * 40 + "1" + "]" * 40 + "}}"
    answer = client.post(f"/api/v1/models/{run_id}/explain", content=nested,
                         headers={"Content-Type": "application/json"})
    assert answer.status_code == 413


def bomb_png(width: int, height: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")

    header = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([8, 2, 0, 0, 0])
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\x00" * 64))


def test_catalog_images_get_the_uploads_pixel_cap_and_pillows_errors_are_4xx(served):
    """Defect 5: an image asked for by id is capped as an upload is; a 200 MP catalog image is 413 on
    thumbnail, predict and explain (Pillow's bomb error is caught)."""
    client, run_id, _ = served
    for width, height in ((2000, 1000), (20_000, 10_000)):  # over the fixture's 1 MP cap; 200 MP
        path = inside_tree(served, f"big{width}.png")
        path.write_bytes(bomb_png(width, height))
        image_id = catalog_row(client, path, width=width, height=height)
        for answer in (client.get(f"/api/v1/images/{image_id}/thumbnail"),
                       client.post(f"/api/v1/models/{run_id}/predict", json={"image_id": image_id}),
                       client.post(f"/api/v1/models/{run_id}/explain", json={"image_id": image_id})):
            assert answer.status_code == 413, answer.text
            assert "pixels" in answer.json()["detail"]


def test_a_catalog_file_that_no_longer_decodes_is_422(served):
    client, run_id, _ = served
    broken = inside_tree(served, "broken.png")
    broken.write_bytes(png_bytes()[:70])  # a PNG header, then nothing
    image_id = catalog_row(client, broken)
    for answer in (client.get(f"/api/v1/images/{image_id}/thumbnail"),
                   client.post(f"/api/v1/models/{run_id}/predict", json={"image_id": image_id})):
        assert answer.status_code == 422 and "corrupt" in answer.json()["detail"], answer.text


def test_a_busy_catalog_is_503_with_retry_after(served, monkeypatch):
    """Defect 6: a locked SQLite catalog on a write is a clear 503, not a 500 after the busy timeout."""
    from sqlalchemy.exc import OperationalError

    import handlens.data.annotations as annotations

    client, _, _ = served

    def locked(*args, **kwargs):
        raise OperationalError("INSERT INTO annotations", {}, Exception("database is locked"))

    monkeypatch.setattr(annotations, "add_polygon_region", locked)
    answer = client.post("/api/v1/images/1/regions", json={"polygons": [[[1, 1], [20, 1], [20, 20]]]})
    assert answer.status_code == 503 and answer.headers["retry-after"]
    assert "catalog is busy" in answer.json()["detail"]


def test_a_damaged_bundle_is_listed_as_damaged_and_hides_no_other(served):
    """Defect 8: one bundle.json that is a JSON list breaks nothing else."""
    client, run_id, root = served
    damaged = root / "ws" / "runs" / "00000000-damaged" / "bundle"
    damaged.mkdir(parents=True)
    (damaged / "bundle.json").write_text("[1, 2, 3]")
    try:
        models = {m["id"]: m for m in client.get("/api/v1/models").json()}
        assert models[run_id]["damaged"] is None and models[run_id]["classes"]
        assert models["00000000-damaged"]["damaged"]
        answer = client.get("/api/v1/models/00000000-damaged")
        assert 400 <= answer.status_code < 500
    finally:
        import shutil

        shutil.rmtree(damaged.parent)


def test_error_messages_carry_no_server_paths(served, tmp_path):
    _, _, root = served
    text = f"cannot read {root}/ws/runs/x/bundle/bundle.json; see GET /api/v1/models or {tmp_path}/a b"
    cleaned = public_message(text, [root])
    assert str(root) not in cleaned and "bundle.json" in cleaned and "/api/v1/models" in cleaned
    import tempfile

    gone = public_message(f"{tmp_path}/gone/file.png is broken", [Path(tempfile.gettempdir())])
    assert gone == "file.png is broken"


def test_cache_misses_are_counted_once_and_counters_are_typed_as_counters(served):
    client, run_id, _ = served
    state = client.app.state.handlens
    before = state.cache.misses
    files = {"file": ("m.png", png_bytes((1, 2, 3)))}
    assert client.post(f"/api/v1/models/{run_id}/explain", files=files, data={"method": "gradcam"}).status_code == 200
    assert state.cache.misses == before + 1
    text = client.get("/metrics").text
    assert "# TYPE handlens_explain_cache_misses_total counter" in text
    assert "# TYPE handlens_explain_cache_hits_total counter" in text


def test_docs_are_served_offline_from_the_package(served):
    client, _, _ = served
    page = client.get("/docs")
    assert page.status_code == 200 and "/docs-assets/swagger-ui-bundle.js" in page.text
    assert "cdn" not in page.text.lower()
    assert client.get("/docs-assets/swagger-ui-bundle.js").status_code == 200
    assert client.get("/docs-assets/swagger-ui.css").status_code == 200
    assert client.get("/docs-assets/redoc.standalone.js").status_code == 200


def test_a_multipart_explain_passes_params_and_ppm_is_accepted(served):
    client, run_id, _ = served
    ppm = png_bytes(fmt="PPM")
    ok = client.post(f"/api/v1/models/{run_id}/explain", files={"file": ("a.ppm", ppm)},
                     data={"method": "integrated_gradients", "params": json.dumps({"steps": 4})})
    assert ok.status_code == 200, ok.text
    over = client.post(f"/api/v1/models/{run_id}/explain", files={"file": ("a.ppm", ppm)},
                       data={"method": "integrated_gradients", "params": json.dumps({"steps": 500})})
    assert over.status_code == 422 and "limit" in over.json()["detail"]
    assert client.post(f"/api/v1/models/{run_id}/predict", files={"file": ("a.ppm", ppm)}).status_code == 200


def test_the_pixel_budget_bounds_what_is_decoded_at_once():
    import asyncio

    from handlens.core.errors import BusyError
    from handlens.serve.images import PixelBudget

    async def scenario():
        budget = PixelBudget(100, wait_s=0.2)
        peak = 0

        async def job(pixels):
            nonlocal peak
            async with budget.hold(pixels):
                peak = max(peak, budget.in_use)
                await asyncio.sleep(0.02)

        await asyncio.gather(*(job(40) for _ in range(6)))
        assert peak <= 100 and budget.in_use == 0
        async with budget.hold(100):
            with pytest.raises(BusyError):
                async with budget.hold(1):
                    pass

    asyncio.run(scenario())


def test_large_images_are_scaled_down_once_right_after_decoding():
    from handlens.serve.images import decode_bounded, open_checked

    buffer = io.BytesIO()
    Image.new("RGB", (3000, 1000), (10, 200, 30)).save(buffer, "JPEG")
    opened, header = open_checked(buffer.getvalue(), max_pixels=10_000_000)
    array = decode_bounded(opened, header, max_side=600)
    assert array.shape == (200, 600, 3) and abs(int(array[100, 300, 1]) - 200) < 8


def test_predict_keeps_answering_during_an_explain_burst(served, monkeypatch):
    """Explanations run in their own threads on their own copy of the model: a burst of slow ones never holds
    what predictions need."""
    import handlens.serve.explaining as explaining

    client, run_id, _ = served
    original = explaining.compute_explanation

    def slow(loaded, *args, **kwargs):
        with loaded.lock:  # as a real explanation holds its model's lock while its hooks are in
            time.sleep(1.5)
        return original(loaded, *args, **kwargs)

    monkeypatch.setattr(explaining, "compute_explanation", slow)
    threads = [threading.Thread(target=client.post, args=(f"/api/v1/models/{run_id}/explain",),
                                kwargs={"files": {"file": (f"{i}.png", png_bytes((i, 9, 9)))}}) for i in range(2)]
    for thread in threads:
        thread.start()
    time.sleep(0.3)
    started = time.perf_counter()
    answer = client.post(f"/api/v1/models/{run_id}/predict", files={"file": ("p.png", png_bytes((7, 7, 7)))})
    waited = time.perf_counter() - started
    for thread in threads:
        thread.join()
    assert answer.status_code == 200 and waited < 1.0, waited


def test_the_service_answers_its_own_limits_in_the_schema(served):
    schema = served[0].get("/openapi.json").json()
    responses = schema["paths"]["/api/v1/models/{model_id}/predict"]["post"]["responses"]
    assert {"200", "400", "404", "413", "415", "422", "503"} <= set(responses)
    error = schema["components"]["schemas"]["ErrorBody"]["properties"]["detail"]
    assert {"type": "string"} in error["anyOf"]



def test_only_application_json_is_read_as_json_and_within_the_json_limit(served):
    """A text/plain or form body (what a cross-site page may send without asking) is never parsed as JSON."""
    client, run_id, _ = served
    region = json.dumps({"polygons": [[[1, 1], [20, 1], [20, 20]]]})
    for kind in ("text/plain", "application/x-www-form-urlencoded", ""):
        answer = client.post("/api/v1/images/1/regions", content=region, headers={"Content-Type": kind})
        assert answer.status_code == 415 and "application/json" in answer.json()["detail"], kind
    big = "{" + ",".join(f'"k{i}": {i}' for i in range(200_000)) + "}"
    answer = client.post(f"/api/v1/models/{run_id}/predict", content=big, headers={"Content-Type": "text/plain"})
    assert answer.status_code in (413, 415)


def test_unknown_or_empty_request_fields_are_refused(served):
    client, run_id, _ = served
    image_id = client.get("/api/v1/images", params={"dataset": "colours", "limit": 1}).json()["items"][0]["id"]
    typo = client.post(f"/api/v1/models/{run_id}/explain", json={"image_id": image_id, "mehtod": "saliency"})
    assert typo.status_code == 422 and "did you mean 'method'" in typo.json()["detail"]
    form = client.post(f"/api/v1/models/{run_id}/explain", files={"file": ("a.png", png_bytes())},
                       data={"mehtod": "saliency"})
    assert form.status_code == 422 and "did you mean 'method'" in form.json()["detail"]
    for body in ({"method": ""}, {"target": 0}, {"output": "pdf"}, {"params": "steps=3"}):
        answer = client.post(f"/api/v1/models/{run_id}/explain", json={"image_id": image_id, **body})
        assert answer.status_code == 422, body
    bad_params = client.post(f"/api/v1/models/{run_id}/explain", files={"file": ("a.png", png_bytes())},
                             data={"params": "nope"})
    assert bad_params.status_code == 422 and "'params' field must be a JSON object" in bad_params.json()["detail"]


def test_regions_must_lie_inside_their_image_and_have_an_area(served):
    client, _, _ = served
    image = client.get("/api/v1/images", params={"dataset": "colours", "limit": 1}).json()["items"][0]
    url = f"/api/v1/images/{image['id']}/regions"
    for polygons, words in (([[[1, 1], [20, 1], [99999, 20]]], "leaves the"), ([[[1, 1], [20, 1], [-5, 20]]], "leaves"),
                            ([[[1, 1], [1, 1], [1, 1]]], "no area"), ([[[True, 1], [20, 1], [20, 20]]], "number"),
                            ([[[1, 1, 1], [20, 1], [20, 20]]], "at most 2")):
        answer = client.post(url, json={"polygons": polygons})
        assert answer.status_code == 422 and words in answer.json()["detail"], (polygons, answer.text)
    assert client.post(url, json={"polygons": [[[0, 0], [image["width"], 0], [0, image["height"]]]]}).status_code == 201
    many = client.post(url, json={f"k{i}": i for i in range(5000)})
    assert many.status_code == 422 and len(many.text) < 2000 and "more" in many.json()["detail"]


def test_an_origin_must_be_exactly_the_services_own(served):
    client, _, _ = served
    region = {"polygons": [[[1, 1], [20, 1], [20, 20]]]}
    for origin in ("http://127.0.0.1:8000/evil", "HTTP://127.0.0.1:8000", "http://user@127.0.0.1:8000",
                   "http://127.0.0.1:8000?x=1"):
        answer = client.post("/api/v1/images/1/regions", json=region,
                             headers={"Host": "127.0.0.1:8000", "Origin": origin})
        assert answer.status_code == 403, origin


def test_an_explanation_slot_is_held_until_its_work_ends_and_a_full_queue_is_503(served):
    """A client that gives up (a 504, a closed connection) does not free its slot while its thread still runs:
    abandoned work can never pile up past the limit; past the queue, 503."""
    import asyncio
    from concurrent.futures import ThreadPoolExecutor

    from handlens.core.errors import BusyError
    from handlens.serve.state import State

    state = State.__new__(State)  # only what run_explanation uses
    state.settings = served[0].app.state.handlens.settings.model_copy(update={"explain_concurrency": 1,
                                                                              "explain_queue": 1})
    state.explain_pool = ThreadPoolExecutor(max_workers=2)
    state._slots, state._waiting = None, 0
    finished = threading.Event()

    def slow():
        time.sleep(0.5)
        finished.set()
        return "done"

    async def scenario():
        first = asyncio.create_task(state.run_explanation(slow))
        await asyncio.sleep(0.05)
        first.cancel()  # the client went away
        await asyncio.sleep(0.05)
        assert state.explain_slots().locked() and not finished.is_set()  # still held: the thread runs on
        waiting = asyncio.create_task(state.run_explanation(lambda: "second"))
        await asyncio.sleep(0.05)
        with pytest.raises(BusyError):
            await state.run_explanation(lambda: "third")  # one already waits: the queue is full
        assert await waiting == "second" and finished.is_set()

    asyncio.run(scenario())
    state.explain_pool.shutdown()
