"""Retries persisted through the engine tick, and the command poll's state transition (both databases)."""

from __future__ import annotations

import json
from typing import Any

from fastapi.testclient import TestClient
from sqlalchemy import select, update

from edgeota_contract.messages import Assignment, verify_command
from edgeota_contract.signing import TrustedKeys
from edgeota_contract.states import DeploymentState, ReasonCode
from ota_server.context import ServerContext
from ota_server.engine import tick
from ota_server.models import Deployment

from .conftest import AUTH, BundleFactory, upload
from .helpers import assignments, finish, report


def _provision(client: TestClient, device_id: str) -> str:
    resp = client.post("/api/v1/devices", json={"device_id": device_id, "hardware_profile": "x86"}, headers=AUTH)
    assert resp.status_code == 201, resp.text
    token: str = resp.json()["token"]
    return token


def _start(client: TestClient, release_id: str, devices: list[str], **extra: Any) -> str:
    body = {
        "release_id": release_id,
        "selector": {"device_ids": devices},
        "gates": {"min_devices": 1, "max_failure_rate": 0.0, "min_count_for_failure_rate": 1},
        "start": True,
        **extra,
    }
    resp = client.post("/api/v1/rollouts", json=body, headers=AUTH)
    assert resp.status_code == 201, resp.text
    rid: str = resp.json()["rollout_id"]
    return rid


def _status(client: TestClient, rid: str) -> dict[str, Any]:
    out: dict[str, Any] = client.get(f"/api/v1/rollouts/{rid}", headers=AUTH).json()
    return out


def test_retry_creates_a_new_attempt_and_only_final_failures_count(
    client: TestClient, ctx: ServerContext, make_bundle: BundleFactory
) -> None:
    release = upload(client, make_bundle("1.0.0")).json()["release_id"]
    _provision(client, "d1")
    rid = _start(client, release, ["d1"], max_retries=1, retry_backoff_seconds=0)
    tick(ctx)
    first = assignments(ctx, "d1")[-1]
    report(ctx, first, DeploymentState.DOWNLOADING)
    report(ctx, first, DeploymentState.FAILED, ReasonCode.DOWNLOAD_TIMEOUT)
    status = _status(client, rid)
    assert status["state"] == "running" and status["retries"] == {"retried_attempts": 0, "waiting": 1}
    tick(ctx)
    second = assignments(ctx, "d1")[-1]
    assert second.deployment_id != first.deployment_id and second.bundle_sha256 == first.bundle_sha256
    status = _status(client, rid)
    assert status["counts"]["notified"] == 1 and status["counts"]["failed"] == 0
    assert status["retries"] == {"retried_attempts": 1, "waiting": 0}
    report(ctx, first, DeploymentState.COMMITTED)  # a late report for the retried attempt changes nothing
    assert _status(client, rid)["counts"]["committed"] == 0

    # The second (last) attempt fails too: now it is final, the gate trips and the rollout rolls back.
    report(ctx, second, DeploymentState.FAILED, ReasonCode.DOWNLOAD_FAILED)
    tick(ctx)
    status = _status(client, rid)
    assert status["state"] == "rolled_back" and status["counts"]["failed"] == 1
    rows = sorted((d["attempt"], d["retried"], d["reason"]) for d in status["deployments"])
    assert rows == [(1, True, "download_timeout"), (2, False, "download_failed")]


def test_a_failed_health_trial_is_not_retried(
    client: TestClient, ctx: ServerContext, make_bundle: BundleFactory
) -> None:
    release = upload(client, make_bundle("1.0.0")).json()["release_id"]
    _provision(client, "d1")
    rid = _start(client, release, ["d1"], max_retries=3, retry_backoff_seconds=0)
    tick(ctx)
    finish(ctx, assignments(ctx, "d1")[-1], ok=False)  # smoke test fails: rolled_back
    tick(ctx)
    status = _status(client, rid)
    assert status["state"] == "rolled_back" and len(assignments(ctx, "d1")) == 1
    assert status["retries"]["retried_attempts"] == 0


def test_retry_settings_are_validated(client: TestClient, make_bundle: BundleFactory) -> None:
    release = upload(client, make_bundle("1.0.0")).json()["release_id"]
    for extra in ({"max_retries": -1}, {"max_retries": 11}, {"retry_backoff_seconds": -1}):
        resp = client.post("/api/v1/rollouts", json={"release_id": release, **extra}, headers=AUTH)
        assert resp.status_code == 422 and resp.headers["content-type"] == "application/problem+json"


def test_poll_marks_pending_notified_once_and_serves_verifiable_commands(
    client: TestClient, ctx: ServerContext, make_bundle: BundleFactory
) -> None:
    release = upload(client, make_bundle("1.0.0")).json()["release_id"]
    token = _provision(client, "d1")
    _start(client, release, ["d1"])
    tick(ctx)
    with ctx.sessions() as session, session.begin():  # as if the server crashed before publishing
        session.execute(update(Deployment).values(state="pending", assignment_id=None, send_count=0))
    url, auth = "/api/v1/devices/d1/commands", {"Authorization": f"Bearer {token}"}
    keys = TrustedKeys([ctx.server_key.public_key])
    polled = []
    for _ in range(2):
        resp = client.get(url, headers=auth)
        assert resp.status_code == 200, resp.text
        (obj,) = resp.json()["commands"]
        polled.append(verify_command(json.dumps(obj).encode(), keys, "d1"))
        with ctx.sessions() as session:
            dep = session.scalars(select(Deployment)).one()
            assert (dep.state, dep.send_count) == ("notified", 1)  # the second poll changed nothing
    assert all(isinstance(c, Assignment) for c in polled)
    assert polled[0].assignment_id == polled[1].assignment_id == dep.assignment_id  # type: ignore[union-attr]
    assert ctx.metrics.snapshot()["commands_polled"] == 2
