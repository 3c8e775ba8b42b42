"""Catalog resources: datasets, labelsets, images (listing, detail, thumbnail, file) and expert regions."""

from __future__ import annotations

import asyncio
import io
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query
from fastapi.responses import FileResponse, Response

from handlens.core.errors import InputError, NotFoundError
from handlens.serve.deps import (
    MAX_ID,
    CatalogImageDep,
    ImageId,
    JsonBody,
    StateDep,
    decode_catalog_image,
    require_key,
    verified_file,
)
from handlens.serve.schemas import (
    ERRORS,
    DatasetSummary,
    ImageDetail,
    ImageList,
    LabelsetSummary,
    RegionCreated,
    RegionIn,
)
from handlens.serve.security import FILE_CSP

router = APIRouter(prefix="/api/v1", tags=["catalog"], responses=ERRORS)


@router.get("/datasets")
def datasets(state: StateDep) -> list[DatasetSummary]:
    from handlens.data.queries import dataset_summaries

    with state.catalog.session() as session:
        return [DatasetSummary(**row) for row in dataset_summaries(session)]


@router.get("/datasets/{name}/labelsets")
def labelsets(name: str, state: StateDep) -> list[LabelsetSummary]:
    from sqlalchemy import func, select

    from handlens.data.catalog import Label, Labelset
    from handlens.data.queries import find_dataset

    with state.catalog.session() as session:
        dataset = find_dataset(session, name)
        rows = session.execute(select(Labelset.name, Label.label, func.count())
                               .join(Label, Label.labelset_id == Labelset.id)
                               .where(Labelset.dataset_id == dataset.id)
                               .group_by(Labelset.name, Label.label)).all()
    out: dict[str, dict[str, int]] = {}
    for labelset, label, count in rows:
        out.setdefault(labelset, {})[label] = int(count)
    return [LabelsetSummary(name=n, classes=sorted(c), counts=c) for n, c in sorted(out.items())]


@router.get("/images")
def images(state: StateDep, dataset: str, *, labelset: str | None = None, label: str | None = None,
           split: str | None = None, subset: Annotated[str | None, Query(pattern="^(train|val|test)$")] = None,
           limit: Annotated[int, Query(ge=1, le=1000)] = 100,
           offset: Annotated[int, Query(ge=0, le=MAX_ID)] = 0) -> ImageList:
    from handlens.data.queries import list_images

    with state.catalog.session() as session:
        return ImageList(**list_images(session, dataset=dataset, labelset=labelset, label=label, split=split,
                                       subset=subset, limit=limit, offset=offset))


@router.get("/images/{image_id}")
def image(image_id: ImageId, state: StateDep) -> ImageDetail:
    from handlens.data.queries import image_detail

    with state.catalog.session() as session:
        found = image_detail(session, image_id)
    if found is None:
        raise NotFoundError(f"no image {image_id} in the catalog")
    return ImageDetail(**found)


@router.get("/images/{image_id}/thumbnail", responses={200: {"content": {"image/jpeg": {}}}})
async def thumbnail(image: CatalogImageDep, state: StateDep,
                    size: Annotated[int, Query(ge=16, le=1024)] = 256) -> Response:
    """The image scaled to fit ``size`` x ``size``, as JPEG (decoded under the same limits as an upload)."""
    from PIL import Image

    array = await decode_catalog_image(state, image, size)
    buffer = io.BytesIO()
    await asyncio.get_running_loop().run_in_executor(
        state.io_pool, lambda: Image.fromarray(array).save(buffer, "JPEG", quality=85))
    return Response(buffer.getvalue(), media_type="image/jpeg", headers={"Cache-Control": "max-age=3600"})


@router.get("/images/{image_id}/file", responses={200: {"content": {"image/*": {}}}})
def image_file(image: CatalogImageDep, state: StateDep) -> FileResponse:
    """The file as imported, served as the type its content is (never its name), with ``nosniff`` and a
    Content-Security-Policy that lets nothing in it run; refused if the file changed since import."""
    from handlens.serve.images import sniff_content_type

    path = verified_file(state, image)
    return FileResponse(path, media_type=sniff_content_type(path), filename=safe_name(path),
                        content_disposition_type="inline", headers={"Content-Security-Policy": FILE_CSP})


def safe_name(path: Path) -> str:
    """The file's name with an image extension only (the download name never suggests a page)."""
    return path.name if path.suffix.lower() in {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp", ".gif",
                                                ".ppm", ".pgm", ".pbm", ".pnm"} else f"{path.stem}.img"


@router.post("/images/{image_id}/regions", status_code=201, dependencies=[Depends(require_key)],
             openapi_extra={"requestBody": {"required": True, "content": {
                 "application/json": {"schema": RegionIn.model_json_schema()}}}})
def add_region(image_id: ImageId, body: JsonBody, state: StateDep) -> RegionCreated:
    """Add an expert region (polygons in the image's pixel coordinates) to a catalog image."""
    from pydantic import ValidationError

    from handlens.data.annotations import add_polygon_region, check_polygons

    try:
        region = RegionIn.model_validate(body)
        check_polygons(region.polygons)
    except ValidationError as exc:
        problems = exc.errors()
        more = f"; and {len(problems) - 5} more" if len(problems) > 5 else ""
        raise InputError("; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'body'}: {e['msg']}"
                                   for e in problems[:5]) + more) from None
    except (ValueError, TypeError) as exc:
        raise InputError(f"polygons: {exc}") from None
    try:
        with state.catalog.session() as session:
            row_id = add_polygon_region(session, image_id, polygons=region.polygons, label=region.label,
                                        source="api")
    except ValueError as exc:
        raise InputError(f"polygons: {exc}") from None
    return RegionCreated(id=row_id, image_id=image_id, kind="polygon", label=region.label)


@router.get("/regions/{region_id}/mask.png", responses={200: {"content": {"image/png": {}}}})
async def region_mask_png(region_id: ImageId, state: StateDep) -> Response:
    """An expert region stored as a mask, drawn for the viewer: the mask's pixels cyan and half transparent,
    the rest transparent, as PNG (decoded under the service's pixel limit)."""
    return Response(await asyncio.get_running_loop().run_in_executor(
        state.io_pool, _region_png, state, region_id), media_type="image/png", headers={"Cache-Control": "max-age=60"})


def _region_png(state: Any, region_id: int) -> bytes:
    from handlens.data.catalog import Annotation

    with state.catalog.session() as session:
        row = session.get(Annotation, region_id)
        path = row.mask_path if row is not None and row.kind == "mask" else None
    if not path or not Path(path).is_file():
        raise NotFoundError(f"no mask region {region_id} (or its file is gone)")
    return _tinted_mask(path, state.settings.max_pixels)


def _tinted_mask(path: str, max_pixels: int) -> bytes:
    import numpy as np
    from PIL import Image

    from handlens.core.errors import TooLargeError

    with Image.open(path) as mask:
        if mask.width * mask.height > max_pixels:
            raise TooLargeError(f"the mask has {mask.width * mask.height} pixels; the service decodes at most "
                                f"{max_pixels}")
        on = np.asarray(mask.convert("L")) > 0
    rgba = np.zeros((*on.shape, 4), dtype=np.uint8)
    rgba[on] = (0, 255, 255, 110)
    buffer = io.BytesIO()
    Image.fromarray(rgba, "RGBA").save(buffer, "PNG")
    return buffer.getvalue()
