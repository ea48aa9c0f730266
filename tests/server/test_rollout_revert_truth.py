"""A rolled-back rollout tells the truth about every device: ``revert`` counts the devices the server ordered
back that really went back, that are still on their way, and that ended their rollback without going back."""

from __future__ import annotations

from typing import Any

from fastapi.testclient import TestClient

from edgeota_contract.states import DeploymentState, ReasonCode
from ota_server.context import ServerContext
from ota_server.engine import tick

from .conftest import AUTH, BundleFactory, upload
from .helpers import assignments, finish, report

FLEET = ("r0", "r1", "r2", "r3")


def _start(client: TestClient, release_id: str) -> dict[str, Any]:
    body = {"release_id": release_id, "stages": [{"percent": 100}], "start": True}
    resp = client.post("/api/v1/rollouts", json=body, headers=AUTH)
    assert resp.status_code == 201, resp.text
    out: dict[str, Any] = resp.json()
    return out


def test_revert_counts_show_devices_that_did_not_go_back(
    client: TestClient, ctx: ServerContext, make_bundle: BundleFactory
) -> None:
    for dev in FLEET:
        client.post("/api/v1/devices", json={"device_id": dev, "hardware_profile": "x86"}, headers=AUTH)
    old = upload(client, make_bundle("1.0.0", "x86")).json()["release_id"]
    new = upload(client, make_bundle("1.1.0", "x86")).json()["release_id"]
    _start(client, old)
    for dev in FLEET:
        finish(ctx, assignments(ctx, dev)[-1])
    tick(ctx)
    rid = _start(client, new)["rollout_id"]
    for dev in FLEET:
        finish(ctx, assignments(ctx, dev)[-1])
    tick(ctx)
    before = client.get(f"/api/v1/rollouts/{rid}", headers=AUTH).json()
    assert before["revert"] == {"ordered": 0, "reverted": 0, "pending": 0, "not_reverted": 0}
    resp = client.post(f"/api/v1/rollouts/{rid}/rollback", headers=AUTH)
    assert resp.status_code == 200 and resp.json()["state"] == "rolled_back"
    back = {dev: assignments(ctx, dev)[-1] for dev in FLEET}
    assert {a.mode for a in back.values()} == {"rollback"}
    finish(ctx, back["r0"])  # went back
    report(ctx, back["r1"], DeploymentState.DOWNLOADING)
    report(ctx, back["r1"], DeploymentState.FAILED, ReasonCode.DOWNLOAD_FAILED)  # stayed on 1.1.0
    report(ctx, back["r2"], DeploymentState.TRIAL)  # on its way
    finish(ctx, back["r3"], ok=False)  # its rollback rolled back: on 1.1.0 again
    status = client.get(f"/api/v1/rollouts/{rid}", headers=AUTH).json()
    assert status["state"] == "rolled_back"
    assert status["revert"] == {"ordered": 4, "reverted": 1, "pending": 1, "not_reverted": 2}
    finish(ctx, back["r2"])
    status = client.get(f"/api/v1/rollouts/{rid}", headers=AUTH).json()
    assert status["revert"] == {"ordered": 4, "reverted": 2, "pending": 0, "not_reverted": 2}
