"""Streaming request bodies to disk with a size cap (bundle uploads, device samples)."""

from __future__ import annotations

from pathlib import Path

from fastapi import Request

from ota_server.errors import MalformedInput, TooLarge


async def receive_to_file(request: Request, dest: Path, limit: int, what: str, empty_detail: str) -> int:
    """Stream the body into ``dest`` and return its size.

    Raises:
        TooLarge: as soon as the body (or its declared length) passes ``limit``.
        MalformedInput: the body is empty.
        The caller removes ``dest`` on any error.
    """
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise TooLarge(f"{what} exceeds the {limit} byte limit")
    size = 0
    with open(dest, "wb") as fh:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise TooLarge(f"{what} exceeds the {limit} byte limit")
            fh.write(chunk)
    if size == 0:
        raise MalformedInput(empty_detail)
    return size
