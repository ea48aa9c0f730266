"""Bandit rollouts through the API and the engine tick, device reports fed into ingest (both databases).

Rewards are Feedback rows written straight into the database here (the proving test with real processes is
``test_bandit_process.py``).
"""

from __future__ import annotations

import itertools
from datetime import timedelta
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from edgeota_contract.messages import Assignment, TelemetryWindow
from edgeota_contract.telemetry import LATENCY_EDGES_MS
from edgeota_contract.topics import Channel, device_topic
from ota_server.context import ServerContext
from ota_server.engine import tick
from ota_server.models import AuditEntry, BanditStep, Deployment, Feedback, utcnow

from .conftest import AUTH, BundleFactory, upload
from .helpers import assignments, checkin, deliver, finish

_ids = itertools.count()


def _fleet(client: TestClient, n: int, profile: str = "x86") -> list[str]:
    ids = [f"b{i}" for i in range(n)]
    for dev in ids:
        body = {"device_id": dev, "hardware_profile": profile, "labels": {"ring": "bandit"}}
        assert client.post("/api/v1/devices", json=body, headers=AUTH).status_code == 201
    return ids


def _body(release: str, arms: list[str], **bandit: Any) -> dict[str, Any]:
    return {
        "release_id": release,
        "strategy": "bandit",
        "arms": arms,
        "selector": {"labels": {"ring": "bandit"}},
        "gates": {"max_failure_rate": 0.5, "min_count_for_failure_rate": 2, "device_timeout_seconds": 600},
        "bandit": {"floor": 0.1, "interval_seconds": 0.001, "max_moves": 2, "draws": 500, "seed": 7, **bandit},
    }


def _status(client: TestClient, rid: str) -> dict[str, Any]:
    resp = client.get(f"/api/v1/rollouts/{rid}", params={"deployments": "false"}, headers=AUTH)
    assert resp.status_code == 200, resp.text
    return resp.json()  # type: ignore[no-any-return]


def _rewards(ctx: ServerContext, device: str, version: str, rewards: list[float | None], correct: bool = True) -> None:
    with ctx.sessions() as session, session.begin():
        for r in rewards:
            session.add(
                Feedback(
                    device_id=device,
                    prediction_id=f"p{next(_ids)}",
                    model_name="digits",
                    version=version,
                    bundle_sha256="0" * 64,
                    hardware_profile="x86",
                    reward=r,
                    correct=correct if r is None else None,
                    source="api",
                    received_at=utcnow(),
                )
            )


def _finish_all(ctx: ServerContext, devices: list[str]) -> None:
    for dev in devices:
        mine = assignments(ctx, dev)
        if mine:
            finish(ctx, mine[-1])
            checkin(ctx, dev, "x86", [mine[-1]])


