"""The background summariser: exactness with a roll racing concurrent requests, the bounded fallback
when the summariser is slow, no thread left after stop, and no work while idle.

Inputs here hold integer values, so every float64 sum is exact in any order and windows can be
merged and compared with a per-value reference exactly; feature 0 carries each request's id, so a
window's feature-0 sum tells which requests it may hold.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import device_agent.telemetry.recorder as telemetry_module
from device_agent.agent import Agent
from device_agent.serving.runtime import LoadedModel, ModelRuntime, SessionCache, load_model
from device_agent.settings import AgentConfig
from device_agent.telemetry.recorder import TelemetryRecorder, WindowSummary
from device_agent.telemetry.worker import Job, Summariser
from edgeota_contract.bundle import verify_bundle
from edgeota_contract.signing import TrustedKeys
from tests.agent.bundles import FEATURES, make_bundle
from tests.agent.conftest import Keys, write_config


@pytest.fixture
def model(tmp_path: Path, keys: Keys) -> LoadedModel:
    path, sha = make_bundle(tmp_path / "b.tar", keys.release)
    v = verify_bundle(path, TrustedKeys([keys.release.public_key]), extract_to=tmp_path / "slot")
    return load_model(tmp_path / "slot", v.manifest, sha, "a", SessionCache())


def _request(model: LoadedModel, ident: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """One row of integers 0..3 (on and between the bundle's edges 0.25/0.5/0.75 after scaling) with the id first."""
    rng = np.random.default_rng(ident)
    x = (rng.integers(0, 4, size=(1, FEATURES)) / 4).astype(np.float32)
    x[0, 0] = ident
    return {"x": x}, model.run({"x": x})


def _totals(windows: list[WindowSummary]) -> dict[str, Any]:
    """Merged counts and sums (exact here: integer-valued data)."""
    feats = [f for w in windows for f in w.features]
    by_feature: dict[int | None, list[Any]] = {}
    for f in feats:
        by_feature.setdefault(f.feature, []).append(f)
    outs = [w.outputs[0] for w in windows if w.outputs[0].class_counts is not None]
    return {
        "requests": sum(w.request_count for w in windows),
        "latency": np.sum([w.latency_counts for w in windows], axis=0).tolist(),
        "counts": {k: np.sum([f.counts for f in v], axis=0).tolist() for k, v in by_feature.items()},
        "sums": {k: (sum(f.sum for f in v), sum(f.sum_sq for f in v)) for k, v in by_feature.items()},
        "min": {k: min(f.min for f in v if f.min is not None) for k, v in by_feature.items()},
        "classes": np.sum([o.class_counts or [] for o in outs], axis=0).tolist(),
        "confidence": np.sum([o.confidence_counts or [] for o in outs], axis=0).tolist(),
    }


def _reference(model: LoadedModel, calls: list[tuple[dict[str, Any], dict[str, Any], int]]) -> dict[str, Any]:
    # the pure-Python path, checked against the per-value reference elsewhere (so the C path is checked here too)
    recorder = TelemetryRecorder(background=False, native=False)
    for inputs, outputs, latency in calls:
        recorder(model, inputs, outputs, latency)
    return _totals(recorder.roll())


def test_roll_racing_concurrent_requests_counts_each_request_once_in_its_window(
    model: LoadedModel, native: bool
) -> None:
    worker = Summariser(linger_seconds=5.0)
    recorder = TelemetryRecorder(max_requests=8, background=True, summariser=worker, native=native)
    clients, per_client = 3, 200
    calls = {
        c: [(*_request(model, 1 + c * per_client + i), 1000 + 7919 * i) for i in range(per_client)]
        for c in range(clients)
    }
    # roll numbers: a request is in the window closed by a roll in [rolls finished before it, rolls started after it]
    rolls_started = rolls_finished = 0
    bounds: dict[int, tuple[int, int]] = {}
    by_roll: dict[int, list[WindowSummary]] = {}
    done = threading.Event()

    def client(c: int) -> None:
        for inputs, outputs, latency in calls[c]:
            lo = rolls_finished
            recorder(model, inputs, outputs, latency)
            bounds[int(inputs["x"][0, 0])] = (lo, rolls_started)

    def roller() -> None:
        nonlocal rolls_started, rolls_finished
        while not done.is_set():
            rolls_started += 1
            by_roll[rolls_started - 1] = recorder.roll()
            rolls_finished += 1
            done.wait(0.002)

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    rolling = threading.Thread(target=roller)
    rolling.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    done.set()
    rolling.join()
    by_roll[rolls_started] = recorder.roll()
    assert worker.wait_idle(30)
    recorder.close()
    assert worker.jobs_run > 0  # batches ran on the summariser

    windows = [w for ws in by_roll.values() for w in ws]
    everything = [call for c in range(clients) for call in calls[c]]
    assert _totals(windows) == _reference(model, everything)  # each request counted exactly once, exactly
    for r, ws in by_roll.items():
        assert len(ws) <= 1
        sure = [i for i, (lo, hi) in bounds.items() if lo == hi == r]
        maybe = [i for i, (lo, hi) in bounds.items() if lo <= r <= hi]
        got = ws[0] if ws else None
        count = got.request_count if got else 0
        assert len(sure) <= count <= len(maybe)
        ids = got.features[0].sum if got else 0.0  # feature 0 holds the ids: exact integer sums
        assert sum(sure) <= ids <= sum(maybe)
        if got is not None:  # each window is consistent in itself
            assert sum(got.latency_counts) == count == sum(got.features[0].counts)
            assert sum(got.outputs[0].class_counts or []) == count


class _Gated(Summariser):
    """A summariser that runs nothing until the gate opens (it fell behind)."""

    def __init__(self) -> None:
        super().__init__(linger_seconds=5.0)
        self.gate = threading.Event()

    def _run_job(self, job: Job) -> None:
        assert self.gate.wait(30)
        job()


def test_a_slow_summariser_makes_the_request_path_summarise_and_memory_stays_bounded(model: LoadedModel) -> None:
    worker = _Gated()
    recorder = TelemetryRecorder(max_requests=8, background=True, summariser=worker)
    calls = [(*_request(model, i + 1), 5000 + i) for i in range(150)]
    most = 0
    drops = 0
    for inputs, outputs, latency in calls:
        before = recorder.pending()
        recorder(model, inputs, outputs, latency)
        most = max(most, recorder.pending())
        drops += recorder.pending() < before
    assert worker.jobs_run == 0 and worker.thread is not None  # the summariser is stuck on its first job
    assert most < 4 * 8  # never more than 4x the limit waits
    assert drops >= 3  # so requests summarised the buffer themselves
    worker.gate.set()
    assert worker.wait_idle(30)
    windows = recorder.roll()
    assert len(windows) == 1 and _totals(windows) == _reference(model, calls)
    recorder.close()


def test_no_summariser_thread_is_left_after_close_and_an_idle_one_does_not_wake(model: LoadedModel) -> None:
    worker = Summariser(linger_seconds=60.0)
    recorder = TelemetryRecorder(max_requests=4, background=True, summariser=worker)
    assert worker.thread is None  # nothing recorded: no thread
    requests = [_request(model, i + 1) for i in range(20)]
    for inputs, outputs in requests:
        recorder(model, inputs, outputs, 1000)
    thread = worker.thread
    assert thread is not None and worker.wait_idle(30)
    woken = worker.wakeups
    threading.Event().wait(0.3)
    assert worker.wakeups == woken and thread.is_alive()  # idle: blocked on its condition, not polling
    recorder.close()
    thread.join(10)
    assert not thread.is_alive() and worker.thread is None
    recorder.close()  # idempotent
    assert sum(w.request_count for w in recorder.roll()) == 20

    # a thread with no close exits by itself once it lingered with nothing to do
    short = Summariser(linger_seconds=0.05)
    other = TelemetryRecorder(max_requests=4, background=True, summariser=short)
    for inputs, outputs in requests:
        other(model, inputs, outputs, 1000)
    thread = short.thread
    assert thread is not None
    thread.join(10)
    assert not thread.is_alive() and short.thread is None
    for inputs, outputs in requests:  # later work starts a new thread
        other(model, inputs, outputs, 1000)
    assert short.wait_idle(30) and short.threads_started == 2
    assert sum(w.request_count for w in other.roll()) == 40
    other.close()


@pytest.mark.parametrize("background", [True, False])
def test_agent_stop_releases_the_summariser_thread(
    tmp_path: Path, keys: Keys, model: LoadedModel, monkeypatch: pytest.MonkeyPatch, background: bool
) -> None:
    worker = Summariser(linger_seconds=60.0)
    monkeypatch.setattr(telemetry_module, "SHARED", worker)  # the agent's recorder uses the process default
    path = write_config(
        tmp_path / "agent", keys, "http://127.0.0.1:1", device_id="bg-1", telemetry_background=background
    )
    agent = Agent(AgentConfig.load(path), connect=False)
    agent.start()
    try:
        runtime: ModelRuntime = agent.runtime
        runtime.install(model)
        for i in range(3000):  # the default samples 1/16 of the inputs: ~190 rows, past the first batch of 64
            runtime.predict(_request(model, i + 1)[0])
        thread = worker.thread
        assert (thread is not None) == background  # telemetry_background=False: summarised on the requests
    finally:
        agent.stop()
    if thread is not None:
        thread.join(10)
        assert not thread.is_alive()
    assert worker.thread is None


def test_a_failing_batch_is_logged_and_the_summariser_goes_on(caplog: pytest.LogCaptureFixture) -> None:
    worker = Summariser(linger_seconds=5.0)
    worker.attach()
    ran: list[int] = []

    def broken() -> None:
        raise ValueError("bad batch")

    worker.submit(broken)
    worker.submit(lambda: ran.append(1))
    assert worker.wait_idle(30)
    assert ran == [1] and worker.jobs_run == 2 and worker.threads_started == 1
    assert "telemetry_summary_failed" in caplog.text
    thread = worker.thread
    worker.detach()
    if thread is not None:
        thread.join(10)
    assert worker.thread is None
