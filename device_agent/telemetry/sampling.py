"""Sampling of raw inputs for retraining, in two streams, uploaded over HTTP.

* ``uniform``: each request is kept with probability ``rate``, decided by a random draw alone, so the
  stream is uniform over traffic and independent of the inputs, outputs and the model's confidence.
* ``hard``: requests the model itself flags: rows whose confidence (the contract's rule, as telemetry
  computes it: the max of a probability row, else the max of its softmax) is below a threshold, and,
  while a shadow candidate runs, rows where the candidate's top-1 class differs from the served one. A
  request the uniform draw took is not taken again by the hard stream.

Each stream has its own budget: at most ``max_per_hour`` samples kept in any hour, at most ``max_files``
stored (oldest dropped). A model retrained only on what it flagged grows blind to what it misses, so the
streams stay apart and every sample says which one it came from.

The request path only appends to bounded in-memory queues (the hard stream computes row confidences,
only for the ``hard.rate`` share of requests it examines); :meth:`InputSampler.persist` (the agent's
ticker) runs the shadow comparisons and writes samples as ``.npz`` files into ``folder/<stream>/``, and
:meth:`InputSampler.upload` POSTs them to the server with the device token (through the agent's one HTTP
client, :mod:`device_agent.transport.http`), deleting each file only after a 2xx answer.

A sample file (``<time_ns>-<model>-<version>-<first 12 hex of the bundle digest>.npz``) holds ``in.<name>``
(the request's inputs; for the hard stream only the flagged rows) and ``meta.stream``, ``meta.time_ns``,
``meta.model_name``, ``meta.version``, ``meta.bundle_sha256``, and where the first output is a
``[rows, classes]`` float matrix and every input has those ``rows``: ``meta.prediction`` (int64 per row)
and ``meta.confidence`` (float64 per row, NaN for a row with non-finite outputs); the hard stream adds
``meta.reason`` (``low_confidence`` or ``shadow_disagreement``). A request that got a prediction id (through
the inference endpoint or ``Agent.predict_tracked``) adds ``meta.prediction_id``, and a hard sample of some of
its rows ``meta.request_row`` (int64 per sample row: the request's row), so the server can join the sample
with the labels applications report for that prediction (shadow-disagreement samples carry no id).
"""

from __future__ import annotations

import collections
import http.client
import io
import logging
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeAlias

from device_agent._lazy import lazy_module
from device_agent.fsutil import atomic_write
from device_agent.serving.predictions import PREDICTION_ID
from device_agent.serving.runtime import LoadedModel, ModelError
from device_agent.telemetry.summaries import row_confidences
from device_agent.transport.http import FetchError, open_url, resolve_url
from edgeota_contract.logs import log_event

if TYPE_CHECKING:
    import numpy as np
else:
    np = lazy_module("numpy")

log = logging.getLogger("device_agent.sampling")

UNIFORM = "uniform"
HARD = "hard"
STREAMS = (UNIFORM, HARD)
LOW_CONFIDENCE = "low_confidence"
SHADOW_DISAGREEMENT = "shadow_disagreement"
HOUR_SECONDS = 3600.0


class HourlyBudget:
    """At most ``limit`` admissions in any ``period`` seconds (a sliding window); ``None``: no limit.

    Not thread-safe on its own: the sampler calls it under its lock.
    """

    def __init__(self, limit: int | None, period: float = HOUR_SECONDS) -> None:
        self.limit = limit
        self.period = period
        self.refused = 0
        self._times: collections.deque[float] = collections.deque()

    def admit(self, now: float) -> bool:
        """Whether one more sample fits at monotonic time ``now``; records it when it does."""
        if self.limit is None:
            return True
        while self._times and now - self._times[0] >= self.period:
            self._times.popleft()
        if len(self._times) >= self.limit:
            self.refused += 1
            return False
        self._times.append(now)
        return True


@dataclass(frozen=True)
class HardPolicy:
    """The hard-example stream: examine a ``rate`` share of requests (drawn at random before the outputs are
    looked at, to bound the cost), keep rows with confidence below ``confidence_threshold`` and, while a shadow
    candidate runs, rows it classifies differently (checked off the request path, at most ``shadow_queue``
    requests waiting)."""

    rate: float
    confidence_threshold: float
    max_per_hour: int | None
    max_files: int
    shadow_queue: int = 64