def test_bandit_moves_devices_toward_the_release_with_better_rewards(
    client: TestClient, ctx: ServerContext, make_bundle: BundleFactory
) -> None:
    devices = _fleet(client, 6)
    old = upload(client, make_bundle("1.0.0", "x86")).json()["release_id"]
    new = upload(client, make_bundle("1.1.0", "x86")).json()["release_id"]
    dry = client.post("/api/v1/rollouts", json={**_body(old, [new]), "dry_run": True}, headers=AUTH).json()
    assert dry["eligible"] == 6 and [len(a["devices"]) for a in dry["arms"]] == [3, 3]
    created = client.post("/api/v1/rollouts", json={**_body(old, [new], max_moves=1), "start": True}, headers=AUTH)
    assert created.status_code == 201, created.text
    rid = created.json()["rollout_id"]
    on = {a["release_id"]: set(a["devices"]) for a in created.json()["preview"]["arms"]}
    assert all(len(assignments(ctx, d)) == 1 for d in devices)  # placed in the create's own unit of work
    _finish_all(ctx, devices)
    for dev in on[old]:
        _rewards(ctx, dev, "1.0.0", [0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0])
    for dev in on[new]:
        _rewards(ctx, dev, "1.1.0", [None] * 10)  # correct = True, counted as reward 1
    tick(ctx)
    status = _status(client, rid)
    arms = {a["version"]: a for a in status["bandit"]["arms"]}
    assert arms["1.1.0"]["rewards"] == 30 and arms["1.1.0"]["reward_sum"] == 30.0
    assert arms["1.0.0"]["rewards"] == 30 and arms["1.0.0"]["reward_sum"] == 3.0
    assert arms["1.1.0"]["prob_best"] > 0.99 and arms["1.1.0"]["posterior"]["mean"] > 0.9
    assert status["bandit"]["steps"] == 1 and status["bandit"]["moved_by_steps"] == 1  # the move cap
    moved = [d for d in on[old] if len(assignments(ctx, d)) == 2]
    assert len(moved) == 1 and assignments(ctx, moved[0])[-1].version == "1.1.0"
    assert assignments(ctx, moved[0])[-1].mode == "install"  # upward: a plain install
    _finish_all(ctx, moved)
    for _ in range(4):
        tick(ctx)
        _finish_all(ctx, [d for d in on[old] if len(assignments(ctx, d)) == 2])
    status = _status(client, rid)
    arms = {a["version"]: a for a in status["bandit"]["arms"]}
    # six devices, floor 0.1: the worse arm keeps ceil(0.6) = 1 device, however sure the bandit is
    assert (arms["1.1.0"]["devices"], arms["1.0.0"]["devices"]) == (5, 1)
    assert arms["1.0.0"]["share"] == pytest.approx(1 / 6) and arms["1.0.0"]["target_share"] == pytest.approx(
        0.1, abs=0.01
    )
    assert status["state"] == "running" and status["bandit"]["moved_by_steps"] == 2
    assert status["bandit"]["winner_release_id"] is None and status["bandit"]["leader"] == new
    with ctx.sessions() as session:
        moves = session.scalars(select(AuditEntry).where(AuditEntry.action == "rollout.bandit.move")).all()
        assert sum(len(m.after["moves"]) for m in moves if m.after) == 2
        steps = session.scalars(select(BanditStep).where(BanditStep.rollout_id == rid)).all()
        assert len(steps) >= 2 and len({s.seed for s in steps}) == len(steps)


def test_moving_a_device_to_an_older_arm_is_sent_as_a_permitted_downgrade_and_rollback_reverts(
    client: TestClient, ctx: ServerContext, make_bundle: BundleFactory
) -> None:
    devices = _fleet(client, 4)
    old = upload(client, make_bundle("1.0.0", "x86")).json()["release_id"]
    new = upload(client, make_bundle("1.1.0", "x86")).json()["release_id"]
    base = upload(client, make_bundle("0.9.0", "x86")).json()["release_id"]
    first = {"release_id": base, "selector": {"labels": {"ring": "bandit"}}, "start": True}
    assert client.post("/api/v1/rollouts", json=first, headers=AUTH).status_code == 201
    _finish_all(ctx, devices)
    tick(ctx)
    created = client.post("/api/v1/rollouts", json={**_body(old, [new]), "start": True}, headers=AUTH).json()
    rid = created["rollout_id"]
    on = {a["release_id"]: set(a["devices"]) for a in created["preview"]["arms"]}
    _finish_all(ctx, devices)
    for dev in on[new]:
        _rewards(ctx, dev, "1.1.0", [0.0] * 10)
    for dev in on[old]:
        _rewards(ctx, dev, "1.0.0", [1.0] * 10)
    tick(ctx)
    moved = [d for d in on[new] if assignments(ctx, d)[-1].version == "1.0.0"]
    assert len(moved) == 1  # 4 devices: 1.1.0 keeps ceil(0.4) = 1
    down = assignments(ctx, moved[0])[-1]
    assert down.mode == "rollback" and down.rollout_id == rid  # the signed permission to go below 1.1.0
    _finish_all(ctx, moved)
    with ctx.sessions() as session:
        rows = session.scalars(
            select(Deployment).where(Deployment.rollout_id == rid, Deployment.device_id == moved[0])
        ).all()
        old_row = next(r for r in rows if r.retried)
        new_row = next(r for r in rows if not r.retried)
        assert old_row.state == "rolled_back" and old_row.reason == "server_rollback"  # not a device failure
        assert new_row.allow_downgrade and new_row.previous_bundle_sha256 == old_row.previous_bundle_sha256
    resp = client.post(f"/api/v1/rollouts/{rid}/rollback", headers=AUTH)
    assert resp.status_code == 200 and resp.json()["state"] == "rolled_back"
    back = assignments(ctx, moved[0])[-1]
    assert back.mode == "rollback" and back.version == "0.9.0"  # to what it ran before the bandit


