"""Dataset export for retraining: stored samples as Parquet, partitioned by release and cohort, with a manifest.

:func:`export_dataset` reads the ``samples`` rows matching an :class:`ExportQuery` and their ``.npz`` files,
and writes into a folder:

* ``release=<release id>/cohort=<cohort>/part-0.parquet`` (Hive partitioning; values URI-encoded; a
  device without the cohort label is in ``cohort=__HIVE_DEFAULT_PARTITION__``, which pyarrow reads as
  null). One Parquet row per sample row, sorted by time, device, sample and row. Columns:
  ``input_<name>`` (the row's input flattened, ``list<float32|float64|int64|bool>`` by the input's dtype),
  ``prediction`` (int64), ``confidence`` (float64), ``label`` (int64) and ``label_source`` (string:
  ``feedback`` when an application reported the true class for the sample's prediction id and row; null
  until labels come back), ``device_id``, ``hardware_profile``, ``model_name``, ``version``, ``time`` (the
  device's clock, else the arrival time; timestamp[us, UTC]), ``received_at``, ``stream`` (``uniform`` |
  ``hard``), ``reason``, ``sample_sha256`` and ``row``.
* ``_manifest.json`` (:data:`MANIFEST_FORMAT`; the leading underscore makes pyarrow's and pandas' dataset
  discovery skip it, so ``pyarrow.dataset.dataset(folder, partitioning="hive")`` reads the folder as it is): the files in digest order with their sha256, size and rows;
  ``digest`` = sha256 over the files' bytes concatenated in that order (sorted by path); the schema; the
  inputs' row shapes; the time window (requested and covered); the trigger, parent release and drift
  report; the counts per stream (samples and rows) and per partition.

pyarrow is imported when an export runs, so the rest of the server does not need it to start.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import tarfile
import urllib.parse
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import select
from sqlalchemy.orm import Session

from ota_server.errors import InvalidRequest, NotFound
from ota_server.models import Bundle, Device, Release, StoredSample
from ota_server.services.feedback import sample_labels
from ota_server.services.samples import STREAMS

MANIFEST_FORMAT = "edgeota-dataset/1"
LABEL_SOURCE_FEEDBACK = "feedback"
"""``label_source`` of a label an application reported for the sample's prediction (``feedback`` table)."""
MANIFEST_NAME = "_manifest.json"
MAX_EXPORT_SAMPLES = 100_000
NULL_PARTITION = "__HIVE_DEFAULT_PARTITION__"
TRIGGER_PATTERN = r"^[A-Za-z0-9_.:-]{1,128}$"
DIGEST_ORDER = "sha256 over the bytes of every file in manifest.files, concatenated in that order (sorted by path)"


@dataclass(frozen=True)
class ExportQuery:
    """What to export: one model's samples (optionally one version and profile, a time window on arrival),
    and what to record about why (``trigger``: ``manual``, or e.g. ``alert:<id>``)."""

    model_name: str
    version: str | None = None
    profile: str | None = None
    since: datetime | None = None
    until: datetime | None = None
    cohort_label: str = "cohort"
    trigger: str = "manual"
    parent_release: str | None = None
    drift_report: dict[str, Any] | None = None


@dataclass
class _Row:
    sample: StoredSample
    row: int
    inputs: dict[str, np.ndarray]
    release_id: str
    cohort: str | None
    label: int | None = None


@dataclass
class _Partition:
    rows: list[_Row] = field(default_factory=list)


def _partition_path(release_id: str, cohort: str | None) -> str:
    value = NULL_PARTITION if cohort is None or cohort == "" else urllib.parse.quote(cohort, safe="")
    return f"release={urllib.parse.quote(release_id, safe='')}/cohort={value}/part-0.parquet"


