"""Raw-input samples uploaded by devices for retraining: validation, storage, listing, export.

Layout: ``data_dir/samples/<model>/<version>/<profile>/<device>/<sha256>.npz``. Every path segment
is checked against the contract's name/version/device-id patterns, so no segment can climb out of
the folder. A sample is named by its content digest, so a re-sent upload (the agent retries when an
answer is lost) stores nothing twice. Files appear by atomic rename only after validation, so a
refused or interrupted upload leaves nothing behind.

Identity (device, and so the hardware profile) comes from the device token; the model and version
are the device's claim in the ``X-Edgeota-Sample`` file name, accepted only when they name a stored
bundle for the device's profile.

Metadata: the agent writes ``meta.*`` arrays into the ``.npz`` (:func:`read_meta` states them): the
sampling stream, per-row predictions and confidences, the device's time. They are checked strictly
before anything is stored and kept as one ``samples`` row per file (:func:`record_sample`), so the
content digest covers them too. A file without any ``meta.*`` member (an agent from before the
streams) is a ``uniform`` sample without predictions.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
import tarfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from edgeota_contract.manifest import NAME_PATTERN, SEMVER_PATTERN
from edgeota_contract.topics import DEVICE_ID_PATTERN
from ota_server.errors import InvalidRequest, MalformedInput, NotFound
from ota_server.models import Bundle, Device, StoredSample
from ota_server.services.feedback import prediction_ref

MAX_ARCHIVE_SAMPLES = 10_000
SAMPLE_HEADER = "x-edgeota-sample"
# The agent names files "<time_ns>-<model>-<version>-<first 12 hex of the bundle digest>.npz".
_AGENT_NAME = re.compile(r"^(\d{1,24})-(.{3,200})-([0-9a-f]{12})\.npz$")
_SHA_FILE = re.compile(r"^[0-9a-f]{64}\.npz$")
_SEGMENTS = (NAME_PATTERN, SEMVER_PATTERN, NAME_PATTERN, DEVICE_ID_PATTERN)
STREAMS = ("uniform", "hard")
HARD_REASONS = ("low_confidence", "shadow_disagreement")
MAX_SAMPLE_ROWS = 100_000
_META_KEYS = frozenset(
    {"stream", "time_ns", "model_name", "version", "bundle_sha256", "prediction", "confidence", "reason"}
    | {"prediction_id", "request_row"}  # the request's prediction id: joins the sample with feedback labels
)
_EARLIEST = datetime(2000, 1, 1, tzinfo=UTC)
_CLOCK_SLACK = timedelta(days=1)


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
        MalformedInput: the name is missing or not the agent's shape.
        NotFound: unknown device.
        InvalidRequest: the name names no stored bundle of the device's hardware profile.
    """
    match = _AGENT_NAME.match(sample_name or "")
    if match is None:
        raise MalformedInput("X-Edgeota-Sample must be <time>-<model>-<version>-<sha12>.npz")
    device = session.get(Device, device_id)
    if device is None:
        raise NotFound(f"device {device_id} not found")
    model_version, prefix = match.group(2), match.group(3)
    for bundle in session.scalars(select(Bundle).where(Bundle.sha256.like(f"{prefix}%"))):
        same_model = f"{bundle.model_name}-{bundle.version}" == model_version
        if same_model and bundle.hardware_profile == device.hardware_profile:
            return SampleOrigin(device_id, device.hardware_profile, bundle.model_name, bundle.version, bundle.sha256)
    raise InvalidRequest(f"{sample_name} names no bundle for profile {device.hardware_profile}")


