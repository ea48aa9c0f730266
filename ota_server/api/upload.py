"""Streaming request bodies to disk with a size cap (bundle uploads, device samples)."""

from __future__ import annotations

from pathlib import Path

from fastapi import Request

from ota_server.core.problems import ApiError


async def receive_to_file(request: Request, dest: Path, limit: int, what: str, empty_detail: str) -> int:
    """Stream the body into ``dest`` and return its size.

    Raises:
        ApiError: 413 as soon as the body (or its declared length) passes ``limit``; 400 if empty.
        The caller removes ``dest`` on any error.
    """
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, "Content Too Large", f"{what} exceeds the {limit} byte limit")
    size = 0
    with open(dest, "wb") as fh:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise ApiError(413, "Content Too Large", f"{what} exceeds the {limit} byte limit")
            fh.write(chunk)
    if size == 0:
        raise ApiError(400, "Bad Request", empty_detail)
    return size
