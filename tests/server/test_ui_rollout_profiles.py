"""The rollout page's "devices per hardware profile" table: states counted per deployment bundle, targets per
profile remembered until the rollout's targets change (a decommissioned device leaves them); the live poll's
numbers against the status endpoint's; the covering index the rollout page's grouped counts read."""

from __future__ import annotations

import re
from typing import Any

from fastapi.testclient import TestClient
from sqlalchemy import inspect

from edgeota_contract.states import DeploymentState, ReasonCode
from ota_server.context import ServerContext
from ota_server.engine import tick

from .conftest import AUTH, BundleFactory, upload
from .helpers import assignments, finish, report
from .ui_helpers import fleet, sign_in


def _profile_rows(html: str) -> dict[str, tuple[int, int, int, int]]:
    """``#profiles`` rows: profile -> (targets, committed, failed, in progress)."""
    table = re.search(r'<table id="profiles">(.*?)</table>', html, re.S)
    assert table, "no #profiles table"
    rows = re.findall(r'<tr data-profile="([^"]+)">((?:<td[^>]*>[^<]*</td>)+)</tr>', table.group(1))
    out = {}
    for profile, cells in rows:
        values = [int(v.replace(",", "")) for v in re.findall(r'<td class="num">([^<]*)</td>', cells)]
        out[profile] = (values[0], values[1], values[2], values[3])
    return out


def test_profiles_table_counts_states_per_profile_and_follows_a_decommission(
    client: TestClient, ctx: ServerContext, make_bundle: BundleFactory
) -> None:
    x86 = fleet(client, 3)
    arm = fleet(client, 2, profile="arm64", prefix="a")
    release = upload(client, make_bundle("2.0.0", "x86")).json()["release_id"]
    resp = upload(client, make_bundle("2.0.0", "arm64"))
    assert resp.status_code in (200, 201) and resp.json()["release_id"] == release, resp.text
    body: dict[str, Any] = {
        "release_id": release,
        "selector": {"labels": {"ring": "a"}},
        "stages": [{"percent": 100, "soak_seconds": 0}],
        "gates": {"max_failure_rate": 1.0},
        "start": True,
    }
    resp = client.post("/api/v1/rollouts", json=body, headers=AUTH)
    assert resp.status_code == 201, resp.text
    rid: str = resp.json()["rollout_id"]
    tick(ctx)
    finish(ctx, assignments(ctx, x86[0])[-1])
    report(ctx, assignments(ctx, arm[0])[-1], DeploymentState.FAILED, ReasonCode.DOWNLOAD_FAILED)
    sign_in(client)
    page = client.get(f"/ui/rollouts/{rid}")
    assert page.status_code == 200
    assert _profile_rows(page.text) == {"arm64": (2, 0, 1, 1), "x86": (3, 1, 0, 2)}
    again = client.get(f"/ui/rollouts/{rid}").text  # the targets per profile now come from the memo
    assert _profile_rows(again) == {"arm64": (2, 0, 1, 1), "x86": (3, 1, 0, 2)}

    # The live poll reads less than the status endpoint but tells the same numbers.
    live = client.get(f"/ui/rollouts/{rid}/live.json").json()
    status = client.get(f"/api/v1/rollouts/{rid}", headers=AUTH).json()
    for key in ("state", "halted_by", "reason", "detail", "current_stage", "updated_at", "counts"):
        assert live[key] == status[key], key
    assert live["gates"][:-1] == (status["gates"] or []) and live["gates"][-1]["name"] == "failure_rate"
    assert live["gates_evaluated_at"] == status["gates_evaluated_at"]
    assert live["stages"][0]["size"] == 5 and live["stages"][0]["counts"] == {
        k: v for k, v in status["counts"].items() if v
    }

    # A decommissioned device leaves the targets (its open deployment is cancelled): the targets change at once.
    gone = client.post(f"/api/v1/devices/{x86[1]}/decommission", json={"reason": "lost"}, headers=AUTH)
    assert gone.status_code == 200, gone.text
    after = _profile_rows(client.get(f"/ui/rollouts/{rid}").text)
    assert after == {"arm64": (2, 0, 1, 1), "x86": (2, 1, 1, 1)}


def test_dashboard_migration_adds_the_rollout_summary_index(client: TestClient, ctx: ServerContext) -> None:
    indexes = {ix["name"]: ix["column_names"] for ix in inspect(ctx.engine).get_indexes("deployments")}
    assert indexes.get("ix_deployments_rollout_summary") == [
        "rollout_id",
        "mode",
        "retried",
        "state",
        "stage",
        "reason",
        "bundle_sha256",
        "reverted_by",
    ]
