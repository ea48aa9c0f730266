"""Telemetry windows: additive per-model-version summaries of live requests, summarised in batches.

The request path (:meth:`TelemetryRecorder.__call__`, a :class:`~device_agent.runtime.ModelRuntime`
listener) does as little as Python allows: for the usual model (one input with reference
statistics, one output, fixed row shapes) it copies the input and output bytes (``tobytes``: the
application may reuse its buffers after ``predict`` returns) and appends them with the integer
latency to a flat list, one atomic ``list.extend`` of four items. Everything numpy does happens in
batches (:mod:`device_agent.telemetry_summaries`): on the process's background summariser thread
(:mod:`device_agent.telemetry_worker`) when the buffer holds ``limit`` requests, and synchronously
on :meth:`TelemetryRecorder.roll` (and so on stop).

Why bytes in a list rather than rows written into a preallocated numpy ring: ``a.tobytes()`` costs
about 70 ns, an ndarray slice assignment 250-300 ns; a list append holds no lock and needs no
slot reservation, so concurrent requests never wait on each other; and bytes and ints are not
tracked by the garbage collector, so the buffer adds no GC work. The batch joins the bytes and
views them as one ``[rows, features]`` matrix.
"""

from __future__ import annotations

import logging
import math
import threading
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from device_agent._lazy import lazy_module
from device_agent.runtime import LoadedModel
from device_agent.telemetry_summaries import FeatureBlock, OutputStats, WholeInput, _counts, row_confidences
from device_agent.telemetry_worker import SHARED, Summariser
from edgeota_contract.logs import log_event
from edgeota_contract.manifest import REFERENCE_STATS_FILE
from edgeota_contract.telemetry import (
    LATENCY_EDGES_MS,
    FeatureSummary,
    OutputReference,
    OutputSummary,
    ReferenceStats,
)

__all__ = [
    "MAX_BUFFERED_BYTES",
    "MAX_BUFFERED_REQUESTS",
    "TelemetryRecorder",
    "WindowSummary",
    "load_reference",
    "row_confidences",
]

if TYPE_CHECKING:
    import numpy as np
else:
    np = lazy_module("numpy")

log = logging.getLogger("device_agent.telemetry")

MAX_BUFFERED_REQUESTS = 1024
"""At most this many requests wait in the buffer before they are summarised (fewer for large inputs).

Why not fewer: a batch has a fixed numpy cost (about 0.15 ms for 64 features), so smaller batches cost
more per request, on the summariser thread and on the request thread alike (``telemetry_batch_sweep``
in the agent bench: per-request cost falls steadily from 64 to 1024 rows)."""
MAX_BUFFERED_BYTES = 4 << 20
"""The buffer limit adapts so that buffered inputs and outputs stay near this many bytes."""


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


def load_reference(model: LoadedModel) -> ReferenceStats | None:
    """The bundle's reference statistics, or None when they cannot be read (telemetry then skips features)."""
    try:
        return ReferenceStats.model_validate_json((model.folder / REFERENCE_STATS_FILE).read_bytes())
    except (OSError, ValueError) as exc:
        log_event(log, "reference_stats_unreadable", level=logging.WARNING, detail=str(exc)[:200])
        return None


@dataclass(frozen=True)
class _Template:
    """What to copy for one bundle, and how rows of the usual (fast) shape are rebuilt."""

    refs: ReferenceStats | None
    inputs: tuple[str, ...]  # inputs with reference statistics (copied), manifest order
    outputs: tuple[str, ...]  # non-string outputs (copied), manifest order
    fast: tuple[str, str] | None  # (input, output) when both have fixed row shapes; else None
    in_dtype: Any = None
    in_width: int = 0  # features per row of the fast input
    out_dtype: Any = None
    out_row: tuple[int, ...] = ()


