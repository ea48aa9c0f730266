"""Evaluations through the API (the server re-checks every record) and the blessing gate on rollout starts
(both databases)."""

from __future__ import annotations

from typing import Any

import pytest
from fastapi.testclient import TestClient

from edgeota.evaluation.blessing import SliceMetrics, Thresholds, decide
from edgeota.evaluation.record import DatasetRef, EvaluationRecord, ReleaseRef
from ota_server.context import ServerContext

from .conftest import AUTH, BundleFactory, make_token, upload

DIGEST = "d" * 64


def _release(client: TestClient, make_bundle: BundleFactory, version: str) -> tuple[str, str]:
    body = upload(client, make_bundle(version, "x86")).json()
    return body["release_id"], body["bundle_sha256"]


def _metrics(rows: int, cand: int, base: int) -> list[SliceMetrics]:
    """One profile, one cohort; the candidate right only where the baseline is (when it is worse)."""
    both = min(cand, base)
    fields = dict(
        rows=rows,
        candidate_correct=cand,
        baseline_correct=base,
        candidate_only=cand - both,
        baseline_only=base - both,
    )
    return [
        SliceMetrics(level="overall", **fields),
        SliceMetrics(level="profile", profile="x86", **fields),
        SliceMetrics(level="cohort", profile="x86", cohort="north", **fields),
    ]


def _record(cand: tuple[str, str], base: tuple[str, str], metrics: list[SliceMetrics], **over: Any) -> dict[str, Any]:
    thresholds = Thresholds()
    record = EvaluationRecord(
        model_name="digits",
        candidate=ReleaseRef(release_id=cand[0], version=over.pop("cand_version", "1.1.0"), bundles={"x86": cand[1]}),
        baseline=ReleaseRef(release_id=base[0], version="1.0.0", bundles={"x86": base[1]}),
        dataset=DatasetRef(
            digest=DIGEST,
            model_name="digits",
            rows=metrics[0].rows,
            labelled_rows=metrics[0].rows,
            unlabelled_rows=0,
        ),
        thresholds=thresholds,
        metrics=metrics,
        verdict=decide(metrics, thresholds),
        evaluated_at="2026-12-07T08:00:00+00:00",
    )
    return {**record.model_dump(mode="json"), **over}


@pytest.fixture
def releases(client: TestClient, make_bundle: BundleFactory) -> dict[str, tuple[str, str]]:
    for i in range(3):
        resp = client.post("/api/v1/devices", json={"device_id": f"dev{i}", "hardware_profile": "x86"}, headers=AUTH)
        assert resp.status_code == 201, resp.text
    return {v: _release(client, make_bundle, v) for v in ("1.0.0", "1.1.0", "1.2.0")}


def _post(client: TestClient, body: dict[str, Any], headers: dict[str, str] = AUTH) -> Any:
    return client.post("/api/v1/evaluations", json=body, headers=headers)


def test_records_are_stored_with_the_servers_verdict_and_listed(
    client: TestClient, releases: dict[str, tuple[str, str]]
) -> None:
    base, cand = releases["1.0.0"], releases["1.1.0"]
    operator = make_token(client, "operator")
    resp = _post(client, _record(cand, base, _metrics(400, 360, 380)), operator)
    assert resp.status_code == 201, resp.text
    failed = resp.json()
    assert failed["blessed"] is False and failed["created_by"] == "token:operator"
    assert "overall: accuracy dropped 0.0500" in failed["record"]["verdict"]["reasons"][0]
    passed = _post(client, _record(cand, base, _metrics(400, 380, 380))).json()
    assert passed["blessed"] is True
    listed = client.get("/api/v1/evaluations", params={"release": cand[0]}, headers=AUTH).json()
    assert [e["evaluation_id"] for e in listed] == [passed["evaluation_id"], failed["evaluation_id"]]
    assert client.get("/api/v1/evaluations", params={"release": base[0]}, headers=AUTH).json() == []
    one = client.get(f"/api/v1/evaluations/{failed['evaluation_id']}", headers=AUTH).json()
    assert one == failed
    audit = client.get("/api/v1/audit", params={"action": "evaluation.create"}, headers=AUTH).json()
    assert [(a["entity_id"], a["after"]["blessed"]) for a in audit] == [(cand[0], False), (cand[0], True)]


