"""Storing application feedback (true labels, rewards) for predictions devices served.

Two ways in, one store (:func:`store_items`):

- **Through the agent**: a ``FeedbackReport`` on the device's ``feedback`` MQTT channel, applied by ingest
  (:func:`ota_server.services.ingest.handle_feedback`) in the batch's transaction and acked after its commit.
- **To the server** (``POST /api/v1/feedback``, :func:`submit_feedback`): an application that learns the
  truth later reports it with the prediction id, release and predicted class the agent returned.

Guarantees: one row per (device, prediction id, row); storing the same item again changes nothing, and a
later item for the same prediction replaces its label and/or reward (a missing one keeps the stored one),
so re-delivery is harmless. The release and hardware profile come from the stored bundle when the bundle
sha is known (the device's word otherwise: its profile, the item's name and version); the cohort is the
device's value of the telemetry cohort label at the time the feedback arrives.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import numpy as np
from sqlalchemy import func, select, tuple_
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from edgeota_contract.messages import MAX_FEEDBACK_ITEMS, FeedbackItem
from ota_server.errors import InvalidRequest, NotFound, PermissionDenied
from ota_server.models import Bundle, Device, Feedback, utcnow
from ota_server.services.telemetry_aggregates import cohort_of

SOURCE_DEVICE = "device"
SOURCE_API = "api"
KEY = ("device_id", "prediction_id", "row")


def is_correct(predicted: str | None, label: str | None) -> bool | None:
    """Whether the top-1 answer matched the label; None when either is unknown (a reward-only item)."""
    if predicted is None or label is None:
        return None
    return predicted.strip() == label.strip()


@dataclass(frozen=True)
class Origin:
    """Where one item's prediction came from, as the server resolves it."""

    model_name: str
    version: str
    hardware_profile: str


def _origins(session: Session, device: Device, items: Sequence[FeedbackItem]) -> dict[str, Origin | None]:
    """The stored bundle's release and profile per bundle sha of ``items`` (None: not stored)."""
    shas = {i.bundle_sha256 for i in items}
    found: dict[str, Origin | None] = dict.fromkeys(shas)
    for b in session.scalars(select(Bundle).where(Bundle.sha256.in_(shas))):
        found[b.sha256] = Origin(b.model_name, b.version, b.hardware_profile)
    return found


def feedback_rows(
    device: Device,
    items: Iterable[FeedbackItem],
    origins: dict[str, Origin | None],
    *,
    source: str,
    cohort_label: str,
    now: datetime,
) -> list[dict[str, Any]]:
    """The ``feedback`` rows of ``items`` (pure), one per key: a later item for the same key is merged over an
    earlier one (its label and reward win where set)."""
    rows: dict[tuple[str, str, int], dict[str, Any]] = {}
    cohort = cohort_of(device.labels, cohort_label)
    for item in items:
        origin = origins.get(item.bundle_sha256)
        key = (device.id, item.prediction_id, item.row)
        row = {
            "device_id": device.id,
            "prediction_id": item.prediction_id,
            "row": item.row,
            "model_name": origin.model_name if origin else item.model_name,
            "version": origin.version if origin else item.version,
            "bundle_sha256": item.bundle_sha256,
            "hardware_profile": origin.hardware_profile if origin else device.hardware_profile,
            "cohort": cohort,
            "predicted": item.predicted,
            "label": item.label,
            "correct": is_correct(item.predicted, item.label),
            "reward": item.reward,
            "confidence": item.confidence,
            "source": source,
            "predicted_at": item.predicted_at,
            "received_at": now,
        }
        earlier = rows.get(key)
        if earlier is not None:
            for name in ("label", "correct", "reward"):
                if row[name] is None:
                    row[name] = earlier[name]
        rows[key] = row
    return list(rows.values())


def store_items(
    session: Session, device: Device, items: Sequence[FeedbackItem], *, source: str, cohort_label: str
) -> int:
    """Upsert ``items`` for ``device`` inside the caller's transaction (one statement); returns the rows written.

    Raises what the database raises (the caller's unit of work rolls back).
    """
    if not items:
        return 0
    rows = feedback_rows(
        device, items, _origins(session, device, items), source=source, cohort_label=cohort_label, now=utcnow()
    )
    insert = postgresql.insert if session.get_bind().dialect.name == "postgresql" else sqlite.insert
    stmt = insert(Feedback).values(rows)
    excluded = stmt.excluded
    session.execute(
        stmt.on_conflict_do_update(
            index_elements=list(KEY),
            set_={
                "label": func.coalesce(excluded.label, Feedback.label),
                "correct": func.coalesce(excluded.correct, Feedback.correct),
                "reward": func.coalesce(excluded.reward, Feedback.reward),
                "source": excluded.source,
                "received_at": excluded.received_at,
            },
        )
    )
    return len(rows)


