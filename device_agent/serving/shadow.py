"""Shadow mode: run a candidate model beside the serving one on a sampled share of live requests.

The serving path only decides (uniformly at random, independent of the inputs and outputs) whether
to sample a request and hands it to a bounded queue; a background thread runs the candidate and
compares. A full queue drops the sample (counted), so shadowing never slows serving down much.
Agreement is counted per row of the first output: top-1 agreement when it has a class axis, and
the cosine similarity of the two output rows.
"""

from __future__ import annotations

import queue
import random
import threading
import time
from bisect import bisect_right
from typing import TYPE_CHECKING, Any

from device_agent._lazy import lazy_module
from device_agent.serving.runtime import LoadedModel, ModelError
from edgeota_contract.telemetry import LATENCY_EDGES_MS, ShadowSummary

if TYPE_CHECKING:
    import numpy as np
else:
    np = lazy_module("numpy")


class ShadowRunner:
    """Compares ``candidate`` with the serving model; a :class:`ModelRuntime` listener. Thread-safe."""

    def __init__(
        self, candidate: LoadedModel, sample_rate: float, rng: random.Random | None = None, queue_size: int = 32
    ) -> None:
        self.candidate = candidate
        self.sample_rate = sample_rate
        self._rng = rng or random.Random()
        self._queue: queue.Queue[tuple[dict[str, np.ndarray], dict[str, np.ndarray]] | None] = queue.Queue(queue_size)
        self._lock = threading.Lock()
        self._reset()
        self.dropped = 0
        self._thread = threading.Thread(target=self._run, name="shadow", daemon=True)
        self._thread.start()

    def _reset(self) -> None:
        self._compared = 0
        self._agree = 0
        self._cosine = 0.0
        self._errors = 0
        self._latency = np.zeros(len(LATENCY_EDGES_MS) + 1, dtype=np.int64)

    @property
    def version(self) -> str:
        return self.candidate.manifest.version

    def __call__(
        self, model: LoadedModel, inputs: dict[str, Any], outputs: dict[str, np.ndarray] | None, latency_ns: int
    ) -> None:
        if outputs is None or model.bundle_sha256 == self.candidate.bundle_sha256:
            return
        if self._rng.random() >= self.sample_rate:
            return
        try:
            self._queue.put_nowait((inputs, outputs))
        except queue.Full:
            with self._lock:
                self.dropped += 1

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is None:
                    return
                self._compare_one(*item)
            finally:
                self._queue.task_done()

    def _compare_one(self, inputs: dict[str, np.ndarray], served: dict[str, np.ndarray]) -> None:
        started = time.perf_counter()
        try:
            got = self.candidate.run(inputs)
        except ModelError:
            with self._lock:
                self._errors += 1
            return
        latency = (time.perf_counter() - started) * 1000.0
        name = next(iter(served))
        theirs = got.get(name, got[self.candidate.output_names[0]])
        compared, agree, cosine = compare(served[name], theirs)
        with self._lock:
            self._compared += compared
            self._agree += agree
            self._cosine += cosine
            self._latency[bisect_right(LATENCY_EDGES_MS, latency)] += 1

    def take_summary(self) -> ShadowSummary | None:
        """The counts since the last call (then reset), or None when nothing was compared or failed."""
        with self._lock:
            if self._compared == 0 and self._errors == 0:
                return None
            summary = ShadowSummary(
                candidate_version=self.version,
                candidate_bundle_sha256=self.candidate.bundle_sha256,
                compared=self._compared,
                top1_agree=self._agree,
                cosine_sum=self._cosine,
                candidate_errors=self._errors,
                candidate_latency_counts=[int(c) for c in self._latency],
            )
            self._reset()
            return summary

    def drain(self, timeout: float = 5.0) -> None:
        """Wait until every queued sample was compared (tests, shutdown)."""
        deadline = time.monotonic() + timeout
        while self._queue.unfinished_tasks and time.monotonic() < deadline:
            time.sleep(0.01)

    def stop(self) -> None:
        self._queue.put(None)
        self._thread.join(5.0)


def compare(served: np.ndarray, candidate: np.ndarray) -> tuple[int, int, float]:
    """(rows compared, rows with the same top-1 class, sum of per-row cosine similarity)."""
    if served.shape != candidate.shape or served.size == 0:
        return 0, 0, 0.0
    a = served.reshape(served.shape[0] if served.ndim > 1 else 1, -1).astype(np.float64)
    b = candidate.reshape(a.shape).astype(np.float64)
    ok = np.isfinite(a).all(axis=1) & np.isfinite(b).all(axis=1)
    a, b = a[ok], b[ok]
    if a.shape[0] == 0:
        return 0, 0, 0.0
    agree = int((a.argmax(axis=1) == b.argmax(axis=1)).sum()) if a.shape[1] > 1 else 0
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    cos = np.where(norms > 0, (a * b).sum(axis=1) / np.where(norms > 0, norms, 1.0), 0.0)
    return int(a.shape[0]), agree, float(cos.sum())
