"""JSON documents inside stored bundles (reference statistics, confidence calibration), read once per bundle.

Bundles are immutable (content-addressed), so a document read from one never changes: it is cached per (bundle
sha256, file name), at most :data:`CACHE_MAX` entries (cleared whole when full).
"""

from __future__ import annotations

import json
import tarfile
from typing import TypeVar

from pydantic import BaseModel, ValidationError

from ota_server.artifacts import ArtifactStore

CACHE_MAX = 256
Doc = TypeVar("Doc", bound=BaseModel)
_CACHE: dict[tuple[str, str], BaseModel | None] = {}


def bundle_document(store: ArtifactStore, sha256: str, member: str, model: type[Doc]) -> Doc | None:
    """The file ``member`` of a stored bundle as ``model``; None when the bundle is not stored, the file is absent,
    or it does not read or validate (never raises for those)."""
    key = (sha256, member)
    if key not in _CACHE:
        doc: BaseModel | None = None
        try:
            with tarfile.open(store.local_path(sha256), mode="r:") as tar:
                file = tar.extractfile(member)
                if file is not None:
                    doc = model.model_validate(json.loads(file.read()))
        except (OSError, KeyError, tarfile.TarError, ValueError, ValidationError):
            doc = None
        if len(_CACHE) >= CACHE_MAX:
            _CACHE.clear()
        _CACHE[key] = doc
    cached = _CACHE[key]
    return cached if isinstance(cached, model) else None
