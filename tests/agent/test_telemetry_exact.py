"""Batched telemetry equals a plain per-request, per-value reference aggregation, field for field.

The recorder buffers copies and summarises them in vectorised batches; the reference below walks
every request, row and value in recording order with ``bisect_right`` and Python floats. Windows
must agree exactly (counts, NaN counts, min, max, sums, sums of squares, class and confidence
counts, latency histograms), across a window roll with requests still buffered, with NaN and inf
inputs and outputs, failed requests, multi-row requests, inputs that are not ndarrays (the general
path) and a bundle whose references cover a subset of features plus the whole input.
"""

from __future__ import annotations

import math
import random
from bisect import bisect_right
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from device_agent.serving.runtime import LoadedModel, SessionCache, load_model
from device_agent.telemetry.recorder import TelemetryRecorder, WindowSummary
from device_agent.telemetry.summaries import row_confidences
from device_agent.telemetry.worker import Summariser
from edgeota_contract.bundle import create_bundle, verify_bundle
from edgeota_contract.manifest import Lineage
from edgeota_contract.signing import TrustedKeys
from edgeota_contract.telemetry import (
    CONFIDENCE_EDGES,
    LATENCY_EDGES_MS,
    FeatureReference,
    FeatureSummary,
    OutputReference,
    OutputSummary,
    ReferenceStats,
)
from tests.agent.bundles import CLASSES, FEATURES, make_payload, sample_inputs
from tests.agent.conftest import Keys

Request = tuple[dict[str, Any], dict[str, Any] | None, int]


class _RefFeature:
    def __init__(self, ref: FeatureReference) -> None:
        self.ref = ref
        self.counts = [0] * (len(ref.edges) + 1)
        self.nan = 0
        self.lo: float | None = None
        self.hi: float | None = None
        self.sum = 0.0
        self.sum_sq = 0.0

    def add(self, value: float) -> None:
        if not math.isfinite(value):
            self.nan += 1
            return
        self.counts[bisect_right(self.ref.edges, value)] += 1
        self.lo = value if self.lo is None else min(self.lo, value)
        self.hi = value if self.hi is None else max(self.hi, value)
        self.sum += value
        self.sum_sq += value * value

    def summary(self) -> FeatureSummary:
        r = self.ref
        return FeatureSummary(
            input=r.input,
            feature=r.feature,
            edges=list(r.edges),
            counts=self.counts,
            nan_count=self.nan,
            min=self.lo,
            max=self.hi,
            sum=self.sum,
            sum_sq=self.sum_sq,
        )


class _RefWindow:
    """Per-request aggregation, value by value, in recording order."""

    def __init__(self, refs: ReferenceStats) -> None:
        self.per_feature = [_RefFeature(r) for r in refs.features if r.feature is not None]
        self.whole = [_RefFeature(r) for r in refs.features if r.feature is None]
        self.requests = self.errors = self.nan_out = 0
        self.latency = [0] * (len(LATENCY_EDGES_MS) + 1)
        self.classes = [0] * CLASSES
        self.confidence = [0] * (len(CONFIDENCE_EDGES) + 1)

    def add(self, inputs: dict[str, Any], outputs: dict[str, Any] | None, latency_ns: int) -> None:
        self.requests += 1
        self.latency[bisect_right(LATENCY_EDGES_MS, latency_ns / 1e6)] += 1
        if outputs is None:
            self.errors += 1
            return
        x = np.asarray(inputs["x"])
        view = x.reshape(len(x), -1)
        for row in view:
            for f in self.per_feature:
                assert f.ref.feature is not None
                f.add(float(row[f.ref.feature]))
        for f in self.whole:
            for value in x.ravel():
                f.add(float(value))
        y = np.asarray(outputs["y"])
        self.nan_out += int((~np.isfinite(y)).sum())
        for row in y.reshape(-1, CLASSES):
            if np.isfinite(row).all():
                self.classes[int(np.argmax(row))] += 1
                confidence = float(row_confidences(row[None, :])[0])
                self.confidence[bisect_right(CONFIDENCE_EDGES, confidence)] += 1

    def check(self, got: WindowSummary, features_from: _RefWindow | None = None) -> None:
        """``features_from``: the reference of the requests whose inputs were sampled (default: this one)."""
        sampled = features_from or self
        assert (got.request_count, got.error_count) == (self.requests, self.errors)
        assert got.latency_counts == self.latency
        assert got.features == [f.summary() for f in sampled.per_feature + sampled.whole]
        assert got.feature_requests == (sampled.requests - sampled.errors if got.features else None)
        seen = any(self.classes)
        assert got.outputs == [
            OutputSummary(
                output="y",
                class_counts=self.classes if seen else None,
                confidence_counts=self.confidence if seen else None,
                nan_count=self.nan_out,
            )
        ]