def test_a_verdict_that_does_not_follow_from_the_metrics_is_refused(
    client: TestClient, releases: dict[str, tuple[str, str]]
) -> None:
    base, cand = releases["1.0.0"], releases["1.1.0"]
    body = _record(cand, base, _metrics(400, 300, 380))
    body["verdict"] = {**body["verdict"], "blessed": True, "reasons": []}
    resp = _post(client, body)
    assert resp.status_code == 422 and "does not follow from its metrics" in resp.json()["detail"]
    body.pop("verdict")  # without a verdict the server computes its own
    assert _post(client, body).json()["blessed"] is False


def test_bad_records_are_refused_and_nothing_is_stored(
    client: TestClient, releases: dict[str, tuple[str, str]]
) -> None:
    base, cand = releases["1.0.0"], releases["1.1.0"]
    good = _record(cand, base, _metrics(400, 380, 380))
    unknown = _record(("nosuchrelease", cand[1]), base, _metrics(400, 380, 380))
    assert _post(client, unknown).status_code == 404
    foreign = _record((cand[0], releases["1.2.0"][1]), base, _metrics(400, 380, 380))
    resp = _post(client, foreign)
    assert resp.status_code == 422 and "is not release" in resp.json()["detail"]
    assert _post(client, _record(cand, base, _metrics(400, 380, 380), cand_version="1.2.0")).status_code == 422
    assert _post(client, _record(base, base, _metrics(400, 380, 380))).status_code == 422
    other_model = {**good, "model_name": "faces", "dataset": {**good["dataset"], "model_name": "faces"}}
    resp = _post(client, other_model)
    assert resp.status_code == 422 and "the record says faces" in resp.json()["detail"]
    bad_sum = {**good, "metrics": [*good["metrics"][:2], {**good["metrics"][2], "rows": 390}]}
    bad_sum["verdict"] = None
    resp = _post(client, bad_sum)
    assert resp.status_code == 422 and "do not add up" in resp.json()["detail"]
    bad_threshold = {**good, "thresholds": {**good["thresholds"], "max_accuracy_drop": -1}}
    assert _post(client, bad_threshold).status_code == 422
    assert _post(client, {**good, "extra": 1}).status_code == 422
    assert _post(client, good, make_token(client, "viewer")).status_code == 403
    assert client.get("/api/v1/evaluations", headers=AUTH).json() == []
    assert client.get("/api/v1/evaluations/" + "0" * 32, headers=AUTH).status_code == 404


def _create(client: TestClient, release_id: str, **extra: Any) -> Any:
    body = {"release_id": release_id, "stages": [{"percent": 100}], **extra}
    return client.post("/api/v1/rollouts", json=body, headers=AUTH)


def test_an_unblessed_release_starts_only_with_an_audited_override(
    client: TestClient, releases: dict[str, tuple[str, str]]
) -> None:
    base, cand = releases["1.0.0"], releases["1.1.0"]
    evaluation = _post(client, _record(cand, base, _metrics(400, 300, 380))).json()["evaluation_id"]

    refused = _create(client, cand[0], start=True)
    assert refused.status_code == 409, refused.text
    detail = refused.json()["detail"]
    assert f"evaluation {evaluation}" in detail and "override" in detail and "\n" not in detail
    assert client.get("/api/v1/rollouts", headers=AUTH).json() == []  # nothing half-done
    assert _create(client, cand[0], start_at="2030-01-01T00:00:00Z").status_code == 409
    assert _create(client, cand[0], override_blessing="no start").status_code == 422  # a draft starts nothing

    started = _create(client, cand[0], start=True, override_blessing="hotfix for the north cohort")
    assert started.status_code == 201, started.text
    blessing = started.json()["blessing"]
    assert blessing["state"] == "not_blessed" and blessing["evaluation_id"] == evaluation
    assert blessing["overridden"] is True and blessing["override_reason"] == "hotfix for the north cohort"
    rollout_id = started.json()["rollout_id"]
    audit = client.get("/api/v1/audit", params={"action": "rollout.blessing_override"}, headers=AUTH).json()
    assert [(a["entity_id"], a["actor"], a["reason"]) for a in audit] == [
        (rollout_id, "bootstrap-admin", "hotfix for the north cohort")
    ]
    assert audit[0]["after"]["evaluation_id"] == evaluation
    shown = client.get(f"/api/v1/rollouts/{rollout_id}", headers=AUTH).json()
    assert shown["blessing"] == blessing