def submit_feedback(
    session: Session,
    device_id: str,
    items: Sequence[FeedbackItem],
    *,
    caller_device: str | None,
    cohort_label: str,
) -> int:
    """Store feedback an application reports to the server for one device (all items or none); returns the count.

    ``caller_device``: the device id of a device token (it may report for itself only), None for an API token.

    Raises:
        PermissionDenied: a device token reporting for another device.
        NotFound: the device does not exist (or is decommissioned).
        InvalidRequest: no items or more than ``MAX_FEEDBACK_ITEMS``; an item with a label but no predicted
            class; a bundle sha that is not stored or belongs to another release.
    """
    if caller_device is not None and caller_device != device_id:
        raise PermissionDenied("a device token may report feedback for its own device only")
    if not items or len(items) > MAX_FEEDBACK_ITEMS:
        raise InvalidRequest(f"send 1 to {MAX_FEEDBACK_ITEMS} feedback items, not {len(items)}")
    device = session.get(Device, device_id)
    if device is None or device.decommissioned_at is not None:
        raise NotFound(f"unknown device {device_id}")
    origins = _origins(session, device, items)
    for n, item in enumerate(items):
        where = f"item {n} (prediction {item.prediction_id})"
        if item.label is not None and item.predicted is None:
            raise InvalidRequest(f"{where}: a label needs the predicted class the agent returned")
        origin = origins.get(item.bundle_sha256)
        if origin is None:
            raise InvalidRequest(f"{where}: bundle {item.bundle_sha256} is not stored on this server")
        if (origin.model_name, origin.version) != (item.model_name, item.version):
            raise InvalidRequest(
                f"{where}: bundle {item.bundle_sha256[:12]} is {origin.model_name} {origin.version},"
                f" not {item.model_name} {item.version}"
            )
    return store_items(session, device, items, source=SOURCE_API, cohort_label=cohort_label)


_PREDICTION_ID = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")


def prediction_ref(meta: dict[str, np.ndarray], rows: int) -> dict[str, Any]:
    """``prediction_id`` and ``request_rows`` of a sample from its ``meta.prediction_id`` (one string, the id the
    agent returned for the request) and ``meta.request_row`` (int >= 0 per sample row: the request's row; only
    with an id; absent: sample row i is request row i). Empty when the sample has no id.

    Raises:
        InvalidRequest: a bad id, or request rows that are not one non-negative integer per sample row.
    """
    if "prediction_id" not in meta:
        if "request_row" in meta:
            raise InvalidRequest("meta.request_row needs meta.prediction_id")
        return {}
    value = meta["prediction_id"]
    if value.shape != () or value.dtype.kind != "U" or not _PREDICTION_ID.match(str(value[()])):
        raise InvalidRequest("meta.prediction_id must be one id of 1 to 64 characters A-Z a-z 0-9 _ . : -")
    out: dict[str, Any] = {"prediction_id": str(value[()])}
    if "request_row" in meta:
        req = meta["request_row"]
        if req.shape != (rows,) or req.dtype.kind not in "iu" or (req < 0).any():
            raise InvalidRequest("meta.request_row must be one non-negative integer per sample row")
        out["request_rows"] = [int(r) for r in req.tolist()]
    return out


def sample_labels(session: Session, refs: Iterable[tuple[str, str]]) -> dict[tuple[str, str, int], int]:
    """The labels reported for the given (device id, prediction id) pairs, by (device, prediction, row), where
    the label is a class index (an integer); a label that is not an integer cannot fill an int64 column."""
    pairs = sorted(set(refs))
    out: dict[tuple[str, str, int], int] = {}
    for start in range(0, len(pairs), 500):
        chunk = pairs[start : start + 500]
        stmt = select(Feedback.device_id, Feedback.prediction_id, Feedback.row, Feedback.label).where(
            tuple_(Feedback.device_id, Feedback.prediction_id).in_(chunk), Feedback.label.is_not(None)
        )
        for device_id, pid, row, label in session.execute(stmt):
            text = str(label).strip()
            if re.fullmatch(r"-?[0-9]{1,18}", text):
                out[(device_id, pid, int(row))] = int(text)
    return out
