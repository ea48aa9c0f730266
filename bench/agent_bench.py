"""Device-agent benchmarks -> bench/results/agent.json.

Measures, on this machine:
* agent RSS with no model loaded (a fresh process: import, start an Agent without MQTT, read VmRSS);
* hot swap under steady load (with the telemetry recorder attached, as in the agent): failed requests,
  p99 latency with and without swaps, and whether telemetry counted every request;
* telemetry overhead: the same model and inputs, batch 1, one ORT thread, interleaved blocks of
  1024 requests with the recorder off, on (background summariser: the agent's default), on with inline
  summaries (``background=False``: the design before the summariser, as a same-run "before") and a bare
  ``LoadedModel.run``, order alternating per round. Two costs, each against the same run's "off" blocks:
  (a) the request thread's CPU time (ORT runs on it) and the added p99 of wall latency, and (b) the whole
  process's CPU time (``time.process_time_ns``), which also counts the summariser thread's batches; the
  goal is reported met or missed for each, and ``goal_met`` needs both. Also the recorder alone (called
  directly, no inference: request thread and process CPU) and the final ``roll()``;
* idle CPU of an agent: N agents in one process without MQTT, idle for a while, process CPU time
  per agent-second (``idle_cpu_ms_per_agent_second``; "before" is a recorded measurement of the old
  code, which no longer exists in this tree);
* bundle verification throughput (signature + per-file sha256, streaming, no unpack) in MB/s.

The digits CNN is built here (1x8x8 input, two 3x3 convolutions, 10 classes) with reference stats
made the way the packager makes them: 64 per-pixel features with decile edges of digits-like data.
The tiny MatMul model (inference of a few us) is reported as a worst case. The box is shared
(2 cores, other test runs): interleaving and medians keep the comparison fair, the figures are noisy.

Run: ``.venv/bin/python -m bench.agent_bench [--quick]`` or ``make bench``; ``--telemetry-sweep [N]`` runs only
the telemetry figures (digits CNN N times, the recorder batch-size sweep N repeats, the tiny model) and merges
them into agent.json.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from device_agent.runtime import LoadedModel, ModelRuntime, SessionCache, load_model  # noqa: E402
from device_agent.telemetry import MAX_BUFFERED_REQUESTS, TelemetryRecorder  # noqa: E402
from device_agent.telemetry_worker import SHARED  # noqa: E402
from edgeota_contract.bundle import create_bundle, verify_bundle  # noqa: E402
from edgeota_contract.signing import SigningKey, TrustedKeys  # noqa: E402
from tests.agent.bundles import make_bundle, make_payload, sample_inputs  # noqa: E402

RSS_SCRIPT = r"""
import sys, tempfile, pathlib
sys.path.insert(0, {root!r})
from edgeota_contract.signing import SigningKey
from edgeota_contract.provisioning import DeviceProvisioning
from device_agent import Agent, AgentConfig
k = SigningKey.generate().public_pem().decode()
d = pathlib.Path(tempfile.mkdtemp())
prov = DeviceProvisioning.model_validate({{"device": {{"id": "bench", "hardware_profile": "x86_64-avx2"}},
    "server": {{"url": "http://127.0.0.1:1", "token": "0123456789abcdef"}},
    "mqtt": {{"host": "127.0.0.1", "port": 1}},
    "trust": {{"release_keys": [k], "server_keys": [k]}}, "agent": {{"state_dir": str(d / "state")}}}})
agent = Agent(AgentConfig.from_provisioning(prov))  # with its MQTT client (no broker on port 1)
agent.start()
import time; time.sleep(1.0)
rss = [l for l in open("/proc/self/status") if l.startswith("VmRSS")][0].split()[1]
agent.stop()
print(int(rss) / 1024)
"""


IDLE_SCRIPT = r"""
import sys, tempfile, pathlib, time
sys.path.insert(0, {root!r})
from edgeota_contract.signing import SigningKey
from edgeota_contract.provisioning import DeviceProvisioning
from device_agent import Agent, AgentConfig
n, seconds = {agents}, {seconds}
k = SigningKey.generate().public_pem().decode()
base = pathlib.Path(tempfile.mkdtemp())
agents = []
for i in range(n):
    prov = DeviceProvisioning.model_validate({{"device": {{"id": f"idle-{{i}}", "hardware_profile": "x86_64-avx2"}},
        "server": {{"url": "http://127.0.0.1:1", "token": "0123456789abcdef"}}, "mqtt": {{"host": "127.0.0.1", "port": 1}},
        "trust": {{"release_keys": [k], "server_keys": [k]}},
        "agent": {{"state_dir": str(base / f"s{{i}}"), "log_level": "WARNING"}}}})
    agents.append(Agent(AgentConfig.from_provisioning(prov), connect=False))
