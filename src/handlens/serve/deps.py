"""``Annotated`` dependencies of the routes: the service state, the API-key rule, JSON bodies parsed off the
event loop, catalog images (or 404), loaded models (or 404), and the image a predict/explain request sends."""

from __future__ import annotations

import asyncio
import hmac
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
from fastapi import Depends, Request
from fastapi import Path as PathParam
from pydantic import BaseModel, ConfigDict, Field

from handlens.core.errors import (
    ForbiddenError,
    HandlensError,
    InputError,
    NotFoundError,
    TooLargeError,
    UnsupportedMediaError,
)
from handlens.serve.schemas import MAX_TRUST_STEPS
from handlens.serve.state import State

MAX_ID = 2**53  # catalog ids: positive, and exact in JavaScript
MAX_JSON_DEPTH = 32
LOOPBACK_CLIENTS = {"127.0.0.1", "::1", "localhost"}


def get_state(request: Request) -> State:
    return request.app.state.handlens  # type: ignore[no-any-return]


StateDep = Annotated[State, Depends(get_state)]
ImageId = Annotated[int, PathParam(ge=1, le=MAX_ID, description="a catalog image id")]


def require_key(request: Request, state: StateDep) -> None:
    """Mutating endpoints: with an API key set, its header is required; off loopback, a key must be set."""
    settings = state.settings
    if settings.api_key:
        given = request.headers.get("x-api-key", "")
        if not hmac.compare_digest(given.encode(), settings.api_key.encode()):
            raise ForbiddenError("this endpoint changes the workspace: send the service's key in X-API-Key")
    elif not settings.loopback or (request.client is not None and request.client.host not in LOOPBACK_CLIENTS):
        raise ForbiddenError(f"the service listens on {settings.host} without an API key: endpoints that "
                             "change the workspace are disabled for clients off loopback; restart it with "
                             "--api-key")


def _depth(value: Any) -> int:
    """Nesting depth of parsed JSON, iteratively (a deep document must not exhaust the stack here either)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        deepest = max(deepest, depth)
        if isinstance(item, dict):
            stack.extend((v, depth + 1) for v in item.values())
        elif isinstance(item, list):
            stack.extend((v, depth + 1) for v in item)
    return deepest


def parse_json(data: bytes) -> Any:
    """JSON bytes -> value, refusing what is not JSON, nested deeper than MAX_JSON_DEPTH, or NaN/Infinity."""
    def no_constants(name: str) -> Any:
        raise ValueError(f"{name} is not JSON")

    def finite(text: str) -> float:
        number = float(text)
        if math.isinf(number):
            raise ValueError(f"{text[:40]} is too large for a number")
        return number

    try:
        value = json.loads(data, parse_constant=no_constants, parse_float=finite)
    except RecursionError:
        raise TooLargeError(f"the JSON body is nested too deeply (the limit is {MAX_JSON_DEPTH} levels)") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise InputError(f"the body is not valid JSON ({str(exc)[:120]})") from None
    if _depth(value) > MAX_JSON_DEPTH:
        raise TooLargeError(f"the JSON body is nested too deeply (the limit is {MAX_JSON_DEPTH} levels)")
    return value


class ClientGoneError(HandlensError):
    """The client closed the connection before its request was read: nothing to answer."""

    http_status = 400


async def read_body(request: Request) -> bytes:
    from starlette.requests import ClientDisconnect

    try:
        return await request.body()
    except ClientDisconnect:
        raise ClientGoneError("the client closed the connection before sending its whole body") from None


async def json_body(request: Request, state: StateDep) -> Any:
    """The request's JSON: only ``application/json`` (415 otherwise: a form or text body a cross-site page
    can send without asking is never read as JSON), at most the JSON limit (413), parsed in a worker thread."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind != "application/json" and not kind.endswith("+json"):
        raise UnsupportedMediaError(f"send the body as Content-Type: application/json (got {kind or 'none'!r})")
    data = await read_body(request)
    limit = state.settings.max_json_bytes
    if len(data) > limit:
        raise TooLargeError(f"the JSON body exceeds the JSON limit of {limit:,} bytes")
    return await asyncio.get_running_loop().run_in_executor(state.io_pool, parse_json, data)


