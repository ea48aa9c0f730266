"""Bundles in an S3-compatible object store (AWS S3, MinIO, Ceph RGW, ...), with a local read cache.

Objects are named ``<prefix><sha256>``; S3 makes an object visible only once its upload completed, so
readers never see half a bundle (the interface's atomic ``put``). Devices download from the store itself:
:meth:`S3ArtifactStore.redirect_url` gives a presigned GET URL (valid ``presign_seconds``), which the
download route answers with a 307; the agent follows it, sends its Range header for a resumed download,
and never sends its device token there (it keeps it for the server's own origin). The bundle's
authenticity never rests on the store: the device checks the signed sha256 as before.

The server itself reads some bundles (reference statistics for drift gates, the TUF targets): those go
through :meth:`local_path`, which keeps a copy under ``cache_dir`` (written by rename).

Errors: a missing bucket or refused credentials at start raise :class:`ArtifactStoreError` (one line); a
blob that is absent raises ``FileNotFoundError`` like the local store.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ota_server.artifacts import ArtifactStore

_SHA256 = re.compile(r"^[0-9a-f]{64}$")


class ArtifactStoreError(Exception):
    """The object store cannot be used (no bucket, refused credentials, unreachable endpoint)."""


@dataclass(frozen=True)
class S3Config:
    bucket: str
    prefix: str = "bundles/"
    endpoint_url: str | None = None
    region: str = "us-east-1"
    access_key_id: str | None = None
    secret_access_key: str | None = None
    presign_seconds: int = 900
    redirect_downloads: bool = True


class S3ArtifactStore(ArtifactStore):
    """See the module docstring. Thread-safe (boto3 clients are; the caches take a lock)."""

    def __init__(self, config: S3Config, cache_dir: Path, client: Any | None = None) -> None:
        self.config = config
        self.cache_dir = cache_dir
        cache_dir.mkdir(parents=True, exist_ok=True)
        self._client = client if client is not None else _make_client(config)
        self._sizes: dict[str, int] = {}  # blobs are immutable: a size seen once stays true until delete
        self._lock = threading.Lock()
        self._check_bucket()

    def _check_bucket(self) -> None:
        from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

        try:
            self._client.head_bucket(Bucket=self.config.bucket)
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "?")
            raise ArtifactStoreError(f"S3 bucket {self.config.bucket!r} is not usable ({code})") from exc
        except NoCredentialsError as exc:
            raise ArtifactStoreError(
                "no S3 credentials: set s3_access_key_id and s3_secret_access_key, or AWS_* variables or a profile"
            ) from exc
        except BotoCoreError as exc:
            raise ArtifactStoreError(f"S3 store not usable: {exc}") from exc

    def _key(self, sha256: str) -> str:
        if not _SHA256.match(sha256):
            raise FileNotFoundError(sha256)
        return f"{self.config.prefix}{sha256}"

    def _cache_path(self, sha256: str) -> Path:
        return self.cache_dir / sha256[:2] / sha256

    def put_file(self, sha256: str, source: Path) -> None:
        key = self._key(sha256)
        if not self.exists(sha256):
            self._client.upload_file(str(source), self.config.bucket, key)
        size = source.stat().st_size
        dest = self._cache_path(sha256)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{sha256}.tmp-{os.getpid()}-{threading.get_ident()}")
        shutil.move(str(source), tmp)
        os.replace(tmp, dest)
        with self._lock:
            self._sizes[sha256] = size

    def _head(self, sha256: str) -> int | None:
        from botocore.exceptions import ClientError

        with self._lock:
            if sha256 in self._sizes:
                return self._sizes[sha256]
        try:
            head = self._client.head_object(Bucket=self.config.bucket, Key=self._key(sha256))
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return None
            raise
        size = int(head["ContentLength"])
        with self._lock:
            self._sizes[sha256] = size
        return size

    def exists(self, sha256: str) -> bool:
        try:
            return self._head(sha256) is not None
        except FileNotFoundError:
            return False

    def size(self, sha256: str) -> int:
        size = self._head(sha256)
        if size is None:
            raise FileNotFoundError(sha256)
        return size

    def local_path(self, sha256: str) -> Path:
        path = self._cache_path(sha256)
        if path.is_file():
            return path
        if not self.exists(sha256):
            raise FileNotFoundError(sha256)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{sha256}.dl-{os.getpid()}-{threading.get_ident()}")
        self._client.download_file(self.config.bucket, self._key(sha256), str(tmp))
        os.replace(tmp, path)
        return path

    def delete(self, sha256: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self._client.delete_object(Bucket=self.config.bucket, Key=self._key(sha256))
            self._cache_path(sha256).unlink(missing_ok=True)
        with self._lock:
            self._sizes.pop(sha256, None)

    def redirect_url(self, sha256: str) -> str | None:
        if not self.config.redirect_downloads:
            return None
        url: str = self._client.generate_presigned_url(
            "get_object",
            Params={"Bucket": self.config.bucket, "Key": self._key(sha256)},
            ExpiresIn=self.config.presign_seconds,
        )
        return url


def _make_client(config: S3Config) -> Any:
    try:
        import boto3
        from botocore.config import Config
    except ImportError as exc:  # the [s3] extra is not installed
        raise ArtifactStoreError("artifact_store = 's3' needs boto3: pip install 'edgeota[s3]'") from exc
    kwargs: dict[str, Any] = {"region_name": config.region, "endpoint_url": config.endpoint_url}
    if config.access_key_id and config.secret_access_key:
        kwargs["aws_access_key_id"] = config.access_key_id
        kwargs["aws_secret_access_key"] = config.secret_access_key
    # Path-style addressing works with every S3-compatible server (MinIO, moto, Ceph), not only AWS.
    boto_config = Config(s3={"addressing_style": "path"}, retries={"max_attempts": 3, "mode": "standard"})
    return boto3.client("s3", config=boto_config, **kwargs)