def _select(session: Session, query: ExportQuery) -> list[StoredSample]:
    stmt = select(StoredSample).where(StoredSample.model_name == query.model_name)
    if query.version is not None:
        stmt = stmt.where(StoredSample.version == query.version)
    if query.profile is not None:
        stmt = stmt.where(StoredSample.hardware_profile == query.profile)
    if query.since is not None:
        stmt = stmt.where(StoredSample.received_at >= query.since)
    if query.until is not None:
        stmt = stmt.where(StoredSample.received_at <= query.until)
    stmt = stmt.order_by(StoredSample.received_at, StoredSample.id).limit(MAX_EXPORT_SAMPLES + 1)
    found = list(session.scalars(stmt))
    if len(found) > MAX_EXPORT_SAMPLES:
        raise InvalidRequest(f"more than {MAX_EXPORT_SAMPLES} samples match; narrow the filters")
    return found


def _label(truth: dict[tuple[str, str, int], int], s: StoredSample, row: int) -> int | None:
    """The label reported for sample row ``row`` (through its request's prediction id and row), if any."""
    if not s.prediction_id:
        return None
    request_row = s.request_rows[row] if s.request_rows and row < len(s.request_rows) else row
    return truth.get((s.device_id, s.prediction_id, int(request_row)))


def _split_rows(arrays: dict[str, np.ndarray], rows: int) -> list[dict[str, np.ndarray]]:
    """One dict of inputs per row: by the leading axis when every input has ``rows`` of them, else the whole."""
    if all(a.ndim > 0 and a.shape[0] == rows for a in arrays.values()):
        return [{k: a[i] for k, a in arrays.items()} for i in range(rows)]
    return [arrays]


def _load(path: Path) -> dict[str, np.ndarray] | None:
    try:
        with np.load(path, allow_pickle=False) as npz:
            return {k.removeprefix("in."): npz[k] for k in npz.files if k.startswith("in.")}
    except (OSError, ValueError, EOFError):
        return None  # removed or damaged since it was stored: counted as missing


def _arrow_type(dtype: np.dtype[Any]) -> Any:
    import pyarrow as pa

    if dtype.kind == "f":
        return pa.float64() if dtype.itemsize > 4 else pa.float32()
    if dtype.kind in "iu":
        return pa.int64()
    if dtype.kind == "b":
        return pa.bool_()
    raise InvalidRequest(f"inputs of dtype {dtype} cannot be exported")


def dataset_schema(inputs: dict[str, np.dtype[Any]]) -> Any:
    """The Parquet schema of an export whose inputs have these dtypes (partition keys are in the path)."""
    import pyarrow as pa

    cols = [pa.field(f"input_{name}", pa.list_(_arrow_type(dt))) for name, dt in sorted(inputs.items())]
    ts = pa.timestamp("us", tz="UTC")
    return pa.schema(
        [
            *cols,
            pa.field("prediction", pa.int64()),
            pa.field("confidence", pa.float64()),
            pa.field("label", pa.int64()),
            pa.field("label_source", pa.string()),
            pa.field("device_id", pa.string(), nullable=False),
            pa.field("hardware_profile", pa.string(), nullable=False),
            pa.field("model_name", pa.string(), nullable=False),
            pa.field("version", pa.string(), nullable=False),
            pa.field("time", ts, nullable=False),
            pa.field("received_at", ts, nullable=False),
            pa.field("stream", pa.string(), nullable=False),
            pa.field("reason", pa.string()),
            pa.field("sample_sha256", pa.string(), nullable=False),
            pa.field("row", pa.int32(), nullable=False),
        ]
    )


def _table(rows: list[_Row], inputs: dict[str, np.dtype[Any]], schema: Any) -> Any:
    import pyarrow as pa

    cols: dict[str, list[Any]] = {f.name: [] for f in schema}
    for r in rows:
        s = r.sample
        for name, dtype in inputs.items():
            value = r.inputs.get(name)
            cols[f"input_{name}"].append(None if value is None else value.astype(dtype).reshape(-1).tolist())
        cols["prediction"].append(s.predictions[r.row] if s.predictions else None)
        cols["confidence"].append(s.confidences[r.row] if s.confidences else None)
        cols["label"].append(r.label)
        cols["label_source"].append(None if r.label is None else LABEL_SOURCE_FEEDBACK)
        cols["device_id"].append(s.device_id)
        cols["hardware_profile"].append(s.hardware_profile)
        cols["model_name"].append(s.model_name)
        cols["version"].append(s.version)
        cols["time"].append(s.sampled_at or s.received_at)
        cols["received_at"].append(s.received_at)
        cols["stream"].append(s.stream)
        cols["reason"].append(s.reason)
        cols["sample_sha256"].append(s.sha256)
        cols["row"].append(r.row)
    return pa.Table.from_pydict(cols, schema=schema)