@dataclass(frozen=True)
class Sample:
    """One kept request (or the flagged rows of one) with what the model said about it."""

    stream: str
    time_ns: int
    model_name: str
    version: str
    bundle_sha256: str
    inputs: dict[str, np.ndarray]
    prediction: np.ndarray | None = None
    confidence: np.ndarray | None = None
    reason: str | None = None
    prediction_id: str | None = None
    request_rows: np.ndarray | None = None

    @property
    def file_name(self) -> str:
        return f"{self.time_ns}-{self.model_name}-{self.version}-{self.bundle_sha256[:12]}.npz"

    def to_npz(self) -> bytes:
        arrays: dict[str, np.ndarray] = {f"in.{k}": v for k, v in self.inputs.items()}
        arrays["meta.stream"] = np.array(self.stream)
        arrays["meta.time_ns"] = np.array(self.time_ns, dtype=np.int64)
        arrays["meta.model_name"] = np.array(self.model_name)
        arrays["meta.version"] = np.array(self.version)
        arrays["meta.bundle_sha256"] = np.array(self.bundle_sha256)
        if self.prediction is not None and self.confidence is not None:
            arrays["meta.prediction"] = self.prediction.astype(np.int64)
            arrays["meta.confidence"] = self.confidence.astype(np.float64)
        if self.reason is not None:
            arrays["meta.reason"] = np.array(self.reason)
        if self.prediction_id is not None:
            arrays["meta.prediction_id"] = np.array(self.prediction_id)
            if self.request_rows is not None:
                arrays["meta.request_row"] = self.request_rows.astype(np.int64)
        buf = io.BytesIO()
        np.savez(buf, **arrays)  # type: ignore[arg-type]
        return buf.getvalue()


def predictions(inputs: dict[str, Any], outputs: dict[str, Any] | None) -> tuple[np.ndarray, np.ndarray] | None:
    """Per-row (class, confidence) from the first output when it is a ``[rows, classes >= 2]`` float matrix and
    every input is an array with ``rows`` leading rows; else None. A row with a non-finite output gets
    confidence NaN (its class is still the first maximum, as ``argmax``)."""
    if not outputs:
        return None
    first = next(iter(outputs.values()))
    if not isinstance(first, np.ndarray) or first.ndim != 2 or first.shape[1] < 2 or first.dtype.kind != "f":
        return None
    rows = first.shape[0]
    if rows == 0 or any(not isinstance(v, np.ndarray) or v.ndim == 0 or v.shape[0] != rows for v in inputs.values()):
        return None
    finite = np.isfinite(first).all(axis=1)
    confidence = np.full(rows, np.nan)
    if finite.any():
        confidence[finite] = row_confidences(first[finite])
    return first.argmax(axis=1).astype(np.int64), confidence


def _copy_inputs(inputs: dict[str, Any], rows: np.ndarray | None = None) -> dict[str, np.ndarray]:
    # Copies: the application may reuse its buffers once predict returns.
    return {k: np.array(v if rows is None else v[rows]) for k, v in inputs.items() if isinstance(v, np.ndarray)}


# A string: evaluating np.ndarray here would import numpy before the first model loads.
_ShadowCheck: TypeAlias = "tuple[LoadedModel, LoadedModel, dict[str, np.ndarray], str, np.ndarray, np.ndarray, int]"


