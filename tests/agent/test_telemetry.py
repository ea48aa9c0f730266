"""Telemetry windows (additive summaries on the bundle's reference edges) and the durable spool."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from device_agent.serving.runtime import ModelError, ModelRuntime, SessionCache, load_model
from device_agent.telemetry.recorder import TelemetryRecorder
from device_agent.telemetry.spool import Spool
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
    from device_agent.telemetry.summaries import FeatureBlock, WholeInput
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
    block = FeatureBlock([r for r in refs if r.feature is not None])
    whole = WholeInput([r for r in refs if r.feature is None])
    block.add(np.concatenate(batches[:2]))
    block.add(batches[2])
    whole.add(batches[:2])
    whole.add(batches[2:])
    out = {(f.feature, len(f.edges)): f for f in block.summaries() + whole.summaries()}
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

    from device_agent.settings import AgentSettings
    from device_agent.store import StateStore
    from device_agent.transport.outbox import Outbox
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


# ---- batched summaries: the request path only buffers copies; numpy work happens in batches --------------


def _runtime(tmp_path: Path, keys: Keys, recorder: TelemetryRecorder) -> ModelRuntime:
    path, sha = make_bundle(tmp_path / "b.tar", keys.release)
    v = verify_bundle(path, TrustedKeys([keys.release.public_key]), extract_to=tmp_path / "slot")
    runtime = ModelRuntime()
    runtime.add_listener(recorder)
    runtime.install(load_model(tmp_path / "slot", v.manifest, sha, "a", SessionCache()))
    return runtime


def _expected(batches: list[np.ndarray]) -> tuple[list[list[int]], list[int], list[int]]:
    """Per-feature counts on the test bundle's edges, class counts and confidence counts, by plain numpy."""
    x = np.concatenate(batches).astype(np.float64)
    features = [
        np.bincount(np.searchsorted([0.25, 0.5, 0.75], x[:, j], side="right"), minlength=4).tolist()
        for j in range(x.shape[1])
    ]
    y = np.concatenate([reference_model(b) for b in batches]).astype(np.float64)
    classes = np.bincount(y.argmax(axis=1), minlength=CLASSES).tolist()
    confidence = np.bincount(np.searchsorted(CONFIDENCE_EDGES, y.max(axis=1), side="right"), minlength=12)
    return features, classes, confidence.tolist()


def _merged(windows: list) -> tuple[int, list[list[int]], list[int], list[int]]:  # type: ignore[type-arg]
    requests = sum(w.request_count for w in windows)
    # A window whose only request failed has no class counts (and may have no feature counts): skip it.
    features = np.sum([[f.counts for f in w.features] for w in windows if w.features], axis=0).tolist()
    served = [w.outputs[0] for w in windows if w.outputs and w.outputs[0].class_counts is not None]
    classes = np.sum([o.class_counts for o in served], axis=0).tolist()
    confidence = np.sum([o.confidence_counts for o in served], axis=0).tolist()
    return requests, features, classes, confidence


@pytest.mark.parametrize("background", [False, True], ids=["inline", "background"])
def test_buffer_is_bounded_and_flushed_on_roll(tmp_path: Path, keys: Keys, background: bool) -> None:
    from device_agent.telemetry.worker import Summariser

    worker = Summariser(linger_seconds=5.0)
    recorder = TelemetryRecorder(max_requests=8, background=background, summariser=worker)
    runtime = _runtime(tmp_path, keys, recorder)
    # inline: the request that fills the buffer summarises it; background: the summariser may lag, and
    # a request summarises itself at 4x the limit
    bound = 4 * 8 if background else 8
    batches = [sample_inputs(1 + i % 3, seed=i) for i in range(50)]
    for batch in batches:
        runtime.predict({"x": batch})
        assert recorder.pending() < bound
    assert worker.wait_idle(30)
    assert recorder.pending() < 8 and (background or recorder.pending() > 0)  # the rest waits for the roll
    windows = recorder.roll()
    assert recorder.pending() == 0 and recorder.roll() == []
    requests, features, classes, confidence = _merged(windows)
    assert (requests, features, classes, confidence) == (50, *_expected(batches))

    small = TelemetryRecorder(max_bytes=4096, background=background, summariser=worker)  # 300-900 bytes a
    runtime.add_listener(small)  # request here: after its first batch of 64, the limit adapts to ~4096 bytes
    for batch in batches * 3:
        runtime.predict({"x": batch})
        assert small.pending() < 4 * 64 if background else small.pending() <= 64
    assert worker.wait_idle(30)
    # a background batch adapts the limit after requests already passed the old one: they wait for the next
    assert small.limit <= 16 and small.pending() < (64 if background else small.limit)
    assert _merged(small.roll())[0] == 150
    recorder.close()
    small.close()
    thread = worker.thread
    if thread is not None:
        thread.join(10)
    assert worker.thread is None and (worker.jobs_run > 0) == background