for a in agents:
    a.start()
time.sleep(3.0)  # start-up work done
cpu, wall = time.process_time(), time.monotonic()
time.sleep(seconds)
cpu, wall = time.process_time() - cpu, time.monotonic() - wall
for a in agents:
    a.stop()
print(cpu * 1000 / (n * wall))
"""

IDLE_BEFORE = {
    "ms_per_agent_second": [0.324, 0.378],
    "measured": "2026-11-22 on this machine, commit 9a15b88 (the code is gone from this tree: recorded constant),"
    " same script, 100 agents, 20 s; the first figure while a fleet benchmark loaded the box",
    "why": "update worker woke every second (deep copy of the state, a SQLite query of the spool), ticker twice a"
    " second",
}
TELEMETRY_BEFORE = {
    "commit_9a15b88": {
        "overhead_us_per_request": [3.0, 3.4],
        "overhead_percent_of_inference": [16, 18],
        "measured": "per-request tuples of copies in a deque, summarised in batches; request-thread CPU; recorded"
        " constant",
    },
    "commit_2ea9fa0": {
        "overhead_us_per_request": [2.0, 3.1],
        "overhead_percent_of_inference": [10, 15],
        "measured": "flat list of bytes, batches of 1024 summarised on the request that fills the buffer;"
        " request-thread CPU only (no process figure then); recorded constant. The same design runs in every"
        " run now as the inline_same_run arm (background=False)",
    },
}


def idle_cpu(agents: int, seconds: float) -> float:
    """Process CPU ms per agent per second of ``agents`` idle agents (no MQTT) in a fresh process."""
    out = subprocess.run(
        [sys.executable, "-c", IDLE_SCRIPT.format(root=str(ROOT), agents=agents, seconds=seconds)],
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    )
    return float(out.stdout.strip().splitlines()[-1])


def _manifest_fields(name: str, input_shape: list[int | None]) -> dict[str, Any]:
    """Manifest fields of the benchmark's fp32 bundles (input ``x``, 10 outputs ``y``)."""
    return {
        "model_name": name,
        "version": "1.0.0",
        "release_counter": 1,
        "hardware_profile": "x86_64-avx2",
        "inputs": [{"name": "x", "dtype": "float32", "shape": input_shape}],
        "outputs": [{"name": "y", "dtype": "float32", "shape": [None, 10]}],
        "opset": 17,
        "execution_provider": "CPUExecutionProvider",
        "recipe": "fp32",
        "lineage": {
            "source_model_sha256": "a" * 64,
            "packager_version": "bench",
            "created_at": "2026-01-01T00:00:00Z",
            "created_by": "bench",
        },
    }


