"""Rollouts through the API and the engine tick, with device reports fed into ingest (both databases)."""

from __future__ import annotations

from typing import Any

from fastapi.testclient import TestClient

from edgeota_contract.states import DeploymentState
from ota_server.context import ServerContext
from ota_server.engine import acquire_lease, release_lease, tick

from .conftest import AUTH, BundleFactory, upload
from .helpers import assignments, finish

STAGES = [{"count": 1, "soak_seconds": 0}, {"percent": 100, "soak_seconds": 0}]


def _fleet(client: TestClient, n: int, profile: str = "x86", prefix: str = "d") -> list[str]:
    ids = [f"{prefix}{i}" for i in range(n)]
    for dev_id in ids:
        client.post(
            "/api/v1/devices",
            json={"device_id": dev_id, "hardware_profile": profile, "labels": {"ring": "a"}},
            headers=AUTH,
        )
    return ids


def _rollout(client: TestClient, release_id: str, **extra: Any) -> dict[str, Any]:
    body = {
        "release_id": release_id,
        "selector": {"labels": {"ring": "a"}},
        "stages": STAGES,
        "gates": {
            "min_devices": 1,
            "max_failure_rate": 0.0,
            "min_count_for_failure_rate": 1,
            "device_timeout_seconds": 600,
        },
        **extra,
    }
    resp = client.post("/api/v1/rollouts", json=body, headers=AUTH)
    assert resp.status_code in (200, 201), resp.text
    return resp.json()


def _status(client: TestClient, rollout_id: str) -> dict[str, Any]:
    return client.get(f"/api/v1/rollouts/{rollout_id}", headers=AUTH).json()


def _install_everywhere(client: TestClient, ctx: ServerContext, release_id: str) -> None:
    r = _rollout(client, release_id, stages=[{"percent": 100}], start=True)
    tick(ctx)
    for dev in r["preview"]["stages"][0]["devices"]:
        finish(ctx, assignments(ctx, dev)[-1])
    tick(ctx)
    assert _status(client, r["rollout_id"])["state"] == "completed"


def test_canary_stage_by_stage_and_profiles(client: TestClient, ctx: ServerContext, make_bundle: BundleFactory) -> None:
    fleet = _fleet(client, 3)
    _fleet(client, 1, profile="riscv", prefix="r")  # no bundle for this profile
    rel = upload(client, make_bundle("1.0.0", "x86")).json()["release_id"]
    upload(client, make_bundle("1.0.0", "arm64"))
    dry = _rollout(client, rel, dry_run=True)
    assert dry["dry_run"] and dry["no_bundle_for_profile"] == ["r0"]
    assert [len(s["devices"]) for s in dry["stages"]] == [1, 2]
    r = _rollout(client, rel)
    assert r["state"] == "draft" and r["no_bundle_for_profile"] == ["r0"]
    rid = r["rollout_id"]
    tick(ctx)
    assert not any(assignments(ctx, d) for d in fleet)  # a draft assigns nothing
    assert client.post(f"/api/v1/rollouts/{rid}/start", headers=AUTH).json()["state"] == "running"
    tick(ctx)
    first = [d for d in fleet if assignments(ctx, d)]
    assert first == [r["preview"]["stages"][0]["devices"][0]]
    a = assignments(ctx, first[0])[0]
    assert a.hardware_profile == "x86" and a.bundle_url == f"/api/v1/artifacts/{a.bundle_sha256}"
    assert _status(client, rid)["counts"]["notified"] == 1
    finish(ctx, a)
    tick(ctx)
    status = _status(client, rid)
    assert status["current_stage"] == 1 and status["counts"]["committed"] == 1 and status["counts"]["notified"] == 2
    for dev in fleet:
        if dev != first[0]:
            finish(ctx, assignments(ctx, dev)[0])
    tick(ctx)
    status = _status(client, rid)
    assert status["state"] == "completed" and status["counts"]["committed"] == 3
    assert all(len(assignments(ctx, d)) == 1 for d in fleet)  # nobody assigned twice
    shown = client.get(f"/api/v1/devices/{fleet[0]}", headers=AUTH).json()
    assert shown["models"][0]["version"] == "1.0.0" and shown["deployments"][0]["state"] == "committed"
    assert not assignments(ctx, "r0")
    actions = [e["action"] for e in client.get("/api/v1/audit", params={"entity_id": rid}, headers=AUTH).json()]
    assert actions[0] == "rollout.create" and "rollout.running" in actions and actions[-1] == "rollout.completed"


