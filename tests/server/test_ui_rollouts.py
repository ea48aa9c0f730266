"""Dashboard rollout pages with a real rollout (engine ticks, device reports through ingest): the halt banner,
gates, incompatible devices, live JSON, confirmed actions by role, and the timeline linked with the audit log."""

from __future__ import annotations

import re
from typing import Any

from fastapi.testclient import TestClient

from edgeota_contract.states import DeploymentState, ReasonCode
from ota_server.context import ServerContext
from ota_server.engine import tick

from .conftest import AUTH, BundleFactory, upload
from .helpers import assignments, finish, report
from .ui_helpers import browser, csrf_of, error_message, fleet, new_token, sign_in


def _halted_rollout(client: TestClient, ctx: ServerContext, make_bundle: BundleFactory) -> tuple[str, str, list[str]]:
    """A rollout paused by the failure-rate gate: stage 1 of 2 devices, one committed, one failed to download."""
    devices = fleet(client, 4)
    fleet(client, 1, profile="rpi4", prefix="r")  # no bundle for this profile
    release = upload(client, make_bundle("2.0.0", "x86")).json()["release_id"]
    body: dict[str, Any] = {
        "release_id": release,
        "selector": {"labels": {"ring": "a"}},
        "stages": [{"count": 2, "soak_seconds": 0}, {"percent": 100, "soak_seconds": 0}],
        "gates": {"min_devices": 1, "max_failure_rate": 0.0, "min_count_for_failure_rate": 1},
        "on_failure": "pause",
        "start": True,
    }
    resp = client.post("/api/v1/rollouts", json=body, headers=AUTH)
    assert resp.status_code == 201, resp.text
    rid: str = resp.json()["rollout_id"]
    tick(ctx)
    first = [d for d in devices if assignments(ctx, d)]
    assert len(first) == 2
    finish(ctx, assignments(ctx, first[0])[-1])
    report(ctx, assignments(ctx, first[1])[-1], DeploymentState.FAILED, ReasonCode.DOWNLOAD_FAILED)
    tick(ctx)
    status = client.get(f"/api/v1/rollouts/{rid}", headers=AUTH).json()
    assert (status["state"], status["halted_by"]) == ("paused", "failure_rate"), status
    return rid, first[1], devices


def test_halted_rollout_page_shows_banner_stages_gates_and_incompatible_devices(
    client: TestClient, ctx: ServerContext, make_bundle: BundleFactory
) -> None:
    rid, failed_device, _ = _halted_rollout(client, ctx, make_bundle)
    sign_in(client)
    page = client.get(f"/ui/rollouts/{rid}")
    assert page.status_code == 200
    html = page.text
    assert re.search(r'id="halt-banner" class="banner" data-halted-by="failure_rate"', html)
    assert 'id="rollout-state" class="state state-paused" data-state="paused"' in html
    assert 'data-stage="0"' in html and 'data-stage="1"' in html
    assert re.search(r'id="stage-0-progress"[^>]*data-size="2" data-committed="1" data-failed="1"', html, re.S)
    assert '<li data-device-id="r000">' in html  # incompatible: no bundle for rpi4
    assert f'<tr data-device-id="{failed_device}">' in html and "download_failed" in html
    assert 'tr data-gate="failure_rate" data-gate-state="failed"' in html
    assert re.search(r'<tr data-profile="x86"><td>x86</td><td class="num">4</td><td class="num">1</td>', html)
    for action in ("resume", "retry_failed", "abort", "rollback"):
        assert f'id="action-{action}"' in html, action
    assert 'id="action-approve"' not in html and 'id="action-pause"' not in html
    # Live JSON: the same numbers the page shows.
    live = client.get(f"/ui/rollouts/{rid}/live.json").json()
    assert live["state"] == "paused" and live["halted_by"] == "failure_rate"
    assert live["stages"][0] | {"counts": None} == {
        "stage": 0,
        "size": 2,
        "committed": 1,
        "failed": 1,
        "active": 0,
        "waiting": 0,
        "unassigned": 0,
        "counts": None,
    }
    listing = client.get("/ui/rollouts?state=paused")
    assert listing.status_code == 200 and f'data-rollout-id="{rid}" data-state="paused"' in listing.text
    assert f'data-rollout-id="{rid}"' not in client.get("/ui/rollouts?state=completed").text


