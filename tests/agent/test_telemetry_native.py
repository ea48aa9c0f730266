"""The C request path of the telemetry recorder (``device_agent/_telemetry_native.c``).

Its windows are checked value for value against the per-request reference in ``test_telemetry_exact.py``
(every test there runs on both paths). Here: it is built and really takes the usual request, two models
interleaved as during a hot swap give the same windows on both paths, and what it refuses.
"""

from __future__ import annotations

import random
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import device_agent.telemetry.recorder as telemetry_module
from device_agent.serving.runtime import LoadedModel, ModelRuntime
from device_agent.telemetry import windows as telemetry_windows
from device_agent.telemetry.recorder import NATIVE_AVAILABLE, TelemetryRecorder, WindowSummary
from device_agent.telemetry.windows import Template, native_arming
from edgeota_contract.telemetry import CONFIDENCE_EDGES, LATENCY_EDGES_MS, OutputReference, ReferenceStats
from tests.agent.conftest import Keys
from tests.agent.test_telemetry_exact import SUBSET, _bundle, _requests


def test_the_c_path_is_built_and_used_by_default() -> None:
    """``make venv`` compiles it (setup.py, optional=True): a missing compiler shows here, not as slow telemetry."""
    assert NATIVE_AVAILABLE, "device_agent._telemetry_native was not built: is gcc installed? run `make venv`"
    recorder = TelemetryRecorder()
    assert recorder.native and not hasattr(recorder.record, "__code__")  # a C method, not a Python closure


def test_the_usual_request_never_reaches_python(tmp_path: Path, keys: Keys) -> None:
    model = _bundle(tmp_path, keys, SUBSET)
    # 1/128 sampled: far fewer than the 64 sampled rows that would have a batch summarised on the way
    recorder = TelemetryRecorder(native=True, feature_sample_rate=1 / 128)
    runtime = ModelRuntime()
    runtime.install(model)
    runtime.add_listener(recorder.record)
    x = {"x": np.full((1, 64), 0.5, dtype=np.float32)}
    runtime.predict(x)  # the first request of a model in a window: Python notes the window and arms the C path
    assert recorder._native.model is model
    for _ in range(500):
        runtime.predict(x)
    assert recorder.pending() == 500 and recorder._buf == []  # counted in C (the first is in its window already)
    [window] = recorder.roll()
    assert window.request_count == 501 and window.outputs[0].class_counts is not None
    assert sum(window.outputs[0].class_counts) == 501
    assert recorder._native.model is None  # a roll disarms: the next request notes the new window's start


def _interleaved(a: LoadedModel, b: LoadedModel, seed: int) -> list[tuple[LoadedModel, Any, Any, int]]:
    """Requests of two models as a hot swap mixes them: runs of A, a stretch of both, then B, then a few A."""
    ra, rb = _requests(a, 150, seed), _requests(b, 150, seed + 1)
    pattern = [0] * 40 + [random.Random(seed).randint(0, 1) for _ in range(160)] + [1] * 90 + [0] * 10
    calls, ia, ib = [], iter(ra), iter(rb)
    for which in pattern:
        model, it = (a, ia) if which == 0 else (b, ib)
        request = next(it, None)
        if request is not None:
            calls.append((model, *request))
    return calls


def _by_model(windows: list[WindowSummary]) -> dict[str, list[WindowSummary]]:
    out: dict[str, list[WindowSummary]] = {}
    for w in windows:
        out.setdefault(w.bundle_sha256, []).append(w)
    return out


def _strip_times(windows: list[WindowSummary]) -> list[dict[str, Any]]:
    return [{k: v for k, v in vars(w).items() if k not in ("window_start", "window_end")} for w in windows]