def test_failing_stage_rolls_back_to_previous_bundle(
    client: TestClient, ctx: ServerContext, make_bundle: BundleFactory
) -> None:
    fleet = _fleet(client, 3)
    old = upload(client, make_bundle("1.0.0", "x86")).json()
    _install_everywhere(client, ctx, old["release_id"])
    new = upload(client, make_bundle("2.0.0", "x86")).json()["release_id"]
    rid = _rollout(client, new, stages=[{"count": 2}, {"percent": 100}], start=True)["rollout_id"]
    tick(ctx)
    canaries = [d for d in fleet if len(assignments(ctx, d)) == 2]
    assert len(canaries) == 2
    finish(ctx, assignments(ctx, canaries[0])[-1], ok=True)
    finish(ctx, assignments(ctx, canaries[1])[-1], ok=False)
    tick(ctx)
    status = _status(client, rid)
    assert status["state"] == "rolled_back" and status["reason"] == "gate_failed"
    back = assignments(ctx, canaries[0])[-1]
    assert back.mode == "rollback" and back.bundle_sha256 == old["bundle_sha256"] and back.version == "1.0.0"
    assert len(assignments(ctx, canaries[1])) == 2  # it rolled back by itself: no revert needed
    untouched = next(d for d in fleet if d not in canaries)
    assert len(assignments(ctx, untouched)) == 1  # the second stage never started
    finish(ctx, back)
    tick(ctx)
    assert client.get(f"/api/v1/devices/{canaries[0]}", headers=AUTH).json()["models"][0]["version"] == "1.0.0"
    # A new rollout of the same release skips the device that rolled it back.
    again = _rollout(client, new, dry_run=True)
    assert again["skipped_rolled_back_before"] == [canaries[1]]
    audit = client.get("/api/v1/audit", params={"action": "rollout.rolled_back"}, headers=AUTH).json()
    assert audit[0]["before"]["state"] == "running" and "failure rate" in audit[0]["reason"]


def test_manual_pause_resume_abort_and_revert(
    client: TestClient, ctx: ServerContext, make_bundle: BundleFactory
) -> None:
    fleet = _fleet(client, 2)
    old = upload(client, make_bundle("1.0.0", "x86")).json()
    _install_everywhere(client, ctx, old["release_id"])
    new = upload(client, make_bundle("1.1.0", "x86")).json()["release_id"]
    rid = _rollout(client, new, stages=[{"count": 1}, {"percent": 100, "requires_approval": True}], start=True)[
        "rollout_id"
    ]
    assert (
        client.post(f"/api/v1/rollouts/{rid}/pause", json={"reason": "lunch"}, headers=AUTH).json()["state"] == "paused"
    )
    tick(ctx)
    # `start` sent the first stage (the canary) at once; paused: nothing new
    assert sorted(len(assignments(ctx, d)) for d in fleet) == [1, 2]
    assert client.post(f"/api/v1/rollouts/{rid}/pause", headers=AUTH).status_code == 409
    assert client.post(f"/api/v1/rollouts/{rid}/resume", headers=AUTH).json()["state"] == "running"
    tick(ctx)
    canary = next(d for d in fleet if len(assignments(ctx, d)) == 2)
    finish(ctx, assignments(ctx, canary)[-1])
    tick(ctx)
    held = _status(client, rid)
    assert held["current_stage"] == 1 and held["counts"]["committed"] == 1  # waiting for approval
    resp = client.post(f"/api/v1/rollouts/{rid}/abort", json={"revert": True, "reason": "bad metrics"}, headers=AUTH)
    assert resp.json()["state"] == "aborted"
    back = assignments(ctx, canary)[-1]
    assert back.mode == "rollback" and back.version == "1.0.0"
    assert client.post(f"/api/v1/rollouts/{rid}/resume", headers=AUTH).status_code == 409
    assert client.post("/api/v1/rollouts/nope/start", headers=AUTH).status_code == 404
    listed = client.get("/api/v1/rollouts", headers=AUTH).json()
    assert rid in [r["rollout_id"] for r in listed]