def test_the_start_command_is_gated_too(client: TestClient, releases: dict[str, tuple[str, str]]) -> None:
    base, cand = releases["1.0.0"], releases["1.1.0"]
    _post(client, _record(cand, base, _metrics(400, 300, 380)))
    draft = _create(client, cand[0]).json()
    assert draft["blessing"] is None
    path = f"/api/v1/rollouts/{draft['rollout_id']}"
    resp = client.post(f"{path}/start", json={}, headers=AUTH)
    assert resp.status_code == 409 and "is not blessed" in resp.json()["detail"]
    assert client.get(path, headers=AUTH).json()["state"] == "draft"
    assert client.post(f"{path}/pause", json={"override_blessing": "x"}, headers=AUTH).status_code == 422
    resp = client.post(f"{path}/start", json={"override_blessing": "accepted risk"}, headers=AUTH)
    assert resp.status_code == 200 and resp.json()["state"] == "running"
    assert resp.json()["blessing"]["overridden"] is True


def test_a_newer_blessed_evaluation_lifts_the_gate(client: TestClient, releases: dict[str, tuple[str, str]]) -> None:
    base, cand = releases["1.0.0"], releases["1.1.0"]
    _post(client, _record(cand, base, _metrics(400, 300, 380)))
    blessed = _post(client, _record(cand, base, _metrics(400, 380, 380))).json()["evaluation_id"]
    resp = _create(client, cand[0], start=True)
    assert resp.status_code == 201, resp.text
    assert resp.json()["blessing"] == {**resp.json()["blessing"], "state": "blessed", "evaluation_id": blessed}
    assert resp.json()["blessing"]["overridden"] is False
    assert client.get("/api/v1/audit", params={"action": "rollout.blessing_override"}, headers=AUTH).json() == []


def test_a_release_never_evaluated_starts_unless_blessing_is_required(
    client: TestClient, ctx: ServerContext, releases: dict[str, tuple[str, str]]
) -> None:
    resp = _create(client, releases["1.0.0"][0], start=True)
    assert resp.status_code == 201 and resp.json()["blessing"]["state"] == "not_evaluated"
    ctx.settings.require_blessing = True
    resp = _create(client, releases["1.1.0"][0], start=True)
    assert resp.status_code == 409 and "never evaluated" in resp.json()["detail"]
    resp = _create(client, releases["1.1.0"][0], start=True, override_blessing="first release of this model")
    assert resp.status_code == 201 and resp.json()["blessing"]["overridden"] is True


def test_with_several_releases_the_status_shows_the_override(
    client: TestClient, ctx: ServerContext, releases: dict[str, tuple[str, str]]
) -> None:
    """A rollout that may serve several releases (a bandit's arms) keeps one gate record per release; the status
    shows the most notable (an override)."""
    from ota_server.services.evaluations import check_blessing

    base, cand = releases["1.0.0"], releases["1.1.0"]
    _post(client, _record(cand, base, _metrics(400, 300, 380)))
    started = _create(client, base[0], start=True).json()
    assert started["blessing"]["state"] == "not_evaluated" and started["blessing"]["release_id"] == base[0]
    with ctx.sessions() as session:
        check_blessing(session, started["rollout_id"], cand[0], "arm-check", "second arm accepted", False)
        session.commit()
    shown = client.get(f"/api/v1/rollouts/{started['rollout_id']}", headers=AUTH).json()["blessing"]
    assert (shown["release_id"], shown["state"], shown["overridden"]) == (cand[0], "not_blessed", True)
