"""Raw-input samples uploaded by devices for retraining: validation, storage, listing, export.

Layout: ``data_dir/samples/<model>/<version>/<profile>/<device>/<sha256>.npz``. Every path segment
is checked against the contract's name/version/device-id patterns, so no segment can climb out of
the folder. A sample is named by its content digest, so a re-sent upload (the agent retries when an
answer is lost) stores nothing twice. Files appear by atomic rename only after validation, so a
refused or interrupted upload leaves nothing behind.

Identity (device, and so the hardware profile) comes from the device token; the model and version
are the device's claim in the ``X-Edgeota-Sample`` file name, accepted only when they name a stored
bundle for the device's profile.
"""

from __future__ import annotations

import hashlib
import os
import re
import tarfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from edgeota_contract.manifest import NAME_PATTERN, SEMVER_PATTERN
from edgeota_contract.topics import DEVICE_ID_PATTERN
from ota_server.core.problems import ApiError
from ota_server.models import Bundle, Device

MAX_ARCHIVE_SAMPLES = 10_000
SAMPLE_HEADER = "x-edgeota-sample"
# The agent names files "<time_ns>-<model>-<version>-<first 12 hex of the bundle digest>.npz".
_AGENT_NAME = re.compile(r"^(\d{1,24})-(.{3,200})-([0-9a-f]{12})\.npz$")
_SHA_FILE = re.compile(r"^[0-9a-f]{64}\.npz$")
_SEGMENTS = (NAME_PATTERN, SEMVER_PATTERN, NAME_PATTERN, DEVICE_ID_PATTERN)


@dataclass(frozen=True)
class SampleOrigin:
    """What an uploaded sample belongs to (device and profile from the token, model from a stored bundle)."""

    device_id: str
    hardware_profile: str
    model_name: str
    version: str
    bundle_sha256: str


@dataclass(frozen=True)
class SampleInfo:
    model_name: str
    version: str
    hardware_profile: str
    device_id: str
    sha256: str
    size: int
    received_at: datetime

    @property
    def id(self) -> str:
        """Stable id, also the download path under ``/api/v1/samples/``."""
        return f"{self.model_name}/{self.version}/{self.hardware_profile}/{self.device_id}/{self.sha256}"

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "model_name": self.model_name,
            "version": self.version,
            "hardware_profile": self.hardware_profile,
            "device_id": self.device_id,
            "sha256": self.sha256,
            "size": self.size,
            "received_at": self.received_at.isoformat(),
            "download_url": f"/api/v1/samples/{self.id}",
        }


def samples_root(data_dir: Path) -> Path:
    return data_dir / "samples"


def resolve_origin(session: Session, device_id: str, sample_name: str | None) -> SampleOrigin:
    """Match the agent's sample file name to a stored bundle for the calling device's profile.

    Raises:
        ApiError: 400 when the name is missing or not the agent's shape, 404 for an unknown device,
            422 when it names no stored bundle of the device's hardware profile.
    """
    match = _AGENT_NAME.match(sample_name or "")
    if match is None:
        raise ApiError(400, "Bad Request", "X-Edgeota-Sample must be <time>-<model>-<version>-<sha12>.npz")
    device = session.get(Device, device_id)
    if device is None:
        raise ApiError(404, "Not Found", f"device {device_id} not found")
    model_version, prefix = match.group(2), match.group(3)
    for bundle in session.scalars(select(Bundle).where(Bundle.sha256.like(f"{prefix}%"))):
        same_model = f"{bundle.model_name}-{bundle.version}" == model_version
        if same_model and bundle.hardware_profile == device.hardware_profile:
            return SampleOrigin(device_id, device.hardware_profile, bundle.model_name, bundle.version, bundle.sha256)
    raise ApiError(422, "Unprocessable Content", f"{sample_name} names no bundle for profile {device.hardware_profile}")


