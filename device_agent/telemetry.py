"""Telemetry windows: additive per-window summaries of inference, one accumulator per model version.

Summaries follow :mod:`edgeota_contract.telemetry`: latency counts on ``LATENCY_EDGES_MS``;
per-input-feature counts on the edges from the bundle's ``reference_stats.json`` (plus NaN count,
min, max, sum and sum of squares); output class counts and a confidence histogram on
``CONFIDENCE_EDGES``. Everything is a count or a sum, so the server merges windows by adding.

The request path only buffers copies (see :class:`TelemetryRecorder`); the numpy work is done in
batches by :mod:`device_agent.telemetry_summaries`.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from device_agent._lazy import lazy_module
from device_agent.runtime import LoadedModel
from device_agent.telemetry_summaries import _counts, _InputSummary, _Output, row_confidences
from edgeota_contract.logs import log_event
from edgeota_contract.manifest import REFERENCE_STATS_FILE
from edgeota_contract.telemetry import (
    LATENCY_EDGES_MS,
    FeatureReference,
    FeatureSummary,
    OutputReference,
    OutputSummary,
    ReferenceStats,
)

__all__ = ["MAX_BUFFERED_BYTES", "MAX_BUFFERED_REQUESTS", "TelemetryRecorder", "WindowSummary", "row_confidences"]

if TYPE_CHECKING:
    import numpy as np
else:
    np = lazy_module("numpy")

log = logging.getLogger("device_agent.telemetry")


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


MAX_BUFFERED_REQUESTS = 1024
"""At most this many requests wait in the buffer before they are summarised (fewer for large inputs)."""
MAX_BUFFERED_BYTES = 4 << 20
"""The buffer limit adapts so that buffered inputs and outputs stay near this many bytes."""

_Copy = tuple[bytes, tuple[int, ...], Any]  # an array's row-major bytes, shape and dtype
_Item = tuple[Any, ...]
"""A buffered request: (digest, input copies, output copies, latency ms) with lists of :data:`_Copy`, or for
one input and one output flat, (digest, input bytes, shape, dtype, output bytes, shape, dtype, latency ms),
which allocates less on the request path. A failed request has None in place of the copies."""


def _arrays(values: dict[str, Any], names: tuple[str, ...]) -> list[np.ndarray]:
    return [np.asarray(values.get(n, np.nan)) for n in names]  # a missing one: 0-d, never a feature


def _copy(values: dict[str, Any], names: tuple[str, ...]) -> list[_Copy]:
    """Copies of ``values[name]`` for ``names``."""
    try:
        return [(a.tobytes(), a.shape, a.dtype) for a in map(values.__getitem__, names)]
    except (AttributeError, KeyError):  # not an ndarray (a list, say), or missing
        return [(a.tobytes(), a.shape, a.dtype) for a in _arrays(values, names)]


def _rebuild(
    datas: tuple[bytes, ...], shapes: tuple[Any, ...], dtypes: tuple[Any, ...], scalars: bool = False
) -> list[np.ndarray]:
    """The copies as arrays; consecutive ones of one row shape and dtype become one array. 0-d ones are
    dropped unless ``scalars``."""
    first = shapes[0]
    if first and shapes.count(first) == len(shapes) and dtypes.count(dtypes[0]) == len(dtypes):
        return [np.frombuffer(b"".join(datas), dtype=dtypes[0]).reshape(-1, *first[1:])]  # the usual case
    arrays: list[np.ndarray] = []
    run: list[bytes] = []
    key: tuple[tuple[int, ...], Any] | None = None
    for data, shape, dtype in zip(datas, shapes, dtypes, strict=True):
        if not shape:
            if scalars:
                arrays.append(np.frombuffer(data, dtype=dtype).reshape(()))
            continue
        if (shape[1:], dtype) != key:
            if run and key is not None:
                arrays.append(np.frombuffer(b"".join(run), dtype=key[1]).reshape(-1, *key[0]))
            run, key = [], (shape[1:], dtype)
        run.append(data)
    if run and key is not None:
        arrays.append(np.frombuffer(b"".join(run), dtype=key[1]).reshape(-1, *key[0]))
    return arrays


@dataclass
class _Window:
    model: LoadedModel
    started: datetime
    inputs: dict[str, _InputSummary]  # the inputs with references, in the recorder's copy order
    outputs: list[_Output]  # every manifest output, in order
    requests: int = 0
    errors: int = 0
    latency: np.ndarray = field(default_factory=lambda: np.zeros(len(LATENCY_EDGES_MS) + 1, dtype=np.int64))

    def add(self, items: list[_Item]) -> int:
        """Summarise buffered requests of this window's model with a few vectorised calls; returns their bytes."""
        self.requests += len(items)
        _, *columns, latencies = zip(*items, strict=True)  # every item of one model has the same length
        self.latency += _counts(np.asarray(LATENCY_EDGES_MS), np.asarray(latencies, dtype=np.float64))
        failed = columns[0].count(None)
        self.errors += failed
        if failed == len(items):
            return 0
        if failed:
            _, *columns, _ = zip(*(item for item in items if item[1] is not None), strict=True)
        if len(columns) == 6:  # flat: one input, one output
            in_cols, out_cols = [columns[:3]], [columns[3:]]
        else:
            ins, outs = columns
            in_cols = [list(zip(*copies, strict=True)) for copies in zip(*ins, strict=True)]
            out_cols = [list(zip(*copies, strict=True)) for copies in zip(*outs, strict=True)]
        nbytes = 0
        for summary, (datas, shapes, dtypes) in zip(self.inputs.values(), in_cols, strict=False):
            arrays = _rebuild(datas, shapes, dtypes)
            nbytes += sum(a.nbytes for a in arrays)
            if arrays:
                summary.add(arrays)
        copied = [o for o in self.outputs if o.copied]
        for out, (datas, shapes, dtypes) in zip(copied, out_cols, strict=False):
            arrays = _rebuild(datas, shapes, dtypes, scalars=True)
            nbytes += sum(a.nbytes for a in arrays)
            out.add_batch(arrays)
        return nbytes

    def close(self, now: datetime) -> WindowSummary:
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
    """Accumulates requests into the current window per model version (a :class:`ModelRuntime` listener).

    The request path only copies the inputs that have reference statistics (their bytes: the caller
    may reuse its buffers) and appends them, the outputs and the latency to a buffer (a deque: appends
    are atomic, so concurrent requests never wait on each other). The numpy summaries happen in batch:
    on the request that finds ``limit`` requests buffered, and in :meth:`roll`. Guarantees: every
    request is counted in exactly one window, summaries equal those of summarising each request on
    its own, and the buffer holds at most ``max_requests`` requests (growing past that only while a
    summary is running, and at ``4 * limit`` a request waits for it) and, after the first batch, about
    ``max_bytes`` of copied inputs and outputs (outputs are copied too: the caller may modify them).
    """

    def __init__(self, max_requests: int = MAX_BUFFERED_REQUESTS, max_bytes: int = MAX_BUFFERED_BYTES) -> None:
        self._lock = threading.Lock()  # windows and the summarising; never taken on the plain request path
        self._meta = threading.Lock()  # plans, refs and window starts
        self._queue: deque[_Item] = deque()
        self._max_requests = max(1, max_requests)
        self._max_bytes = max(1, max_bytes)
        self.limit = min(64, self._max_requests)
        self._windows: dict[str, _Window] = {}
        self._refs: dict[str, ReferenceStats | None] = {}
        self._plans: dict[str, tuple[Any, ...]] = {}  # digest: (input names, output names[, input, output])
        self._starts: dict[str, datetime] = {}
        self._cur: tuple[Any, ...] = (None, "", None, None)  # the last model seen (see __call__)
        self._models: dict[str, LoadedModel] = {}  # buffered entries name their model by digest (see roll)
        self._seen: set[str] = set()  # digests whose model was noted since the last roll

    def __call__(
        self, model: LoadedModel, inputs: dict[str, Any], outputs: dict[str, np.ndarray] | None, latency_ms: float
    ) -> None:
        cur = self._cur  # (model, digest, input, output): one read, so a concurrent swap cannot mix two models
        if cur[0] is not model:
            cur = self._first_seen(model)
        if outputs is not None and cur[2] is not None:  # one input and one output: the usual case, one flat tuple
            try:
                a, b = inputs[cur[2]], outputs[cur[3]]
                self._queue.append((cur[1], a.tobytes(), a.shape, a.dtype, b.tobytes(), b.shape, b.dtype, latency_ms))
            except (AttributeError, KeyError):  # not ndarrays (a list, say), or missing
                self._queue.append(self._entry(cur[1], inputs, outputs, latency_ms))
        else:
            self._queue.append(self._entry(cur[1], inputs, outputs, latency_ms))
        if len(self._queue) >= self.limit:
            self._summarise(block=len(self._queue) >= 4 * self.limit)

    def _entry(self, digest: str, inputs: dict[str, Any], outputs: dict[str, Any] | None, latency: float) -> _Item:
        """The buffered entry of a request off the usual path (entries hold no object the GC must track)."""
        plan = self._plans[digest]
        names, out_names = plan[0], plan[1]
        if outputs is None:  # as long as the model's other entries, so that summarising can transpose them
            return (digest, *(None,) * (len(plan) + 2), latency)
        if len(plan) == 4:
            (a,), (b,) = _arrays(inputs, names), _arrays(outputs, out_names)
            return (digest, a.tobytes(), a.shape, a.dtype, b.tobytes(), b.shape, b.dtype, latency)
        return (digest, _copy(inputs, names), _copy(outputs, out_names), latency)

    def _first_seen(self, model: LoadedModel) -> tuple[Any, ...]:
        """Note the window start and the copy plan of a model (on its first request after a swap or a roll)."""
        with self._meta:
            digest = model.bundle_sha256
            if digest not in self._refs:
                self._refs[digest] = load_reference(model)
                refs = self._refs[digest]
                names = {r.input for r in refs.features} if refs else set()
                copied = tuple(s.name for s in model.manifest.inputs if s.name in names and s.dtype != "string")
                outs = tuple(s.name for s in model.manifest.outputs if s.dtype != "string")
                single = (copied[0], outs[0]) if len(copied) == 1 and len(outs) == 1 else ()
                self._plans[digest] = (copied, outs, *single)
            self._starts.setdefault(digest, datetime.now(UTC))
            self._models[digest] = model
            self._seen.add(digest)
            plan = self._plans[digest]
            self._cur = (model, digest, *(plan[2:] if len(plan) == 4 else (None, None)))
            return self._cur

    def _window_for(self, model: LoadedModel) -> _Window:
        window = self._windows.get(model.bundle_sha256)
        if window is None:
            with self._meta:
                ref = self._refs.get(model.bundle_sha256)
                plan = self._plans.get(model.bundle_sha256, ((), ()))[0]
                started = self._starts.pop(model.bundle_sha256, None) or datetime.now(UTC)
            by_input: dict[str, list[FeatureReference]] = {name: [] for name in plan}
            for r in ref.features if ref else []:
                if r.input in by_input:
                    by_input[r.input].append(r)
            inputs = {name: _InputSummary(name, refs) for name, refs in by_input.items()}
            outputs = [_Output(s.name, _classes(s.name, ref), s.dtype != "string") for s in model.manifest.outputs]
            window = _Window(model, started, inputs, outputs)
            self._windows[model.bundle_sha256] = window
        return window

    def _summarise(self, block: bool) -> None:
        if not self._lock.acquire(blocking=block):
            return  # another request is summarising; this one's entry waits for the next batch
        try:
            self._summarise_locked()
        finally:
            self._lock.release()

    def _summarise_locked(self) -> None:
        queue = self._queue
        items = [queue.popleft() for _ in range(len(queue))]  # later appends stay for the next batch
        if not items:
            return
        first = items[0][0]
        if [item[0] for item in items].count(first) == len(items):  # one model
            groups = [items]
        else:
            by_digest: dict[str, list[_Item]] = {}
            for item in items:
                by_digest.setdefault(item[0], []).append(item)
            groups = list(by_digest.values())
        with self._meta:
            models = dict(self._models)
        nbytes = sum(self._window_for(models[group[0][0]]).add(group) for group in groups)
        self.limit = max(1, min(self._max_requests, self._max_bytes * len(items) // max(nbytes, 1)))

    def pending(self) -> int:
        """Requests buffered and not yet summarised."""
        return len(self._queue)

    def roll(self) -> list[WindowSummary]:
        """Close every open window that saw at least one request; the next request opens a new one."""
        with self._lock:
            with self._meta:
                self._starts.clear()
            self._cur = (None, "", None, None)  # the next request notes its model and its window's start
            self._summarise_locked()
            now = datetime.now(UTC)
            closed = [w.close(now) for w in self._windows.values() if w.requests]
            self._windows.clear()
            with self._meta:  # a request that raced this roll may still name a model noted before it: keep those
                self._models = {d: m for d, m in self._models.items() if d in self._seen}
                self._seen = set()
        return closed


def _classes(output: str, ref: ReferenceStats | None) -> int | None:
    for item in ref.outputs if ref else []:
        if isinstance(item, OutputReference) and item.output == output and item.kind == "classes":
            return len(item.class_counts) if item.class_counts else None
    return None