class InputSampler:
    """A :class:`~device_agent.serving.runtime.ModelRuntime` listener keeping inputs in the two streams.

    Args:
        folder: where sample files wait for upload (``<folder>/<stream>/``).
        rate, max_files, max_per_hour: the uniform stream (share of requests, files stored, samples per hour).
        hard: the hard stream's policy; None: no hard stream.
        shadow: returns the shadow candidate while one runs (the agent's shadow runner's model), for the
            disagreement check; None: no disagreement check.
    """

    def __init__(
        self,
        folder: Path,
        rate: float,
        max_files: int,
        rng: random.Random | None = None,
        *,
        max_per_hour: int | None = None,
        hard: HardPolicy | None = None,
        shadow: Callable[[], LoadedModel | None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.folder = folder
        self.rate = rate
        self.max_files = max_files
        self.hard = hard
        self.dropped = 0
        self._last_ns = 0
        self._shadow = shadow
        self._clock = clock
        self._rng = rng or random.Random()
        # The hard stream draws from its own generator, so the uniform draws are the same whatever it does.
        self._hard_rng = random.Random(self._rng.getrandbits(64))
        self._lock = threading.Lock()
        self._io_lock = threading.Lock()
        self.budgets = {UNIFORM: HourlyBudget(max_per_hour), HARD: HourlyBudget(hard.max_per_hour if hard else None)}
        self._limits = {UNIFORM: max_files, HARD: hard.max_files if hard else 1}
        self._queue: collections.deque[Sample] = collections.deque(maxlen=max_files)  # uniform
        self._hard_queue: collections.deque[Sample] = collections.deque(maxlen=self._limits[HARD])
        self._queues = {UNIFORM: self._queue, HARD: self._hard_queue}
        self._checks: collections.deque[_ShadowCheck] = collections.deque(maxlen=hard.shadow_queue if hard else 1)

    @property
    def enabled(self) -> bool:
        """Whether either stream can keep anything (the agent registers the listener only then)."""
        return self.rate > 0 or (self.hard is not None and self.hard.rate > 0)

    def __call__(self, model: LoadedModel, inputs: dict[str, Any], outputs: Any, latency_ns: int) -> None:
        if self.rate > 0 and self._rng.random() < self.rate:
            with self._lock:
                admitted = self.budgets[UNIFORM].admit(self._clock())
            if admitted:
                pc = predictions(inputs, outputs)
                self._keep(model, UNIFORM, _copy_inputs(inputs), pc, None, prediction_id=PREDICTION_ID.get())
                return
        hard = self.hard
        if hard is None or hard.rate <= 0 or outputs is None:
            return
        if hard.rate < 1 and self._hard_rng.random() >= hard.rate:
            return
        pc = predictions(inputs, outputs)
        if pc is None:
            return
        prediction, confidence = pc
        low = confidence < hard.confidence_threshold  # NaN compares False: a broken row is not "unsure"
        if low.any():
            with self._lock:
                admitted = self.budgets[HARD].admit(self._clock())
            if admitted:
                pid = PREDICTION_ID.get()
                rows = np.flatnonzero(low) if pid is not None else None
                self._keep(
                    model,
                    HARD,
                    _copy_inputs(inputs, low),
                    (prediction[low], confidence[low]),
                    LOW_CONFIDENCE,
                    prediction_id=pid,
                    request_rows=rows,
                )
            return
        candidate = self._shadow() if self._shadow is not None else None
        if candidate is not None and candidate.bundle_sha256 != model.bundle_sha256:
            name = next(iter(outputs))
            check = (model, candidate, _copy_inputs(inputs), name, prediction, confidence, time.time_ns())
            with self._lock:
                self._checks.append(check)

    def _keep(
        self,
        model: LoadedModel,
        stream: str,
        inputs: dict[str, np.ndarray],
        pc: tuple[np.ndarray, np.ndarray] | None,
        reason: str | None,
        time_ns: int | None = None,
        *,
        prediction_id: str | None = None,
        request_rows: np.ndarray | None = None,
    ) -> None:
        manifest = model.manifest
        with self._lock:  # strictly increasing stamps: two samples never share a file name
            stamp = self._last_ns = max(time_ns or time.time_ns(), self._last_ns + 1)
        sample = Sample(
            stream,
            stamp,
            manifest.model_name,
            manifest.version,
            model.bundle_sha256,
            inputs,
            pc[0] if pc else None,
            pc[1] if pc else None,
            reason,
            prediction_id,
            request_rows,
        )
        with self._lock:
            self._queues[stream].append(sample)

    def check_shadow(self) -> int:
        """Run the shadow candidate on the requests waiting for a disagreement check (off the request path);
        keeps the rows it classifies differently in the hard stream. Returns how many samples it kept."""
        with self._lock:
            checks = list(self._checks)
            self._checks.clear()
        kept = 0
        for model, candidate, inputs, name, prediction, confidence, stamp in checks:
            try:
                got = candidate.run(inputs)
            except ModelError:
                continue  # the shadow runner counts candidate errors
            theirs = got.get(name, got[candidate.output_names[0]]) if got else None
            if not isinstance(theirs, np.ndarray) or theirs.shape[0:1] != prediction.shape or theirs.ndim != 2:
                continue
            differ = np.isfinite(theirs).all(axis=1) & (theirs.argmax(axis=1) != prediction)
            if not differ.any():
                continue
            with self._lock:
                admitted = self.budgets[HARD].admit(self._clock())
            if admitted:
                rows = {k: v[differ] for k, v in inputs.items()}
                self._keep(model, HARD, rows, (prediction[differ], confidence[differ]), SHADOW_DISAGREEMENT, stamp)
                kept += 1
        return kept

    def persist(self) -> int:
        """Run pending shadow checks, then write queued samples into ``folder/<stream>/``, each stream bounded by
        its ``max_files`` (the oldest files go first); returns how many were written."""
        self.check_shadow()
        with self._lock:
            items = [s for q in self._queues.values() for s in q]
            for q in self._queues.values():
                q.clear()
        for sample in items:
            folder = self.folder / sample.stream
            folder.mkdir(parents=True, exist_ok=True)
            atomic_write(folder / sample.file_name, sample.to_npz())
        for stream in {s.stream for s in items}:
            files = sorted((self.folder / stream).glob("*.npz"))
            for old in files[: max(0, len(files) - self._limits[stream])]:
                old.unlink(missing_ok=True)
                self.dropped += 1
        return len(items)

    def pending(self, stream: str | None = None) -> list[Path]:
        """Files waiting for upload, oldest first (``stream``: of that stream only; files written by an agent
        before streams existed lie in the folder itself and count as uniform)."""
        if not self.folder.exists():
            return []
        patterns = [f"{s}/*.npz" for s in STREAMS if stream in (None, s)]
        if stream in (None, UNIFORM):
            patterns.append("*.npz")
        return sorted((p for pattern in patterns for p in self.folder.glob(pattern)), key=lambda p: p.name)

    def persist_and_upload(
        self, server_url: str, token: str, upload_path: str | None, device_id: str, allow_insecure_http: bool = False
    ) -> int:
        """The agent's retry tick: :meth:`persist`, then :meth:`upload` to ``upload_path`` (``{device_id}`` filled
        in) on the server, the token only when that URL has the server's origin (and, unless
        ``allow_insecure_http``, never over plain HTTP to a host that is not loopback). None: keep the files.
        Returns how many files the server accepted; never raises for network errors or a bad URL."""
        self.persist()
        if upload_path is None:
            return 0
        try:
            url, same_origin = resolve_url(server_url, upload_path.format(device_id=device_id))
        except FetchError as exc:
            log_event(log, "sample_upload_failed", level=logging.WARNING, detail=str(exc))
            return 0
        return self.upload(url, token if same_origin else None, allow_insecure_http=allow_insecure_http)

    def upload(
        self, url: str, token: str | None, timeout: float = 30.0, limit: int = 50, allow_insecure_http: bool = False
    ) -> int:
        """POST up to ``limit`` sample files to ``url``, oldest first; returns how many the server accepted.

        Stops at the first failure (the rest waits for the next call); never raises for network errors.
        """
        with self._io_lock:  # one uploader at a time, so no file is sent twice
            return self._upload(url, token, timeout, limit, allow_insecure_http)

    def _upload(self, url: str, token: str | None, timeout: float, limit: int, allow_insecure_http: bool) -> int:
        sent = 0
        for path in self.pending()[:limit]:
            headers = {"Content-Type": "application/octet-stream", "X-Edgeota-Sample": path.name}
            try:
                with open_url(
                    url,
                    method="POST",
                    token=token,
                    headers=headers,
                    body=path.read_bytes(),
                    timeout=timeout,
                    allow_insecure_http=allow_insecure_http,
                ) as r:
                    status = r.status
            except (OSError, http.client.HTTPException, FetchError) as exc:
                log_event(log, "sample_upload_failed", level=logging.WARNING, detail=str(exc))
                return sent
            if not 200 <= status < 300:
                log_event(log, "sample_upload_refused", level=logging.WARNING, status=status)
                return sent
            path.unlink(missing_ok=True)
            sent += 1
        return sent