def test_inputs_are_copied_when_the_caller_reuses_its_buffer(tmp_path: Path, keys: Keys) -> None:
    recorder = TelemetryRecorder()
    runtime = _runtime(tmp_path, keys, recorder)
    buffer = np.empty((2, 64), dtype=np.float32)
    batches = [sample_inputs(2, seed=i) for i in range(20)]
    for batch in batches:
        buffer[:] = batch
        runtime.predict({"x": buffer})
        out = runtime.predict({"x": batch})
        out["y"][:] = np.nan  # the caller scribbles on its outputs too
    buffer[:] = 0.0
    _, features, classes, confidence = _merged(recorder.roll())
    doubled = [b for b in batches for _ in range(2)]
    assert (features, classes, confidence) == _expected(doubled)


def test_concurrent_requests_and_rolls_lose_nothing(tmp_path: Path, keys: Keys, native: bool) -> None:
    import threading

    recorder = TelemetryRecorder(max_requests=16, native=native)
    runtime = _runtime(tmp_path, keys, recorder)
    threads, per_thread = 4, 150
    batches = {t: [sample_inputs(1 + i % 2, seed=1000 * t + i) for i in range(per_thread)] for t in range(threads)}
    windows: list = []  # type: ignore[type-arg]
    done = threading.Event()

    def client(t: int) -> None:
        for batch in batches[t]:
            runtime.predict({"x": batch})
        if t == 0:
            with pytest.raises(ModelError):
                runtime.predict({"x": np.zeros((1, 2), dtype=np.float32)})

    def roller() -> None:
        while not done.is_set():
            windows.extend(recorder.roll())

    workers = [threading.Thread(target=client, args=(t,)) for t in range(threads)]
    rolling = threading.Thread(target=roller)
    rolling.start()
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    done.set()
    rolling.join()
    windows.extend(recorder.roll())
    requests, features, classes, confidence = _merged(windows)
    assert requests == threads * per_thread + 1 and sum(w.error_count for w in windows) == 1
    assert sum(sum(w.latency_counts) for w in windows) == requests
    everything = [b for t in range(threads) for b in batches[t]]
    assert (features, classes, confidence) == _expected(everything)
    assert all(w.window_start <= w.window_end for w in windows)


def test_edges_between_float32_values_and_non_finite_values_count_exactly() -> None:
    from bisect import bisect_right

    from device_agent.telemetry.recorder import row_confidences
    from device_agent.telemetry.summaries import FeatureBlock, OutputStats
    from edgeota_contract.telemetry import FeatureReference

    # Edges that float32 cannot represent, values right at and around them, and edges beyond float32's range.
    edges = [[-1e39, 0.1, 1 / 3, 0.7], [0.1], [-2.5, 0.0, 2.5, 3e38, 1e39], [0.2, 0.30000001192092896]]
    refs = [FeatureReference(input="x", feature=j, edges=e, counts=[0] * (len(e) + 1)) for j, e in enumerate(edges)]
    near = [np.float32(e) for row in edges for e in row if abs(e) < 3.4e38]
    near += [np.nextafter(v, np.float32(np.inf)) for v in near] + [np.nextafter(v, np.float32(-np.inf)) for v in near]
    rng = np.random.default_rng(3)
    values = np.array(near + list(rng.normal(scale=2, size=200)), dtype=np.float32)
    for dtype in (np.float32, np.float64):
        x = np.stack([rng.permutation(values) for _ in range(len(edges))], axis=1).astype(dtype)
        summary = FeatureBlock(refs)
        summary.add(x[:100])
        summary.add(x[100:])
        dirty = x.copy()
        dirty[0, 1], dirty[3, 2], dirty[5, 0] = np.nan, np.inf, -np.inf
        summary.add(dirty)
        for j, f in enumerate(summary.summaries()):
            col = np.concatenate([x[:, j], dirty[:, j]]).astype(np.float64)
            finite = col[np.isfinite(col)]
            expected = np.bincount([bisect_right(edges[j], v) for v in finite], minlength=len(edges[j]) + 1)
            assert f.counts == expected.tolist()
            assert f.nan_count == col.size - finite.size
            assert (f.min, f.max) == (finite.min(), finite.max())
            assert np.isclose(f.sum, finite.sum()) and np.isclose(f.sum_sq, (finite**2).sum())

    # Confidence: probability rows use their max, other rows (and a mixed batch) the max of the softmax.
    probs = rng.dirichlet(np.ones(4), size=30)
    logits = rng.normal(size=(30, 4)) * 3
    for rows in (probs, logits, np.concatenate([probs, logits])):
        soft = np.exp(rows - rows.max(axis=1, keepdims=True))
        soft /= soft.sum(axis=1, keepdims=True)
        is_prob = ((rows >= 0) & (rows <= 1)).all(axis=1) & (np.abs(rows.sum(axis=1) - 1) <= 1e-3)
        assert np.array_equal(row_confidences(rows), np.where(is_prob, rows.max(axis=1), soft.max(axis=1)))
    out = OutputStats("y", 4)
    bad = logits.astype(np.float32)
    bad[2, 1] = np.nan
    out.add_batch([probs.astype(np.float32), bad])
    assert out.nan_count == 1 and out.class_counts is not None and sum(out.class_counts) == 59
