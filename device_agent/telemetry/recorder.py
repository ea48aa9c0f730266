"""Telemetry windows: additive per-model-version summaries of live requests, summarised in batches.

Two request paths give the same windows. Where ``device_agent._telemetry_native`` is built (the default
install, with a C compiler), the listener is its ``Accumulator.record``: the usual request of the model it
is armed for is counted and summarised in C (outputs, latency, a copy of a sampled input) and everything
else comes to :meth:`TelemetryRecorder._off_path` below; ``docs/agent.md`` says why and what it costs.
Without it, the Python request path described next takes every request.

The request path (:attr:`TelemetryRecorder.record`, a :class:`~device_agent.serving.runtime.ModelRuntime`
listener) does as little as Python allows: for the usual model (one input with reference
statistics, one output, fixed row shapes) it copies the output bytes and, for a uniform random
sample of requests (``feature_sample_rate``), the input bytes (``tobytes``: the application may
reuse its buffers after ``predict`` returns), and appends them with the integer latency to a flat
list, one atomic ``list.extend`` of four items.

Why sample the inputs: the per-feature summaries (64 features on the digits CNN: histograms on the
reference edges plus moments) were the largest share of the batch work (~0.3 us a request warm,
beside a ~25 us inference). Drift (PSI) compares proportions, which a uniform sample estimates
without bias; a 1/16 sample of a 60 s window at 100 requests/s still holds ~375 rows per feature.
Request and error counts, latency and output summaries (the health gates) always cover every
request. Everything numpy does happens in batches (:mod:`device_agent.telemetry.summaries`): on
the request that finds ``limit`` requests buffered (or, with ``background=True``, on the process's
summariser thread, :mod:`device_agent.telemetry.worker`), and synchronously on
:meth:`TelemetryRecorder.roll` (and so on stop); sampled input rows wait until
``FEATURE_BATCH_ROWS`` of them are summarised together.

Why bytes in a list rather than rows written into a preallocated numpy ring: ``a.tobytes()`` costs
about 70 ns, an ndarray slice assignment 250-300 ns; a list append holds no lock and needs no
slot reservation, so concurrent requests never wait on each other; and bytes and ints are not
tracked by the garbage collector, so the buffer adds no GC work. The batch joins the bytes and
views them as one ``[rows, features]`` matrix.
"""

from __future__ import annotations

import contextlib
import random
import threading
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from device_agent._lazy import lazy_module
from device_agent.serving.runtime import Listener, LoadedModel
from device_agent.telemetry.summaries import row_confidences
from device_agent.telemetry.windows import (
    FEATURE_BATCH_ROWS,
    NativeState,
    Plan,
    Template,
    Window,
    WindowSummary,
    add_buffered,
    copies,
    load_reference,
    template_for,
)
from device_agent.telemetry.worker import SHARED, Summariser
from edgeota_contract.telemetry import CONFIDENCE_EDGES, LATENCY_EDGES_MS

try:  # the C request path (setup.py builds it where a compiler is found; optional)
    from device_agent import _telemetry_native
except ImportError:  # pragma: no cover - exercised on installs without a compiler
    _telemetry_native = None  # type: ignore[assignment]

__all__ = [
    "FEATURE_BATCH_ROWS",
    "MAX_BUFFERED_BYTES",
    "MAX_BUFFERED_REQUESTS",
    "NATIVE_AVAILABLE",
    "TelemetryRecorder",
    "WindowSummary",
    "load_reference",
    "row_confidences",
]

if TYPE_CHECKING:
    import numpy as np
else:
    np = lazy_module("numpy")

MAX_BUFFERED_REQUESTS = 1024
"""At most this many requests wait in the buffer before they are summarised (fewer for large inputs).

Why not fewer: a batch has a fixed numpy cost, so smaller batches cost more per request, on the
summariser thread and on the request thread alike (an earlier session's batch-size sweep: the
per-request cost fell steadily from 64 to 1024 rows; 2048 was no better)."""
MAX_BUFFERED_BYTES = 4 << 20
"""The buffer limit adapts so that buffered inputs and outputs stay near this many bytes."""
DEFAULT_FEATURE_SAMPLE_RATE = 1.0
"""The recorder's own default: every request's inputs (the agent's setting defaults to 1/16)."""
NATIVE_AVAILABLE = _telemetry_native is not None
"""Whether the C request path (``device_agent._telemetry_native``) was built with this install."""


