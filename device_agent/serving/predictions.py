"""Recent predictions, remembered so that an application can report the true label for one later.

:class:`PredictionMemory` keeps, per prediction id the agent returned, the release that answered and the
top-1 class and confidence of each row of the model's first class output. It is bounded two ways:
at most ``max_predictions`` entries (the oldest are forgotten first) and ``max_age_seconds`` (older
entries count as expired). Each entry holds at most ``MAX_ROWS`` rows (a batched request's later rows
cannot get feedback through the agent), so the memory stays under about
``max_predictions x (300 + 60 x rows) bytes``: ~3 MB for the default 10,000 single-row predictions.

:func:`feedback_item` turns one feedback call (prediction id, row, label and/or reward) into the contract's
:class:`~edgeota_contract.messages.FeedbackItem`, raising :class:`FeedbackError` (with the HTTP status the
endpoint answers) for an unknown or expired prediction, a row the request did not have, or a bad value.
:func:`parse_feedback` reads the endpoint's JSON body (one object, or a list of them).
"""

from __future__ import annotations

import json
import math
import threading
import time
from collections import OrderedDict
from collections.abc import Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from device_agent._lazy import lazy_module
from device_agent.telemetry.summaries import row_confidences
from edgeota_contract.errors import EdgeotaError
from edgeota_contract.manifest import BundleManifest
from edgeota_contract.messages import MAX_FEEDBACK_ITEMS, FeedbackItem
from edgeota_contract.states import ReasonCode

if TYPE_CHECKING:
    import numpy as np
else:
    np = lazy_module("numpy")

MAX_ROWS = 64
"""Rows of one request remembered (the first ones)."""
PREDICTION_ID: ContextVar[str | None] = ContextVar("edgeota_prediction_id", default=None)
"""The prediction id of the request being served on this thread (set around the model call by the endpoint and
:meth:`~device_agent.agent.Agent.predict_tracked`), so that runtime listeners (the input sampler) can tag what
they keep with it; None for requests that get no prediction id (:meth:`~device_agent.agent.Agent.predict`)."""


class FeedbackError(EdgeotaError):
    """Feedback the agent refuses; ``status`` is the HTTP status the endpoint answers (400 or 404)."""

    default_reason = ReasonCode.MALFORMED_MESSAGE

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Prediction:
    """What the agent answered for one request: the release, and per row the top-1 class and confidence
    (None for rows with non-finite outputs, or when the model has no class output)."""

    prediction_id: str
    model_name: str
    version: str
    bundle_sha256: str
    at: datetime
    rows: int
    predicted: tuple[int | None, ...]
    confidence: tuple[float | None, ...]
    monotonic: float = 0.0


def class_output(manifest: BundleManifest, outputs: Mapping[str, Any]) -> Any | None:
    """The first class output in manifest order (floating point, ``[N, C]``, ``C >= 2``), or None."""
    for spec in manifest.outputs:
        arr = outputs.get(spec.name)
        if arr is None:
            continue
        arr = np.asarray(arr)
        if arr.ndim == 2 and arr.shape[1] >= 2 and arr.dtype.kind == "f":
            return arr
    return None


def top1(
    manifest: BundleManifest, outputs: Mapping[str, Any]
) -> tuple[int, tuple[int | None, ...], tuple[float | None, ...]]:
    """(rows, top-1 class per row, confidence per row) of the first class output; at most ``MAX_ROWS`` rows
    are returned. Rows: the batch size of the first output when there is no class output."""
    arr = class_output(manifest, outputs)
    if arr is None:
        first = next((np.asarray(v) for v in outputs.values()), None)
        rows = int(first.shape[0]) if first is not None and first.ndim > 0 else 1
        none = (None,) * min(rows, MAX_ROWS)
        return rows, none, none
    rows = int(arr.shape[0])
    head = arr[:MAX_ROWS]
    finite = np.isfinite(head).all(axis=1)
    classes = head.argmax(axis=1)
    conf = row_confidences(np.where(finite[:, None], head, 0.0))
    predicted = tuple(int(c) if ok else None for c, ok in zip(classes, finite, strict=True))
    confidence = tuple(float(v) if ok else None for v, ok in zip(conf, finite, strict=True))
    return rows, predicted, confidence


class PredictionMemory:
    """The last ``max_predictions`` predictions by id, each for ``max_age_seconds``. Thread-safe."""

    def __init__(self, max_predictions: int = 10_000, max_age_seconds: float = 86_400.0) -> None:
        self.max_predictions = max_predictions
        self.max_age_seconds = max_age_seconds
        self._lock = threading.Lock()
        self._entries: OrderedDict[str, Prediction] = OrderedDict()

    def remember(self, prediction: Prediction) -> None:
        if self.max_predictions <= 0:
            return
        with self._lock:
            self._entries[prediction.prediction_id] = prediction
            while len(self._entries) > self.max_predictions:
                self._entries.popitem(last=False)

    def get(self, prediction_id: str) -> Prediction | None:
        """The prediction, or None when unknown, forgotten or older than ``max_age_seconds``."""
        with self._lock:
            found = self._entries.get(prediction_id)
        if found is None or time.monotonic() - found.monotonic > self.max_age_seconds:
            return None
        return found

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)


