"""Telemetry windows: additive per-window summaries of inference, one accumulator per model version.

Summaries follow :mod:`edgeota_contract.telemetry`: latency counts on ``LATENCY_EDGES_MS``;
per-input-feature counts on the edges from the bundle's ``reference_stats.json`` (plus NaN count,
min, max, sum and sum of squares); output class counts and a confidence histogram on
``CONFIDENCE_EDGES``. Everything is a count or a sum, so the server merges windows by adding.
"""

from __future__ import annotations

import logging
import threading
from bisect import bisect_right
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from device_agent._lazy import lazy_module
from device_agent.runtime import LoadedModel
from edgeota_contract.logs import log_event
from edgeota_contract.manifest import REFERENCE_STATS_FILE
from edgeota_contract.telemetry import (
    CONFIDENCE_EDGES,
    LATENCY_EDGES_MS,
    FeatureReference,
    FeatureSummary,
    OutputReference,
    OutputSummary,
    ReferenceStats,
)

if TYPE_CHECKING:
    import numpy as np
else:
    np = lazy_module("numpy")

log = logging.getLogger("device_agent.telemetry")


def _counts(edges: np.ndarray, values: np.ndarray) -> np.ndarray:
    idx = np.searchsorted(edges, values, side="right")
    return np.bincount(idx, minlength=len(edges) + 1)


def row_confidences(rows: np.ndarray) -> np.ndarray:
    """Per-row confidence by the contract's rule: the max of a probability row, else the max of its softmax."""
    is_prob = (rows >= 0).all(axis=1) & (rows <= 1).all(axis=1) & (np.abs(rows.sum(axis=1) - 1) <= 1e-3)
    shifted = rows - rows.max(axis=1, keepdims=True)
    soft = np.exp(shifted)
    soft /= soft.sum(axis=1, keepdims=True)
    return np.asarray(np.where(is_prob, rows.max(axis=1), soft.max(axis=1)), dtype=np.float64)


class _InputSummary:
    """All reference features of one input, summarised with a handful of vectorised numpy calls per batch."""

    def __init__(self, name: str, refs: list[FeatureReference]) -> None:
        self.name = name
        self.refs = [r for r in refs if r.feature is not None]
        self.whole = [r for r in refs if r.feature is None]
        n = len(self.refs)
        width = max((len(r.edges) for r in self.refs), default=1)
        self.cols = np.asarray([r.feature for r in self.refs], dtype=np.int64)
        self.edges = np.full((n, width), np.inf)
        for i, r in enumerate(self.refs):
            self.edges[i, : len(r.edges)] = r.edges
        self.width = width + 1
        self.counts = np.zeros((n, self.width), dtype=np.int64)
        self.nan = np.zeros(n, dtype=np.int64)
        self.min = np.full(n, np.inf)
        self.max = np.full(n, -np.inf)
        self.sum = np.zeros(n)
        self.sum_sq = np.zeros(n)
        w = len(self.whole)
        self.whole_counts = [np.zeros(len(r.edges) + 1, dtype=np.int64) for r in self.whole]
        self.whole_stats = np.zeros((w, 3))  # nan count, sum, sum of squares
        self.whole_min = np.full(w, np.inf)
        self.whole_max = np.full(w, -np.inf)

    def add(self, arrays: list[np.ndarray]) -> None:
        if self.refs:
            # The contract's feature view: [N, ...] flattened row-major to [N, F] (edgeota_contract.telemetry).
            views = [a.reshape(len(a), -1) for a in arrays if a.ndim]
            width = views[0].shape[1] if views else 0
            same = [v for v in views if v.shape[1] == width]
            if same and (self.cols < width).all():
                self._add_columns(np.concatenate(same).astype(np.float64, copy=False)[:, self.cols])
        if self.whole:
            flat = np.concatenate([a.ravel() for a in arrays]).astype(np.float64, copy=False)
            finite = np.isfinite(flat)
            vals = flat[finite]
            for i, r in enumerate(self.whole):
                self.whole_stats[i, 0] += flat.size - vals.size
                if vals.size:
                    self.whole_counts[i] += _counts(np.asarray(r.edges), vals)
                    self.whole_stats[i, 1] += vals.sum()
                    self.whole_stats[i, 2] += np.dot(vals, vals)
                    self.whole_min[i] = min(self.whole_min[i], vals.min())
                    self.whole_max[i] = max(self.whole_max[i], vals.max())

    def _add_columns(self, v: np.ndarray) -> None:
        finite = np.isfinite(v)
        self.nan += (~finite).sum(axis=0)
        zeroed = np.where(finite, v, 0.0)
        self.sum += zeroed.sum(axis=0)
        self.sum_sq += (zeroed * zeroed).sum(axis=0)
        self.min = np.minimum(self.min, np.where(finite, v, np.inf).min(axis=0, initial=np.inf))
        self.max = np.maximum(self.max, np.where(finite, v, -np.inf).max(axis=0, initial=-np.inf))
        # bisect_right on each feature's own (padded) edges: the number of edges <= x
        idx = (zeroed[:, :, None] >= self.edges[None, :, :]).sum(axis=2)
        flat = (np.arange(len(self.refs)) * self.width)[None, :] + idx
        self.counts += np.bincount(flat[finite], minlength=len(self.refs) * self.width).reshape(self.counts.shape)

    def summaries(self) -> list[FeatureSummary]:
        out = []
        for i, r in enumerate(self.refs):
            has = self.min[i] != np.inf
            out.append(
                FeatureSummary(
                    input=r.input,
                    feature=r.feature,
                    edges=list(r.edges),
                    counts=[int(c) for c in self.counts[i, : len(r.edges) + 1]],
                    nan_count=int(self.nan[i]),
                    min=float(self.min[i]) if has else None,
                    max=float(self.max[i]) if has else None,
                    sum=float(self.sum[i]),
                    sum_sq=float(self.sum_sq[i]),
                )
            )
        for i, r in enumerate(self.whole):
            has = self.whole_min[i] != np.inf
            out.append(
                FeatureSummary(
                    input=r.input,
                    feature=None,
                    edges=list(r.edges),
                    counts=[int(c) for c in self.whole_counts[i]],
                    nan_count=int(self.whole_stats[i, 0]),
                    min=float(self.whole_min[i]) if has else None,
                    max=float(self.whole_max[i]) if has else None,
                    sum=float(self.whole_stats[i, 1]),
                    sum_sq=float(self.whole_stats[i, 2]),
                )
            )
        return out


