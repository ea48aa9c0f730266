"""Bundle upload, releases, and device downloads (HTTP Range, ETag)."""

from __future__ import annotations

import os
import re
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Query, Request, Response
from fastapi import Path as PathParam
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, StreamingResponse
from sqlalchemy import select

from edgeota_contract.manifest import SHA256_PATTERN
from ota_server.api.deps import AnyCaller, CtxDep, ReleaseManager, SessionDep, Viewer
from ota_server.api.responses import BINARY, BundleRecord, ReleaseRecord
from ota_server.api.upload import receive_to_file
from ota_server.core.problems import ApiError
from ota_server.errors import NotFound, PermissionDenied
from ota_server.models import Bundle, Release
from ota_server.services.releases import accept_bundle, bundle_json, release_json

router = APIRouter(prefix="/api/v1", tags=["releases"])
_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")


@router.post(
    "/bundles",
    status_code=201,
    response_model=BundleRecord,
    responses={200: {"model": BundleRecord, "description": "this bundle was already stored"}},
    openapi_extra={
        "requestBody": {
            "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
            "required": True,
        }
    },
)
async def upload_bundle(request: Request, ctx: CtxDep, who: ReleaseManager) -> Response:
    """Upload one signed bundle as the raw request body. Verified before acceptance; 201 when new, 200 when known."""
    ctx.settings.tmp_dir.mkdir(parents=True, exist_ok=True)
    tmp = ctx.settings.tmp_dir / f"upload-{uuid.uuid4().hex}.tar"
    try:
        await receive_to_file(
            request,
            tmp,
            ctx.settings.max_bundle_bytes,
            "bundle",
            "empty request body; send the bundle archive as application/octet-stream",
        )

        def _accept() -> tuple[dict[str, Any], bool]:
            with ctx.sessions() as session:
                try:
                    bundle, created = accept_bundle(session, ctx.store, ctx.release_keys, tmp, who.name, ctx.tuf)
                    session.commit()
                except BaseException:
                    session.rollback()
                    raise
                return bundle_json(bundle), created

        body, created = await run_in_threadpool(_accept)
    finally:
        tmp.unlink(missing_ok=True)
    return JSONResponse(body, status_code=201 if created else 200)


@router.get("/releases", response_model=list[ReleaseRecord])
def list_releases(
    session: SessionDep,
    _who: Viewer,
    model_name: str | None = Query(default=None, max_length=64),
    limit: int = Query(default=100, ge=1, le=1000),
    offset: int = Query(default=0, ge=0, le=10_000_000),
) -> list[dict[str, Any]]:
    stmt = select(Release).order_by(Release.created_at.desc(), Release.id)
    if model_name:
        stmt = stmt.where(Release.model_name == model_name)
    return [release_json(session, r) for r in session.scalars(stmt.offset(offset).limit(limit))]


@router.get("/releases/{release_id}", response_model=ReleaseRecord)
def get_release(session: SessionDep, _who: Viewer, release_id: str = PathParam(max_length=64)) -> dict[str, Any]:
    release = session.get(Release, release_id)
    if release is None:
        raise NotFound(f"release {release_id} not found")
    return release_json(session, release)


def _file_iter(path: Path, start: int, length: int) -> Iterator[bytes]:
    with open(path, "rb") as fh:
        fh.seek(start)
        remaining = length
        while remaining > 0:
            chunk = fh.read(min(1 << 20, remaining))
            if not chunk:
                break
            remaining -= len(chunk)
            yield chunk


@router.get(
    "/artifacts/{sha256}",
    response_class=Response,
    responses={
        200: {"description": "the bundle archive", "content": BINARY},
        206: {"description": "partial content", "content": BINARY},
        307: {"description": "download it from the object store (artifact_store = s3): a presigned URL"},
        304: {"description": "not modified"},
        416: {"description": "range not satisfiable"},
    },
)
def download(
    request: Request,
    ctx: CtxDep,
    session: SessionDep,
    who: AnyCaller,
    sha256: str = PathParam(pattern=SHA256_PATTERN),
) -> Response:
    """Stream a bundle. Supports one ``Range: bytes=a-b`` (206/416) and ``If-None-Match`` (304)."""
    bundle = session.get(Bundle, sha256)
    if bundle is None or not ctx.store.exists(sha256):
        raise NotFound(f"no bundle {sha256}")
    if who.role is None and who.device_id is not None:
        from ota_server.models import Device

        device = session.get(Device, who.device_id)
        if device is None or device.hardware_profile != bundle.hardware_profile:
            raise PermissionDenied("this bundle is not for this device's hardware profile")
    # Never hold a database transaction open while a (possibly slow) device downloads.
    session.close()
    etag = f'"{sha256}"'
    headers = {"ETag": etag, "Accept-Ranges": "bytes", "Cache-Control": "private, max-age=31536000, immutable"}
    inm = request.headers.get("if-none-match")
    if inm and (inm.strip() == "*" or etag in [t.strip() for t in inm.split(",")]):
        return Response(status_code=304, headers=headers)
    redirect = ctx.store.redirect_url(sha256)
    if redirect is not None:  # an object store serves the bytes (and the Range the device sends again)
        return Response(status_code=307, headers={"Location": redirect, "Cache-Control": "no-store"})
    path = ctx.store.local_path(sha256)
    size = os.path.getsize(path)
    range_header = request.headers.get("range")
    if range_header:
        match = _RANGE.match(range_header.strip())
        start: int
        end: int
        if match is None or (not match.group(1) and not match.group(2)):
            raise ApiError(
                416,
                "Range Not Satisfiable",
                f"unsupported range {range_header!r}",
                headers={"Content-Range": f"bytes */{size}"},
            )
        if match.group(1):
            start = int(match.group(1))
            end = int(match.group(2)) if match.group(2) else size - 1
        else:
            start = max(0, size - int(match.group(2)))
            end = size - 1
        end = min(end, size - 1)
        if start >= size or start > end:
            raise ApiError(
                416,
                "Range Not Satisfiable",
                f"range {range_header!r} outside 0-{size - 1}",
                headers={"Content-Range": f"bytes */{size}"},
            )
        headers.update({"Content-Range": f"bytes {start}-{end}/{size}", "Content-Length": str(end - start + 1)})
        return StreamingResponse(
            _file_iter(path, start, end - start + 1),
            status_code=206,
            media_type="application/octet-stream",
            headers=headers,
        )
    headers["Content-Length"] = str(size)
    return StreamingResponse(_file_iter(path, 0, size), media_type="application/octet-stream", headers=headers)