@pytest.mark.parametrize("armable", [True, False], ids=["c-takes-them", "c-cannot-take-them"])
@pytest.mark.parametrize("rate", [1.0, 0.5])
def test_two_models_interleaved_give_the_same_windows_on_both_paths(
    tmp_path: Path, keys: Keys, rate: float, armable: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """During a swap old and new model requests interleave: the C path follows the newer model only (no
    ping-pong), leaves the other to Python, and every window equals the pure-Python recorder's. Models the
    C path cannot take (as wide class outputs) go to the Python path with the C path's draw."""
    if not armable:
        monkeypatch.setattr(telemetry_windows, "native_arming", lambda template: None)
    a = _bundle(tmp_path / "a", keys, SUBSET)
    b = _bundle(tmp_path / "b", keys, None, version="1.0.1")
    assert a.bundle_sha256 != b.bundle_sha256
    calls = _interleaved(a, b, seed=3)
    results = []
    for native in (True, False):
        recorder = TelemetryRecorder(max_requests=16, background=False, feature_sample_rate=rate, native=native)
        random.seed(7)  # the same sample on both paths
        windows, ever_armed = [], False
        for i, (model, inputs, outputs, latency) in enumerate(calls):
            if i in (120, 260):
                windows += recorder.roll()
            recorder.record(model, inputs, outputs, latency)
            ever_armed = ever_armed or (native and recorder._native.model is not None)
        windows += recorder.roll()
        if native:
            assert ever_armed == armable
        results.append({k: _strip_times(v) for k, v in _by_model(windows).items()})
    assert results[0] == results[1]
    assert sum(w["request_count"] for ws in results[0].values() for w in ws) == len(calls)


def test_wide_and_non_float_outputs_stay_in_python() -> None:
    wide = ReferenceStats(
        sample_count=1, features=[], outputs=[OutputReference(output="y", kind="classes", class_counts=[1] * 40)]
    )
    f32, f64 = np.dtype("float32"), np.dtype("float64")
    usual = Template(None, ("x",), ("y",), ("x", "y"), f32, 64, f32, (10,))
    assert native_arming(usual) == ("x", "y", f32.num, 256, f32.num, 10, 0)
    assert native_arming(Template(wide, ("x",), ("y",), ("x", "y"), f32, 64, f64, (40,))) is None  # > 32 classes
    assert native_arming(Template(None, ("x",), ("y",), ("x", "y"), f32, 64, np.dtype("int64"), (1,))) is None
    assert native_arming(Template(None, ("x",), ("y",), None)) is None  # no fixed row shape
    odd = ReferenceStats(
        sample_count=1, features=[], outputs=[OutputReference(output="y", kind="classes", class_counts=[1] * 5)]
    )  # the last axis is not the class axis: only NaN counts, as OutputStats does
    assert native_arming(Template(odd, ("x",), ("y",), ("x", "y"), f32, 64, f32, (10,)))[-1] == 0  # type: ignore[index]


def test_native_true_without_the_extension_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(telemetry_module, "_telemetry_native", None)
    with pytest.raises(ValueError, match="not built"):
        TelemetryRecorder(native=True)
    assert not TelemetryRecorder().native  # the default falls back to Python


def test_the_accumulator_refuses_bad_arguments() -> None:
    from device_agent._telemetry_native import Accumulator

    def nothing(*_: Any) -> None:
        return None

    for rate in (0.0, 1.5, float("nan")):
        with pytest.raises(ValueError, match="rate"):
            Accumulator(nothing, nothing, nothing, random.random, rate, LATENCY_EDGES_MS, CONFIDENCE_EDGES)
    with pytest.raises(ValueError, match="edges"):
        Accumulator(nothing, nothing, nothing, random.random, 1.0, [0.0] * 65, CONFIDENCE_EDGES)
    acc = Accumulator(nothing, nothing, nothing, random.random, 1.0, LATENCY_EDGES_MS, CONFIDENCE_EDGES)
    model = object()
    f32, i64 = np.dtype("float32").num, np.dtype("int64").num
    with pytest.raises(ValueError, match="float32 or float64"):
        acc.arm(model, "tag", "x", "y", f32, 4, i64, 1, 0)
    with pytest.raises(ValueError, match="shapes"):
        acc.arm(model, "tag", "x", "y", f32, 4, f32, 10, 33)
    with pytest.raises(TypeError):
        acc.record(model, {}, None)  # type: ignore[call-arg]
    acc.arm(model, "tag", "x", "y", f32, 4, f32, 2, 2)
    acc.record(model, {"x": np.ones((1, 1), np.float32)}, {"y": np.array([[0.2, 0.8]], np.float32)}, 1000)
    with pytest.raises(RuntimeError, match="take"):  # arming again would drop what it holds
        acc.arm(model, "tag", "x", "y", f32, 4, f32, 2, 2)
    taken = acc.take(True)
    assert taken is not None and taken[1] == 1 and taken[4] == [0, 1]
    with pytest.raises(ValueError, match="limit must be"):
        acc.limit = 0
    with pytest.raises(ValueError, match="limit_bytes must be"):
        acc.limit_bytes = -5
    with pytest.raises(TypeError):
        acc.limit = "many"  # type: ignore[assignment]


def test_concurrent_requests_with_hot_swaps_and_rolls_count_each_request_once(tmp_path: Path, keys: Keys) -> None:
    """Three clients through one runtime while the model is swapped back and forth and windows roll: per model,
    the windows' totals equal the pure-Python recorder's over the same requests (integer data: exact sums)."""
    from device_agent.serving.runtime import SessionCache, load_model
    from edgeota_contract.bundle import verify_bundle
    from edgeota_contract.signing import TrustedKeys
    from tests.agent.bundles import make_bundle
    from tests.agent.test_telemetry_background import _request, _totals

    models = []
    for version, seed in (("1.0.0", 0), ("1.0.1", 1)):
        path, sha = make_bundle(tmp_path / f"{version}.tar", keys.release, version=version, seed=seed)
        v = verify_bundle(path, TrustedKeys([keys.release.public_key]), extract_to=tmp_path / version)
        models.append(load_model(tmp_path / version, v.manifest, sha, version, SessionCache()))
    recorder = TelemetryRecorder(max_requests=8, background=False, feature_sample_rate=0.5, native=True)
    runtime = ModelRuntime()
    runtime.install(models[0])
    runtime.add_listener(recorder.record)
    in_python = [0]  # requests that went through the Python buffer rather than the C path
    summarise_buffer = recorder._summarise_buffer

    def counting() -> tuple[int, int]:
        requests, nbytes = summarise_buffer()
        in_python[0] += requests
        return requests, nbytes

    recorder._summarise_buffer = counting  # type: ignore[method-assign]
    served: dict[str, list[tuple[dict[str, Any], dict[str, Any], int]]] = {m.bundle_sha256: [] for m in models}
    seen: list[LoadedModel] = []
    windows: list[WindowSummary] = []
    done = threading.Event()

    def client(c: int) -> None:
        for i in range(300):
            inputs = _request(models[0], 1 + c * 1000 + i)[0]
            outputs = runtime.predict(inputs)  # (which model served it: the one its outputs match)
            served_by = next(m for m in models if np.array_equal(m.run(inputs)["y"], outputs["y"]))
            seen.append(served_by)
            served[served_by.bundle_sha256].append((inputs, outputs, 0))

    def swapper() -> None:
        k = 0
        while not done.is_set():
            k += 1
            runtime.install(models[k % 2])
            done.wait(0.001)

    def roller() -> None:
        while not done.is_set():
            windows.extend(recorder.roll())
            done.wait(0.003)

    clients = [threading.Thread(target=client, args=(c,)) for c in range(3)]
    others = [threading.Thread(target=swapper), threading.Thread(target=roller)]
    for t in clients + others:
        t.start()
    for t in clients:
        t.join()
    done.set()
    for t in others:
        t.join()
    windows.extend(recorder.roll())
    assert {m.bundle_sha256 for m in seen} == {m.bundle_sha256 for m in models}  # both really served
    # the C path took part (how much depends on scheduling: with both models in one window it follows the newer)
    assert in_python[0] < len(seen), in_python
    for model in models:
        got = [w for w in windows if w.bundle_sha256 == model.bundle_sha256]
        calls = served[model.bundle_sha256]
        assert sum(w.request_count for w in got) == len(calls)
        mine, reference = _totals(got), _python_totals(model, calls)
        # features cover a random half of the requests on both sides: compare what every request feeds
        for key in ("requests", "classes", "confidence"):
            assert mine[key] == reference[key], key
        assert sum(w.feature_requests or 0 for w in got) == sum(sum(f.counts) for w in got for f in w.features[:1])


def _python_totals(model: LoadedModel, calls: list[tuple[dict[str, Any], dict[str, Any], int]]) -> dict[str, Any]:
    from tests.agent.test_telemetry_background import _totals

    recorder = TelemetryRecorder(background=False, native=False)
    for inputs, outputs, latency in calls:
        recorder.record(model, inputs, outputs, latency)
    return _totals(recorder.roll())