def _fixed_row(session_args: Any, name: str) -> tuple[int, ...] | None:
    """The row shape (all axes after the first) when the model itself fixes it, else None."""
    for arg in session_args:
        if arg.name == name:
            shape = list(arg.shape)
            if len(shape) >= 2 and all(isinstance(d, int) and d > 0 for d in shape[1:]):
                return tuple(shape[1:])
    return None


def _template(model: LoadedModel) -> _Template:
    refs = load_reference(model)
    names = {r.input for r in refs.features} if refs else set()
    m = model.manifest
    inputs = tuple(s.name for s in m.inputs if s.name in names and s.dtype != "string")
    outputs = tuple(s.name for s in m.outputs if s.dtype != "string")
    if len(inputs) != 1 or len(outputs) != 1:
        return _Template(refs, inputs, outputs, None)
    try:  # the session enforces its input dims, so a request that succeeded has rows of exactly this shape
        in_row = _fixed_row(model.session.get_inputs(), inputs[0])
        out_row = _fixed_row(model.session.get_outputs(), outputs[0])
        in_spec = next(s for s in m.inputs if s.name == inputs[0])
        out_spec = next(s for s in m.outputs if s.name == outputs[0])
        in_dtype, out_dtype = np.dtype(_dtype(in_spec.dtype)), np.dtype(_dtype(out_spec.dtype))
    except Exception:  # a session without shape information, an unknown dtype: the general path
        return _Template(refs, inputs, outputs, None)
    if in_row is None or out_row is None:
        return _Template(refs, inputs, outputs, None)
    return _Template(refs, inputs, outputs, (inputs[0], outputs[0]), in_dtype, math.prod(in_row), out_dtype, out_row)


def _dtype(name: str) -> str:
    return {"float": "float32", "double": "float64", "half": "float16", "long": "int64", "int": "int32"}.get(name, name)


class _Plan:
    """One model's buffering in the current window: the hot path reads only these slots."""

    __slots__ = ("digest", "fast", "input", "model", "output", "slow", "started", "template")

    def __init__(self, model: LoadedModel | None, template: _Template | None, started: datetime) -> None:
        self.model = model
        self.digest = model.bundle_sha256 if model is not None else ""
        self.template = template
        self.started = started
        fast = template.fast if template is not None else None
        self.fast = fast is not None
        self.input, self.output = fast if fast is not None else ("", "")
        self.slow = _Slow(self)


class _Slow:
    """Marks buffered requests of a plan that carry shapes (the general path) rather than bare row bytes."""

    __slots__ = ("plan",)

    def __init__(self, plan: _Plan) -> None:
        self.plan = plan


_Copy = tuple[bytes, tuple[int, ...], Any]  # an array's row-major bytes, shape and dtype


def _copies(values: dict[str, Any], names: tuple[str, ...]) -> list[_Copy]:
    arrays = [np.asarray(values.get(n, np.nan)) for n in names]  # a missing one: 0-d, never a feature
    return [(a.tobytes(), a.shape, a.dtype) for a in arrays]


