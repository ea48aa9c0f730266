"""A server-ordered rollback keeps an honest record, whatever the timing of the next check-in (both databases).

Through the API, the engine tick and the ingest writers' batch function: after ``rollback``, a gate's
rollback or ``abort --revert``, each committed install ends ``rolled_back``/``server_rollback`` (never
``health_failed``) and the next rollout targets the device again; a device whose own health check
rolled the release back is still skipped. Also: ``create --start`` sends at once, and a unit of work
whose commit fails publishes nothing.
"""

from __future__ import annotations

import time
from typing import Any, Literal

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import event, func, select, text
from sqlalchemy.orm import Session

from edgeota_contract.messages import Assignment
from edgeota_contract.states import DeploymentState, ReasonCode
from edgeota_contract.topics import Channel, device_topic
from ota_server.context import ServerContext
from ota_server.db import make_engine, upgrade_to_head
from ota_server.engine import tick
from ota_server.models import Deployment, Rollout
from ota_server.rollout.plan import Plan, Selector, Stage
from ota_server.services import rollouts as svc

from .conftest import AUTH, BundleFactory, upload
from .helpers import assignments, checkin, checkin_message, deliver, finish, report

How = Literal["rollback", "gate", "abort_revert"]
Timing = Literal["before", "during", "after"]
FLEET = ("d0", "d1", "d2")


def _start(client: TestClient, release_id: str, **extra: Any) -> dict[str, Any]:
    body = {"release_id": release_id, "stages": [{"percent": 100}], "start": True, **extra}
    resp = client.post("/api/v1/rollouts", json=body, headers=AUTH)
    assert resp.status_code == 201, resp.text
    out: dict[str, Any] = resp.json()
    return out


def _release_everywhere(
    client: TestClient, ctx: ServerContext, make_bundle: BundleFactory, how: How
) -> tuple[str, str, dict[str, Assignment]]:
    """1.0.0 committed on the fleet, then 1.1.0 rolled out and rolled back ``how``; (release, rollout, 1.0.0's)."""
    for dev in FLEET:
        client.post("/api/v1/devices", json={"device_id": dev, "hardware_profile": "x86"}, headers=AUTH)
    old = upload(client, make_bundle("1.0.0", "x86")).json()["release_id"]
    new = upload(client, make_bundle("1.1.0", "x86")).json()["release_id"]
    _start(client, old)
    v1 = {dev: assignments(ctx, dev)[-1] for dev in FLEET}  # sent by `create --start`, no tick needed
    for a in v1.values():
        finish(ctx, a)
    tick(ctx)
    gates = {"max_failure_rate": 0.0, "min_count_for_failure_rate": 1, "min_devices": 1}
    rollout = _start(client, new, gates=gates)
    rid = rollout["rollout_id"]
    v2 = {dev: assignments(ctx, dev)[-1] for dev in FLEET}
    assert {a.version for a in v2.values()} == {"1.1.0"}
    finish(ctx, v2["d0"])
    finish(ctx, v2["d1"])
    if how == "gate":
        finish(ctx, v2["d2"], ok=False)  # d2's own smoke test fails: the failure-rate gate rolls back
        tick(ctx)
    elif how == "abort_revert":
        report(ctx, v2["d2"], DeploymentState.DOWNLOADING)  # still downloading: cancelled and reverted at once
        resp = client.post(f"/api/v1/rollouts/{rid}/abort", json={"revert": True}, headers=AUTH)
        assert resp.status_code == 200 and resp.json()["state"] == "aborted"
    else:
        finish(ctx, v2["d2"])
        tick(ctx)
        assert client.get(f"/api/v1/rollouts/{rid}", headers=AUTH).json()["state"] == "completed"
        resp = client.post(f"/api/v1/rollouts/{rid}/rollback", headers=AUTH)
        assert resp.status_code == 200 and resp.json()["state"] == "rolled_back"
    return new, rid, v1