def _bundle(tmp_path: Path, keys: Keys, refs: ReferenceStats | None, version: str = "1.0.0") -> LoadedModel:
    payload = make_payload()
    if refs is not None:
        payload["reference_stats.json"] = refs.model_dump_json().encode()
    path = tmp_path / "b.tar"
    create_bundle(
        path,
        payload,
        keys.release,
        model_name="digits",
        version=version,
        release_counter=1,
        hardware_profile="x86_64-avx2",
        inputs=[{"name": "x", "dtype": "float32", "shape": [None, FEATURES]}],
        outputs=[{"name": "y", "dtype": "float32", "shape": [None, CLASSES]}],
        opset=17,
        execution_provider="CPUExecutionProvider",
        recipe="fp32",
        metrics={"smoke_atol": 1e-4, "smoke_rtol": 1e-3},
        lineage=Lineage(
            source_model_sha256="a" * 64, packager_version="0", created_at="2026-01-01T00:00:00Z", created_by="t"
        ),
    )
    v = verify_bundle(path, TrustedKeys([keys.release.public_key]), extract_to=tmp_path / "slot")
    return load_model(tmp_path / "slot", v.manifest, v.archive_sha256, "a", SessionCache())


def _requests(model: LoadedModel, n: int, seed: int) -> list[Request]:
    """Real inferences with awkward values mixed in: NaN/inf inputs and outputs, errors, lists, batches."""
    rng = np.random.default_rng(seed)
    out: list[Request] = []
    for i in range(n):
        x = sample_inputs(1 + int(rng.integers(0, 3)), seed=seed * 1000 + i)
        if i % 3 == 0:  # magnitudes from 1e-7 to 1e7: float64 sums round, so their order shows
            x = (x * 10 ** rng.uniform(-7, 7, size=x.shape)).astype(np.float32)
        on_edges = np.array([0.25, 0.5, 0.75, 0.1], dtype=np.float32)  # on the edges, and near one
        x[0, int(rng.integers(0, FEATURES))] = rng.choice(on_edges)
        latency = int(rng.integers(1_000, 3_000_000))
        if i % 11 == 3:
            out.append(({"x": x}, None, latency))  # a failed request
            continue
        y = model.run({"x": x})
        if i % 23 == 2:
            x = x.copy()
            x[-1, 3], x[0, 0] = np.nan, np.inf
        if i % 13 == 5:
            y["y"] = y["y"].copy()
            y["y"][0, 2] = np.nan
        if i % 19 == 8 and len(x) > 1:  # a strided view (not C-contiguous): the C path leaves it to Python
            y["y"] = np.repeat(y["y"], 2, axis=0)[::2]
        inputs: dict[str, Any] = {"x": x.tolist() if i % 17 == 6 else x}  # a list: the general path
        out.append((inputs, y, latency))
    return out


SUBSET = ReferenceStats(
    sample_count=10,
    features=[
        FeatureReference(input="x", feature=5, edges=[0.1, 1 / 3, 0.7], counts=[0, 0, 0, 0]),
        FeatureReference(input="x", feature=0, edges=[-1e39, 0.5, 3e38], counts=[0, 0, 0, 0]),
        FeatureReference(input="x", feature=63, edges=[0.2], counts=[0, 0]),
        FeatureReference(input="x", feature=None, edges=[0.25, 0.5, 0.75], counts=[0, 0, 0, 0]),
    ],
    outputs=[OutputReference(output="y", kind="classes", class_counts=[1] * CLASSES)],
)


@pytest.mark.parametrize("refs", [None, SUBSET], ids=["all-features", "subset-and-whole"])
@pytest.mark.parametrize(("max_requests", "background"), [(7, True), (7, False), (2048, True)])
def test_batched_windows_equal_per_request_reference(
    tmp_path: Path, keys: Keys, refs: ReferenceStats | None, max_requests: int, background: bool, native: bool
) -> None:
    """Background batches (on the summariser thread, racing this one) and inline ones give the same windows."""
    model = _bundle(tmp_path, keys, refs)
    stats = ReferenceStats.model_validate_json((model.folder / "reference_stats.json").read_bytes())
    worker = Summariser(linger_seconds=5.0)
    recorder = TelemetryRecorder(max_requests=max_requests, background=background, summariser=worker, native=native)
    requests = _requests(model, 120, seed=max_requests)
    windows: list[WindowSummary] = []
    references = [_RefWindow(stats), _RefWindow(stats)]
    for i, (inputs, outputs, latency) in enumerate(requests):
        if i == 73:  # roll with requests still buffered: they belong to the window they were recorded in
            assert recorder.pending() > 0 or background  # (the summariser may just have taken them)
            windows += recorder.roll()
        recorder(model, inputs, outputs, latency)
        references[i >= 73].add(inputs, outputs, latency)
    windows += recorder.roll()
    assert worker.wait_idle(30)  # a batch job queued before the last roll still runs (on what is left: nothing)
    recorder.close()
    assert len(windows) == 2
    for got, want in zip(windows, references, strict=True):
        want.check(got)
    # The first limit is 64 requests (sampled rows on the C path), whatever max_requests. On the C path a list
    # input (every 17th request) has what C holds summarised at once, to keep the recording order, so only
    # the limit of 7 fills a batch between two of them.
    assert (worker.jobs_run > 0) == (background and (not native or max_requests < 17))


