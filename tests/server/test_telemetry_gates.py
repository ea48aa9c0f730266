"""Telemetry gates: pure evaluation, and a rollout halted by its devices' telemetry (both databases)."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime

from fastapi.testclient import TestClient

from edgeota_contract.messages import Assignment, TelemetryWindow
from edgeota_contract.telemetry import (
    LATENCY_EDGES_MS,
    FeatureReference,
    FeatureSummary,
    OutputSummary,
    ReferenceStats,
)
from edgeota_contract.topics import Channel, device_topic
from ota_server.context import ServerContext
from ota_server.drift import feature_key
from ota_server.engine import tick
from ota_server.rollout.gate_results import DriftInput, GateInputs, GateResult, evaluate_gates
from ota_server.rollout.plan import Gates
from ota_server.rollout.telemetry_gates import TelemetryTotals

from .conftest import AUTH, BundleFactory, upload
from .helpers import BOOT, assignments, deliver, finish

N = len(LATENCY_EDGES_MS) + 1
_seq = iter(range(10_000, 1_000_000))


def latency(bucket: int, n: int) -> list[int]:
    counts = [0] * N
    counts[bucket] = n
    return counts


def window(
    a: Assignment,
    requests: int,
    errors: int,
    lat_bucket: int = 5,
    features: list[FeatureSummary] | None = None,
    nan_values: int = 0,
) -> TelemetryWindow:
    return TelemetryWindow(
        boot_id=BOOT,
        seq=next(_seq),
        model_name=a.model_name,
        version=a.version,
        bundle_sha256=a.bundle_sha256,
        window_start=datetime(2026, 1, 1, tzinfo=UTC),
        window_end=datetime(2026, 1, 1, 0, 1, tzinfo=UTC),
        request_count=requests,
        error_count=errors,
        latency_counts=latency(lat_bucket, requests),
        features=features or [],
        outputs=[OutputSummary(output="y", nan_count=nan_values)] if nan_values else [],
    )


def totals(*windows: TelemetryWindow) -> TelemetryTotals:
    t = TelemetryTotals()
    for w in windows:
        t.add_window(w.model_dump(mode="json"))
    return t


def _a(version: str = "1.0.0") -> Assignment:
    now = datetime(2026, 1, 1, tzinfo=UTC)
    return Assignment(
        deployment_id="d",
        device_id="x",
        model_name="m",
        version=version,
        release_counter=1,
        hardware_profile="p",
        bundle_sha256="0" * 64,
        bundle_size=1,
        bundle_url="/u",
        issued_at=now,
        expires_at=now,
    )


def judge(gates: Gates, new: TelemetryTotals, **kw: object) -> GateResult:
    (result,) = evaluate_gates(gates, GateInputs(new=new, **kw))  # type: ignore[arg-type]
    return result


def test_error_rate_gate_waits_for_enough_requests() -> None:
    gates = Gates(max_error_rate=0.05, min_telemetry_requests=100)
    waiting = judge(gates, totals(window(_a(), 50, 40)))
    assert (waiting.state, waiting.have, waiting.need, waiting.unit) == ("not_evaluated", 50, 100, "requests")
    assert waiting.describe() == "gate error_rate not evaluated: 50 of 100 requests"
    failing = judge(gates, totals(window(_a(), 50, 40), window(_a(), 60, 0)))
    assert failing.state == "failed" and "error rate" in failing.detail
    assert failing.value == 40 / 110 and failing.threshold == 0.05
    passed = judge(gates, totals(window(_a(), 200, 5)))
    assert passed.state == "passed" and passed.value == 5 / 200


def test_p95_latency_gate_compares_with_previous_release() -> None:
    gates = Gates(max_p95_latency_ratio=1.5, min_telemetry_requests=10)
    old = totals(window(_a(), 100, 0, lat_bucket=5))  # p95 <= 2 ms
    slow = judge(gates, totals(window(_a(), 100, 0, lat_bucket=8)), baseline=old)
    assert slow.state == "failed" and "p95 latency" in slow.detail and slow.value is not None and slow.value > 1.5
    assert judge(gates, totals(window(_a(), 100, 0, lat_bucket=5)), baseline=old).state == "passed"
    # no baseline (the devices ran nothing before): the gate cannot judge, and says so
    blind = judge(gates, totals(window(_a(), 100, 0, lat_bucket=8)))
    assert (blind.state, blind.have, blind.need) == ("not_evaluated", 0, 10) and "baseline" in blind.detail


def test_nan_output_gate_counts_values_per_successful_request() -> None:
    gates = Gates(max_nan_output_rate=0.0, min_telemetry_requests=100)
    assert judge(gates, totals(window(_a(), 50, 0, nan_values=5))).state == "not_evaluated"  # too few
    assert judge(gates, totals(window(_a(), 200, 0))).state == "passed"
    failing = totals(window(_a(), 200, 0), window(_a(), 100, 50, nan_values=1))
    assert failing.nan_outputs == 1
    result = judge(gates, failing)
    assert result.state == "failed" and "1 non-finite output values in 250 requests" in result.detail
    lenient = Gates(max_nan_output_rate=0.01, min_telemetry_requests=100)
    assert judge(lenient, failing).state == "passed"  # 0.004 per request
    assert evaluate_gates(Gates(min_telemetry_requests=1), GateInputs(new=failing)) == ()  # gate off


def _drift_input(observed: list[int]) -> dict[str, DriftInput]:
    ref = {feature_key("x", 0): [500, 500]}
    return {"sha": DriftInput(ref, {feature_key("x", 0): observed})}


def test_drift_gate_needs_values_not_requests() -> None:
    """The old gate failed a healthy release on ~19 sampled values; now below the minimum it says so."""
    gates = Gates(max_drift_psi=0.25, min_telemetry_requests=1)
    few = judge(gates, TelemetryTotals(requests=10_000), drift=_drift_input([19, 0]))  # PSI huge, 19 values
    assert (few.state, few.have, few.need, few.unit) == ("not_evaluated", 19, 200, "values")
    assert few.describe() == "gate drift not evaluated: 19 of 200 values"
    shifted = judge(gates, TelemetryTotals(), drift=_drift_input([990, 10]))
    assert shifted.state == "failed" and "x[0]" in shifted.detail and (shifted.value or 0) > 0.25
    same = judge(gates, TelemetryTotals(), drift=_drift_input([510, 490]))
    assert same.state == "passed" and "stable" in same.detail
    # max_drift_psi is the effect-size floor: a significant but small shift is not drift under a high floor
    small = _drift_input([6500, 3500])  # PSI ~0.09, p tiny at 10,000 values
    assert judge(Gates(max_drift_psi=0.25), TelemetryTotals(), drift=small).state == "passed"
    assert judge(Gates(max_drift_psi=0.05), TelemetryTotals(), drift=small).state == "failed"
    none = judge(gates, TelemetryTotals())
    assert none.state == "not_evaluated" and "no reference" in none.detail
    fewer = judge(replace(gates, min_drift_values=10), TelemetryTotals(), drift=_drift_input([19, 0]))
    assert fewer.state == "failed"  # a plan may lower the minimum


def test_shadow_agreement_gate() -> None:
    gates = Gates(min_shadow_agreement=0.9, min_telemetry_requests=100)
    assert judge(gates, TelemetryTotals(), shadow=(50, 10)).state == "not_evaluated"  # too few comparisons yet
    low = judge(gates, TelemetryTotals(), shadow=(150, 110))
    assert low.state == "failed" and "shadow agreement" in low.detail and low.unit == "comparisons"
    assert judge(gates, TelemetryTotals(), shadow=(200, 190)).state == "passed"
    assert evaluate_gates(Gates(), GateInputs(new=TelemetryTotals(), shadow=(150, 10))) == ()


def test_results_round_trip_as_json_without_infinity() -> None:
    gates = Gates(max_p95_latency_ratio=1.5, min_telemetry_requests=10)
    old = totals(window(_a(), 100, 0, lat_bucket=5))
    past_last_edge = judge(gates, totals(window(_a(), 100, 0, lat_bucket=N - 1)), baseline=old)
    assert past_last_edge.state == "failed" and past_last_edge.value is None  # inf: no JSON number
    assert GateResult.from_json(past_last_edge.as_json()) == past_last_edge


def _send(ctx: ServerContext, device_id: str, w: TelemetryWindow) -> None:
    assert deliver(ctx, device_topic(device_id, Channel.TELEMETRY), w.model_dump_json().encode()) == "ok"


def test_rollout_halts_on_error_rate_and_drift(
    client: TestClient, ctx: ServerContext, make_bundle: BundleFactory
) -> None:
    ref = ReferenceStats(
        sample_count=100, features=[FeatureReference(input="x", feature=0, edges=[0.5], counts=[50, 50])]
    )
    client.post("/api/v1/devices", json={"device_id": "t1", "hardware_profile": "x86"}, headers=AUTH)
    releases = [
        upload(client, make_bundle(v, "x86", reference=ref.model_dump_json().encode())).json()["release_id"]
        for v in ("1.0.0", "1.1.0")
    ]
    releases.append(upload(client, make_bundle("1.2.0", "x86")).json()["release_id"])
    gates = [
        {"max_error_rate": 0.1, "min_telemetry_requests": 50},
        {"max_drift_psi": 0.25, "min_telemetry_requests": 50},
        {"max_nan_output_rate": 0, "min_telemetry_requests": 50},
    ]
    for release, gate in zip(releases, gates, strict=True):
        body = {
            "release_id": release,
            "stages": [{"percent": 100, "soak_seconds": 3600}],
            "start": True,
            "on_failure": "pause",
            "gates": gate,
        }
        rid = client.post("/api/v1/rollouts", json=body, headers=AUTH).json()["rollout_id"]
        tick(ctx)
        a = assignments(ctx, "t1")[-1]
        finish(ctx, a)
        tick(ctx)
        assert client.get(f"/api/v1/rollouts/{rid}", headers=AUTH).json()["state"] == "running"  # soaking
        if "max_error_rate" in gate:
            _send(ctx, "t1", window(a, 100, 2))
            tick(ctx)
            assert client.get(f"/api/v1/rollouts/{rid}", headers=AUTH).json()["state"] == "running"
            _send(ctx, "t1", window(a, 100, 40))
            expected = "error rate"
        elif "max_nan_output_rate" in gate:
            _send(ctx, "t1", window(a, 100, 0))
            tick(ctx)
            assert client.get(f"/api/v1/rollouts/{rid}", headers=AUTH).json()["state"] == "running"
            # a model that returns NaN on a share of live inputs passes the device's short trial: the fleet sees it
            _send(ctx, "t1", window(a, 100, 0, nan_values=30))
            expected = "non-finite output"
        else:
            drifted = FeatureSummary(input="x", feature=0, edges=[0.5], counts=[95, 5])
            _send(ctx, "t1", window(a, 100, 0, features=[drifted]))
            tick(ctx)  # 100 values: PSI is large, but too few values for a verdict (the old gate failed here)
            status = client.get(f"/api/v1/rollouts/{rid}", headers=AUTH).json()
            assert status["state"] == "running"
            (gate,) = status["gates"]
            assert (gate["name"], gate["state"], gate["have"], gate["need"], gate["unit"]) == (
                "drift",
                "not_evaluated",
                100,
                200,
                "values",
            )
            _send(ctx, "t1", window(a, 150, 0, features=[drifted.model_copy(update={"counts": [140, 10]})]))
            expected = "drift"
        tick(ctx)
        status = client.get(f"/api/v1/rollouts/{rid}", headers=AUTH).json()
        assert status["state"] == "paused" and status["reason"] == "gate_failed" and expected in status["detail"]
        assert status["halted_by"] == "telemetry" and status["gates"][0]["state"] == "failed"
        audit = client.get("/api/v1/audit", params={"entity_id": rid}, headers=AUTH).json()
        paused = [e for e in audit if e["action"] == "rollout.paused"]
        assert paused and paused[-1]["after"]["gates"][0]["state"] == "failed"
        client.post(f"/api/v1/rollouts/{rid}/abort", headers=AUTH)


def test_rollout_halts_on_p95_latency_against_what_the_devices_ran_before(
    client: TestClient, ctx: ServerContext, make_bundle: BundleFactory
) -> None:
    """The latency gate reads the histograms (the sums alone come from SQL) of old and new bundles."""
    client.post("/api/v1/devices", json={"device_id": "t1", "hardware_profile": "x86"}, headers=AUTH)
    old, new = (upload(client, make_bundle(v, "x86")).json()["release_id"] for v in ("1.0.0", "1.1.0"))
    body: dict[str, object] = {"release_id": old, "stages": [{"percent": 100}], "start": True}
    client.post("/api/v1/rollouts", json=body, headers=AUTH)
    tick(ctx)
    before = assignments(ctx, "t1")[-1]
    finish(ctx, before)
    _send(ctx, "t1", window(before, 200, 0, lat_bucket=3))  # the old release: fast
    gate = {"max_p95_latency_ratio": 1.5, "min_telemetry_requests": 50}
    body = {**body, "release_id": new, "stages": [{"percent": 100, "soak_seconds": 3600}], "gates": gate}
    body["on_failure"] = "pause"
    rid = client.post("/api/v1/rollouts", json=body, headers=AUTH).json()["rollout_id"]
    tick(ctx)
    after = assignments(ctx, "t1")[-1]
    assert after.version == "1.1.0"
    finish(ctx, after)
    _send(ctx, "t1", window(after, 40, 0, lat_bucket=9))  # slow, but fewer than min_telemetry_requests
    tick(ctx)
    assert client.get(f"/api/v1/rollouts/{rid}", headers=AUTH).json()["state"] == "running"
    _send(ctx, "t1", window(after, 40, 0, lat_bucket=9))
    tick(ctx)
    status = client.get(f"/api/v1/rollouts/{rid}", headers=AUTH).json()
    assert status["state"] == "paused" and "p95 latency" in status["detail"], status["detail"]


def test_gate_fields_are_validated_and_kept_in_the_plan(client: TestClient, make_bundle: BundleFactory) -> None:
    release = upload(client, make_bundle("1.0.0", "x86")).json()["release_id"]
    base = {"release_id": release, "stages": [{"percent": 100}], "allow_empty": True}  # no devices here
    for bad in (
        {"on_missing_data": "maybe"},
        {"gates": {"gate_data_timeout_seconds": -1}},
        {"gates": {"min_drift_values": 0}},
    ):
        resp = client.post("/api/v1/rollouts", json={**base, **bad}, headers=AUTH)
        assert resp.status_code == 422, (bad, resp.text)
    body = {**base, "on_missing_data": "pass", "gates": {"gate_data_timeout_seconds": 30, "min_drift_values": 500}}
    created = client.post("/api/v1/rollouts", json=body, headers=AUTH)
    assert created.status_code == 201, created.text
    plan = created.json()["plan"]
    assert plan["on_missing_data"] == "pass"
    assert (plan["gates"]["gate_data_timeout_seconds"], plan["gates"]["min_drift_values"]) == (30, 500)
    assert created.json()["telemetry"] == {"requests": 0, "attributed_requests": 0, "coverage": None}