def _device_goes_back(ctx: ServerContext, dev: str, timing: Timing) -> None:
    """The device runs the rollback to 1.0.0; its check-in comes before, during or after the report."""
    back = assignments(ctx, dev)[-1]
    assert back.mode == "rollback" and back.version == "1.0.0"
    report(ctx, back, DeploymentState.DOWNLOADING)
    if timing == "during":
        msg = checkin_message("x86", models=[back], active=back.deployment_id)
        msg = msg.model_copy(update={"active_state": DeploymentState.TRIAL})
        assert deliver(ctx, device_topic(dev, Channel.CHECKIN), msg.model_dump_json().encode()) == "ok"
    elif timing == "before":
        assert checkin(ctx, dev, "x86", models=[back]) == "ok"
    report(ctx, back, DeploymentState.TRIAL)
    report(ctx, back, DeploymentState.COMMITTED)
    assert checkin(ctx, dev, "x86", models=[back]) == "ok"  # the heartbeat after: the soak's relabelling


def _install_records(ctx: ServerContext, rid: str) -> dict[str, tuple[str, str]]:
    with ctx.sessions() as session:
        rows = session.scalars(select(Deployment).where(Deployment.rollout_id == rid, Deployment.mode == "install"))
        return {d.device_id: (d.state, d.reason) for d in rows}


@pytest.mark.parametrize("timing", ["before", "during", "after"])
@pytest.mark.parametrize("how", ["rollback", "gate", "abort_revert"])
def test_a_server_rollback_is_recorded_as_such_and_the_next_rollout_targets_the_devices(
    client: TestClient, ctx: ServerContext, make_bundle: BundleFactory, how: How, timing: Timing
) -> None:
    new, rid, v1 = _release_everywhere(client, ctx, make_bundle, how)
    for dev in ("d0", "d1"):
        _device_goes_back(ctx, dev, timing)
    # d2 runs 1.0.0: its own rollback (gate), a cancelled download (abort), or (rollback) the server's
    # rollback, seen only in this check-in (its reports never arrive)
    checkin(ctx, "d2", "x86", models=[v1["d2"]])
    records = _install_records(ctx, rid)
    server = (DeploymentState.ROLLED_BACK.value, ReasonCode.SERVER_ROLLBACK.value)
    assert records["d0"] == records["d1"] == server
    status = client.get(f"/api/v1/rollouts/{rid}", headers=AUTH).json()
    assert status["reverted"] is True
    assert status["halted_by"] == ("failure_rate" if how == "gate" else None)
    # abort --revert: d2's download was sent, so it got a rollback too, which its check-in shows done
    assert status["rollback_counts"] == {"committed": 2 if how == "gate" else 3}
    if how == "rollback":
        assert records["d2"] == server
    elif how == "abort_revert":
        assert records["d2"] == (DeploymentState.FAILED.value, ReasonCode.CANCELLED.value)
    dry = client.post("/api/v1/rollouts", json={"release_id": new, "dry_run": True}, headers=AUTH).json()
    if how == "gate":
        # d2's own smoke test rolled 1.1.0 back: that device is skipped, the server's rollback is not
        assert records["d2"] == (DeploymentState.ROLLED_BACK.value, ReasonCode.SMOKE_TEST_FAILED.value)
        assert dry["skipped_rolled_back_before"] == ["d2"] and dry["eligible"] == 2
        assert sorted(dry["stages"][0]["devices"]) == ["d0", "d1"]
    else:
        assert dry["skipped_rolled_back_before"] == [] and dry["eligible"] == 3
        assert sorted(dry["stages"][0]["devices"]) == list(FLEET)