@dataclass
class _Output:
    name: str
    classes: int | None
    class_counts: np.ndarray | None = None
    confidence_counts: np.ndarray | None = None
    nan_count: int = 0

    def add(self, value: np.ndarray) -> None:
        if np.issubdtype(value.dtype, np.floating):
            self.nan_count += int((~np.isfinite(value)).sum())
        if self.classes is None or value.ndim == 0 or value.shape[-1] != self.classes:
            return
        probs = value.reshape(-1, self.classes).astype(np.float64, copy=False)
        finite_rows = np.isfinite(probs).all(axis=1)
        probs = probs[finite_rows]
        if probs.size == 0:
            return
        if self.class_counts is None or self.confidence_counts is None:
            self.class_counts = np.zeros(self.classes, dtype=np.int64)
            self.confidence_counts = np.zeros(len(CONFIDENCE_EDGES) + 1, dtype=np.int64)
        self.class_counts += np.bincount(probs.argmax(axis=1), minlength=self.classes)
        self.confidence_counts += _counts(np.asarray(CONFIDENCE_EDGES), row_confidences(probs))

    def add_batch(self, arrays: list[np.ndarray]) -> None:
        if self.classes is not None and all(a.ndim and a.shape[-1] == self.classes for a in arrays):
            self.add(np.concatenate([a.reshape(-1, self.classes) for a in arrays]))
        else:
            for a in arrays:
                self.add(a)

    def summary(self) -> OutputSummary:
        return OutputSummary(
            output=self.name,
            class_counts=None if self.class_counts is None else [int(c) for c in self.class_counts],
            confidence_counts=None if self.confidence_counts is None else [int(c) for c in self.confidence_counts],
            nan_count=self.nan_count,
        )


@dataclass
class WindowSummary:
    """One closed window of one model version, ready to become a ``TelemetryWindow``."""

    model_name: str
    version: str
    bundle_sha256: str
    window_start: datetime
    window_end: datetime
    request_count: int
    error_count: int
    latency_counts: list[int]
    features: list[FeatureSummary]
    outputs: list[OutputSummary]