def test_an_arm_failing_its_gate_is_dropped_and_its_devices_join_the_other(
    client: TestClient, ctx: ServerContext, make_bundle: BundleFactory
) -> None:
    _fleet(client, 6)
    old = upload(client, make_bundle("1.0.0", "x86")).json()["release_id"]
    new = upload(client, make_bundle("1.1.0", "x86")).json()["release_id"]
    created = client.post(
        "/api/v1/rollouts", json={**_body(old, [new], interval_seconds=3600), "start": True}, headers=AUTH
    ).json()
    rid = created["rollout_id"]
    on = {a["release_id"]: sorted(a["devices"]) for a in created["preview"]["arms"]}
    for dev in on[old]:
        finish(ctx, assignments(ctx, dev)[-1])
    survivor, *failing = on[new]
    finish(ctx, assignments(ctx, survivor)[-1])
    for dev in failing:
        finish(ctx, assignments(ctx, dev)[-1], ok=False)  # the health trial fails on the device
    tick(ctx)
    status = _status(client, rid)
    arms = {a["version"]: a for a in status["bandit"]["arms"]}
    assert arms["1.1.0"]["state"] == "dropped" and arms["1.1.0"]["reason"] == "failure_rate"
    assert "failure rate 0.67" in arms["1.1.0"]["detail"] and status["state"] == "running"
    # the dropped arm's healthy device moves at once; those that rolled back by themselves stay where they are
    moved = assignments(ctx, survivor)
    assert len(moved) == 2 and moved[-1].version == "1.0.0" and moved[-1].mode == "rollback"
    assert all(len(assignments(ctx, d)) == 1 for d in failing)
    with ctx.sessions() as session:
        actions = [e.action for e in session.scalars(select(AuditEntry).where(AuditEntry.entity_id == rid))]
    assert "rollout.bandit.arm_dropped" in actions and "rollout.bandit.move" in actions
    finish(ctx, moved[-1])
    tick(ctx)
    arms = {a["version"]: a for a in _status(client, rid)["bandit"]["arms"]}
    assert (arms["1.0.0"]["devices"], arms["1.1.0"]["devices"], arms["1.1.0"]["failed"]) == (4, 0, 2)


@pytest.mark.parametrize(
    ("change", "status", "words"),
    [
        ({"arms": []}, 422, "two or more releases"),
        ({"arms": ["@same"]}, 422, "listed twice"),
        ({"arms": ["@other_model"]}, 422, "one model"),
        ({"arms": ["nope"]}, 404, "release nope not found"),
        ({"bandit": {"floor": 0.6}}, 422, "floor"),
        ({"arms": ["@new", "@third"], "bandit": {"floor": 0.4}}, 422, "floor 0.4 is out of range"),
        ({"strategy": "canary"}, 422, "arms apply only to strategy bandit"),
        ({"bandit": {"win_probability": 0.4}}, 422, "win_probability"),
        ({"selector": {"labels": {"ring": "nobody"}}}, 422, "targets no device"),
        ({"bandit": {"interval_seconds": 0}}, 422, "interval_seconds"),
        ({"bandit": {"max_moves": 0}}, 422, "max_moves"),
        ({"bandit": {"draws": 0}}, 422, "draws"),
        ({"override_blessing": "because"}, 422, "override_blessing applies only"),
    ],
)
def test_bad_bandit_requests_are_refused_and_store_nothing(
    client: TestClient, make_bundle: BundleFactory, change: dict[str, Any], status: int, words: str
) -> None:
    _fleet(client, 2)
    old = upload(client, make_bundle("1.0.0", "x86")).json()["release_id"]
    new = upload(client, make_bundle("1.1.0", "x86")).json()["release_id"]
    third = upload(client, make_bundle("1.2.0", "x86")).json()["release_id"]
    other = upload(client, make_bundle("1.0.0", "x86", model="faces")).json()["release_id"]
    names = {"@same": old, "@other_model": other, "@new": new, "@third": third}
    body = {**_body(old, [new]), **change}
    if "bandit" in change:
        body["bandit"] = {**_body(old, [new])["bandit"], **change["bandit"]}
    body["arms"] = [names.get(a, a) for a in body["arms"]]
    resp = client.post("/api/v1/rollouts", json=body, headers=AUTH)
    assert resp.status_code == status, resp.text
    assert words in resp.text
    assert client.get("/api/v1/rollouts", headers=AUTH).json() == []