class _Window:
    """The open window of one bundle: counts and the summaries of its inputs and outputs."""

    def __init__(self, model: LoadedModel, template: _Template, started: datetime) -> None:
        self.model = model
        self.started = started
        self.requests = 0
        self.errors = 0
        self.latency = np.zeros(len(LATENCY_EDGES_MS) + 1, dtype=np.int64)
        refs = template.refs.features if template.refs else []
        self.inputs: list[tuple[FeatureBlock, WholeInput]] = []
        for name in template.inputs:
            mine = [r for r in refs if r.input == name]
            self.inputs.append(
                (
                    FeatureBlock([r for r in mine if r.feature is not None]),
                    WholeInput([r for r in mine if r.feature is None]),
                )
            )
        self.outputs = [OutputStats(s.name, _classes(s.name, template.refs)) for s in model.manifest.outputs]
        self.copied = [o for o in self.outputs if o.name in template.outputs]

    def _count(self, latencies: list[int], failed: int) -> None:
        self.requests += len(latencies)
        self.errors += failed
        ns = np.fromiter(latencies, dtype=np.int64, count=len(latencies))
        self.latency += _counts(np.asarray(LATENCY_EDGES_MS), ns / 1e6)  # as bisect_right(edges, ns / 1e6)

    def add_fast(self, t: _Template, ins: list[Any], outs: list[Any], latencies: list[int]) -> int:
        """Requests buffered as bare row bytes (None for a failed one), in recording order; returns their bytes."""
        failed = ins.count(None)
        self._count(latencies, failed)
        if failed == len(ins):
            return 0
        if failed:
            ins = [a for a in ins if a is not None]
            outs = [b for b in outs if b is not None]
        data = b"".join(ins)
        view = np.frombuffer(data, dtype=t.in_dtype).reshape(-1, t.in_width)
        block, whole = self.inputs[0]
        if block.applies(t.in_width):
            block.add(view)
        if whole.refs:
            whole.add([view])
        out_data = b"".join(outs)
        if len(out_data) % (t.out_dtype.itemsize * math.prod(t.out_row)) == 0:
            self.copied[0].add(np.frombuffer(out_data, dtype=t.out_dtype).reshape(-1, *t.out_row))
        else:  # the model returned another shape than it declares: do not guess its rows
            log_event(log, "telemetry_output_shape_unexpected", level=logging.WARNING, output=self.copied[0].name)
        return len(data) + len(out_data)

    def add_general(self, ins: list[Any], outs: list[Any], latencies: list[int]) -> int:
        """Requests buffered with shapes (lists of copies per input/output), in recording order."""
        failed = ins.count(None)
        self._count(latencies, failed)
        ok = [(a, b) for a, b in zip(ins, outs, strict=True) if a is not None]
        nbytes = 0
        for k, (block, whole) in enumerate(self.inputs):
            arrays = [np.frombuffer(a[k][0], dtype=a[k][2]).reshape(a[k][1]) for a, _ in ok]
            nbytes += sum(x.nbytes for x in arrays)
            whole.add(arrays)
            rows = [x.reshape(len(x), -1) for x in arrays if x.ndim and x.size]
            start = 0
            for i in range(1, len(rows) + 1):  # consecutive requests of one width, in order
                if i == len(rows) or rows[i].shape[1] != rows[start].shape[1]:
                    if block.applies(rows[start].shape[1]):
                        block.add(rows[start] if i - start == 1 else np.concatenate(rows[start:i]))
                    start = i
        for k, out in enumerate(self.copied):
            arrays = [np.frombuffer(b[k][0], dtype=b[k][2]).reshape(b[k][1]) for _, b in ok]
            nbytes += sum(x.nbytes for x in arrays)
            if arrays:
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
            features=[f for block, whole in self.inputs for f in block.summaries() + whole.summaries()],
            outputs=[o.summary() for o in self.outputs],
        )