def test_timeline_and_audit_log_link_both_ways(
    client: TestClient, ctx: ServerContext, make_bundle: BundleFactory
) -> None:
    rid, _, _ = _halted_rollout(client, ctx, make_bundle)
    sign_in(client)
    html = client.get(f"/ui/rollouts/{rid}").text
    audit_ids = re.findall(r'<li data-audit-id="(\d+)"><a class="audit-link" href="/ui/audit/(\d+)"', html)
    assert len(audit_ids) >= 3 and all(a == b for a, b in audit_ids)
    entry = client.get(f"/ui/audit/{audit_ids[-1][0]}")
    assert entry.status_code == 200 and f'href="/ui/rollouts/{rid}"' in entry.text
    # A deployment's audit entry links to its rollout too.
    log = client.get("/ui/audit?entity_type=deployment")
    assert log.status_code == 200 and f'class="rollout-link" href="/ui/rollouts/{rid}"' in log.text


def test_viewer_sees_no_actions_and_its_forged_posts_are_refused(
    client: TestClient, ctx: ServerContext, make_bundle: BundleFactory
) -> None:
    rid, _, _ = _halted_rollout(client, ctx, make_bundle)
    viewer = browser(client)
    csrf = sign_in(viewer, new_token(client, "viewer", "watcher"))
    page = viewer.get(f"/ui/rollouts/{rid}")
    assert page.status_code == 200 and 'id="action-' not in page.text and 'id="actions"' not in page.text
    for command in ("retry_failed", "rollback", "resume", "abort"):
        forged = viewer.post(f"/ui/rollouts/{rid}/{command}", data={"csrf": csrf})
        assert forged.status_code == 403, command
        assert "needs the operator role" in error_message(forged.text)
        assert viewer.get(f"/ui/rollouts/{rid}/confirm/{command}").status_code == 403
    assert client.get(f"/api/v1/rollouts/{rid}", headers=AUTH).json()["state"] == "paused"  # nothing happened
    assert 'id="bulk-label-form"' in viewer.get("/ui/devices").text  # the list, without the labelling controls
    assert 'id="bulk-label-submit"' not in viewer.get("/ui/devices").text


def test_operator_retries_failed_devices_then_rolls_back_each_confirmed(
    client: TestClient, ctx: ServerContext, make_bundle: BundleFactory
) -> None:
    rid, failed_device, _ = _halted_rollout(client, ctx, make_bundle)
    ops = browser(client)
    sign_in(ops, new_token(client, "operator", "ops"))
    # Without the CSRF token the action is refused and nothing changes.
    assert ops.post(f"/ui/rollouts/{rid}/retry_failed", data={"reason": "x"}).status_code == 403
    assert len(assignments(ctx, failed_device)) == 1
    confirm = ops.get(f"/ui/rollouts/{rid}/confirm/retry_failed")
    assert confirm.status_code == 200 and 'id="confirm-form"' in confirm.text
    done = ops.post(
        f"/ui/rollouts/{rid}/retry_failed",
        data={"csrf": csrf_of(confirm.text), "reason": "flaky network"},
        follow_redirects=False,
    )
    assert done.status_code == 303 and done.headers["location"] == f"/ui/rollouts/{rid}"
    shown = ops.get(done.headers["location"]).text
    assert '<p id="flash" class="flash">Retry failed devices: done</p>' in shown
    assert 'id="flash"' not in ops.get(done.headers["location"]).text  # shown once
    assert len(assignments(ctx, failed_device)) == 2  # a new attempt went out
    live = ops.get(f"/ui/rollouts/{rid}/live.json").json()
    assert live["state"] == "paused" and live["stages"][0]["failed"] == 0 and live["stages"][0]["waiting"] == 1
    audit = client.get(f"/api/v1/audit?entity_id={rid}&action=rollout.command.retry_failed", headers=AUTH).json()
    assert audit and audit[-1]["reason"] == "flaky network" and audit[-1]["actor"] == "token:ops"
    # Nothing failed any more: retrying again is a conflict page, not a 500.
    again = ops.post(f"/ui/rollouts/{rid}/retry_failed", data={"csrf": csrf_of(confirm.text)})
    assert again.status_code == 409 and "no failed devices" in error_message(again.text)
    confirm = ops.get(f"/ui/rollouts/{rid}/confirm/rollback")
    back = ops.post(f"/ui/rollouts/{rid}/rollback", data={"csrf": csrf_of(confirm.text)}, follow_redirects=False)
    assert back.status_code == 303
    page = ops.get(f"/ui/rollouts/{rid}").text
    assert 'data-state="rolled_back"' in page and 'id="action-rollback"' not in page
    resume = ops.post(f"/ui/rollouts/{rid}/resume", data={"csrf": csrf_of(page)})
    assert resume.status_code == 409 and "cannot resume" in error_message(resume.text)


