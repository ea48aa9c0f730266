"""Telemetry windows (additive summaries on the bundle's reference edges) and the durable spool."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from device_agent.runtime import ModelError, ModelRuntime, SessionCache, load_model
from device_agent.spool import Spool
from device_agent.telemetry import TelemetryRecorder
from edgeota_contract.bundle import verify_bundle
from edgeota_contract.signing import TrustedKeys
from edgeota_contract.telemetry import CONFIDENCE_EDGES, LATENCY_EDGES_MS
from tests.agent.bundles import CLASSES, make_bundle, reference_model, sample_inputs
from tests.agent.conftest import Keys


def test_window_summaries(tmp_path: Path, keys: Keys) -> None:
    path, sha = make_bundle(tmp_path / "b.tar", keys.release)
    v = verify_bundle(path, TrustedKeys([keys.release.public_key]), extract_to=tmp_path / "slot")
    runtime = ModelRuntime()
    recorder = TelemetryRecorder()
    runtime.add_listener(recorder)
    runtime.install(load_model(tmp_path / "slot", v.manifest, sha, "a", SessionCache()))
    x = sample_inputs(6, seed=7)
    x[0, 0] = np.nan
    runtime.predict({"x": x})
    runtime.predict({"x": sample_inputs(3, seed=8)})
    with pytest.raises(ModelError):
        runtime.predict({"x": np.zeros((1, 2), dtype=np.float32)})
    [window] = recorder.roll()
    assert recorder.roll() == []  # closed windows are not reported twice
    assert (window.version, window.bundle_sha256) == ("1.0.0", sha)
    assert window.request_count == 3 and window.error_count == 1
    assert sum(window.latency_counts) == 3 and len(window.latency_counts) == len(LATENCY_EDGES_MS) + 1
    f0 = window.features[0]
    assert (f0.input, f0.feature, f0.nan_count) == ("x", 0, 1)
    col = np.concatenate([x[1:, 0], sample_inputs(3, seed=8)[:, 0]]).astype(np.float64)
    assert sum(f0.counts) == col.size
    assert f0.counts == np.bincount(np.searchsorted([0.25, 0.5, 0.75], col, side="right"), minlength=4).tolist()
    assert np.isclose(f0.sum, col.sum()) and np.isclose(f0.sum_sq, (col**2).sum())
    assert f0.min == col.min() and f0.max == col.max()
    out = window.outputs[0]
    y = np.concatenate([reference_model(x), reference_model(sample_inputs(3, seed=8))])
    finite = np.isfinite(y).all(axis=1)
    assert out.nan_count == int((~np.isfinite(y)).sum())
    assert out.class_counts == np.bincount(y[finite].argmax(axis=1), minlength=CLASSES).tolist()
    assert out.confidence_counts is not None and len(out.confidence_counts) == len(CONFIDENCE_EDGES) + 1
    assert sum(out.confidence_counts) == int(finite.sum())


def test_spool_is_durable_ordered_bounded(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "t.sqlite", max_windows=3)
    for i in range(5):
        spool.add(f"m{i}", f"p{i}".encode())
    assert spool.dropped == 2
    assert [m for m, _ in spool.oldest(10)] == ["m2", "m3", "m4"]
    assert [m for m, _ in spool.oldest(10, skip={"m3"})] == ["m2", "m4"]
    spool.add("m4", b"again")  # the same window twice is stored once
    assert len(spool) == 3
    spool.close()
    reopened = Spool(tmp_path / "t.sqlite", max_windows=3)
    assert reopened.dropped == 2 and [m for m, _ in reopened.oldest(1)] == ["m2"]
    assert reopened.ack(["m2", "m9"]) == 1
    assert [m for m, _ in reopened.oldest(10)] == ["m3", "m4"]
    reopened.close()


def test_whole_input_and_per_feature_summaries_match_numpy() -> None:
    from device_agent.telemetry import _InputSummary
    from edgeota_contract.telemetry import FeatureReference

    rng = np.random.default_rng(0)
    batches = [rng.normal(size=(n, 300)) for n in (3, 5, 1)]
    batches[1][2, 7] = np.inf
    batches[2][0, 1] = np.nan
    refs = [
        FeatureReference(input="img", feature=None, edges=[-1.0, 0.0, 1.0], counts=[1, 1, 1, 1]),
        FeatureReference(input="img", feature=7, edges=[-0.5, 0.5], counts=[1, 1, 1]),
        FeatureReference(input="img", feature=1, edges=[-2.0, -1.0, 0.0, 1.0, 2.0], counts=[1] * 6),
    ]
    summary = _InputSummary("img", refs)
    summary.add(batches[:2])
    summary.add(batches[2:])
    out = {(f.feature, len(f.edges)): f for f in summary.summaries()}
    allv = np.concatenate([b.ravel() for b in batches])
    for (feature, _), f in out.items():
        values = allv if feature is None else np.concatenate([b[:, feature] for b in batches])
        finite = values[np.isfinite(values)]
        assert f.nan_count == values.size - finite.size
        assert (
            f.counts == np.bincount(np.searchsorted(f.edges, finite, side="right"), minlength=len(f.edges) + 1).tolist()
        )
        assert np.isclose(f.sum, finite.sum()) and np.isclose(f.sum_sq, (finite**2).sum())
        assert f.min == finite.min() and f.max == finite.max()


def test_oversized_window_is_sent_without_feature_histograms(tmp_path: Path) -> None:
    from datetime import UTC, datetime

    from device_agent.outbox import Outbox
    from device_agent.settings import AgentSettings
    from device_agent.store import StateStore
    from edgeota_contract.messages import MAX_MESSAGE_BYTES, TelemetryWindow
    from edgeota_contract.telemetry import FeatureSummary

    edges = [float(i) for i in range(200)]
    features = [FeatureSummary(input="x", feature=i, edges=edges, counts=[1] * 201) for i in range(200)]
    now = datetime.now(UTC)
    window = TelemetryWindow(
        boot_id="b",
        seq=1,
        model_name="m",
        version="1.0.0",
        bundle_sha256="0" * 64,
        window_start=now,
        window_end=now,
        request_count=5,
        error_count=0,
        latency_counts=[5] + [0] * 16,
        features=features,
    )
    assert len(window.model_dump_json()) > MAX_MESSAGE_BYTES
    outbox = Outbox("b", AgentSettings(state_dir=tmp_path), StateStore(tmp_path), Spool(tmp_path / "t.sqlite", 10))
    outbox.add_window(window)
    [(msg_id, payload)] = outbox.spool.oldest(10)
    assert msg_id == window.msg_id and len(payload) <= MAX_MESSAGE_BYTES
    sent = TelemetryWindow.model_validate_json(payload)
    assert sent.features == [] and sent.request_count == 5