def _iso(value: datetime | None) -> str | None:
    return None if value is None else value.astimezone(UTC).isoformat()


def _parent(session: Session, query: ExportQuery, newest_release: str | None) -> dict[str, Any] | None:
    release_id = query.parent_release or newest_release
    if release_id is None:
        return None
    release = session.get(Release, release_id)
    if release is None:
        raise NotFound(f"release {release_id} not found")
    if release.model_name != query.model_name:
        raise InvalidRequest(f"release {release_id} is not a release of {query.model_name}")
    return {"release_id": release.id, "model_name": release.model_name, "version": release.version}


def check_query(query: ExportQuery) -> None:
    """Raises InvalidRequest for a trigger that is not ``[A-Za-z0-9_.:-]{1,128}``, a blank cohort label or a
    window that ends before it starts."""
    if not re.match(TRIGGER_PATTERN, query.trigger):
        raise InvalidRequest("trigger must be 1-128 characters of A-Z a-z 0-9 _ . : -")
    if not query.cohort_label.strip():
        raise InvalidRequest("cohort label must not be blank")
    if query.since is not None and query.until is not None and query.until < query.since:
        raise InvalidRequest("until is before since")


def export_dataset(
    session: Session, samples_root: Path, query: ExportQuery, out: Path, now: datetime | None = None
) -> dict[str, Any]:
    """Write the Parquet partitions and ``_manifest.json`` into the empty folder ``out``; returns the manifest.

    Reads the files of the matching ``samples`` rows under ``samples_root``; a file that is gone or unreadable
    is skipped and counted (``counts.missing_files``).

    Raises:
        InvalidRequest: a bad query (:func:`check_query`), more than ``MAX_EXPORT_SAMPLES`` matches, an input
            dtype Parquet cannot hold here, or a parent release of another model.
        NotFound: ``parent_release`` names no release.
    """
    check_query(query)
    now = now or datetime.now(UTC)
    samples = _select(session, query)
    bundles = {
        b.sha256: (b.release_id, b.release_counter)
        for b in session.scalars(select(Bundle).where(Bundle.model_name == query.model_name))
    }
    device_ids = sorted({s.device_id for s in samples})
    labels = {d.id: d.labels or {} for d in session.scalars(select(Device).where(Device.id.in_(device_ids)))}
    truth = sample_labels(session, ((s.device_id, s.prediction_id) for s in samples if s.prediction_id))
    partitions: dict[str, _Partition] = defaultdict(_Partition)
    dtypes: dict[str, np.dtype[Any]] = {}
    shapes: dict[str, set[tuple[int, ...]]] = defaultdict(set)
    missing = 0
    newest: tuple[int, str] | None = None  # (release counter, release id): the latest release in the data
    for s in samples:
        arrays = _load(samples_root / s.model_name / s.version / s.hardware_profile / s.device_id / f"{s.sha256}.npz")
        if arrays is None:
            missing += 1
            continue
        release_id, counter = bundles.get(s.bundle_sha256, (f"{s.model_name}-{s.version}", -1))
        if counter >= 0 and (newest is None or counter > newest[0]):
            newest = (counter, release_id)
        cohort = labels.get(s.device_id, {}).get(query.cohort_label)
        for name, a in arrays.items():
            dtypes.setdefault(name, a.dtype)
        for i, row_inputs in enumerate(_split_rows(arrays, s.rows)):
            for name, a in row_inputs.items():
                shapes[name].add(tuple(a.shape))
            part = partitions[_partition_path(release_id, None if cohort is None else str(cohort))]
            label = _label(truth, s, i)
            part.rows.append(_Row(s, i, row_inputs, release_id, None if cohort is None else str(cohort), label))
    parent = _parent(session, query, newest[1] if newest else None)
    return _write(out, query, partitions, dtypes, shapes, missing, len(samples), parent, now)


