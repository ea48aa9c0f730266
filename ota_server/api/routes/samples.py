"""Raw-input sample upload (device token) and export for ML engineers (viewer and up), files or a Parquet dataset."""

from __future__ import annotations

import json
import shutil
import time
import uuid
from datetime import UTC, datetime
from typing import Any

from fastapi import APIRouter, Query, Request, Response
from fastapi import Path as PathParam
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator

from edgeota_contract.errors import EdgeotaError
from edgeota_contract.manifest import NAME_PATTERN, SEMVER_PATTERN, SHA256_PATTERN
from edgeota_contract.topics import DEVICE_ID_PATTERN
from ota_server.api.deps import AnyCaller, CtxDep, Viewer
from ota_server.api.responses import BINARY, SampleList, SampleRecord, binary_content
from ota_server.api.upload import receive_to_file
from ota_server.core.problems import status_of
from ota_server.errors import InvalidRequest, PermissionDenied, RateLimited
from ota_server.services import datasets
from ota_server.services import samples as svc

router = APIRouter(prefix="/api/v1", tags=["samples"])


@router.post(
    "/devices/{device_id}/samples",
    status_code=201,
    response_model=SampleRecord,
    responses={200: {"model": SampleRecord, "description": "this sample was already stored"}},
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
        raise PermissionDenied("only the device itself may upload its samples")
    assert ctx.limiter is not None
    if not ctx.limiter.allow(f"samples:{device_id}", time.monotonic()):
        raise RateLimited("sample upload rate exceeded", retry_after=5)
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
            meta = svc.read_meta(tmp, origin, datetime.now(UTC))
            info, created = svc.store_sample(svc.samples_root(ctx.settings.data_dir), origin, tmp)
            with ctx.sessions() as session:
                svc.record_sample(session, origin, info, meta)
            return info, created

        info, created = await run_in_threadpool(_store)
    except EdgeotaError as exc:
        ctx.metrics.inc(f"samples_refused_{status_of(exc)}")
        raise
    finally:
        tmp.unlink(missing_ok=True)
    ctx.metrics.inc("samples_stored" if created else "samples_duplicate")
    return JSONResponse(info.to_json(), status_code=201 if created else 200)


@router.get("/samples", response_model=SampleList)
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


@router.get(
    "/samples/archive",
    response_class=Response,
    responses={
        200: {"description": "a tar of index.json and the samples", "content": binary_content("application/x-tar")}
    },
)
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
        raise InvalidRequest(f"{len(found)} samples; narrow the filters")
    index = json.dumps([s.to_json() for s in found], indent=1).encode()
    filename = f"samples-{model_name}{'-' + version if version else ''}.tar"
    return StreamingResponse(
        svc.archive_stream(root, found, index),
        media_type="application/x-tar",
        headers={"Content-Disposition": f'attachment; filename="{filename}"'},
    )


@router.get(
    "/samples/{model_name}/{version}/{profile}/{device_id}/{sha256}",
    response_class=Response,
    responses={200: {"description": "the sample (.npz)", "content": BINARY}},
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


MAX_DRIFT_REPORT_BYTES = 1 << 20


class DatasetExportBody(BaseModel):
    """``POST /api/v1/datasets/export``: which samples, and why the export is made."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    model_name: str = Field(pattern=NAME_PATTERN)
    version: str | None = Field(default=None, pattern=SEMVER_PATTERN)
    profile: str | None = Field(default=None, pattern=NAME_PATTERN)
    since: datetime | None = Field(default=None, description="samples received at or after (ISO 8601)")
    until: datetime | None = Field(default=None, description="samples received at or before (ISO 8601)")
    cohort_label: str | None = Field(
        default=None,
        min_length=1,
        max_length=64,
        description="device label of the cohort partition; default: the server's telemetry_cohort_label, else 'cohort'",
    )
    trigger: str = Field(default="manual", pattern=datasets.TRIGGER_PATTERN, description="manual, alert:<id>, ...")
    parent_release: str | None = Field(default=None, min_length=1, max_length=32)
    drift_report: dict[str, Any] | None = Field(default=None, description="the drift report behind the export")

    @field_validator("drift_report")
    @classmethod
    def _small_report(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is not None and len(json.dumps(value)) > MAX_DRIFT_REPORT_BYTES:
            raise ValueError(f"drift_report is larger than {MAX_DRIFT_REPORT_BYTES} bytes")
        return value

    @field_validator("since", "until")
    @classmethod
    def _aware(cls, value: datetime | None) -> datetime | None:
        if value is not None and value.tzinfo is None:
            raise ValueError("give a time zone (e.g. Z)")
        return value


@router.post(
    "/datasets/export",
    response_class=Response,
    responses={
        200: {
            "description": "a tar of _manifest.json and the Parquet partitions (release=<id>/cohort=<value>/...)",
            "content": binary_content("application/x-tar"),
        }
    },
)
def export_dataset(body: DatasetExportBody, ctx: CtxDep, _who: Viewer) -> Response:
    """The matching samples as a Parquet dataset, partitioned by release and cohort, with a manifest
    (:mod:`ota_server.services.datasets` states the layout); 404 for an unknown parent release, 422 for
    bad parameters or too many samples."""
    query = datasets.ExportQuery(
        model_name=body.model_name,
        version=body.version,
        profile=body.profile,
        since=body.since,
        until=body.until,
        cohort_label=body.cohort_label or ctx.settings.telemetry_cohort_label or "cohort",
        trigger=body.trigger,
        parent_release=body.parent_release,
        drift_report=body.drift_report,
    )
    work = ctx.settings.tmp_dir / f"dataset-{uuid.uuid4().hex}"
    work.mkdir(parents=True)
    try:
        with ctx.sessions() as session:
            manifest = datasets.export_dataset(session, svc.samples_root(ctx.settings.data_dir), query, work)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    ctx.metrics.inc("dataset_exports")
    return StreamingResponse(
        datasets.tar_stream(work, manifest),
        media_type="application/x-tar",
        headers={
            "Content-Disposition": f'attachment; filename="dataset-{body.model_name}.tar"',
            "X-Edgeota-Dataset-Digest": manifest["digest"]["value"],
        },
    )