def test_a_late_commit_is_reverted_only_once_a_revert_was_ordered(
    client: TestClient, ctx: ServerContext, make_bundle: BundleFactory
) -> None:
    """Whether a late commit is reverted is read from ``rollouts.reverted``, not from the detail text."""
    client.post("/api/v1/devices", json={"device_id": "d0", "hardware_profile": "x86"}, headers=AUTH)
    old = upload(client, make_bundle("1.0.0", "x86")).json()["release_id"]
    _start(client, old)
    v1 = assignments(ctx, "d0")[-1]
    finish(ctx, v1)
    new = upload(client, make_bundle("1.1.0", "x86")).json()["release_id"]
    gates = {"device_timeout_seconds": 0.05, "max_failure_rate": 1.0, "min_devices": 0}
    rid = _start(client, new, gates=gates)["rollout_id"]
    v2 = assignments(ctx, "d0")[-1]
    time.sleep(0.1)
    tick(ctx)  # the device is silent: timed out, and the rollout completes without it
    with ctx.sessions() as session, session.begin():
        row = session.get(Rollout, rid)
        assert row is not None and row.state == "completed" and not row.reverted
        row.detail = "revert"  # words in the detail must not matter
        dep = session.get(Deployment, v2.deployment_id)
        assert dep is not None and (dep.state, dep.reason) == ("failed", "device_timeout")
    assert report(ctx, v2, DeploymentState.COMMITTED)[0] == "stale"  # committed late: recorded, not reverted
    assert checkin(ctx, "d0", "x86", models=[v2]) == "ok"
    assert [a.mode for a in assignments(ctx, "d0")] == ["install", "install"]
    assert client.get("/api/v1/devices/d0", headers=AUTH).json()["models"][0]["version"] == "1.1.0"
    # Once the operator rolls the rollout back, the next check-in that shows 1.1.0 reverts the device.
    assert client.post(f"/api/v1/rollouts/{rid}/rollback", headers=AUTH).json()["reverted"] is True
    assert checkin(ctx, "d0", "x86", models=[v2]) == "ok"
    back = assignments(ctx, "d0")[-1]
    assert (back.mode, back.version) == ("rollback", "1.0.0")
    assert checkin(ctx, "d0", "x86", models=[v2]) == "ok"  # the same open rollback again, no second one
    with ctx.sessions() as session:
        n = session.scalar(select(func.count()).select_from(Deployment).where(Deployment.mode == "rollback"))
        dep = session.get(Deployment, v2.deployment_id)
        assert n == 1 and dep is not None and dep.reverted_by == back.deployment_id


def test_create_with_start_sends_the_first_stage_at_once(
    client: TestClient, ctx: ServerContext, make_bundle: BundleFactory
) -> None:
    for dev in FLEET:
        client.post("/api/v1/devices", json={"device_id": dev, "hardware_profile": "x86"}, headers=AUTH)
    rel = upload(client, make_bundle("1.0.0", "x86")).json()["release_id"]
    out = _start(client, rel, stages=[{"count": 1}, {"percent": 100}])
    assert out["state"] == "running" and out["counts"]["notified"] == 1
    assert [dev for dev in FLEET if assignments(ctx, dev)] == out["preview"]["stages"][0]["devices"]
    # an operator's `start` sends at once too
    rid = client.post("/api/v1/rollouts", json={"release_id": rel, "selector": {"device_ids": ["d2"]}}, headers=AUTH)
    started = client.post(f"/api/v1/rollouts/{rid.json()['rollout_id']}/start", headers=AUTH).json()
    assert started["counts"]["notified"] == 1 and assignments(ctx, "d2")


def test_a_failed_commit_publishes_nothing(client: TestClient, ctx: ServerContext, make_bundle: BundleFactory) -> None:
    new, _rid, _ = _release_everywhere(client, ctx, make_bundle, "abort_revert")
    sent = list(ctx.publisher.sent)  # type: ignore[attr-defined]
    client.post("/api/v1/devices", json={"device_id": "d9", "hardware_profile": "x86"}, headers=AUTH)

    def refuse(_session: Session) -> None:
        raise RuntimeError("database went away at commit")

    plan = Plan((Stage(percent=100),))
    event.listen(ctx.sessions, "before_commit", refuse)
    try:
        with pytest.raises(RuntimeError):
            svc.create(ctx, new, Selector(device_ids=("d9",)), plan, "t", start=True)
        with pytest.raises(RuntimeError):
            tick(ctx)
    finally:
        event.remove(ctx.sessions, "before_commit", refuse)
    assert ctx.publisher.sent == sent  # type: ignore[attr-defined]
    with ctx.sessions() as session:
        assert session.scalar(select(func.count()).select_from(Deployment).where(Deployment.device_id == "d9")) == 0
    svc.create(ctx, new, Selector(device_ids=("d9",)), plan, "t", start=True)  # the same, committed: sent
    assert [a.version for a in assignments(ctx, "d9")] == ["1.1.0"]


