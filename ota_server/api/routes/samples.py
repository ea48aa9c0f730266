"""Raw-input sample upload (device token) and export for ML engineers (viewer and up)."""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

from fastapi import APIRouter, Query, Request, Response
from fastapi import Path as PathParam
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse

from edgeota_contract.manifest import NAME_PATTERN, SEMVER_PATTERN, SHA256_PATTERN
from edgeota_contract.topics import DEVICE_ID_PATTERN
from ota_server.api.deps import AnyCaller, CtxDep, Viewer
from ota_server.api.upload import receive_to_file
from ota_server.core.problems import ApiError
from ota_server.services import samples as svc

router = APIRouter(prefix="/api/v1", tags=["samples"])


@router.post(
    "/devices/{device_id}/samples",
    status_code=201,
    openapi_extra={
        "requestBody": {
            "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
            "required": True,
        }
    },
)
async def upload_sample(
    request: Request, ctx: CtxDep, who: AnyCaller, device_id: str = PathParam(pattern=DEVICE_ID_PATTERN)
) -> Response:
    """Store one ``.npz`` of raw inputs from the calling device (201 new, 200 already stored).

    Only the device named in the path, authenticated by its own token, may upload (403 otherwise);
    bodies over the ``max_sample_bytes`` setting get 413, bad names or bodies 400/422, and nothing is stored.
    """
    if who.device_id is None or who.device_id != device_id:
        raise ApiError(403, "Forbidden", "only the device itself may upload its samples")
    assert ctx.limiter is not None
    if not ctx.limiter.allow(f"samples:{device_id}", time.monotonic()):
        raise ApiError(429, "Too Many Requests", "sample upload rate exceeded", headers={"Retry-After": "5"})
    name = request.headers.get(svc.SAMPLE_HEADER)
    limit = ctx.settings.max_sample_bytes

    def _origin() -> svc.SampleOrigin:
        with ctx.sessions() as session:
            return svc.resolve_origin(session, device_id, name)

    origin = await run_in_threadpool(_origin)
    ctx.settings.tmp_dir.mkdir(parents=True, exist_ok=True)
    tmp = ctx.settings.tmp_dir / f"sample-{uuid.uuid4().hex}.npz"
    try:
        await receive_to_file(
            request, tmp, limit, "sample", "empty body; send the sample .npz as application/octet-stream"
        )

        def _store() -> tuple[svc.SampleInfo, bool]:
            svc.check_npz(tmp, limit)
            return svc.store_sample(svc.samples_root(ctx.settings.data_dir), origin, tmp)

        info, created = await run_in_threadpool(_store)
    except ApiError as exc:
        ctx.metrics.inc(f"samples_refused_{exc.status}")
        raise
    finally:
        tmp.unlink(missing_ok=True)
    ctx.metrics.inc("samples_stored" if created else "samples_duplicate")
    return JSONResponse(info.to_json(), status_code=201 if created else 200)


@router.get("/samples")
def list_samples(
    ctx: CtxDep,
    _who: Viewer,
    model_name: str | None = Query(default=None, pattern=NAME_PATTERN),
    version: str | None = Query(default=None, pattern=SEMVER_PATTERN),
    profile: str | None = Query(default=None, pattern=NAME_PATTERN),
    device_id: str | None = Query(default=None, pattern=DEVICE_ID_PATTERN),
    limit: int = Query(default=1000, ge=1, le=100_000),
    offset: int = Query(default=0, ge=0, le=10_000_000),
) -> dict[str, Any]:
    """Samples matching the filters, oldest first: ``{count, samples: [...]}`` (count before paging)."""
    found = svc.list_samples(svc.samples_root(ctx.settings.data_dir), model_name, version, profile, device_id)
    return {"count": len(found), "samples": [s.to_json() for s in found[offset : offset + limit]]}


@router.get("/samples/archive", responses={200: {"content": {"application/x-tar": {}}}})
def export_archive(
    ctx: CtxDep,
    _who: Viewer,
    model_name: str = Query(pattern=NAME_PATTERN),
    version: str | None = Query(default=None, pattern=SEMVER_PATTERN),
    profile: str | None = Query(default=None, pattern=NAME_PATTERN),
    device_id: str | None = Query(default=None, pattern=DEVICE_ID_PATTERN),
) -> Response:
    """A tar of ``index.json`` plus every matching sample (at most ``MAX_ARCHIVE_SAMPLES``, else 422)."""
    root = svc.samples_root(ctx.settings.data_dir)
    found = svc.list_samples(root, model_name, version, profile, device_id)
    if len(found) > svc.MAX_ARCHIVE_SAMPLES:
        raise ApiError(422, "Unprocessable Content", f"{len(found)} samples; narrow the filters")
    index = json.dumps([s.to_json() for s in found], indent=1).encode()
    filename = f"samples-{model_name}{'-' + version if version else ''}.tar"
    return StreamingResponse(
        svc.archive_stream(root, found, index),
        media_type="application/x-tar",
        headers={"Content-Disposition": f'attachment; filename="{filename}"'},
    )


@router.get(
    "/samples/{model_name}/{version}/{profile}/{device_id}/{sha256}",
    responses={200: {"content": {"application/octet-stream": {}}}},
)
def download_sample(
    ctx: CtxDep,
    _who: Viewer,
    model_name: str = PathParam(pattern=NAME_PATTERN),
    version: str = PathParam(pattern=SEMVER_PATTERN),
    profile: str = PathParam(pattern=NAME_PATTERN),
    device_id: str = PathParam(pattern=DEVICE_ID_PATTERN),
    sha256: str = PathParam(pattern=SHA256_PATTERN),
) -> Response:
    """One stored sample, as uploaded (``.npz``)."""
    path = svc.sample_path(svc.samples_root(ctx.settings.data_dir), model_name, version, profile, device_id, sha256)
    return FileResponse(path, media_type="application/octet-stream", filename=f"{sha256}.npz")