JsonBody = Annotated[Any, Depends(json_body)]


@dataclass
class CatalogImage:
    id: int
    dataset_id: int
    path: str
    sha256: str
    width: int
    height: int
    bytes: int
    mtime_ns: int | None
    format: str


def catalog_image(state: State, image_id: int) -> CatalogImage:
    """A catalog image's record, or 404; only paths the catalog holds are ever opened."""
    from handlens.data.catalog import Image

    with state.catalog.session() as session:
        row = session.get(Image, image_id)
        if row is None:
            raise NotFoundError(f"no image {image_id} in the catalog")
        return CatalogImage(row.id, row.dataset_id, row.path, row.sha256, row.width, row.height, row.bytes,
                            row.mtime_ns, row.format)


def image_or_404(image_id: ImageId, state: StateDep) -> CatalogImage:
    return catalog_image(state, image_id)


CatalogImageDep = Annotated[CatalogImage, Depends(image_or_404)]


async def loaded_model(model_id: str, state: StateDep) -> Any:
    """The model ``model_id``, loaded (off the event loop) and kept in the pool, or 404."""
    return await asyncio.get_running_loop().run_in_executor(state.io_pool, state.pool.get, model_id)


LoadedModelDep = Annotated[Any, Depends(loaded_model)]


@dataclass
class RequestImage:
    """The image a predict/explain request sends (an upload or a catalog id) and its other fields."""

    array: np.ndarray  # (H, W, 3) uint8 at the working size
    sha256: str
    image_id: int | None
    fields: dict[str, Any] = field(default_factory=dict)


@dataclass
class RawImage:
    """What a predict/explain request sent, read before anything else happens (nothing decoded yet)."""

    data: bytes | None  # an upload's bytes
    image_id: int | None  # or a catalog image's id
    fields: dict[str, Any] = field(default_factory=dict)


class ImageFields(BaseModel):
    """The fields a predict/explain/trust request may carry besides its image: a typo is a 422, never a default."""

    model_config = ConfigDict(extra="forbid")

    method: str | None = Field(None, min_length=1, max_length=64)
    layer: str | None = Field(None, min_length=1, max_length=200)
    target: str | None = Field(None, min_length=1, max_length=200)
    output: Literal["png", "array", "both"] | None = None
    params: dict[str, Any] | None = None
    steps: int | None = Field(None, ge=2, le=MAX_TRUST_STEPS, description="trust: points on each curve")


def check_fields(raw: dict[str, Any]) -> dict[str, Any]:
    """``raw`` fields validated by :class:`ImageFields` (unknown keys named, with the closest allowed one)."""
    import difflib

    from pydantic import ValidationError

    allowed = sorted(ImageFields.model_fields)
    unknown = [k for k in raw if k not in ImageFields.model_fields]
    if unknown:
        hints = [f"{k!r}" + (f" (did you mean {close[0]!r}?)" if (close := difflib.get_close_matches(k, allowed, 1))
                             else "") for k in unknown[:5]]
        raise InputError(f"unknown field(s) {', '.join(hints)}; allowed: image_id, file, {', '.join(allowed)}")
    try:
        return ImageFields.model_validate(raw).model_dump(exclude_none=True)
    except ValidationError as exc:
        raise InputError("; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}"
                                   for e in exc.errors()[:5])) from None