def test_upgrade_repairs_installs_relabelled_after_a_server_rollback(db_url: str) -> None:
    from alembic import command

    from ota_server.db import alembic_config

    engine = make_engine(db_url)
    cfg = alembic_config(db_url)
    rows = [
        ("inst", "o1", "install", "rolled_back", "health_failed", "device check-in shows 1.0.0 running"),
        ("back", "o1", "rollback", "committed", "server_rollback", ""),
        ("own", "o2", "install", "rolled_back", "health_failed", "device check-in shows 1.0.0 running"),
    ]
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "0004")
        conn.execute(
            text("INSERT INTO releases (id, model_name, version, created_at, created_by) VALUES "
                 "('r1', 'm', '1.1.0', CURRENT_TIMESTAMP, 't')")
        )  # fmt: skip
        conn.execute(
            text("INSERT INTO bundles (sha256, release_id, model_name, version, hardware_profile, release_counter, "
                 "size, signing_key_id, manifest, created_at) VALUES "
                 "(:sha, 'r1', 'm', '1.1.0', 'x86', 2, 10, 'k', '{}', CURRENT_TIMESTAMP)"),
            {"sha": "b" * 64},
        )  # fmt: skip
        conn.execute(
            text("INSERT INTO devices (id, hardware_profile, labels, token_hash, mqtt_password_hash, created_at, "
                 "presence_online) VALUES ('d1', 'x86', '{}', 'h', 'p', CURRENT_TIMESTAMP, false)")
        )  # fmt: skip
        for rollout_id, state, detail in (
            ("o1", "rolled_back", "rolled back"),
            ("o2", "aborted", "aborted"),
            ("o3", "aborted", "aborted and reverted"),
        ):
            conn.execute(
                text("INSERT INTO rollouts (id, release_id, state, plan, selector, targets, no_bundle, skipped, "
                     "current_stage, approved_stages, reason, detail, created_at, updated_at, created_by) VALUES "
                     "(:id, 'r1', :state, '{}', '{}', '[]', '[]', '[]', 0, '[]', 'manual', :detail, "
                     "CURRENT_TIMESTAMP, CURRENT_TIMESTAMP, 't')"),
                {"id": rollout_id, "state": state, "detail": detail},
            )  # fmt: skip
        for dep_id, rollout_id, mode, state, reason, detail in rows:
            conn.execute(
                text("INSERT INTO deployments (id, rollout_id, device_id, mode, stage, model_name, version, "
                     "bundle_sha256, release_counter, state, reason, detail, send_count, created_at, updated_at) "
                     "VALUES (:id, :rollout, 'd1', :mode, 0, 'm', '1.1.0', :sha, 2, :state, :reason, :detail, 1, "
                     "CURRENT_TIMESTAMP, CURRENT_TIMESTAMP)"),
                {"id": dep_id, "rollout": rollout_id, "mode": mode, "state": state, "reason": reason,
                 "detail": detail, "sha": "b" * 64},
            )  # fmt: skip
    upgrade_to_head(engine)
    with engine.connect() as conn:
        reverted = {r[0]: r[1] for r in conn.execute(text("SELECT id, reverted FROM rollouts"))}
        assert {k: bool(v) for k, v in reverted.items()} == {"o1": True, "o2": False, "o3": True}
        deps = {r[0]: (r[1], r[2]) for r in conn.execute(text("SELECT id, reason, reverted_by FROM deployments"))}
    assert deps == {
        "inst": ("server_rollback", "back"),
        "back": ("server_rollback", None),
        "own": ("health_failed", None),  # no rollback was ordered there: the device's own
    }
    engine.dispose()


def test_a_gate_pause_names_the_gate_until_the_rollout_runs_again(
    client: TestClient, ctx: ServerContext, make_bundle: BundleFactory
) -> None:
    for dev in ("d0", "d1"):
        client.post("/api/v1/devices", json={"device_id": dev, "hardware_profile": "x86"}, headers=AUTH)
    rel = upload(client, make_bundle("1.0.0", "x86")).json()["release_id"]
    gates = {"max_failure_rate": 0.0, "min_count_for_failure_rate": 1}
    rid = _start(client, rel, gates=gates, on_failure="pause")["rollout_id"]
    finish(ctx, assignments(ctx, "d0")[-1], ok=False)
    tick(ctx)
    paused = client.get(f"/api/v1/rollouts/{rid}", headers=AUTH).json()
    assert (paused["state"], paused["reason"], paused["halted_by"]) == ("paused", "gate_failed", "failure_rate")
    assert paused["reverted"] is False
    resumed = client.post(f"/api/v1/rollouts/{rid}/resume", headers=AUTH).json()
    assert resumed["state"] == "running" and resumed["halted_by"] is None
