"""The windows behind :mod:`device_agent.telemetry.recorder`: what a bundle's requests are copied as, and the open
window of one bundle that counts them and feeds its summaries (:mod:`device_agent.telemetry.summaries`).

Split from the recorder so that module holds only the request path and the buffering; nothing here runs
on a request.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

from device_agent._lazy import lazy_module
from device_agent.serving.runtime import LoadedModel
from device_agent.telemetry.summaries import FeatureBlock, OutputStats, WholeInput, _counts
from edgeota_contract.logs import log_event
from edgeota_contract.manifest import REFERENCE_STATS_FILE
from edgeota_contract.telemetry import (
    LATENCY_EDGES_MS,
    FeatureSummary,
    OutputReference,
    OutputSummary,
    ReferenceStats,
)

if TYPE_CHECKING:
    import numpy as np
else:
    np = lazy_module("numpy")

__all__ = [
    "FEATURE_BATCH_ROWS",
    "NativeState",
    "Plan",
    "SlowMarker",
    "Template",
    "Window",
    "WindowSummary",
    "add_buffered",
    "copies",
    "load_reference",
    "native_arming",
    "template_for",
]

log = logging.getLogger("device_agent.telemetry")

FEATURE_BATCH_ROWS = 1024
"""Sampled input rows summarised together (the fast path): past this, a feature batch costs ~0.3 us a row."""
NATIVE_MAX_CLASSES = 32
"""Class outputs up to this wide are summarised by the C path (as ``telemetry_summaries``' column loop)."""

NativeState = tuple[Any, int, int, list[int], list[int] | None, list[int] | None, int, int, list[bytes]]
"""What the C path's ``take()`` returns: (plan, requests, errors, latency counts, class counts, confidence
counts, output NaN count, sampled requests, their input bytes in recording order)."""


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
    feature_requests: int | None  # successful requests the features cover; None: all of them
    outputs: list[OutputSummary]


def load_reference(model: LoadedModel) -> ReferenceStats | None:
    """The bundle's reference statistics, or None when they cannot be read (telemetry then skips features)."""
    try:
        return ReferenceStats.model_validate_json((model.folder / REFERENCE_STATS_FILE).read_bytes())
    except (OSError, ValueError) as exc:
        log_event(log, "reference_stats_unreadable", level=logging.WARNING, detail=str(exc)[:200])
        return None


@dataclass(frozen=True)
class Template:
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


def template_for(model: LoadedModel) -> Template:
    refs = load_reference(model)
    names = {r.input for r in refs.features} if refs else set()
    m = model.manifest
    inputs = tuple(s.name for s in m.inputs if s.name in names and s.dtype != "string")
    outputs = tuple(s.name for s in m.outputs if s.dtype != "string")
    if len(inputs) != 1 or len(outputs) != 1:
        return Template(refs, inputs, outputs, None)
    try:  # the session enforces its input dims, so a request that succeeded has rows of exactly this shape
        in_row = _fixed_row(model.session.get_inputs(), inputs[0])
        out_row = _fixed_row(model.session.get_outputs(), outputs[0])
        in_spec = next(s for s in m.inputs if s.name == inputs[0])
        out_spec = next(s for s in m.outputs if s.name == outputs[0])
        in_dtype, out_dtype = np.dtype(_dtype(in_spec.dtype)), np.dtype(_dtype(out_spec.dtype))
    except Exception:  # a session without shape information, an unknown dtype: the general path
        return Template(refs, inputs, outputs, None)
    if in_row is None or out_row is None:
        return Template(refs, inputs, outputs, None)
    return Template(refs, inputs, outputs, (inputs[0], outputs[0]), in_dtype, math.prod(in_row), out_dtype, out_row)


def native_arming(t: Template) -> tuple[str, str, int, int, int, int, int] | None:
    """The C path's ``arm()`` arguments after (model, tag) for a bundle of the usual shape with a float
    output, or None when its requests stay in Python: (input, output, input dtype number, input row bytes,
    output dtype number, output row items, classes or 0)."""
    if t.fast is None or t.out_dtype not in (np.float32, np.float64):
        return None
    classes = _classes(t.fast[1], t.refs) or 0
    if classes > NATIVE_MAX_CLASSES:
        return None
    if classes and t.out_row[-1] != classes:
        classes = 0  # as OutputStats.add: only the NaN count when the last axis is not the class axis
    in_row_bytes = t.in_width * t.in_dtype.itemsize
    return (t.fast[0], t.fast[1], t.in_dtype.num, in_row_bytes, t.out_dtype.num, math.prod(t.out_row), classes)


def _dtype(name: str) -> str:
    return {"float": "float32", "double": "float64", "half": "float16", "long": "int64", "int": "int32"}.get(name, name)


Copy = tuple[bytes, tuple[int, ...], Any]  # an array's row-major bytes, shape and dtype


def copies(values: dict[str, Any], names: tuple[str, ...]) -> list[Copy]:
    arrays = [np.asarray(values.get(n, np.nan)) for n in names]  # a missing one: 0-d, never a feature
    return [(a.tobytes(), a.shape, a.dtype) for a in arrays]


class Window:
    """The open window of one bundle: counts and the summaries of its inputs and outputs."""

    def __init__(self, model: LoadedModel, template: Template, started: datetime) -> None:
        self.model = model
        self.template = template
        self.started = started
        self.requests = 0
        self.errors = 0
        self.sampled = 0  # successful requests whose inputs were copied and summarised
        self.latency = np.zeros(len(LATENCY_EDGES_MS) + 1, dtype=np.int64)
        # Sampled rows of the fast path wait here (recording order) until FEATURE_BATCH_ROWS of them can be
        # summarised together: a feature batch costs ~0.1 ms whatever its size, and a 1/16 sample of a
        # request batch is only ~64 rows.
        self.pending: list[bytes] = []
        self.pending_bytes = 0
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

    def add_fast(self, t: Template, ins: list[Any], outs: list[Any], latencies: list[int]) -> int:
        """Requests buffered as bare row bytes (None for a failed one), in recording order; returns their bytes."""
        failed = ins.count(None)
        self._count(latencies, failed)
        if failed == len(ins):
            return 0
        if failed:
            ins = [a for a in ins if a is not None]
            outs = [b for b in outs if b is not None]
        self.sampled += len(ins) - ins.count(b"")  # an unsampled request's input is b""
        data = b"".join(ins)
        self._add_rows(data)
        out_data = b"".join(outs)
        if len(out_data) % (t.out_dtype.itemsize * math.prod(t.out_row)) == 0:
            self.copied[0].add(np.frombuffer(out_data, dtype=t.out_dtype).reshape(-1, *t.out_row))
        else:  # the model returned another shape than it declares: do not guess its rows
            log_event(log, "telemetry_output_shape_unexpected", level=logging.WARNING, output=self.copied[0].name)
        return len(data) + len(out_data)

    def add_native(self, taken: NativeState) -> int:
        """What the C path summarised (counts and histograms) and copied (sampled rows); returns those bytes."""
        _, requests, errors, latency, classes, confidence, nan, sampled, rows = taken
        self.requests += requests
        self.errors += errors
        self.latency += np.asarray(latency, dtype=np.int64)
        output = self.copied[0]
        output.nan_count += nan
        if classes is not None and confidence is not None:
            output.add_counts(classes, confidence)
        self.sampled += sampled
        data = b"".join(rows)
        self._add_rows(data)
        return len(data)

    def _add_rows(self, data: bytes) -> None:
        """Sampled rows of the fast path's input (row bytes, recording order) wait for a feature batch."""
        if not data:
            return
        t = self.template
        self.pending.append(data)
        self.pending_bytes += len(data)
        if self.pending_bytes >= FEATURE_BATCH_ROWS * t.in_width * t.in_dtype.itemsize:
            self.flush_features()

    def flush_features(self) -> None:
        """Summarise the sampled rows waiting in :attr:`pending` (the fast path's), in recording order."""
        if not self.pending:
            return
        t = self.template
        data = b"".join(self.pending)
        self.pending, self.pending_bytes = [], 0
        view = np.frombuffer(data, dtype=t.in_dtype).reshape(-1, t.in_width)
        block, whole = self.inputs[0]
        if block.applies(t.in_width):
            block.add(view)
        if whole.refs:
            whole.add([view])

    def add_general(self, ins: list[Any], outs: list[Any], latencies: list[int]) -> int:
        """Requests buffered with shapes (lists of copies per input/output), in recording order."""
        failed = ins.count(None)
        self._count(latencies, failed)
        self.flush_features()  # rows the fast path left waiting come first (recording order)
        ok = [(a, b) for a, b in zip(ins, outs, strict=True) if a is not None]
        sampled = [a for a, _ in ok if a]  # an unsampled request's inputs are []
        self.sampled += len(sampled)
        nbytes = 0
        for k, (block, whole) in enumerate(self.inputs):
            arrays = [np.frombuffer(a[k][0], dtype=a[k][2]).reshape(a[k][1]) for a in sampled]
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
        self.flush_features()
        m = self.model.manifest
        features = [f for block, whole in self.inputs for f in block.summaries() + whole.summaries()]
        return WindowSummary(
            model_name=m.model_name,
            version=m.version,
            bundle_sha256=self.model.bundle_sha256,
            window_start=self.started,
            window_end=now,
            request_count=self.requests,
            error_count=self.errors,
            latency_counts=[int(c) for c in self.latency],
            features=features,
            feature_requests=self.sampled if features else None,
            outputs=[o.summary() for o in self.outputs],
        )


_plan_order = itertools.count()


class Plan:
    """One model's buffering in the recorder's current window (``device_agent.telemetry.recorder``): the request path
    reads only these slots."""

    __slots__ = ("digest", "fast_model", "input", "model", "native", "order", "output", "slow", "started", "template")

    def __init__(self, model: LoadedModel | None, template: Template | None, started: datetime) -> None:
        self.order = next(_plan_order)  # the C path is armed for newer plans only (no ping-pong during a swap)
        self.model = model
        self.digest = model.bundle_sha256 if model is not None else ""
        self.template = template
        self.started = started
        fast = template.fast if template is not None else None
        self.fast_model = model if fast is not None else None  # set: the usual shape (the hot path's one check)
        self.input, self.output = fast if fast is not None else ("", "")
        self.slow = SlowMarker(self)
        # the C path's arm() arguments after (model, tag); None: this model's requests stay in Python
        self.native = native_arming(template) if model is not None and template is not None else None


class SlowMarker:
    """Marks buffered requests of a plan that carry shapes (the general path) rather than bare row bytes."""

    __slots__ = ("plan",)

    def __init__(self, plan: Plan) -> None:
        self.plan = plan


def add_buffered(items: list[Any], window_for: Callable[[Plan], Window]) -> int:
    """Add a batch of the recorder's flat buffer (``marker, input copy, output copy, latency ns`` per request) to
    the windows ``window_for`` gives each plan, in recording order; returns the bytes the requests held."""
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
        ins, outs, lats = items[4 * lo + 1 : 4 * hi : 4], items[4 * lo + 2 : 4 * hi : 4], items[4 * lo + 3 : 4 * hi : 4]
        if isinstance(marker, SlowMarker):
            nbytes += window_for(marker.plan).add_general(ins, outs, lats)
        elif marker.fast_model is not None:
            assert marker.template is not None
            nbytes += window_for(marker).add_fast(marker.template, ins, outs, lats)
        else:  # only failed requests of a model off the fast path
            nbytes += window_for(marker).add_general(ins, outs, lats)
    return nbytes


def _classes(output: str, ref: ReferenceStats | None) -> int | None:
    for item in ref.outputs if ref else []:
        if isinstance(item, OutputReference) and item.output == output and item.kind == "classes":
            return len(item.class_counts) if item.class_counts else None
    return None