class TelemetryRecorder:
    """Accumulates requests into the current window per model version (a :class:`ModelRuntime` listener).

    Guarantees: every request is counted in exactly one window, the one open when it was recorded;
    the summaries are exactly those of summarising each request on its own, in recording order
    (``tests/agent/test_telemetry_exact.py`` checks this against a plain per-value reference);
    inputs and outputs are copied, never referenced. Thread-safe: requests never take a lock on
    the usual path. The request that finds ``limit`` requests buffered summarises them (another
    request that finds the lock held goes on; at ``4 * limit`` it waits). With ``background=True``
    it queues one job on the background :class:`~device_agent.telemetry.worker.Summariser` instead
    and goes on; only when the summariser falls ``4 * limit`` requests behind does a request
    summarise the buffer itself (and wait for a batch that is running), so memory stays bounded. :meth:`roll` summarises whatever is buffered synchronously, so a batch still
    queued never moves a request into another window. The buffer holds about ``max_bytes`` of
    copies once the first batch showed the request size. Call :meth:`close` when done with it.

    Sampling: each successful request's inputs are summarised with probability ``feature_sample_rate``
    (``random.random()``, drawn before the inputs are looked at, so the sample is uniform and independent
    of inputs and outputs); the window's ``feature_requests`` counts them. Everything else covers every
    request. With the rate 1.0 (the default here) the feature summaries are exact as above.
    """

    def __init__(
        self,
        max_requests: int = MAX_BUFFERED_REQUESTS,
        max_bytes: int = MAX_BUFFERED_BYTES,
        background: bool = False,
        summariser: Summariser | None = None,
        feature_sample_rate: float = DEFAULT_FEATURE_SAMPLE_RATE,
        native: bool | None = None,
    ) -> None:
        """``background``: full buffers go to ``summariser`` (default: the process-wide
        :data:`~device_agent.telemetry.worker.SHARED`); False summarises on the request thread.
        ``native``: summarise the usual request in C (:data:`NATIVE_AVAILABLE`); None: when it is built.

        Raises:
            ValueError: ``feature_sample_rate`` is not in (0, 1], or ``native=True`` without the C path.
        """
        if not 0 < feature_sample_rate <= 1:
            raise ValueError(f"feature_sample_rate must be in (0, 1], not {feature_sample_rate}")
        if native and _telemetry_native is None:
            raise ValueError("native=True, but device_agent._telemetry_native was not built (no C compiler?)")
        self.feature_sample_rate = feature_sample_rate
        self._every = feature_sample_rate >= 1  # the request path skips the draw
        self._lock = threading.Lock()  # windows and summarising; never taken on the request path
        self._meta = threading.Lock()  # plans, templates, queueing a batch
        self._worker = (summariser or SHARED) if background else None
        self._queued = False  # a batch job of this recorder waits in the summariser's queue
        self._attached = False  # counted in the summariser's users (until close)
        self._buf: list[Any] = []  # (marker, input copy, output copy, latency ns) per request, flat
        self._max_requests = max(1, max_requests)
        self._max_bytes = max(1, max_bytes)
        self._native: Any = None
        self._set_limit(min(64, self._max_requests))
        self._plan = Plan(None, None, datetime.now(UTC))  # the last model seen (see record)
        self._plans: dict[str, Plan] = {}  # this window's plans by bundle digest
        self._templates: dict[str, Template] = {}
        self._windows: dict[str, Window] = {}
        self._rolled_at = datetime.now(UTC)
        python_path = self._request_path()
        if _telemetry_native is not None and native is not False:
            self._native = _telemetry_native.Accumulator(
                fallback=python_path,  # other models: the Python path (with C's draw)
                unusual=self._off_path,  # the armed model's odd requests: in order with what C holds
                on_full=self._native_full,
                draw=random.random,
                rate=feature_sample_rate,
                latency_edges=LATENCY_EDGES_MS,
                confidence_edges=CONFIDENCE_EDGES,
            )
            self._native.limit_bytes = self._max_bytes
            self._set_limit(self.limit)
        self.record: Listener = self._native.record if self._native is not None else python_path
        """The listener to give :meth:`ModelRuntime.add_listener` (the same object on every read)."""

    @property
    def native(self) -> bool:
        """Whether the usual request is summarised in C (else everything runs in Python)."""
        return self._native is not None

    def _set_limit(self, limit: int) -> None:
        self.limit = limit
        self._limit4 = 4 * limit  # the buffer holds four items per request
        # the request path's one comparison: the limit, or while a batch job is queued, the fallback point
        self._check = 4 * self._limit4 if self._queued else self._limit4
        if self._native is not None:  # the C path counts sampled rows, one per request
            self._native.limit = 4 * limit if self._queued else limit

    def __call__(
        self, model: LoadedModel, inputs: dict[str, Any], outputs: dict[str, np.ndarray] | None, latency_ns: int
    ) -> None:
        """Record one request (as :attr:`record`, which is the cheaper listener)."""
        self.record(model, inputs, outputs, latency_ns)

    def _request_path(self) -> Any:
        """The per-request listener: a closure, since its cell reads cost less than attribute reads, and a
        plain function is a cheaper call than an instance's ``__call__`` (both measurable beside a 17 us
        inference). The C path calls it with its own draw (``take``) for models it is not armed for: those
        the C path cannot take (wide class outputs, integer outputs, ...) then cost what they cost in Python."""
        rec, buf = self, self._buf  # the buffer list is never replaced, only emptied
        extend, draw, every, rate = buf.extend, random.random, self._every, self.feature_sample_rate

        def record(
            model: LoadedModel,
            inputs: dict[str, Any],
            outputs: dict[str, np.ndarray] | None,
            latency_ns: int,
            take: bool | None = None,
        ) -> None:
            if take is None:  # one draw per request, first: the sample never depends on the data
                take = every or draw() < rate
            plan = rec._plan  # one read: a concurrent swap cannot mix two models' plans
            if plan.fast_model is not model:  # another model than the last one, or not the usual shape
                rec._off_path(model, inputs, outputs, latency_ns, take)
                return
            try:
                extend(
                    (plan, inputs[plan.input].tobytes() if take else b"", outputs[plan.output].tobytes(), latency_ns)  # type: ignore[index]
                )
            except (AttributeError, KeyError, TypeError):  # failed (no outputs), or not ndarrays (a list, say)
                extend(rec._entry(plan, inputs, outputs, latency_ns, take))
            if len(buf) >= rec._check:
                rec._full()

        return record

    def _off_path(
        self, model: LoadedModel, inputs: dict[str, Any], outputs: dict[str, Any] | None, latency_ns: int, take: bool
    ) -> None:
        """A request that is not the fast path's: the first of a model in this window, or of a model whose
        rows are not of one fixed shape (or, with the C path, any request it leaves to Python). ``take``: its
        inputs are in the sample."""
        plan = self._plan
        if plan.model is not model:
            plan = self._first_seen(model)
        entry = None
        if plan.fast_model is model and outputs is not None:
            with contextlib.suppress(AttributeError, KeyError, TypeError):  # not ndarrays: the general path
                entry = (
                    plan,
                    inputs[plan.input].tobytes() if take else b"",
                    outputs[plan.output].tobytes(),
                    latency_ns,
                )
        entry = entry or self._entry(plan, inputs, outputs, latency_ns, take)
        native = self._native
        if native is not None and take and outputs is not None and native.model is model:
            # The C path holds earlier sampled rows of this model: they go first (sums keep recording order).
            with self._lock:
                self._summarise_locked(adapt=False)
                self._buf.extend(entry)
                self._summarise_locked(adapt=False)
            return
        self._buf.extend(entry)
        if native is not None and plan.native is not None and native.model is not model:
            tag = native.tag
            if tag is None or tag.order < plan.order:
                self._arm(plan)
                return
        if len(self._buf) >= self._check:
            self._full()

    def _arm(self, plan: Plan) -> None:
        """Hand ``plan``'s model to the C path (after what Python and C hold now is summarised, in order)."""
        with self._lock:
            native = self._native
            taken = native.take(True)  # atomic: from here until arm() every request comes to Python
            self._summarise_locked(taken, adapt=False)  # a partial batch says little about request sizes
            with self._meta:
                if self._plans.get(plan.digest) is not plan:  # a roll came first: the next request arms
                    return
            assert plan.native is not None
            native.arm(plan.model, plan, *plan.native)

    def _native_full(self) -> None:
        """The C path holds ``limit`` sampled rows (it calls again only at ``4 * limit`` while a job is
        queued: then it fell behind)."""
        self._hand_off(behind=self._queued)

    def _full(self) -> None:
        """The buffer reached its limit (``4 * limit`` requests: it fell behind)."""
        self._hand_off(behind=len(self._buf) >= 4 * self._limit4)

    def _hand_off(self, behind: bool) -> None:
        """Hand what is buffered to the summariser, or summarise here when there is none or it fell
        ``behind`` (bounded memory; this request waits for it)."""
        if self._worker is None or behind:
            self._summarise(block=behind)
            return
        with self._meta:
            if self._queued:
                return
            self._queued = True
            self._set_limit(self.limit)
            if not self._attached:
                self._attached = True
                self._worker.attach()
        self._worker.submit(self._background)

    def _background(self) -> None:
        """The summariser's job: summarise what is buffered now (later requests may queue the next job)."""
        self._queued = False
        self._set_limit(self.limit)
        with self._lock:
            self._summarise_locked()

    def _entry(
        self, plan: Plan, inputs: dict[str, Any], outputs: dict[str, Any] | None, latency_ns: int, take: bool
    ) -> tuple[Any, ...]:
        """A request off the usual path: a failed one (no copies), or copies with their shapes (the inputs'
        only when ``take``: in the sample)."""
        if outputs is None:
            return (plan, None, None, latency_ns)
        t = plan.template
        assert t is not None
        return (plan.slow, copies(inputs, t.inputs) if take else [], copies(outputs, t.outputs), latency_ns)

    def _first_seen(self, model: LoadedModel) -> Plan:
        """The plan of a model in this window (on its first request after a swap or a roll)."""
        with self._meta:
            digest = model.bundle_sha256
            plan = self._plans.get(digest)
            if plan is None or plan.model is not model:
                template = self._templates.get(digest)
                if template is None:
                    template = self._templates[digest] = template_for(model)
                plan = self._plans[digest] = Plan(model, template, datetime.now(UTC))
            self._plan = plan
            return plan

    def _window_for(self, plan: Plan) -> Window:
        window = self._windows.get(plan.digest)
        if window is None:
            assert plan.model is not None and plan.template is not None
            # a request that read its plan just before a roll lands in the next window: start no earlier
            window = Window(plan.model, plan.template, max(plan.started, self._rolled_at))
            self._windows[plan.digest] = window
        return window

    def _summarise(self, block: bool) -> None:
        if not self._lock.acquire(blocking=block):
            return  # another request is summarising; this one's entry waits for the next batch
        try:
            self._summarise_locked()
        finally:
            self._lock.release()

    def _summarise_locked(self, taken: NativeState | None = None, adapt: bool = True) -> None:
        """Summarise the Python buffer, then what the C path holds (``taken``: what was already taken from
        it). In that order: Python holds a model's requests from before the C path was armed for it."""
        native = self._native
        if taken is None and native is not None:
            taken = native.take(False)
        requests, nbytes = self._summarise_buffer()  # the adaptive limit: from the bytes requests needed
        if taken is not None:
            plan: Plan = taken[0]
            nbytes += self._window_for(plan).add_native(taken)
            requests += taken[7]
        if requests and adapt:
            self._set_limit(max(1, min(self._max_requests, self._max_bytes * requests // max(nbytes, 1))))

    def _summarise_buffer(self) -> tuple[int, int]:
        """Summarise the Python buffer; returns (requests, their bytes)."""
        buf = self._buf
        n = len(buf)  # a multiple of 4: each request is one atomic extend
        if not n:
            return 0, 0
        items = buf[:n]
        del buf[:n]  # later requests stay for the next batch
        return n // 4, add_buffered(items, self._window_for)

    def pending(self) -> int:
        """Requests buffered and not yet summarised (in Python, or counted in C but not yet in a window)."""
        return len(self._buf) // 4 + (self._native.pending if self._native is not None else 0)

    def roll(self) -> list[WindowSummary]:
        """Close every open window that saw at least one request; the next request opens a new one."""
        with self._lock:
            with self._meta:
                self._plans = {}
                self._plan = Plan(None, None, datetime.now(UTC))  # the next request notes its window's start
            # the C path disarmed: the next request of any model comes to Python and notes its window's start
            self._summarise_locked(self._native.take(True) if self._native is not None else None)
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
            self._set_limit(self.limit)