def check_npz(path: Path, limit: int) -> None:
    """Refuse anything but an ``.npz`` (zip of ``.npy`` members) whose content stays within ``4*limit``.

    Raises:
        MalformedInput: not a readable zip, a member is not ``.npy``, or it inflates too far.
    """
    try:
        with zipfile.ZipFile(path) as zf:
            infos = zf.infolist()
            if not infos or any(not i.filename.endswith(".npy") or "/" in i.filename for i in infos):
                raise MalformedInput("body must be an .npz of .npy arrays")
            if sum(i.file_size for i in infos) > 4 * limit:
                raise MalformedInput("sample arrays inflate beyond the size limit")
            bad = zf.testzip()
    except (zipfile.BadZipFile, OSError, ValueError, EOFError, NotImplementedError) as exc:
        raise MalformedInput(f"body is not a valid .npz: {exc}") from exc
    if bad is not None:
        raise MalformedInput(f"corrupt member {bad} in .npz")


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
    """The file of one sample. Raises NotFound when absent or a segment has a bad shape."""
    for value, pattern in zip((model_name, version, profile, device_id), _SEGMENTS, strict=True):
        if not re.match(pattern, value):
            raise NotFound("no such sample")
    path = root / model_name / version / profile / device_id / f"{sha256}.npz"
    if not _SHA_FILE.match(path.name) or not path.is_file():
        raise NotFound("no such sample")
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


@dataclass(frozen=True)
class SampleMeta:
    """What a sample's ``meta.*`` arrays say, checked (see :func:`read_meta`)."""

    stream: str
    rows: int
    reason: str | None = None
    predictions: list[int] | None = None
    confidences: list[float | None] | None = None
    sampled_at: datetime | None = None
    prediction_id: str | None = None
    request_rows: list[int] | None = None


def _text(value: np.ndarray, name: str) -> str:
    if value.shape != () or value.dtype.kind != "U":
        raise InvalidRequest(f"{name} must be a single string")
    return str(value[()])


def _leading_rows(inputs: dict[str, np.ndarray]) -> int:
    """The rows a sample without predictions holds: the shared leading dimension of its inputs, else 1."""
    firsts = {v.shape[0] for v in inputs.values() if v.ndim > 0}
    if len(firsts) == 1 and all(v.ndim > 0 for v in inputs.values()):
        return max(1, int(firsts.pop()))
    return 1