def record(
    memory: PredictionMemory,
    prediction_id: str,
    manifest: BundleManifest,
    bundle_sha256: str,
    outputs: Mapping[str, Any],
) -> Prediction:
    """Remember the answer ``outputs`` of the release ``manifest`` / ``bundle_sha256`` under ``prediction_id``."""
    rows, predicted, confidence = top1(manifest, outputs)
    prediction = Prediction(
        prediction_id=prediction_id,
        model_name=manifest.model_name,
        version=manifest.version,
        bundle_sha256=bundle_sha256,
        at=datetime.now(UTC),
        rows=rows,
        predicted=predicted,
        confidence=confidence,
        monotonic=time.monotonic(),
    )
    memory.remember(prediction)
    return prediction


def _label_text(label: Any) -> str | None:
    if label is None:
        return None
    if isinstance(label, bool) or not isinstance(label, int | str):
        raise FeedbackError(400, "label must be a class index (an integer or a string)")
    text = str(label).strip()
    if not text or len(text) > 128:
        raise FeedbackError(400, "label must be 1 to 128 characters")
    return text


def _reward(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or not 0 <= value <= 1:
        raise FeedbackError(400, "reward must be a number from 0 to 1")
    return float(value)


def feedback_item(
    memory: PredictionMemory,
    prediction_id: str,
    *,
    label: Any = None,
    reward: Any = None,
    row: int = 0,
    model_name: str | None = None,
) -> FeedbackItem:
    """The feedback item for one remembered prediction.

    ``model_name``: the model the caller named (the endpoint's path); a prediction of another model is unknown.

    Raises:
        FeedbackError: 404 unknown, forgotten or expired prediction (or of another model); 400 no label and
            no reward, a bad label or reward, a row the request did not have or beyond ``MAX_ROWS``.
    """
    if not isinstance(prediction_id, str) or not prediction_id:
        raise FeedbackError(400, "prediction_id must be a non-empty string")
    prediction = memory.get(prediction_id)
    if prediction is None or (model_name is not None and prediction.model_name != model_name):
        raise FeedbackError(404, f"unknown or expired prediction: {prediction_id[:64]}")
    if isinstance(row, bool) or not isinstance(row, int) or row < 0:
        raise FeedbackError(400, "row must be a non-negative integer")
    if row >= prediction.rows:
        raise FeedbackError(400, f"row {row} is not in the request's {prediction.rows} rows")
    if row >= len(prediction.predicted):
        raise FeedbackError(400, f"row {row}: only the first {MAX_ROWS} rows of a request take feedback")
    text, value = _label_text(label), _reward(reward)
    if text is None and value is None:
        raise FeedbackError(400, "feedback needs a label or a reward")
    predicted = prediction.predicted[row]
    try:
        return FeedbackItem(
            prediction_id=prediction.prediction_id,
            row=row,
            model_name=prediction.model_name,
            version=prediction.version,
            bundle_sha256=prediction.bundle_sha256,
            predicted=None if predicted is None else str(predicted),
            confidence=prediction.confidence[row],
            label=text,
            reward=value,
            predicted_at=prediction.at,
        )
    except ValidationError as exc:  # a prediction id the contract cannot carry
        raise FeedbackError(400, f"feedback not valid: {exc.errors()[0]['msg']}") from None


_FIELDS = {"prediction_id", "label", "reward", "row"}


def parse_feedback(body: bytes, memory: PredictionMemory, model_name: str) -> list[FeedbackItem]:
    """The items of a feedback request body: one JSON object, or a list of 1 to ``MAX_FEEDBACK_ITEMS`` of them,
    each ``{"prediction_id": ..., "label": ..., "reward": ..., "row": ...}`` (label or reward required).

    Raises:
        FeedbackError: 400 for malformed JSON, unknown fields or bad values; 404 for an unknown prediction (the
            whole request is refused: nothing is sent).
    """
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError) as exc:
        raise FeedbackError(400, f"malformed JSON: {str(exc)[:200]}") from None
    docs = doc if isinstance(doc, list) else [doc]
    if not docs or len(docs) > MAX_FEEDBACK_ITEMS:
        raise FeedbackError(400, f"send 1 to {MAX_FEEDBACK_ITEMS} feedback objects")
    items = []
    for d in docs:
        if not isinstance(d, dict):
            raise FeedbackError(400, "feedback must be a JSON object (or a list of them)")
        unknown = sorted(set(d) - _FIELDS)
        if unknown:
            raise FeedbackError(400, f"unknown fields: {', '.join(unknown)[:200]}")
        items.append(
            feedback_item(
                memory,
                d.get("prediction_id"),  # type: ignore[arg-type]  # checked inside
                label=d.get("label"),
                reward=d.get("reward"),
                row=d.get("row", 0),
                model_name=model_name,
            )
        )
    return items


def feedback_answer(msg_id: str, items: list[FeedbackItem]) -> dict[str, Any]:
    """The endpoint's 202 answer: the report's msg id and, per item, what was predicted and whether it was right."""
    return {
        "msg_id": msg_id,
        "items": [
            {
                "prediction_id": i.prediction_id,
                "row": i.row,
                "predicted": i.predicted,
                "label": i.label,
                "correct": None if i.predicted is None or i.label is None else i.predicted == i.label,
                "reward": i.reward,
            }
            for i in items
        ],
    }
