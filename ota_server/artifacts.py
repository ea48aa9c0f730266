"""Content-addressed bundle storage behind a small interface: a local folder (the default) or an
S3-compatible object store (:mod:`ota_server.artifacts_s3`)."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
from abc import ABC, abstractmethod
from pathlib import Path

_SHA256 = re.compile(r"^[0-9a-f]{64}$")


class ArtifactStore(ABC):
    """Stores immutable blobs by their sha256. Implementations must make ``put`` atomic."""

    @abstractmethod
    def put_file(self, sha256: str, source: Path) -> None:
        """Move ``source`` (already verified to hash to ``sha256``) into the store."""

    @abstractmethod
    def exists(self, sha256: str) -> bool: ...

    @abstractmethod
    def size(self, sha256: str) -> int: ...

    @abstractmethod
    def local_path(self, sha256: str) -> Path:
        """A readable local path for the blob; raises FileNotFoundError when absent."""

    @abstractmethod
    def delete(self, sha256: str) -> None: ...

    def redirect_url(self, sha256: str) -> str | None:
        """A URL devices may download the blob from instead of the server (e.g. presigned), or None."""
        return None


class LocalArtifactStore(ArtifactStore):
    """Blobs under ``root/ab/abcdef...``, written by rename so readers never see half a file."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)

    def _path(self, sha256: str) -> Path:
        if not _SHA256.match(sha256):
            raise FileNotFoundError(sha256)
        return self.root / sha256[:2] / sha256

    def put_file(self, sha256: str, source: Path) -> None:
        dest = self._path(sha256)
        if dest.exists():
            source.unlink(missing_ok=True)
            return
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{sha256}.tmp-{os.getpid()}")
        shutil.move(str(source), tmp)
        os.replace(tmp, dest)

    def exists(self, sha256: str) -> bool:
        try:
            return self._path(sha256).is_file()
        except FileNotFoundError:
            return False

    def size(self, sha256: str) -> int:
        return self.local_path(sha256).stat().st_size

    def local_path(self, sha256: str) -> Path:
        path = self._path(sha256)
        if not path.is_file():
            raise FileNotFoundError(sha256)
        return path

    def delete(self, sha256: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self._path(sha256).unlink(missing_ok=True)