def read_meta(path: Path, origin: SampleOrigin, now: datetime) -> SampleMeta:
    """Read and check the metadata of the validated ``.npz`` at ``path`` (after :func:`check_npz`).

    Members: ``in.<name>`` (inputs; at least one when metadata is present) and ``meta.stream``
    (``uniform`` | ``hard``), ``meta.time_ns`` (int, the device's clock, from 2000 to a day past ``now``),
    optional ``meta.model_name``/``meta.version``/``meta.bundle_sha256`` (must name ``origin``), optional
    ``meta.prediction`` (int >= 0 per row) with ``meta.confidence`` (float in [0, 1] or NaN per row, the same
    length, and every input with that many leading rows), ``meta.reason`` (hard only, required there:
    ``low_confidence`` | ``shadow_disagreement``). The hard stream needs predictions. Optional
    ``meta.prediction_id`` and ``meta.request_row``: :func:`ota_server.services.feedback.prediction_ref`.

    Raises:
        MalformedInput: an array cannot be read without pickle, or an unknown ``meta.*`` member.
        InvalidRequest: a value out of its range, a missing member, or a claim about another bundle.
    """
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {name: npz[name] for name in npz.files}
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:
        raise MalformedInput(f"sample arrays cannot be read: {exc}") from exc
    meta = {k.removeprefix("meta."): v for k, v in arrays.items() if k.startswith("meta.")}
    inputs = {k: v for k, v in arrays.items() if k.startswith("in.")}
    if not meta:
        return SampleMeta("uniform", _leading_rows(inputs))
    unknown = sorted(set(meta) - _META_KEYS)
    if unknown:
        raise MalformedInput(f"unknown sample metadata: {', '.join('meta.' + k for k in unknown)}")
    if not inputs:
        raise InvalidRequest("sample holds no in.<name> input arrays")
    for key in ("stream", "time_ns"):
        if key not in meta:
            raise InvalidRequest(f"meta.{key} is missing")
    stream = _text(meta["stream"], "meta.stream")
    if stream not in STREAMS:
        raise InvalidRequest(f"meta.stream must be one of {', '.join(STREAMS)}")
    claims = {"model_name": origin.model_name, "version": origin.version, "bundle_sha256": origin.bundle_sha256}
    for key, expected in claims.items():
        if key in meta and _text(meta[key], f"meta.{key}") != expected:
            raise InvalidRequest(f"meta.{key} does not match the sample's bundle")
    stamp = meta["time_ns"]
    if stamp.shape != () or stamp.dtype.kind not in "iu":
        raise InvalidRequest("meta.time_ns must be one integer")
    ns = int(stamp)
    if not int(_EARLIEST.timestamp()) * 10**9 <= ns <= int((now + _CLOCK_SLACK).timestamp()) * 10**9:
        raise InvalidRequest("meta.time_ns is out of range")
    sampled_at = datetime(1970, 1, 1, tzinfo=UTC) + timedelta(microseconds=ns // 1000)
    reason = _text(meta["reason"], "meta.reason") if "reason" in meta else None
    if stream == "hard" and reason not in HARD_REASONS:
        raise InvalidRequest(f"a hard sample needs meta.reason, one of {', '.join(HARD_REASONS)}")
    if stream == "uniform" and reason is not None:
        raise InvalidRequest("meta.reason is for hard samples only")
    if ("prediction" in meta) != ("confidence" in meta):
        raise InvalidRequest("meta.prediction and meta.confidence come together")
    if "prediction" not in meta:
        if stream == "hard":
            raise InvalidRequest("a hard sample needs meta.prediction and meta.confidence")
        n = _leading_rows(inputs)
        return SampleMeta(stream, n, reason, sampled_at=sampled_at, **prediction_ref(meta, n))
    pred, conf = meta["prediction"], meta["confidence"]
    rows = pred.shape[0] if pred.ndim == 1 else 0
    if pred.ndim != 1 or pred.dtype.kind not in "iu" or not 1 <= rows <= MAX_SAMPLE_ROWS:
        raise InvalidRequest(f"meta.prediction must be 1 to {MAX_SAMPLE_ROWS} integers")
    if conf.shape != pred.shape or conf.dtype.kind != "f":
        raise InvalidRequest("meta.confidence must be one float per meta.prediction row")
    if (pred < 0).any():
        raise InvalidRequest("meta.prediction holds a negative class")
    known = conf[~np.isnan(conf)]
    if ((known < 0) | (known > 1)).any():  # inf lands here too
        raise InvalidRequest("meta.confidence must lie in [0, 1] (NaN: unknown)")
    if any(v.ndim == 0 or v.shape[0] != rows for v in inputs.values()):
        raise InvalidRequest("every in.<name> array needs one leading row per meta.prediction row")
    confidences = [None if math.isnan(c) else float(c) for c in conf.tolist()]
    ref = prediction_ref(meta, rows)
    return SampleMeta(stream, rows, reason, [int(p) for p in pred.tolist()], confidences, sampled_at, **ref)


def record_sample(session: Session, origin: SampleOrigin, info: SampleInfo, meta: SampleMeta) -> bool:
    """Insert the ``samples`` row of a stored file unless it is there; returns whether it was inserted.

    Idempotent (a re-sent upload, or two at once, keep one row), so a crash between the file's rename
    and this insert is repaired by the device's retry (the agent deletes a sample only after a 2xx).
    Commits ``session``.
    """
    key = (StoredSample.device_id == origin.device_id, StoredSample.bundle_sha256 == origin.bundle_sha256)
    if session.scalar(select(StoredSample.id).where(*key, StoredSample.sha256 == info.sha256)) is not None:
        return False
    session.add(
        StoredSample(
            sha256=info.sha256,
            device_id=origin.device_id,
            bundle_sha256=origin.bundle_sha256,
            model_name=origin.model_name,
            version=origin.version,
            hardware_profile=origin.hardware_profile,
            stream=meta.stream,
            reason=meta.reason,
            rows=meta.rows,
            predictions=meta.predictions,
            confidences=meta.confidences,
            sampled_at=meta.sampled_at,
            prediction_id=meta.prediction_id,
            request_rows=meta.request_rows,
            received_at=info.received_at,
            size=info.size,
        )
    )
    try:
        session.commit()
    except IntegrityError:  # the same upload, committed by a concurrent request
        session.rollback()
        return False
    return True
