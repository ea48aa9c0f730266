"""TUF metadata, read-only and without authentication (devices verify it against their trusted root)."""

from __future__ import annotations

from fastapi import APIRouter, Response
from fastapi import Path as PathParam

from ota_server.api.deps import CtxDep
from ota_server.core.problems import ApiError
from ota_server.tuf_repo import METADATA_NAME

router = APIRouter(tags=["tuf"])


@router.get(
    "/tuf/{filename}",
    responses={200: {"content": {"application/json": {}}, "description": "one TUF metadata file"}, 404: {}},
)
def tuf_metadata(ctx: CtxDep, filename: str = PathParam(pattern=METADATA_NAME.pattern, max_length=64)) -> Response:
    """``N.root.json``, ``timestamp.json``, ``N.snapshot.json`` or ``N.targets.json`` as written by the repository."""
    if ctx.tuf is None:
        raise ApiError(404, "Not Found", "this server has no TUF repository (tuf_enabled is false)")
    try:
        data = ctx.tuf.read_metadata(filename)
    except (FileNotFoundError, ValueError):
        raise ApiError(404, "Not Found", f"no TUF metadata {filename}") from None
    # Never cached by intermediaries: a stale timestamp is exactly what clients must not be served.
    return Response(data, media_type="application/json", headers={"Cache-Control": "no-store"})