def test_device_timeout_fails_silent_device(client: TestClient, ctx: ServerContext, make_bundle: BundleFactory) -> None:
    _fleet(client, 1)
    rel = upload(client, make_bundle("1.0.0", "x86")).json()["release_id"]
    r = _rollout(
        client,
        rel,
        stages=[{"percent": 100}],
        start=True,
        gates={"device_timeout_seconds": 0.05, "max_failure_rate": 1.0, "min_devices": 0},
    )
    tick(ctx)
    import time

    time.sleep(0.1)
    tick(ctx)
    status = _status(client, r["rollout_id"])
    dep = status["deployments"][0]
    assert dep["state"] == DeploymentState.FAILED and dep["reason"] == "device_timeout"
    assert status["state"] == "completed"  # gates allowed 100% failures, so the stage was not hung


def test_only_one_engine_holds_the_lease(ctx: ServerContext) -> None:
    assert acquire_lease(ctx, "a")
    assert not acquire_lease(ctx, "b")
    assert acquire_lease(ctx, "a")  # renewal
    release_lease(ctx, "a")
    assert acquire_lease(ctx, "b")
    assert not acquire_lease(ctx, "a")


def test_rollout_validation(client: TestClient, make_bundle: BundleFactory) -> None:
    assert client.post("/api/v1/rollouts", json={"release_id": "missing"}, headers=AUTH).status_code == 404
    rel = upload(client, make_bundle()).json()["release_id"]
    bad = [
        {"stages": [{"percent": 0}]},
        {"stages": [{"percent": 120}]},
        {"on_failure": "explode"},
        {"strategy": "yolo"},
        {"gates": {"max_failure_rate": 2}},
        {"selector": {"labels": {"a": 1}}},
    ]
    for extra in bad:
        resp = client.post("/api/v1/rollouts", json={"release_id": rel, **extra}, headers=AUTH)
        assert resp.status_code == 422, extra


def test_late_commit_after_rollback_is_reverted(
    client: TestClient, ctx: ServerContext, make_bundle: BundleFactory
) -> None:
    fleet = _fleet(client, 2)
    old = upload(client, make_bundle("1.0.0", "x86")).json()
    _install_everywhere(client, ctx, old["release_id"])
    new = upload(client, make_bundle("2.0.0", "x86")).json()["release_id"]
    rid = _rollout(client, new, stages=[{"percent": 100}], start=True)["rollout_id"]
    tick(ctx)
    bad, slow = (assignments(ctx, d)[-1] for d in fleet)
    finish(ctx, bad, ok=False)
    tick(ctx)
    status = _status(client, rid)
    assert status["state"] == "rolled_back"
    assert {d["device_id"]: d["reason"] for d in status["deployments"] if d["mode"] == "install"}[slow.device_id] == (
        "cancelled"
    )
    # Cancelled before it switched, but it was sent: its rollback goes out at once, queued on the device
    back = assignments(ctx, slow.device_id)[-1]
    assert len(assignments(ctx, slow.device_id)) == 3
    assert back.mode == "rollback" and back.version == "1.0.0"
    finish(ctx, slow)  # ...the device completes the install anyway: that late commit sends no second rollback
    assert {a.deployment_id for a in assignments(ctx, slow.device_id)[2:]} == {back.deployment_id}
    finish(ctx, back)  # then runs the rollback it queued
    assert client.get(f"/api/v1/devices/{slow.device_id}", headers=AUTH).json()["models"][0]["version"] == "1.0.0"