def test_inputs_reused_by_the_caller_are_copied(tmp_path: Path, keys: Keys, native: bool) -> None:
    model = _bundle(tmp_path, keys, None)
    stats = ReferenceStats.model_validate_json((model.folder / "reference_stats.json").read_bytes())
    recorder = TelemetryRecorder(native=native)
    reference = _RefWindow(stats)
    buffer = np.empty((1, FEATURES), dtype=np.float32)
    for i in range(30):
        buffer[:] = sample_inputs(1, seed=i)
        outputs = model.run({"x": buffer})
        reference.add({"x": buffer.copy()}, {"y": outputs["y"].copy()}, 5000)
        recorder(model, {"x": buffer}, outputs, 5000)
        outputs["y"][:] = -1.0  # the caller scribbles on its outputs and reuses its input buffer
    [window] = recorder.roll()
    reference.check(window)


@pytest.mark.parametrize("refs", [None, SUBSET], ids=["all-features", "subset-and-whole"])
@pytest.mark.parametrize(("rate", "max_requests"), [(0.25, 7), (0.5, 2048)])
def test_sampled_features_equal_the_reference_of_the_sampled_requests(
    tmp_path: Path, keys: Keys, refs: ReferenceStats | None, rate: float, max_requests: int, native: bool
) -> None:
    """With a sample rate, counts, latency and outputs still cover every request, and the feature summaries
    are exactly those of the requests whose draw (one ``random.random()`` per request, in order) fell under
    the rate: replaying the draws from the same seed names them."""
    model = _bundle(tmp_path, keys, refs)
    stats = ReferenceStats.model_validate_json((model.folder / "reference_stats.json").read_bytes())
    recorder = TelemetryRecorder(max_requests=max_requests, background=False, feature_sample_rate=rate, native=native)
    requests = _requests(model, 300, seed=5)
    random.seed(20261202)
    for inputs, outputs, latency in requests:
        recorder.record(model, inputs, outputs, latency)
    [window] = recorder.roll()
    random.seed(20261202)
    taken = [random.random() < rate for _ in requests]
    everything, sampled = _RefWindow(stats), _RefWindow(stats)
    for (inputs, outputs, latency), take in zip(requests, taken, strict=True):
        everything.add(inputs, outputs, latency)
        if take:
            sampled.add(inputs, outputs, latency)
    everything.check(window, features_from=sampled)
    assert window.feature_requests is not None
    assert 0 < window.feature_requests < window.request_count - window.error_count


def test_the_sample_does_not_depend_on_the_inputs_or_outputs(tmp_path: Path, keys: Keys, native: bool) -> None:
    """Two kinds of requests, alternating (dark and bright inputs, so different outputs too): a uniform
    sample takes each kind at the same rate. 2,000 of each at 1/4: 500 expected, 19 standard deviations
    of binomial noise would be 3.5 times the bound below."""
    model = _bundle(tmp_path, keys, None)
    dark = {"x": np.full((1, FEATURES), 0.05, dtype=np.float32)}
    bright = {"x": np.full((1, FEATURES), 0.95, dtype=np.float32)}
    answers = [(dark, model.run(dark)), (bright, model.run(bright))]
    recorder = TelemetryRecorder(background=False, feature_sample_rate=0.25, native=native)
    for i in range(4000):
        inputs, outputs = answers[i % 2]
        recorder.record(model, inputs, outputs, 10_000)
    [window] = recorder.roll()
    assert window.request_count == 4000 and window.outputs[0].class_counts is not None
    assert sum(window.outputs[0].class_counts) == 4000  # outputs: every request
    feature = window.features[0]
    low, high = feature.counts[0], feature.counts[-1]  # 0.05 and 0.95 fall in the first and last buckets
    assert low + high == sum(feature.counts) == window.feature_requests
    assert 430 <= low <= 570 and 430 <= high <= 570, (low, high)


@pytest.mark.parametrize("rate", [0.0, -0.5, 1.01, math.nan])
def test_bad_sample_rate_refused(rate: float) -> None:
    with pytest.raises(ValueError, match="feature_sample_rate"):
        TelemetryRecorder(feature_sample_rate=rate)