def test_rollout_rejection_pages(client: TestClient) -> None:
    csrf = sign_in(client)
    missing = client.get("/ui/rollouts/doesnotexist")
    assert missing.status_code == 404 and "not found" in error_message(missing.text)
    assert client.get("/ui/rollouts/doesnotexist/live.json").status_code == 404
    assert client.get("/ui/rollouts/bad%20id!").status_code == 400
    assert client.get("/ui/rollouts?state=bogus").status_code == 400
    assert client.get("/ui/rollouts?page=0").status_code == 400
    assert client.get("/ui/rollouts/abc/confirm/explode").status_code == 404
    assert client.post("/ui/rollouts/abc/explode", data={"csrf": csrf}).status_code == 404
    assert client.post("/ui/rollouts/abc/rollback", data={"csrf": csrf}).status_code == 404


def test_retry_failed_through_the_api_by_role(
    client: TestClient, ctx: ServerContext, make_bundle: BundleFactory
) -> None:
    rid, failed_device, _ = _halted_rollout(client, ctx, make_bundle)
    viewer = {"Authorization": f"Bearer {new_token(client, 'viewer', 'v')}"}
    operator = {"Authorization": f"Bearer {new_token(client, 'operator', 'o')}"}
    assert client.post(f"/api/v1/rollouts/{rid}/retry_failed", headers=viewer).status_code == 403
    resp = client.post(f"/api/v1/rollouts/{rid}/retry_failed", json={"reason": "api"}, headers=operator)
    assert resp.status_code == 200 and resp.json()["state"] == "paused"
    assert len(assignments(ctx, failed_device)) == 2
    assert client.post(f"/api/v1/rollouts/{rid}/retry_failed", headers=operator).status_code == 409


def test_a_release_manager_starts_a_draft_an_operator_may_not(client: TestClient, make_bundle: BundleFactory) -> None:
    fleet(client, 2)
    release = upload(client, make_bundle("3.0.0", "x86")).json()["release_id"]
    body = {"release_id": release, "selector": {"labels": {"ring": "a"}}, "stages": [{"percent": 100}]}
    rid = client.post("/api/v1/rollouts", json=body, headers=AUTH).json()["rollout_id"]
    ops = browser(client)
    ops_csrf = sign_in(ops, new_token(client, "operator", "ops"))
    page = ops.get(f"/ui/rollouts/{rid}").text
    assert 'id="action-start"' not in page and 'id="action-abort"' in page
    assert ops.post(f"/ui/rollouts/{rid}/start", data={"csrf": ops_csrf}).status_code == 403
    rm = browser(client)
    rm_csrf = sign_in(rm, new_token(client, "release_manager", "rm"))
    assert 'id="action-start"' in rm.get(f"/ui/rollouts/{rid}").text
    started = rm.post(f"/ui/rollouts/{rid}/start", data={"csrf": rm_csrf}, follow_redirects=False)
    assert started.status_code == 303
    live = rm.get(f"/ui/rollouts/{rid}/live.json").json()
    assert live["state"] == "running" and live["stages"][0]["waiting"] == 2
    assert {g["name"]: g["state"] for g in live["gates"]}["failure_rate"] == "not_evaluated"


def test_gate_values_and_not_evaluated_gates_are_shown(
    client: TestClient, ctx: ServerContext, make_bundle: BundleFactory
) -> None:
    from ota_server.models import Rollout

    rid, _, _ = _halted_rollout(client, ctx, make_bundle)
    gates = [
        {
            "name": "error_rate",
            "state": "failed",
            "value": 0.31,
            "threshold": 0.05,
            "have": 900,
            "need": 100,
            "unit": "requests",
            "detail": "error rate 0.31 over 0.05",
        },
        {
            "name": "drift",
            "state": "not_evaluated",
            "value": None,
            "threshold": 0.25,
            "have": 37,
            "need": 200,
            "unit": "values",
            "detail": "",
        },
    ]
    with ctx.sessions() as session:
        rollout = session.get(Rollout, rid)
        assert rollout is not None
        rollout.gate_results = {"stage": 0, "at": "2026-12-07T08:00:00+00:00", "gates": gates}
        rollout.halted_by, rollout.detail = "telemetry", "gate error_rate failed: error rate 0.31 over 0.05"
        session.commit()
    sign_in(client)
    html = client.get(f"/ui/rollouts/{rid}").text
    assert 'data-halted-by="telemetry"' in html and "error rate 0.31 over 0.05" in html
    assert re.search(r'<tr data-gate="error_rate" data-gate-state="failed">.*?0\.31.*?0\.05', html, re.S)
    drift = re.search(r'<tr data-gate="drift" data-gate-state="not_evaluated">(.*?)</tr>', html, re.S)
    assert drift is not None and "not evaluated: 37 of 200 values" in drift.group(1)
    live = client.get(f"/ui/rollouts/{rid}/live.json").json()
    assert [g["name"] for g in live["gates"]] == ["error_rate", "drift", "failure_rate"]