def rss_no_model() -> float:
    out = subprocess.run(
        [sys.executable, "-c", RSS_SCRIPT.format(root=str(ROOT))],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    return float(out.stdout.strip().splitlines()[-1])


def _load(tmp: Path, key: SigningKey, seed: int, cache: SessionCache) -> LoadedModel:
    path, sha = make_bundle(tmp / f"b{seed}.tar", key, version=f"1.{seed}.0", seed=seed)
    v = verify_bundle(path, TrustedKeys([key.public_key]), extract_to=tmp / f"slot{seed}")
    return load_model(tmp / f"slot{seed}", v.manifest, sha, f"s{seed}", cache)


def _p99(values: list[float]) -> float:
    return float(np.percentile(np.asarray(values), 99)) if values else 0.0


def hot_swap(models: list[LoadedModel], seconds: float = 3.0, clients: int = 2) -> dict[str, Any]:
    runtime = ModelRuntime()
    recorder = TelemetryRecorder()
    runtime.add_listener(recorder)
    runtime.install(models[0])
    x = {"x": sample_inputs(8)}

    def phase(swap: bool) -> tuple[list[float], int, int]:
        stop = threading.Event()
        lat: list[float] = []
        failed = [0]
        lock = threading.Lock()

        def client() -> None:
            while not stop.is_set():
                started = time.perf_counter()
                try:
                    runtime.predict(x)
                except Exception:
                    with lock:
                        failed[0] += 1
                    continue
                with lock:
                    lat.append((time.perf_counter() - started) * 1000)

        threads = [threading.Thread(target=client) for _ in range(clients)]
        for t in threads:
            t.start()
        swaps = 0
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            time.sleep(0.01)
            if swap:
                runtime.install(models[(swaps + 1) % 2])
                swaps += 1
        stop.set()
        for t in threads:
            t.join()
        return lat, failed[0], swaps

    base, base_failed, _ = phase(False)
    swapped, swap_failed, swaps = phase(True)
    counted = sum(w.request_count for w in recorder.roll())
    return {
        "clients": clients,
        "seconds_per_phase": seconds,
        "telemetry_counted_every_request": counted == len(base) + len(swapped) + base_failed + swap_failed,
        "requests_without_swaps": len(base),
        "requests_during_swaps": len(swapped),
        "swaps": swaps,
        "failed_requests": base_failed + swap_failed,
        "p99_ms_without_swaps": round(_p99(base), 4),
        "p99_ms_during_swaps": round(_p99(swapped), 4),
        "added_p99_ms": round(_p99(swapped) - _p99(base), 4),
    }


def digits_like(n: int, seed: int) -> np.ndarray:
    """[n, 1, 8, 8] float32 images with integer intensities 0..16 (the sklearn digits' range), a bright centre."""
    rng = np.random.default_rng(seed)
    centre = np.exp(-((np.arange(8) - 3.5) ** 2) / 6.0)
    scale = 16 * np.outer(centre, centre)
    return np.asarray(np.clip(np.round(rng.uniform(0, 1.3, size=(n, 1, 8, 8)) * scale), 0, 16).astype(np.float32))


def digits_cnn_bundle(tmp: Path, key: SigningKey) -> LoadedModel:
    """A digits-sized CNN (1x8x8 input, Conv 16x3x3 + Relu + Conv 32x3x3 + Relu + Gemm 10 + Softmax)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    inits = {
        "w1": rng.normal(size=(16, 1, 3, 3)).astype(np.float32),
        "b1": np.zeros(16, np.float32),
        "w2": rng.normal(size=(32, 16, 3, 3)).astype(np.float32) * 0.1,
        "b2": np.zeros(32, np.float32),
        "w3": rng.normal(size=(32 * 8 * 8, 10)).astype(np.float32) * 0.01,
        "b3": np.zeros(10, np.float32),
    }
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c2"], ["r2"]),
        helper.make_node("Flatten", ["r2"], ["f"]),
        helper.make_node("Gemm", ["f", "w3", "b3"], ["g"]),
        helper.make_node("Softmax", ["g"], ["y"], axis=-1),
    ]
    graph = helper.make_graph(
        nodes,
        "digits",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10])],
        initializer=[numpy_helper.from_array(v, k) for k, v in inits.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    x = digits_like(4, seed=1)
    from edgeota_contract.telemetry import FeatureReference, OutputReference, ReferenceStats

    # As packager.stats does: per-pixel decile edges (6 significant digits, duplicates merged).
    calib = digits_like(1000, seed=2).reshape(1000, -1).astype(np.float64)
    features = []
    for j in range(calib.shape[1]):
        edges = sorted({float(f"{q:.6g}") for q in np.percentile(calib[:, j], np.arange(10, 100, 10))})
        counts = np.bincount(np.searchsorted(edges, calib[:, j], side="right"), minlength=len(edges) + 1)
        features.append(FeatureReference(input="x", feature=j, edges=edges, counts=counts.tolist()))
    ref = ReferenceStats(
        sample_count=len(calib),
        features=features,
        outputs=[OutputReference(output="y", kind="classes", class_counts=[1] * 10)],
    )
    import io

    import onnxruntime as ort

    y = ort.InferenceSession(model.SerializeToString()).run(None, {"x": x})[0]
    buf = io.BytesIO()
    np.savez(buf, **{"in.x": x, "out.y": y})
    payload = {
        "model.onnx": model.SerializeToString(),
        "reference_stats.json": ref.model_dump_json().encode(),
        "test_vectors.npz": buf.getvalue(),
        "model_card.md": b"# digits cnn\n",
    }
    onnx.checker.check_model(model)
    path = tmp / "digits.tar"
    create_bundle(
        path,
        payload,
        key,
        **_manifest_fields("digits-cnn", [None, 1, 8, 8]),
    )
    v = verify_bundle(path, TrustedKeys([key.public_key]), extract_to=tmp / "digits")
    return load_model(tmp / "digits", v.manifest, v.archive_sha256, "d", SessionCache())


def _timed(fn: Any, x: dict[str, np.ndarray], n: int, settle: Any = None) -> tuple[np.ndarray, float, float]:
    """Per-request wall latencies in us of ``n`` calls ``fn(x)``, the calling thread's CPU us for all, and the
    process's CPU us for all (every thread: the background summariser too). ``settle`` runs before the
    final readings (waiting for the summariser to finish this block's batches costs no CPU itself)."""
    out = np.empty(n, dtype=np.float64)
    clock = time.perf_counter_ns
    proc = time.process_time_ns()
    cpu = time.thread_time_ns()
    for i in range(n):
        started = clock()
        fn(x)
        out[i] = clock() - started
    if settle is not None:
        settle()
    thread_us = (time.thread_time_ns() - cpu) / 1000.0
    return out / 1000.0, thread_us, (time.process_time_ns() - proc) / 1000.0


def _settle() -> None:
    SHARED.wait_idle(30)


def telemetry_overhead(
    model: LoadedModel, requests: int = 1024, rounds: int = 30, batch_rows: int | None = None
) -> dict[str, Any]:
    """Interleaved blocks of ``requests`` requests: telemetry off, on (background summariser, the agent's
    default), on with inline summaries (``background=False``, the design before the summariser thread), and a
    bare ``LoadedModel.run``.

    ORT runs on the calling thread (one intra-op thread). Two costs per request, each against the same
    run's "off" blocks: (a) the request thread's CPU time (inference plus the hot path; inline summaries
    are charged to the request that triggers them) and the added p99 of wall latency; (b) the whole
    process's CPU time, which also counts the summariser thread's batches (each "on" block waits for its
    batches to finish before the reading). The recorders are never reset between blocks, so batches land
    where they would in service; their final ``roll()`` is added to their totals. ``batch_rows`` sets the
    recorders' ``max_requests`` (None: ``MAX_BUFFERED_REQUESTS``).
    """
    shape = [1 if not isinstance(d, int) else d for d in model.manifest.inputs[0].shape]
    x = {"x": np.random.default_rng(1).uniform(0, 16, size=shape).astype(np.float32)}
    if model.manifest.model_name == "digits-cnn":
        x = {"x": digits_like(1, seed=3)}
    plain, recorded, inlined = ModelRuntime(), ModelRuntime(), ModelRuntime()
    recorder = _recorder(batch_rows)
    inline_recorder = _recorder(batch_rows, background=False)
    recorded.add_listener(recorder)
    inlined.add_listener(inline_recorder)
    for rt in (plain, recorded, inlined):
        rt.install(model)
    for fn in (model.run, plain.predict, recorded.predict, inlined.predict):  # warm up, then empty windows
        _timed(fn, x, 300)
    _settle()
    recorder.roll()
    inline_recorder.roll()
    arms = {"bare": model.run, "off": plain.predict, "on": recorded.predict, "inline": inlined.predict}
    cpu: dict[str, list[float]] = {name: [] for name in arms}
    proc: dict[str, list[float]] = {name: [] for name in arms}
    p99: dict[str, list[float]] = {name: [] for name in arms}
    p999: dict[str, list[float]] = {name: [] for name in arms}
    load = os.getloadavg()
    for r in range(rounds):  # interleaved; the order alternates so no arm always runs first
        for name in arms if r % 2 == 0 else reversed(arms):
            lat, used, used_proc = _timed(arms[name], x, requests, _settle if name == "on" else None)
            cpu[name].append(used / requests)
            proc[name].append(used_proc / requests)
            p99[name].append(float(np.percentile(lat, 99)))
            p999[name].append(float(np.percentile(lat, 99.9)))
    total = rounds * requests
    rolls: dict[str, tuple[float, float]] = {}
    feature_histograms = 0
    for name, rec in (("on", recorder), ("inline", inline_recorder)):
        started, started_proc = time.thread_time_ns(), time.process_time_ns()
        windows = rec.roll()
        rolls[name] = ((time.thread_time_ns() - started) / 1000.0, (time.process_time_ns() - started_proc) / 1000.0)
        assert sum(w.request_count for w in windows) == total, "telemetry lost requests"
        feature_histograms = sum(len(w.features) for w in windows)
        rec.close()
    load_end = os.getloadavg()
    off, on, bare, inline = (np.asarray(cpu[name]) for name in ("off", "on", "bare", "inline"))
    p_off, p_on, p_inline = (np.asarray(proc[name]) for name in ("off", "on", "inline"))
    inference = float(np.median(off))
    inference_proc = float(np.median(p_off))

    def added(arm: np.ndarray, base: np.ndarray, roll_us: float) -> float:
        return float(arm.sum() - base.sum()) / rounds + roll_us / total

    thread_on = added(on, off, rolls["on"][0])
    process_on = added(p_on, p_off, rolls["on"][1])
    thread_inline = added(inline, off, rolls["inline"][0])
    process_inline = added(p_inline, p_off, rolls["inline"][1])
    alone = _recorder_alone(model, x, total, batch_rows)
    goal = TELEMETRY_TARGET_PERCENT

    def pct(us: float, base: float) -> float:
        return round(us / base * 100, 2)

    def p99_added(arm: str, q: dict[str, list[float]] = p99) -> float:
        return round(float(np.median(np.asarray(q[arm]) - np.asarray(q["off"]))), 2)

    return {
        "model": model.manifest.model_name,
        "batch_rows": MAX_BUFFERED_REQUESTS if batch_rows is None else batch_rows,
        "load_average_1min_start_end": [round(load[0], 2), round(load_end[0], 2)],
        "inference_alone_us_per_request": round(inference, 2),
        "inference_alone_process_cpu_us_per_request": round(inference_proc, 2),
        "goal_percent": goal,
        "goal_met_request_thread": pct(thread_on, inference) <= goal,
        "goal_met_whole_process": pct(process_on, inference_proc) <= goal,
        "goal_met": pct(process_on, inference_proc) <= goal and pct(thread_on, inference) <= goal,
        "request_thread": {
            "overhead_us_per_request": round(thread_on, 3),
            "overhead_percent_of_inference": pct(thread_on, inference),
            "overhead_us_median_of_blocks": round(float(np.median(on - off)), 3),
            "overhead_percent_median_of_blocks": pct(float(np.median(on - off)), inference),
            "p99_wall_us_off_median": round(float(np.median(p99["off"])), 2),
            "p99_added_wall_us_median": p99_added("on"),
            "p999_added_wall_us_median": p99_added("on", p999),
            "final_roll_us": round(rolls["on"][0], 1),
        },
        "whole_process": {
            "overhead_us_per_request": round(process_on, 3),
            "overhead_percent_of_inference": pct(process_on, inference_proc),
            "overhead_us_median_of_blocks": round(float(np.median(p_on - p_off)), 3),
            "overhead_percent_median_of_blocks": pct(float(np.median(p_on - p_off)), inference_proc),
            "final_roll_us": round(rolls["on"][1], 1),
        },
        "inline_same_run": {
            "what": "the same recorder with background=False: batches summarised on the request thread (the"
            " design before the summariser thread)",
            "request_thread_overhead_us_per_request": round(thread_inline, 3),
            "request_thread_overhead_percent_of_inference": pct(thread_inline, inference),
            "whole_process_overhead_us_per_request": round(process_inline, 3),
            "whole_process_overhead_percent_of_inference": pct(process_inline, inference_proc),
            "p99_added_wall_us_median": p99_added("inline"),
            "p999_added_wall_us_median": p99_added("inline", p999),
        },
        "recorder_alone": alone,
        "recorder_alone_us_per_request": alone["process_cpu_us_per_request"],
        "recorder_alone_percent_of_inference": pct(alone["process_cpu_us_per_request"], inference),
        "note": "overhead = CPU with telemetry minus without, in the same run (a difference of two noisy means: on"
        " this shared box it moves by tenths of a us between runs); (a) request_thread = thread CPU time of the"
        " requests, (b) whole_process = process CPU time, which counts the summariser thread; goal_met needs"
        " both. recorder_alone = the recorder called directly with the same inputs, outputs and batches, no"
        " inference in between (stable, but cache-warm; excludes the runtime's listener call, about 0.05 us)",
        "feature_histograms": feature_histograms,
        "requests_per_block": requests,
        "blocks_per_arm": rounds,
        "clock": "thread and process CPU time (means); wall perf_counter_ns per request (p99)",
        "us_per_request_off_median": round(inference, 2),
        "us_per_request_on_median": round(float(np.median(on)), 2),
        "us_per_request_inline_median": round(float(np.median(inline)), 2),
        "us_per_request_bare_run_median": round(float(np.median(bare)), 2),
    }


TELEMETRY_TARGET_PERCENT = 3.0


def _recorder(batch_rows: int | None, background: bool = True) -> TelemetryRecorder:
    rows = MAX_BUFFERED_REQUESTS if batch_rows is None else batch_rows
    return TelemetryRecorder(max_requests=rows, background=background)


def _recorder_alone(
    model: LoadedModel, x: dict[str, np.ndarray], requests: int, batch_rows: int | None
) -> dict[str, float]:
    """CPU us per request of the recorder alone (hot path, batch summaries, final roll): the request thread's
    with the background summariser, the process's (summariser included), and the inline recorder's."""
    outputs = model.run(x)
    out: dict[str, float] = {}
    for background in (True, False):
        recorder = _recorder(batch_rows, background)
        for _ in range(2048):  # warm up: plan, reference stats, scratch arrays
            recorder(model, x, outputs, 20_000)
        _settle()
        recorder.roll()
        started, started_proc = time.thread_time_ns(), time.process_time_ns()
        for _ in range(requests):
            recorder(model, x, outputs, 20_000)
        thread_ns = time.thread_time_ns() - started
        _settle()
        windows = recorder.roll()
        used, used_proc = time.thread_time_ns() - started, time.process_time_ns() - started_proc
        recorder.close()
        assert sum(w.request_count for w in windows) == requests, "telemetry lost requests"
        if background:
            out["request_thread_cpu_us_per_request"] = round(thread_ns / requests / 1000.0, 3)
            out["request_thread_cpu_incl_roll_us_per_request"] = round(used / requests / 1000.0, 3)
            out["process_cpu_us_per_request"] = round(used_proc / requests / 1000.0, 3)
        else:
            out["inline_thread_cpu_us_per_request"] = round(used / requests / 1000.0, 3)
    return out


def telemetry_in_situ_breakdown(model: LoadedModel, requests: int = 1024, rounds: int = 30) -> dict[str, Any]:
    """Where the request thread's telemetry cost goes, with inference in between (interleaved blocks as in
    :func:`telemetry_overhead`): a listener that does nothing, one that only copies the input and output
    (``tobytes``, dropped), the recorder's hot path alone (no batch ever runs: the buffer is cleared after
    each block), the recorder with background batches, and with inline batches. Mean thread and process
    CPU us per request above the "off" blocks."""
    x = {"x": digits_like(1, seed=3)} if model.manifest.model_name == "digits-cnn" else None
    assert x is not None, "the breakdown is for the digits CNN"

    def noop(m: Any, i: Any, o: Any, latency: int) -> None:
        return None

    def copies(m: Any, i: Any, o: Any, latency: int) -> None:
        i["x"].tobytes()
        o["y"].tobytes()

    hot = TelemetryRecorder(max_requests=1 << 30, background=False)
    background, inline = _recorder(None), _recorder(None, background=False)

    def clear_hot() -> None:
        hot._set_limit(1 << 30)  # the first batch adapted it; keep batches from running at all
        hot._buf.clear()

    listeners: dict[str, Any] = {
        "off": None,
        "noop_listener": noop,
        "copies_only": copies,
        "hot_path_only": hot,
        "background": background,
        "inline": inline,
    }
    settle = {"hot_path_only": clear_hot, "background": _settle}
    runtimes: dict[str, ModelRuntime] = {}
    for name, listener in listeners.items():
        rt = runtimes[name] = ModelRuntime()
        rt.install(model)
        if listener is not None:
            rt.add_listener(listener)
        _timed(rt.predict, x, 2000, settle.get(name))
    clear_hot()
    load = os.getloadavg()[0]
    cpu: dict[str, list[float]] = {name: [] for name in runtimes}
    proc: dict[str, list[float]] = {name: [] for name in runtimes}
    for r in range(rounds):
        for name in list(runtimes) if r % 2 == 0 else list(reversed(runtimes)):
            _, used, used_proc = _timed(runtimes[name].predict, x, requests, settle.get(name))
            cpu[name].append(used / requests)
            proc[name].append(used_proc / requests)
    for rec in (background, inline):
        rec.roll()
        rec.close()
    off, poff = np.asarray(cpu["off"]), np.asarray(proc["off"])
    out: dict[str, Any] = {
        "load_average_1min_start_end": [round(load, 2), round(os.getloadavg()[0], 2)],
        "inference_us": round(float(np.median(off)), 2),
    }
    for name in runtimes:
        if name != "off":
            out[name] = {
                "thread_us": round(float(np.mean(np.asarray(cpu[name]) - off)), 3),
                "thread_us_median_of_blocks": round(float(np.median(np.asarray(cpu[name]) - off)), 3),
                "process_us": round(float(np.mean(np.asarray(proc[name]) - poff)), 3),
            }
    return out


SWEEP_BATCH_ROWS = (64, 128, 256, 512, 1024, 2048)


def telemetry_batch_sweep(model: LoadedModel, repeats: int = 2, rounds: int = 30) -> list[dict[str, Any]]:
    """The A/B telemetry overhead for each recorder batch size in :data:`SWEEP_BATCH_ROWS`, ``repeats`` times.

    Each entry is a whole :func:`telemetry_overhead` run (its own interleaved baseline); the order of the
    sizes reverses on every repeat so that drifting load does not favour one size. The load average at
    the start of each entry is recorded beside it.
    """
    out = []
    for rep in range(repeats):
        for rows in SWEEP_BATCH_ROWS if rep % 2 == 0 else reversed(SWEEP_BATCH_ROWS):
            load = os.getloadavg()[0]
            r = telemetry_overhead(model, rounds=rounds, batch_rows=rows)
            out.append(
                {
                    "batch_rows": rows,
                    "repeat": rep,
                    "request_thread_overhead_us": r["request_thread"]["overhead_us_per_request"],
                    "request_thread_overhead_percent": r["request_thread"]["overhead_percent_of_inference"],
                    "process_overhead_us": r["whole_process"]["overhead_us_per_request"],
                    "process_overhead_percent": r["whole_process"]["overhead_percent_of_inference"],
                    "inline_request_thread_overhead_us": r["inline_same_run"]["request_thread_overhead_us_per_request"],
                    "inline_process_overhead_us": r["inline_same_run"]["whole_process_overhead_us_per_request"],
                    "p99_added_wall_us": r["request_thread"]["p99_added_wall_us_median"],
                    "recorder_alone_process_us": r["recorder_alone"]["process_cpu_us_per_request"],
                    "recorder_alone_request_thread_us": r["recorder_alone"]["request_thread_cpu_us_per_request"],
                    "inference_us": r["inference_alone_us_per_request"],
                    "load_average_1min": round(load, 2),
                }
            )
    return sorted(out, key=lambda e: (e["batch_rows"], e["repeat"]))


def verification_throughput(tmp: Path, key: SigningKey, megabytes: int = 128) -> dict[str, Any]:
    payload = make_payload()
    payload["weights.bin"] = os.urandom(megabytes << 20)
    path = tmp / "big.tar"
    create_bundle(
        path,
        payload,
        key,
        **_manifest_fields("big", [None, 64]),
    )
    trusted = TrustedKeys([key.public_key])
    times = []
    for _ in range(3):
        started = time.perf_counter()
        verify_bundle(path, trusted)
        times.append(time.perf_counter() - started)
    size = path.stat().st_size / 1e6
    return {"bundle_mb": round(size, 1), "seconds": round(min(times), 3), "mb_per_s": round(size / min(times), 1)}


def run(results_dir: Path, quick: bool) -> dict[str, Any]:
    """All agent figures (smaller and shorter with ``quick``); writes ``results_dir/agent.json``."""
    key = SigningKey.generate()
    rounds = 8 if quick else 30
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        cache = SessionCache()
        models = [_load(tmp, key, 0, cache), _load(tmp, key, 1, cache)]
        digits = digits_cnn_bundle(tmp, key)
        results = {
            "machine": {"python": platform.python_version(), "cpus": os.cpu_count(), "platform": platform.platform()},
            "quick": quick,
            "rss_mb_no_model": round(rss_no_model(), 1),
            "rss_target_mb": 60,
            "hot_swap": hot_swap(models, seconds=1.0 if quick else 3.0),
            "telemetry_digits_cnn": telemetry_overhead(digits, rounds=rounds),
            "telemetry_batch_sweep": telemetry_batch_sweep(digits, repeats=1 if quick else 2, rounds=rounds),
            "telemetry_in_situ_breakdown": [telemetry_in_situ_breakdown(digits, rounds=rounds)],
            "telemetry_tiny_model_worst_case": telemetry_overhead(models[0], rounds=rounds),
            "telemetry_target_percent": TELEMETRY_TARGET_PERCENT,
            "telemetry_before": TELEMETRY_BEFORE,
            "verification": verification_throughput(tmp, key, megabytes=32 if quick else 128),
            "verification_target_mb_per_s": 300,
        }
        # long enough for the idle agent's timers to fire (report retry every 30 s, window roll every 60 s)
        agents, seconds = (30, 35.0) if quick else (100, 65.0)
        results["idle_cpu_ms_per_agent_second"] = {
            "after": round(idle_cpu(agents, seconds), 4),
            "after_setup": f"{agents} agents in one process, no MQTT, no model, default intervals (retry 30 s,"
            f" telemetry window 60 s), idle {seconds:.0f} s after a 3 s settle (process CPU time / agents / wall"
            " seconds), this run",
            "before": IDLE_BEFORE,
        }
    results_dir.mkdir(parents=True, exist_ok=True)
    (results_dir / "agent.json").write_text(json.dumps(results, indent=2) + "\n")
    return results


def _brief(r: dict[str, Any]) -> dict[str, Any]:
    """The headline figures of one :func:`telemetry_overhead` run."""
    return {
        "load_average_1min_start_end": r["load_average_1min_start_end"],
        "inference_us": r["inference_alone_us_per_request"],
        "request_thread_us": r["request_thread"]["overhead_us_per_request"],
        "request_thread_percent": r["request_thread"]["overhead_percent_of_inference"],
        "request_thread_median_of_blocks_percent": r["request_thread"]["overhead_percent_median_of_blocks"],
        "p99_added_wall_us": r["request_thread"]["p99_added_wall_us_median"],
        "whole_process_us": r["whole_process"]["overhead_us_per_request"],
        "whole_process_percent": r["whole_process"]["overhead_percent_of_inference"],
        "inline_request_thread_percent": r["inline_same_run"]["request_thread_overhead_percent_of_inference"],
        "inline_whole_process_percent": r["inline_same_run"]["whole_process_overhead_percent_of_inference"],
        "inline_p99_added_wall_us": r["inline_same_run"]["p99_added_wall_us_median"],
        "p999_added_wall_us": r["request_thread"]["p999_added_wall_us_median"],
        "inline_p999_added_wall_us": r["inline_same_run"]["p999_added_wall_us_median"],
        "goal_met_request_thread": r["goal_met_request_thread"],
        "goal_met_whole_process": r["goal_met_whole_process"],
    }


def sweep_only(results_dir: Path, repeats: int) -> dict[str, Any]:
    """Only the telemetry figures, merged into an existing ``agent.json``: the digits CNN ``repeats`` times (the
    last run in full, every run in brief), the batch sweep, and the tiny model's worst case."""
    path = results_dir / "agent.json"
    results: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {}
    with tempfile.TemporaryDirectory() as tmpdir:
        key = SigningKey.generate()
        digits = digits_cnn_bundle(Path(tmpdir), key)
        runs = [telemetry_overhead(digits) for _ in range(max(1, repeats))]
        results["telemetry_digits_cnn"] = runs[-1]
        results["telemetry_digits_cnn_runs"] = [_brief(r) for r in runs]
        results["telemetry_batch_sweep"] = telemetry_batch_sweep(digits, repeats=repeats)
        results["telemetry_in_situ_breakdown"] = [telemetry_in_situ_breakdown(digits) for _ in range(max(1, repeats))]
        tiny = _load(Path(tmpdir), key, 0, SessionCache())
        results["telemetry_tiny_model_worst_case"] = telemetry_overhead(tiny)
    results["telemetry_target_percent"] = TELEMETRY_TARGET_PERCENT
    results["telemetry_before"] = TELEMETRY_BEFORE
    results_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2) + "\n")
    return results


def main() -> None:
    """``--quick``: shorter runs; ``--telemetry-sweep [N]``: only the telemetry figures (N repeats, default 2)."""
    results_dir = ROOT / "bench" / "results"
    if "--telemetry-sweep" in sys.argv:
        rest = sys.argv[sys.argv.index("--telemetry-sweep") + 1 :]
        repeats = int(rest[0]) if rest and rest[0].isdigit() else 2
        out = sweep_only(results_dir, repeats)
        print(json.dumps({k: out[k] for k in ("telemetry_digits_cnn", "telemetry_batch_sweep")}, indent=2))
        return
    print(json.dumps(run(results_dir, "--quick" in sys.argv), indent=2))


if __name__ == "__main__":
    main()
