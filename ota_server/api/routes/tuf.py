"""TUF metadata, read-only and without authentication (devices verify it against their trusted root)."""

from __future__ import annotations

from fastapi import APIRouter, Response
from fastapi import Path as PathParam

from ota_server.api.deps import CtxDep
from ota_server.api.responses import TUF_METADATA
from ota_server.errors import NotFound
from ota_server.tuf_repo import METADATA_NAME

router = APIRouter(tags=["tuf"])


@router.get(
    "/tuf/{filename}",
    response_class=Response,
    # Served byte for byte as signed (re-encoding would break the signatures): only its envelope is described.
    responses={
        200: {"content": {"application/json": {"schema": TUF_METADATA}}, "description": "one TUF metadata file"}
    },
)
def tuf_metadata(ctx: CtxDep, filename: str = PathParam(pattern=METADATA_NAME.pattern, max_length=64)) -> Response:
    """``N.root.json``, ``timestamp.json``, ``N.snapshot.json`` or ``N.targets.json`` as written by the repository."""
    if ctx.tuf is None:
        raise NotFound("this server has no TUF repository (tuf_enabled is false)")
    try:
        data = ctx.tuf.read_metadata(filename)
    except (FileNotFoundError, ValueError):
        raise NotFound(f"no TUF metadata {filename}") from None
    # Never cached by intermediaries: a stale timestamp is exactly what clients must not be served.
    return Response(data, media_type="application/json", headers={"Cache-Control": "no-store"})