def _write(
    out: Path,
    query: ExportQuery,
    partitions: dict[str, _Partition],
    dtypes: dict[str, np.dtype[Any]],
    shapes: dict[str, set[tuple[int, ...]]],
    missing: int,
    matched: int,
    parent: dict[str, Any] | None,
    now: datetime,
) -> dict[str, Any]:
    import pyarrow.parquet as pq

    schema = dataset_schema(dtypes)
    files: list[dict[str, Any]] = []
    per_stream: dict[str, Counter[str]] = {s: Counter() for s in STREAMS}
    times: list[datetime] = []
    digest = hashlib.sha256()
    for rel in sorted(partitions):
        rows = sorted(
            partitions[rel].rows,
            key=lambda r: (r.sample.sampled_at or r.sample.received_at, r.sample.device_id, r.sample.sha256, r.row),
        )
        path = out / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(_table(rows, dtypes, schema), path)
        data = path.read_bytes()
        digest.update(data)
        seen: set[int] = set()
        stream_counts: dict[str, Counter[str]] = {s: Counter() for s in STREAMS}
        for r in rows:
            stream_counts[r.sample.stream]["rows"] += 1
            if id(r.sample) not in seen:
                seen.add(id(r.sample))
                stream_counts[r.sample.stream]["samples"] += 1
            times.append(r.sample.sampled_at or r.sample.received_at)
        for s in STREAMS:
            per_stream[s].update(stream_counts[s])
        first = rows[0]
        files.append(
            {
                "path": rel,
                "release_id": first.release_id,
                "cohort": first.cohort,
                "sha256": hashlib.sha256(data).hexdigest(),
                "size": len(data),
                "rows": len(rows),
                "streams": {s: dict(stream_counts[s]) for s in STREAMS},
            }
        )
    total_rows = sum(f["rows"] for f in files)
    manifest: dict[str, Any] = {
        "format": MANIFEST_FORMAT,
        "created_at": now.isoformat(),
        "model_name": query.model_name,
        "filters": {"version": query.version, "hardware_profile": query.profile},
        "time_window": {
            "since": _iso(query.since),
            "until": _iso(query.until),
            "first": _iso(min(times)) if times else None,
            "last": _iso(max(times)) if times else None,
        },
        "trigger": query.trigger,
        "parent_release": parent,
        "drift_report": query.drift_report,
        "partitioning": {"flavor": "hive", "keys": ["release", "cohort"], "cohort_label": query.cohort_label},
        "files": files,
        "digest": {"algorithm": "sha256", "order": DIGEST_ORDER, "value": digest.hexdigest()},
        "schema": [{"name": f.name, "type": str(f.type), "nullable": f.nullable} for f in schema],
        "inputs": {
            name: {"dtype": str(dtypes[name]), "row_shape": list(next(iter(s))) if len(s) == 1 else None}
            for name, s in sorted(shapes.items())
        },
        "counts": {
            "samples": sum(per_stream[s]["samples"] for s in STREAMS),
            "rows": total_rows,
            "missing_files": missing,
            "matched": matched,
            "per_stream": {
                s: {
                    "samples": per_stream[s]["samples"],
                    "rows": per_stream[s]["rows"],
                    "share_of_rows": per_stream[s]["rows"] / total_rows if total_rows else 0.0,
                }
                for s in STREAMS
            },
        },
    }
    (out / MANIFEST_NAME).write_text(json.dumps(manifest, indent=1, sort_keys=True), encoding="utf-8")
    return manifest


def tar_stream(folder: Path, manifest: dict[str, Any]) -> Iterator[bytes]:
    """A POSIX tar of an export, streamed: ``_manifest.json`` then the files in manifest order; removes
    ``folder`` when done (or when the reader goes away)."""
    try:
        for name in [MANIFEST_NAME, *(f["path"] for f in manifest["files"])]:
            data = (folder / name).read_bytes()
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), 0o644, 0
            yield info.tobuf(format=tarfile.PAX_FORMAT)
            yield data
            yield b"\0" * (-len(data) % tarfile.BLOCKSIZE)
        yield b"\0" * (2 * tarfile.BLOCKSIZE)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