async def raw_image(request: Request, state: StateDep) -> RawImage:
    """A multipart upload (``file`` and string fields; ``params`` as a JSON object) or a JSON body with a catalog
    ``image_id``; the body is read first, so a request is never left half-read."""
    from starlette.requests import ClientDisconnect

    if request.headers.get("content-type", "").startswith("multipart/form-data"):
        try:
            form = await request.form(max_files=1, max_fields=20)
            upload = form.get("file")
            if upload is None or isinstance(upload, str):
                raise InputError("send the image as a multipart field named 'file'")
            data = await upload.read(state.settings.max_upload_bytes + 1)
        except ClientDisconnect:
            raise ClientGoneError("the client closed the connection before sending its whole body") from None
        fields: dict[str, Any] = {k: v for k, v in form.items() if k != "file" and isinstance(v, str)}
        if "params" in fields:
            fields["params"] = _params_field(fields["params"])
        return RawImage(data, None, check_fields(fields))
    body = await json_body(request, state)
    image_id = body.get("image_id") if isinstance(body, dict) else None
    if not isinstance(image_id, int) or isinstance(image_id, bool) or not 1 <= image_id <= MAX_ID:
        raise InputError("send multipart/form-data with a 'file', or JSON with the integer image_id of a catalog "
                         "image, e.g. {\"image_id\": 12}")
    return RawImage(None, image_id, check_fields({k: v for k, v in body.items() if k != "image_id"}))


def _params_field(text: str) -> dict[str, Any]:
    if not text.strip():
        return {}
    try:
        value = parse_json(text.encode())
    except InputError:
        raise InputError("the 'params' field must be a JSON object, e.g. {\"steps\": 32}") from None
    if not isinstance(value, dict):
        raise InputError("the 'params' field must be a JSON object, e.g. {\"steps\": 32}")
    return value


RawImageDep = Annotated[RawImage, Depends(raw_image)]


async def request_image(raw: RawImageDep, model: LoadedModelDep, state: StateDep) -> RequestImage:
    """The request's image decoded under the pixel budget and scaled down to the model's working size."""
    side = state.working_side(model.bundle.preprocess)
    if raw.data is None:
        assert raw.image_id is not None
        image = catalog_image(state, raw.image_id)
        return RequestImage(await decode_catalog_image(state, image, side), image.sha256, raw.image_id, raw.fields)
    import hashlib

    from handlens.serve.images import decode_bounded
    from handlens.serve.uploads import open_upload

    settings, data = state.settings, raw.data
    opened, header = open_upload(data, max_bytes=settings.max_upload_bytes, max_pixels=settings.max_pixels)
    async with state.pixels.hold(header.pixels):  # the header said how many pixels: wait for them, then decode
        array = await asyncio.get_running_loop().run_in_executor(
            state.io_pool, lambda: decode_bounded(opened, header, max_side=side))
    return RequestImage(array, hashlib.sha256(data).hexdigest(), None, raw.fields)


def verified_file(state: State, image: CatalogImage) -> Path:
    """The real path of a catalog image's file, refused unless it is still the file that was imported: inside
    its dataset's folder once symlinks are resolved (404 gone, 409 moved outside or changed; a symlink
    re-pointed at another file, or a file replaced in place, is never served or decoded)."""
    from handlens.data.imaging import verify_catalog_file
    from handlens.data.importer import dataset_roots

    with state.catalog.session() as session:
        roots = dataset_roots(session, image.dataset_id)
    return verify_catalog_file(image.path, sha256=image.sha256, size=image.bytes, mtime_ns=image.mtime_ns,
                               root=roots)


async def decode_catalog_image(state: State, image: CatalogImage, side: int) -> np.ndarray:
    """A catalog image decoded as an upload would be: the same pixel cap, budget and downscaling; refused if
    its file changed since import (:func:`verified_file`)."""
    from handlens.serve.images import decode_bounded, open_checked

    loop = asyncio.get_running_loop()
    path = await loop.run_in_executor(state.io_pool, verified_file, state, image)  # may hash the file
    what = f"catalog image {image.id}"
    opened, header = open_checked(path, max_pixels=state.settings.max_pixels, what=what)
    async with state.pixels.hold(header.pixels):
        return await loop.run_in_executor(state.io_pool,
                                          lambda: decode_bounded(opened, header, max_side=side, what=what))


RequestImageDep = Annotated[RequestImage, Depends(request_image)]
