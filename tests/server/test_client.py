"""The typed REST client against the real app: every method parses its answer, every refusal is one error type."""

from __future__ import annotations

from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from ota_server.api.responses import RolloutCreated, RolloutDryRun, RolloutStatus
from ota_server.client import ApiClient, ApiClientError, ClientSettings, as_json
from ota_server.client_plans import RolloutPlan, StagePlan

from .conftest import ADMIN, BundleFactory


def _api(client: TestClient, token: str | None = ADMIN) -> ApiClient:
    return ApiClient(ClientSettings(url="http://testserver", token=token), http=client)


def test_release_device_and_rollout_calls(client: TestClient, make_bundle: BundleFactory) -> None:
    api = _api(client)
    assert api.health().status == "ok"
    bundle = make_bundle("1.0.0", "x86")
    first = api.upload(bundle)
    assert api.upload(bundle) == first  # the second upload is answered 200 with the same record
    assert first.hardware_profile == "x86" and len(first.bundle_sha256) == 64
    release = api.release(first.release_id)
    assert [b.bundle_sha256 for b in release.bundles] == [first.bundle_sha256]
    assert [r.release_id for r in api.releases(model_name="digits")] == [first.release_id]

    made = [api.provision("x86", {"ring": str(i)}, f"cl-{i}") for i in range(3)]
    assert made[0].device_id == "cl-0" and made[0].token.startswith("dev:cl-0.") and "[device]" in made[0].agent_toml
    assert [d.device_id for d in api.devices("ring=1")] == ["cl-1"]
    assert [d.device_id for d in api.devices(profile="x86", limit=2)] == ["cl-0", "cl-1"]
    assert api.device("cl-2").labels == {"ring": "2"}

    plan = RolloutPlan(stages=[StagePlan(count=1), StagePlan(percent=100, requires_approval=True)])
    preview = api.dry_run_rollout(first.release_id, plan)
    assert isinstance(preview, RolloutDryRun) and preview.dry_run and preview.eligible == 3
    assert [s.cumulative for s in preview.stages] == [1, 3]
    created = api.create_rollout(first.release_id, plan, start=True)
    assert isinstance(created, RolloutCreated) and created.state == "running" and created.preview.eligible == 3
    assert created.stage_sizes == [1, 3] and created.counts["pending"] + created.counts["notified"] == 1

    brief = api.rollout(created.rollout_id, deployments=False)
    assert brief.deployments is None and "deployments" not in as_json(brief)
    full = api.rollout(created.rollout_id)
    first_device = created.preview.stages[0].devices[0]
    assert full.deployments is not None and [d.device_id for d in full.deployments] == [first_device]
    assert [r.rollout_id for r in api.rollouts(state="running")] == [created.rollout_id]
    # The device sees its signed assignment by polling with its own token.
    token = next(m.token for m in made if m.device_id == first_device)
    commands = _api(client, token).device_commands(first_device).commands
    assert len(commands) == 1 and commands[0].sig.key_id

    paused = api.command(created.rollout_id, "pause", "looking")
    assert isinstance(paused, RolloutStatus) and paused.state == "paused"
    seen: list[str] = []
    api.command(created.rollout_id, "abort", "done", revert=True)
    final = api.wait_rollout(created.rollout_id, timeout=5, on_poll=lambda s: seen.append(s.state))
    assert final.state == "aborted" and seen == ["aborted"]

    entries = api.audit(entity_type="rollout", entity_id=created.rollout_id)
    assert entries[0].action == "rollout.create" and (entries[-1].after or {}).get("state") == "aborted"
    assert api.create_token("viewer", "ci").role == "viewer"
    assert api.metrics() and all(isinstance(v, int) for v in api.metrics().values())
    assert api.samples(model_name="digits").count == 0
    summary = api.telemetry_summary(model_name="digits", cohort="ring=1")
    assert summary.groups == [] and summary.filters.cohort == {"ring": "1"}


def test_refusals_carry_status_and_detail(client: TestClient, tmp_path: Path) -> None:
    api = _api(client)
    with pytest.raises(ApiClientError) as missing:
        api.release("nope")
    assert missing.value.status == 404 and missing.value.detail == "release nope not found"
    assert str(missing.value) == "GET /api/v1/releases/nope -> 404: release nope not found"
    assert missing.value.problem["title"] == "Not Found"

    with pytest.raises(ApiClientError) as anonymous:
        _api(client, None).devices()
    assert anonymous.value.status == 401 and anonymous.value.detail == "missing bearer token"

    with pytest.raises(ApiClientError) as invalid:
        api.telemetry_summary(since="2026-02-01T00:00:00Z", until="2026-01-01T00:00:00Z")
    assert invalid.value.status == 422 and invalid.value.problem["reason"] == "malformed_message"

    with pytest.raises(ApiClientError) as dry:
        api.create_rollout("r", {"dry_run": True})
    assert dry.value.status is None and "dry_run_rollout" in str(dry.value)

    with pytest.raises(ApiClientError) as unknown_rollout:
        api.wait_rollout("no-such-rollout", timeout=1)
    assert unknown_rollout.value.status == 404


def test_wait_rollout_gives_up_after_its_timeout(client: TestClient, make_bundle: BundleFactory) -> None:
    api = _api(client)
    release_id = api.upload(make_bundle("1.0.0", "x86")).release_id
    api.provision("x86", device_id="w-1")
    draft = api.create_rollout(release_id, RolloutPlan(stages=[StagePlan(percent=100)]))
    with pytest.raises(ApiClientError, match="still draft after 0s") as late:
        api.wait_rollout(draft.rollout_id, timeout=0.2, interval=0.05)
    assert late.value.status is None


def test_unreachable_server_is_an_error_without_status() -> None:
    with ApiClient.connect("http://127.0.0.1:9", "t", timeout=2) as api, pytest.raises(ApiClientError) as err:
        api.health()
    assert err.value.status is None and str(err.value).startswith("cannot reach http://127.0.0.1:9")