class TelemetryRecorder:
    """Accumulates requests into the current window per model version (a :class:`ModelRuntime` listener).

    Guarantees: every request is counted in exactly one window, the one open when it was recorded;
    the summaries are exactly those of summarising each request on its own, in recording order
    (``tests/agent/test_telemetry_exact.py`` checks this against a plain per-value reference);
    inputs and outputs are copied, never referenced. Thread-safe: requests never take a lock on
    the usual path. The request that finds ``limit`` requests buffered queues one job on the
    background :class:`~device_agent.telemetry_worker.Summariser` and goes on; only when the
    summariser falls ``4 * limit`` requests behind does a request summarise the buffer itself
    (and wait for a batch that is running), so memory stays bounded. With ``background=False``
    the request that finds ``limit`` buffered summarises them (as above, waiting only at
    ``4 * limit``). :meth:`roll` summarises whatever is buffered synchronously, so a batch still
    queued never moves a request into another window. The buffer holds about ``max_bytes`` of
    copies once the first batch showed the request size. Call :meth:`close` when done with it.
    """

    def __init__(
        self,
        max_requests: int = MAX_BUFFERED_REQUESTS,
        max_bytes: int = MAX_BUFFERED_BYTES,
        background: bool = True,
        summariser: Summariser | None = None,
    ) -> None:
        """``background``: full buffers go to ``summariser`` (default: the process-wide
        :data:`~device_agent.telemetry_worker.SHARED`); False summarises on the request thread."""
        self._lock = threading.Lock()  # windows and summarising; never taken on the request path
        self._meta = threading.Lock()  # plans, templates, queueing a batch
        self._worker = (summariser or SHARED) if background else None
        self._queued = False  # a batch job of this recorder waits in the summariser's queue
        self._attached = False  # counted in the summariser's users (until close)
        self._buf: list[Any] = []  # (marker, input copy, output copy, latency ns) per request, flat
        self._extend = self._buf.extend
        self._max_requests = max(1, max_requests)
        self._max_bytes = max(1, max_bytes)
        self._set_limit(min(64, self._max_requests))
        self._plan = _Plan(None, None, datetime.now(UTC))  # the last model seen (see __call__)
        self._plans: dict[str, _Plan] = {}  # this window's plans by bundle digest
        self._templates: dict[str, _Template] = {}
        self._windows: dict[str, _Window] = {}
        self._rolled_at = datetime.now(UTC)

    def _set_limit(self, limit: int) -> None:
        self.limit = limit
        self._limit4 = 4 * limit  # the buffer holds four items per request
        # the request path's one comparison: the limit, or while a batch job is queued, the fallback point
        self._check = 4 * self._limit4 if self._queued else self._limit4

    def __call__(
        self, model: LoadedModel, inputs: dict[str, Any], outputs: dict[str, np.ndarray] | None, latency_ns: int
    ) -> None:
        plan = self._plan  # one read: a concurrent swap cannot mix two models' plans
        if plan.model is not model:
            plan = self._first_seen(model)
        if plan.fast and outputs is not None:
            try:
                self._extend((plan, inputs[plan.input].tobytes(), outputs[plan.output].tobytes(), latency_ns))
            except (AttributeError, KeyError):  # not ndarrays (a list, say): the general path
                self._extend(self._entry(plan, inputs, outputs, latency_ns))
        else:
            self._extend(self._entry(plan, inputs, outputs, latency_ns))
        if len(self._buf) >= self._check:
            self._full()

    def _full(self) -> None:
        """The buffer reached its limit: hand it to the summariser, or summarise here when there is
        none or it fell ``4 * limit`` requests behind (bounded memory; this request waits for it)."""
        behind = len(self._buf) >= 4 * self._limit4
        if self._worker is None or behind:
            self._summarise(block=behind)
            return
        with self._meta:
            if self._queued:
                return
            self._queued = True
            self._check = 4 * self._limit4
            if not self._attached:
                self._attached = True
                self._worker.attach()
        self._worker.submit(self._background)

    def _background(self) -> None:
        """The summariser's job: summarise what is buffered now (later requests may queue the next job)."""
        self._queued = False
        self._check = self._limit4
        with self._lock:
            self._summarise_locked()

    def _entry(
        self, plan: _Plan, inputs: dict[str, Any], outputs: dict[str, Any] | None, latency_ns: int
    ) -> tuple[Any, ...]:
        """A request off the usual path: a failed one (no copies), or copies with their shapes."""
        if outputs is None:
            return (plan, None, None, latency_ns)
        t = plan.template
        assert t is not None
        return (plan.slow, _copies(inputs, t.inputs), _copies(outputs, t.outputs), latency_ns)

    def _first_seen(self, model: LoadedModel) -> _Plan:
        """The plan of a model in this window (on its first request after a swap or a roll)."""
        with self._meta:
            digest = model.bundle_sha256
            plan = self._plans.get(digest)
            if plan is None or plan.model is not model:
                template = self._templates.get(digest)
                if template is None:
                    template = self._templates[digest] = _template(model)
                plan = self._plans[digest] = _Plan(model, template, datetime.now(UTC))
            self._plan = plan
            return plan

    def _window_for(self, plan: _Plan) -> _Window:
        window = self._windows.get(plan.digest)
        if window is None:
            assert plan.model is not None and plan.template is not None
            # a request that read its plan just before a roll lands in the next window: start no earlier
            window = _Window(plan.model, plan.template, max(plan.started, self._rolled_at))
            self._windows[plan.digest] = window
        return window

    def _summarise(self, block: bool) -> None:
        if not self._lock.acquire(blocking=block):
            return  # another request is summarising; this one's entry waits for the next batch
        try:
            self._summarise_locked()
        finally:
            self._lock.release()

    def _summarise_locked(self) -> None:
        buf = self._buf
        n = len(buf)  # a multiple of 4: each request is one atomic extend
        if not n:
            return
        items = buf[:n]
        del buf[:n]  # later requests stay for the next batch
        markers = items[0::4]
        first = markers[0]
        runs = [(first, 0, len(markers))]
        if markers.count(first) != len(markers):  # several models or paths: consecutive runs, in order
            runs, start = [], 0
            for i in range(1, len(markers) + 1):
                if i == len(markers) or markers[i] is not markers[start]:
                    runs.append((markers[start], start, i))
                    start = i
        nbytes = 0
        for marker, lo, hi in runs:
            ins, outs, lats = (
                items[4 * lo + 1 : 4 * hi : 4],
                items[4 * lo + 2 : 4 * hi : 4],
                items[4 * lo + 3 : 4 * hi : 4],
            )
            if isinstance(marker, _Slow):
                nbytes += self._window_for(marker.plan).add_general(ins, outs, lats)
            elif marker.fast:
                assert marker.template is not None
                nbytes += self._window_for(marker).add_fast(marker.template, ins, outs, lats)
            else:  # only failed requests of a model off the fast path
                nbytes += self._window_for(marker).add_general(ins, outs, lats)
        requests = n // 4
        self._set_limit(max(1, min(self._max_requests, self._max_bytes * requests // max(nbytes, 1))))

    def pending(self) -> int:
        """Requests buffered and not yet summarised."""
        return len(self._buf) // 4

    def roll(self) -> list[WindowSummary]:
        """Close every open window that saw at least one request; the next request opens a new one."""
        with self._lock:
            with self._meta:
                self._plans = {}
                self._plan = _Plan(None, None, datetime.now(UTC))  # the next request notes its window's start
            self._summarise_locked()
            now = datetime.now(UTC)
            self._rolled_at = now
            closed = [w.close(now) for w in self._windows.values() if w.requests]
            used = set(self._windows)
            self._windows = {}
            with self._meta:  # keep the templates of models still in use (reference stats are read once)
                used |= set(self._plans)
                self._templates = {d: t for d, t in self._templates.items() if d in used}
        return closed

    def close(self) -> None:
        """Release the background summariser (the agent calls this on stop, after a last :meth:`roll`).

        Drops a queued batch job of this recorder (its requests stay buffered for the next
        :meth:`roll`) and waits for one that is running; once no recorder is attached, the
        summariser's thread exits. Idempotent. The recorder stays usable: a later full buffer
        attaches it again.
        """
        with self._meta:
            attached, self._attached = self._attached, False
        if attached and self._worker is not None:
            self._worker.detach(self._background)
        with self._lock:  # a batch of this recorder running on the summariser finishes first
            self._queued = False
            self._check = self._limit4


def _classes(output: str, ref: ReferenceStats | None) -> int | None:
    for item in ref.outputs if ref else []:
        if isinstance(item, OutputReference) and item.output == output and item.kind == "classes":
            return len(item.class_counts) if item.class_counts else None
    return None