def test_scheduled_start(client: TestClient, ctx: ServerContext, make_bundle: BundleFactory) -> None:
    from datetime import timedelta

    from ota_server.models import utcnow

    _fleet(client, 1)
    rel = upload(client, make_bundle()).json()["release_id"]
    later = _rollout(client, rel, start_at=(utcnow() + timedelta(hours=1)).isoformat())
    soon = _rollout(client, rel, start_at=(utcnow() - timedelta(seconds=1)).isoformat())
    assert later["state"] == soon["state"] == "scheduled"
    tick(ctx)
    assert _status(client, later["rollout_id"])["state"] == "scheduled"
    assert _status(client, soon["rollout_id"])["state"] == "running"
    assert client.post(f"/api/v1/rollouts/{later['rollout_id']}/start", headers=AUTH).json()["state"] == "running"


def test_maintenance_window_is_validated_and_stored(client: TestClient, make_bundle: BundleFactory) -> None:
    rel = upload(client, make_bundle()).json()["release_id"]
    ok = _rollout(client, rel, maintenance_windows=[{"start": "22:00", "end": "02:30"}], allow_empty=True)
    assert ok["plan"]["windows"] == [{"start_minute": 22 * 60, "end_minute": 150}]
    for bad in ({"start": "25:00", "end": "01:00"}, {"start": "1:00", "end": "02:00"}, {"start": "01:00"}):
        body = {"release_id": rel, "maintenance_windows": [bad], "allow_empty": True}
        resp = client.post("/api/v1/rollouts", json=body, headers=AUTH)
        assert resp.status_code == 422, bad


def test_blue_green_and_ab_strategies(client: TestClient, make_bundle: BundleFactory) -> None:
    _fleet(client, 4)
    rel = upload(client, make_bundle()).json()["release_id"]
    blue_green = _rollout(client, rel, strategy="blue_green", stages=[{"count": 1, "soak_seconds": 30}], dry_run=True)
    assert [len(s["devices"]) for s in blue_green["stages"]] == [4]
    ab = _rollout(client, rel, strategy="ab", split_percent=50, dry_run=True)
    assert [len(s["devices"]) for s in ab["stages"]] == [2]
    created = _rollout(client, rel, strategy="ab", split_percent=25)
    assert created["stage_sizes"] == [1] and created["plan"]["stages"][0]["percent"] == 25
    missing = client.post("/api/v1/rollouts", json={"release_id": rel, "strategy": "ab"}, headers=AUTH)
    assert missing.status_code == 422 and "split_percent" in missing.json()["detail"]


def test_shadow_strategy_never_switches_and_stops_on_rollback(
    client: TestClient, ctx: ServerContext, make_bundle: BundleFactory
) -> None:
    from edgeota_contract.messages import ShadowStop

    from .helpers import commands

    fleet = _fleet(client, 2)
    old = upload(client, make_bundle("1.0.0", "x86")).json()
    _install_everywhere(client, ctx, old["release_id"])
    cand = upload(client, make_bundle("2.0.0", "x86")).json()["release_id"]
    rid = _rollout(client, cand, strategy="shadow", stages=[{"percent": 100, "soak_seconds": 3600}], start=True)[
        "rollout_id"
    ]
    tick(ctx)
    shadows = [assignments(ctx, d)[-1] for d in fleet]
    assert all(a.mode == "shadow" and a.version == "2.0.0" for a in shadows)
    for a in shadows:
        finish(ctx, a)  # committed = verified, loaded and shadowing
    tick(ctx)
    status = _status(client, rid)
    assert status["counts"]["committed"] == 2 and status["state"] == "running"  # soaking
    for dev in fleet:  # serving is untouched
        assert client.get(f"/api/v1/devices/{dev}", headers=AUTH).json()["models"][0]["version"] == "1.0.0"
    assert client.post(f"/api/v1/rollouts/{rid}/rollback", headers=AUTH).json()["state"] == "rolled_back"
    for dev in fleet:
        stops = [c for c in commands(ctx, dev) if isinstance(c, ShadowStop)]
        assert [s.model_name for s in stops] == ["digits"]
        assert len(assignments(ctx, dev)) == 2  # no rollback install: nothing was switched
    assert _status(client, rid)["counts"]["rolled_back"] == 2