def test_every_arm_passes_the_blessing_gate_at_the_start(
    client: TestClient, ctx: ServerContext, make_bundle: BundleFactory
) -> None:
    _fleet(client, 2)
    old = upload(client, make_bundle("1.0.0", "x86")).json()["release_id"]
    new = upload(client, make_bundle("1.1.0", "x86")).json()["release_id"]
    ctx.settings.require_blessing = True
    refused = client.post("/api/v1/rollouts", json={**_body(old, [new]), "start": True}, headers=AUTH)
    assert refused.status_code == 409 and "never evaluated" in refused.json()["detail"]
    assert client.get("/api/v1/rollouts", headers=AUTH).json() == []  # nothing stored
    draft = client.post("/api/v1/rollouts", json=_body(old, [new]), headers=AUTH).json()["rollout_id"]
    start = client.post(f"/api/v1/rollouts/{draft}/start", headers=AUTH)
    assert start.status_code == 409 and "never evaluated" in start.json()["detail"]
    body = {"override_blessing": "field trial of both"}
    started = client.post(f"/api/v1/rollouts/{draft}/start", json=body, headers=AUTH)
    assert started.status_code == 200 and started.json()["state"] == "running"
    overrides = client.get("/api/v1/audit", params={"action": "rollout.blessing_override"}, headers=AUTH).json()
    assert len(overrides) == 2  # one per arm


def _errors_window(ctx: ServerContext, device: str, a: Assignment, seq: int, errors: int, n: int = 50) -> None:
    end = utcnow()
    window = TelemetryWindow(
        boot_id="boot-bandit",
        seq=seq,
        model_name=a.model_name,
        version=a.version,
        bundle_sha256=a.bundle_sha256,
        window_start=end - timedelta(minutes=1),
        window_end=end,
        request_count=n,
        error_count=errors,
        latency_counts=[n] + [0] * len(LATENCY_EDGES_MS),
    )
    assert deliver(ctx, device_topic(device, Channel.TELEMETRY), window.model_dump_json().encode()) == "ok"


def test_a_telemetry_gate_is_judged_per_arm_and_drops_only_the_failing_arm(
    client: TestClient, ctx: ServerContext, make_bundle: BundleFactory
) -> None:
    _fleet(client, 4)
    old = upload(client, make_bundle("1.0.0", "x86")).json()["release_id"]
    new = upload(client, make_bundle("1.1.0", "x86")).json()["release_id"]
    body = _body(old, [new], interval_seconds=3600)
    body["gates"] = {**body["gates"], "max_error_rate": 0.1, "min_telemetry_requests": 100}
    created = client.post("/api/v1/rollouts", json={**body, "start": True}, headers=AUTH).json()
    rid = created["rollout_id"]
    on = {a["release_id"]: sorted(a["devices"]) for a in created["preview"]["arms"]}
    for dev in on[old] + on[new]:
        finish(ctx, assignments(ctx, dev)[-1])
    tick(ctx)
    arms = {a["version"]: a for a in _status(client, rid)["bandit"]["arms"]}
    assert [g["state"] for g in arms["1.1.0"]["gates"]] == ["not_evaluated"]  # no telemetry yet: holds nothing
    seq = itertools.count(1)
    for dev in on[old]:
        _errors_window(ctx, dev, assignments(ctx, dev)[-1], next(seq), errors=1)
    for dev in on[new]:
        _errors_window(ctx, dev, assignments(ctx, dev)[-1], next(seq), errors=20)
    tick(ctx)
    status = _status(client, rid)
    arms = {a["version"]: a for a in status["bandit"]["arms"]}
    assert arms["1.0.0"]["state"] == "active" and arms["1.0.0"]["gates"][0]["state"] == "passed"
    assert arms["1.1.0"]["state"] == "dropped" and arms["1.1.0"]["reason"] == "telemetry"
    assert "error rate 0.400 over 0.100" in arms["1.1.0"]["detail"]
    assert all(assignments(ctx, d)[-1].version == "1.0.0" for d in on[new])  # moved at once, no cap
    assert status["state"] == "running"