def check_npz(path: Path, limit: int) -> None:
    """Refuse anything but an ``.npz`` (zip of ``.npy`` members) whose content stays within ``4*limit``.

    Raises:
        ApiError(400): not a readable zip, a member is not ``.npy``, or it inflates too far.
    """
    try:
        with zipfile.ZipFile(path) as zf:
            infos = zf.infolist()
            if not infos or any(not i.filename.endswith(".npy") or "/" in i.filename for i in infos):
                raise ApiError(400, "Bad Request", "body must be an .npz of .npy arrays")
            if sum(i.file_size for i in infos) > 4 * limit:
                raise ApiError(400, "Bad Request", "sample arrays inflate beyond the size limit")
            bad = zf.testzip()
    except (zipfile.BadZipFile, OSError, ValueError, EOFError, NotImplementedError) as exc:
        raise ApiError(400, "Bad Request", f"body is not a valid .npz: {exc}") from exc
    if bad is not None:
        raise ApiError(400, "Bad Request", f"corrupt member {bad} in .npz")


def store_sample(root: Path, origin: SampleOrigin, tmp: Path) -> tuple[SampleInfo, bool]:
    """Move the validated file ``tmp`` into place by atomic rename; returns (info, newly stored).

    ``tmp`` must be on the same file system as ``root`` and is consumed (moved or deleted).
    """
    digest = hashlib.sha256()
    with open(tmp, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
        os.fsync(fh.fileno())
    sha = digest.hexdigest()
    folder = root / origin.model_name / origin.version / origin.hardware_profile / origin.device_id
    dest = folder / f"{sha}.npz"
    created = not dest.exists()
    if created:
        folder.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, dest)
    else:
        tmp.unlink(missing_ok=True)
    return _info(dest), created


def _info(path: Path) -> SampleInfo:
    model, version, profile, device = path.parts[-5:-1]
    stat = path.stat()
    return SampleInfo(
        model, version, profile, device, path.stem, stat.st_size, datetime.fromtimestamp(stat.st_mtime, UTC)
    )


def _pick(value: str | None) -> str:
    return "*" if value is None else value


def list_samples(
    root: Path,
    model_name: str | None = None,
    version: str | None = None,
    profile: str | None = None,
    device_id: str | None = None,
) -> list[SampleInfo]:
    """Stored samples matching every given filter, oldest first. Filters must already be pattern-checked."""
    if not root.is_dir():
        return []
    pattern = "/".join([_pick(model_name), _pick(version), _pick(profile), _pick(device_id), "*.npz"])
    out = []
    for path in root.glob(pattern):
        if _SHA_FILE.match(path.name) and path.is_file():
            try:
                out.append(_info(path))
            except OSError:
                continue  # removed while listing
    out.sort(key=lambda s: (s.received_at, s.id))
    return out


def sample_path(root: Path, model_name: str, version: str, profile: str, device_id: str, sha256: str) -> Path:
    """The file of one sample. Raises ApiError(404) when absent or a segment has a bad shape."""
    for value, pattern in zip((model_name, version, profile, device_id), _SEGMENTS, strict=True):
        if not re.match(pattern, value):
            raise ApiError(404, "Not Found", "no such sample")
    path = root / model_name / version / profile / device_id / f"{sha256}.npz"
    if not _SHA_FILE.match(path.name) or not path.is_file():
        raise ApiError(404, "Not Found", "no such sample")
    return path


def _pad(size: int) -> bytes:
    return b"\0" * (-size % tarfile.BLOCKSIZE)


def archive_stream(root: Path, samples: list[SampleInfo], index: bytes) -> Iterator[bytes]:
    """A POSIX tar, streamed: ``index.json`` (``index``) then each sample as ``<id>.npz``.

    A sample deleted while streaming is skipped (its index entry stays).
    """
    entries: list[tuple[str, Path | None]] = [("index.json", None)]
    entries += [(f"{s.id}.npz", root / f"{s.id}.npz") for s in samples]
    for name, path in entries:
        try:
            data = index if path is None else path.read_bytes()
        except OSError:
            continue
        info = tarfile.TarInfo(name)
        info.size, info.mode, info.mtime = len(data), 0o644, 0
        yield info.tobuf(format=tarfile.PAX_FORMAT)
        yield data
        yield _pad(len(data))
    yield b"\0" * (2 * tarfile.BLOCKSIZE)