BATCH_REQUESTS = 128
"""Requests are buffered and summarised together once this many have arrived (and at window end)."""


@dataclass
class _Window:
    model: LoadedModel
    started: datetime
    inputs: dict[str, _InputSummary]
    outputs: list[_Output]
    requests: int = 0
    errors: int = 0
    latency: np.ndarray = field(default_factory=lambda: np.zeros(len(LATENCY_EDGES_MS) + 1, dtype=np.int64))
    pending: list[tuple[dict[str, np.ndarray], dict[str, np.ndarray]]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.input_names = list(self.inputs)

    def buffer(self, inputs: dict[str, Any], outputs: dict[str, np.ndarray]) -> None:
        # Only a copy of the inputs on the request path (the caller may reuse its buffers); the numpy work
        # happens once per BATCH_REQUESTS requests.
        self.pending.append(({n: np.array(inputs[n]) for n in self.input_names if n in inputs}, outputs))
        if len(self.pending) >= BATCH_REQUESTS:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        for name, summary in self.inputs.items():
            arrays = [i[name] for i, _ in self.pending if name in i and i[name].ndim]
            if arrays:
                summary.add(arrays)
        for out in self.outputs:
            produced = [o[out.name] for _, o in self.pending if out.name in o]
            if produced:
                out.add_batch(produced)
        self.pending.clear()

    def close(self, now: datetime) -> WindowSummary:
        self.flush()
        m = self.model.manifest
        return WindowSummary(
            model_name=m.model_name,
            version=m.version,
            bundle_sha256=self.model.bundle_sha256,
            window_start=self.started,
            window_end=now,
            request_count=self.requests,
            error_count=self.errors,
            latency_counts=[int(c) for c in self.latency],
            features=[f for summary in self.inputs.values() for f in summary.summaries()],
            outputs=[o.summary() for o in self.outputs],
        )


def load_reference(model: LoadedModel) -> ReferenceStats | None:
    """The bundle's reference statistics, or None when they cannot be read (telemetry then skips features)."""
    try:
        return ReferenceStats.model_validate_json((model.folder / REFERENCE_STATS_FILE).read_bytes())
    except (OSError, ValueError) as exc:
        log_event(log, "reference_stats_unreadable", level=logging.WARNING, detail=str(exc)[:200])
        return None


class TelemetryRecorder:
    """Accumulates requests into the current window per model version (a :class:`ModelRuntime` listener)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._windows: dict[str, _Window] = {}
        self._refs: dict[str, ReferenceStats | None] = {}

    def _window_for(self, model: LoadedModel) -> _Window:
        window = self._windows.get(model.bundle_sha256)
        if window is None:
            if model.bundle_sha256 not in self._refs:
                self._refs[model.bundle_sha256] = load_reference(model)
            ref = self._refs[model.bundle_sha256]
            by_input: dict[str, list[FeatureReference]] = {}
            for r in ref.features if ref else []:
                by_input.setdefault(r.input, []).append(r)
            inputs = {name: _InputSummary(name, refs) for name, refs in by_input.items()}
            outputs = [_Output(s.name, _classes(s.name, ref)) for s in model.manifest.outputs]
            window = _Window(model, datetime.now(UTC), inputs, outputs)
            self._windows[model.bundle_sha256] = window
        return window

    def __call__(
        self, model: LoadedModel, inputs: dict[str, Any], outputs: dict[str, np.ndarray] | None, latency_ms: float
    ) -> None:
        with self._lock:
            window = self._window_for(model)
            window.requests += 1
            window.latency[bisect_right(LATENCY_EDGES_MS, latency_ms)] += 1
            if outputs is None:
                window.errors += 1
                return
            window.buffer(inputs, outputs)

    def roll(self) -> list[WindowSummary]:
        """Close every open window that saw at least one request; the next request opens a new one."""
        now = datetime.now(UTC)
        with self._lock:
            closed = [w.close(now) for w in self._windows.values() if w.requests]
            self._windows.clear()
        return closed


def _classes(output: str, ref: ReferenceStats | None) -> int | None:
    for item in ref.outputs if ref else []:
        if isinstance(item, OutputReference) and item.output == output and item.kind == "classes":
            return len(item.class_counts) if item.class_counts else None
    return None
