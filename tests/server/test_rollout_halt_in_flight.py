"""A halt that reverts orders back at once the devices whose install is still in flight.

The pure parts (which effects each deployment state gets, the rules for the late commit, the check-in and the
rollback's ``committed``, and the agent's verdict on a rollback that arrives while it installs), then through the API, the engine and the ingest batch function on SQLite and
PostgreSQL: a rollback sends the in-flight devices their rollback assignment in the same unit of work, the
install they finish late makes no second rollback, a check-in while they are still busy does not count the
rollback done, the revert summary ends with every device reverted; and ``revert_devices`` runs a constant
number of queries for any number of devices, with a bounded note of the devices it cannot revert.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import event, select

from device_agent.store import AgentState, SlotInfo
from device_agent.update import machine
from device_agent.update.checks import Verdict
from device_agent.update.checks import decide as agent_decide
from edgeota_contract.messages import Assignment
from edgeota_contract.states import DeploymentState as DS
from edgeota_contract.states import ReasonCode, RolloutState
from ota_server.context import ServerContext
from ota_server.engine import tick
from ota_server.models import Deployment, Rollout
from ota_server.rollout import deployment_rules as rules
from ota_server.rollout import engine_logic as el
from ota_server.rollout.deployments import revert_devices
from ota_server.rollout.plan import Gates, Plan, Stage
from ota_server.rollout.unit_of_work import Outbox

from .conftest import AUTH, BundleFactory, upload
from .helpers import assignments, checkin, finish, report

T0 = datetime(2026, 1, 1, tzinfo=UTC)
SENT_NOT_UPDATED = {DS.NOTIFIED, DS.DOWNLOADING, DS.DOWNLOADED, DS.VERIFYING}
UPDATED = {DS.INSTALLING, DS.TRIAL, DS.COMMITTED}

# ------------------------------------------------------------------ pure: which devices a halt orders back


def _ids(effects: list[el.Effect], kind: type[el.CancelDeployments] | type[el.RevertDevices]) -> set[str]:
    return {d for e in effects if isinstance(e, kind) for d in e.device_ids}


@pytest.mark.parametrize("state", list(DS))
def test_a_halt_cancels_what_is_open_and_not_yet_there_and_reverts_whatever_was_sent(state: DS) -> None:
    effects = el.revert_effects({"d0": el.DeploymentView("d0", 0, state, T0)})
    assert ("d0" in _ids(effects, el.CancelDeployments)) == (state in SENT_NOT_UPDATED or state == DS.PENDING)
    assert ("d0" in _ids(effects, el.RevertDevices)) == (state in SENT_NOT_UPDATED | UPDATED)


MIXED = {
    "p": DS.PENDING,
    "n": DS.NOTIFIED,
    "dl": DS.DOWNLOADING,
    "v": DS.VERIFYING,
    "i": DS.INSTALLING,
    "c": DS.COMMITTED,
    "f": DS.FAILED,
}
PLAN = Plan((Stage(percent=100),), Gates(max_failure_rate=0.1, min_count_for_failure_rate=1, min_devices=1))


def _view(state: RolloutState = RolloutState.RUNNING) -> el.RolloutView:
    deployments = {d: el.DeploymentView(d, 0, s, T0) for d, s in MIXED.items()}
    return el.RolloutView("r1", state, PLAN, tuple(MIXED), 0, T0, None, frozenset(), deployments)


@pytest.mark.parametrize("how", ["rollback", "abort_revert", "gate"])
def test_every_halt_that_reverts_sends_the_in_flight_devices_back_in_one_unit_of_work(how: str) -> None:
    if how == "gate":  # "f" failed: 1 of 2 finished is over the 10% failure-rate gate
        effects = el.decide(_view(), T0)
    else:
        effects = el.apply_command(_view(), "rollback" if how == "rollback" else "abort_revert")
    assert effects[:2] == [
        el.CancelDeployments(("dl", "n", "p", "v")),
        el.RevertDevices(("c", "dl", "i", "n", "v")),
    ]
    last = effects[-1]
    assert isinstance(last, el.SetState) and last.revert_ordered


def test_abort_without_revert_still_cancels_only_the_pending() -> None:
    effects = el.apply_command(_view(), "abort")
    assert _ids(effects, el.CancelDeployments) == {"p"} and not _ids(effects, el.RevertDevices)


# ------------------------------------------------------------------ pure: the rules after such a halt


def _facts(id_: str, mode: str, bundle: str, state: DS, **kw: Any) -> rules.DeploymentFacts:
    version = {"new": "1.1.0", "old": "1.0.0"}[bundle]
    counter = {"new": 2, "old": 1}[bundle]
    return rules.DeploymentFacts(id_, "d0", mode, "digits", version, bundle, counter, state, **kw)


CANCELLED = _facts(
    "inst",
    "install",
    "new",
    DS.FAILED,
    reason=ReasonCode.CANCELLED.value,
    reverted_by="back",
    rollout_revert_ordered=True,
)
BACK = _facts("back", "rollback", "old", DS.NOTIFIED, reason=ReasonCode.SERVER_ROLLBACK.value)
RUNS_OLD = {"digits": rules.RunningFacts("digits", "1.0.0", "old", 1, serving=True)}


def test_the_late_commit_of_a_cancelled_install_asks_for_the_revert_again() -> None:
    # RevertLate finds the rollback deployment the halt made (revert_devices keeps one per rollout and device)
    outcome = rules.on_status_report(CANCELLED, DS.COMMITTED, ReasonCode.OK, "")
    assert outcome.ignored == "stale"
    assert outcome.effects == [rules.RecordRunning("d0", "new"), rules.RevertLate("inst")]


def test_the_rollback_committing_never_lands_the_cancelled_install() -> None:
    outcome = rules.on_status_report(BACK, DS.COMMITTED, ReasonCode.OK, "", reverted=[CANCELLED])
    assert outcome.effects == [
        rules.Transition("back", "report", DS.COMMITTED, ReasonCode.OK, ""),
        rules.RecordRunning("d0", "old"),
    ]


def test_a_checkin_while_the_device_still_runs_the_cancelled_install_does_not_count_the_rollback_done() -> None:
    busy = rules.on_checkin([CANCELLED, BACK], RUNS_OLD, "inst", DS.DOWNLOADING)
    assert busy == [rules.Resend(("back",))]
    idle = rules.on_checkin([CANCELLED, BACK], RUNS_OLD, None, None)
    assert idle == [
        rules.Transition("back", "checkin_runs_it", DS.COMMITTED, ReasonCode.OK, "reconciled from check-in")
    ]
    other = rules.DeploymentFacts("x", "d0", "install", "other", "2.0.0", "sha-x", 5, DS.DOWNLOADING)
    busy_elsewhere = rules.on_checkin([CANCELLED, BACK, other], RUNS_OLD, "x", DS.DOWNLOADING)
    assert rules.Transition("back", "checkin_runs_it", DS.COMMITTED, ReasonCode.OK, "reconciled from check-in") in (
        busy_elsewhere
    )


# ------------------------------------------------------------------ the device side the halt relies on


def _assignment(deployment_id: str, mode: str, sha: str, version: str) -> Assignment:
    now = datetime.now(UTC)
    return Assignment(
        deployment_id=deployment_id,
        device_id="d0",
        mode=mode,  # type: ignore[arg-type]
        model_name="digits",
        version=version,
        release_counter=1 if version == "1.0.0" else 2,
        hardware_profile="x86",
        bundle_sha256=sha,
        bundle_size=1,
        bundle_url="/b",
        issued_at=now,
        expires_at=now + timedelta(hours=1),
    )


OLD_SHA, NEW_SHA = "a" * 64, "b" * 64


def test_the_agent_queues_the_rollback_that_arrives_while_it_installs_and_commits_it_at_once_when_idle() -> None:
    install = _assignment("inst", "install", NEW_SHA, "1.1.0")
    back = _assignment("back", "rollback", OLD_SHA, "1.0.0")
    # decide reads only the active slot's sha256: no manifest needed for this check
    slot = SlotInfo.model_construct(manifest=None, bundle_sha256=OLD_SHA)  # type: ignore[arg-type]
    runs_old = AgentState(active_slot="a", slots={"a": slot, "b": None})
    busy = runs_old.model_copy(update={"deployment": machine.start(install, "b", "a")})
    assert agent_decide(back, busy, "x86").verdict == Verdict.QUEUE  # runs next, after the cancelled install
    # The install never reached the device: it runs the previous bundle, so the rollback is done at once.
    assert agent_decide(back, runs_old, "x86").verdict == Verdict.ALREADY_INSTALLED


# ------------------------------------------------------------------ through the API, engine and ingest


def _fleet(
    client: TestClient, ctx: ServerContext, make_bundle: BundleFactory, devices: list[str], with_old: bool = True
) -> str:
    """``devices`` registered (running 1.0.0 when ``with_old``), then 1.1.0 rolled out to them; its rollout id."""
    for dev in devices:
        client.post("/api/v1/devices", json={"device_id": dev, "hardware_profile": "x86"}, headers=AUTH)
    old = upload(client, make_bundle("1.0.0", "x86")).json()["release_id"]
    new = upload(client, make_bundle("1.1.0", "x86")).json()["release_id"]
    selector = {"device_ids": devices}
    if with_old:
        body = {"release_id": old, "selector": selector, "stages": [{"percent": 100}], "start": True}
        assert client.post("/api/v1/rollouts", json=body, headers=AUTH).status_code == 201
        for dev in devices:
            finish(ctx, assignments(ctx, dev)[-1])
        tick(ctx)
    body = {"release_id": new, "selector": selector, "stages": [{"percent": 100}], "start": True}
    resp = client.post("/api/v1/rollouts", json=body, headers=AUTH)
    assert resp.status_code == 201, resp.text
    rid: str = resp.json()["rollout_id"]
    return rid


def _rows(ctx: ServerContext, rid: str, mode: str) -> dict[str, list[Deployment]]:
    out: dict[str, list[Deployment]] = {}
    with ctx.sessions() as session:
        for dep in session.scalars(select(Deployment).where(Deployment.rollout_id == rid, Deployment.mode == mode)):
            session.expunge(dep)
            out.setdefault(dep.device_id, []).append(dep)
    return out


def test_a_rollback_reaches_in_flight_devices_at_once_and_all_end_reverted(
    client: TestClient, ctx: ServerContext, make_bundle: BundleFactory
) -> None:
    fleet = ["h0", "h1", "h2", "h3"]
    rid = _fleet(client, ctx, make_bundle, fleet)
    v2 = {dev: assignments(ctx, dev)[-1] for dev in fleet}
    finish(ctx, v2["h0"])  # updated
    report(ctx, v2["h1"], DS.DOWNLOADING)  # in flight
    report(ctx, v2["h2"], DS.VERIFYING)  # in flight
    # h3: sent (notified), its assignment never reached the device
    resp = client.post(f"/api/v1/rollouts/{rid}/rollback", headers=AUTH)
    assert resp.status_code == 200 and resp.json()["state"] == "rolled_back"

    # Sent at once, by the rollback's own unit of work: no late report needed.
    back = {dev: assignments(ctx, dev)[-1] for dev in fleet}
    assert {(a.mode, a.version) for a in back.values()} == {("rollback", "1.0.0")}
    installs = _rows(ctx, rid, "install")
    rollbacks = _rows(ctx, rid, "rollback")
    for dev in ("h1", "h2", "h3"):
        (inst,) = installs[dev]
        assert (inst.state, inst.reason) == (DS.FAILED.value, ReasonCode.CANCELLED.value)
        assert inst.reverted_by == rollbacks[dev][0].id
    status = client.get(f"/api/v1/rollouts/{rid}", headers=AUTH).json()
    assert status["revert"] == {"ordered": 4, "reverted": 0, "pending": 4, "not_reverted": 0}

    # h1 still installs 1.1.0 (it never heard the cancel); its check-in meanwhile shows 1.0.0 and its busy
    # install: the queued rollback is not done yet.
    assert checkin(ctx, "h1", "x86", models=[back["h1"]], active=v2["h1"].deployment_id) == "ok"
    assert _rows(ctx, rid, "rollback")["h1"][0].state != DS.COMMITTED.value
    for state in (DS.INSTALLING, DS.TRIAL, DS.COMMITTED):
        report(ctx, v2["h1"], state)  # the late commit: recorded, no second rollback
    finish(ctx, back["h1"])  # then the device runs the rollback it queued
    report(ctx, v2["h2"], DS.FAILED, ReasonCode.DOWNLOAD_FAILED)  # h2's install fails on its own
    finish(ctx, back["h2"])
    report(ctx, back["h3"], DS.COMMITTED)  # h3 runs 1.0.0 already: the agent commits at once
    finish(ctx, back["h0"])

    rollbacks = _rows(ctx, rid, "rollback")
    assert {dev: len(deps) for dev, deps in rollbacks.items()} == dict.fromkeys(fleet, 1)
    assert {len({a.deployment_id for a in assignments(ctx, dev) if a.mode == "rollback"}) for dev in fleet} == {1}
    installs = _rows(ctx, rid, "install")
    assert (installs["h0"][0].state, installs["h0"][0].reason) == (DS.ROLLED_BACK.value, "server_rollback")
    for dev in ("h1", "h2", "h3"):  # a cancelled install is never landed
        assert (installs[dev][0].state, installs[dev][0].reason) == (DS.FAILED.value, ReasonCode.CANCELLED.value)
    status = client.get(f"/api/v1/rollouts/{rid}", headers=AUTH).json()
    assert status["revert"] == {"ordered": 4, "reverted": 4, "pending": 0, "not_reverted": 0}
    assert status["rollback_counts"] == {"committed": 4}


@contextmanager
def _selects(ctx: ServerContext) -> Iterator[list[str]]:
    seen: list[str] = []

    def count(_conn: Any, _cursor: Any, statement: str, *_rest: Any) -> None:
        if statement.lstrip().upper().startswith("SELECT"):
            seen.append(statement)

    event.listen(ctx.engine, "before_cursor_execute", count)
    try:
        yield seen
    finally:
        event.remove(ctx.engine, "before_cursor_execute", count)


def _revert(ctx: ServerContext, rid: str, devices: list[str]) -> tuple[list[str], int]:
    """``revert_devices`` in its own committed transaction: (new rollback ids, SELECT statements it ran)."""
    with ctx.sessions() as session, session.begin():
        rollout = session.get(Rollout, rid)
        assert rollout is not None
        session.scalars(select(Deployment).where(Deployment.rollout_id == rid)).all()  # warm the identity map
        with _selects(ctx) as seen:
            new = revert_devices(session, rollout, tuple(devices), "test", datetime.now(UTC), Outbox())
        return new, len(seen)


@pytest.mark.parametrize("id_list_max", [None, 4], ids=["id-lists", "past-the-id-list-limit"])
def test_revert_devices_runs_a_constant_number_of_queries_with_the_same_results(
    client: TestClient,
    ctx: ServerContext,
    make_bundle: BundleFactory,
    monkeypatch: pytest.MonkeyPatch,
    id_list_max: int | None,
) -> None:
    fleet = [f"q{i:02d}" for i in range(24)]
    rid = _fleet(client, ctx, make_bundle, fleet)
    if id_list_max is not None:  # more devices than an id list may hold: filtered over the whole rollout
        monkeypatch.setattr("ota_server.rollout.deployments.LOOKUP_CHUNK", id_list_max)
    few, few_queries = _revert(ctx, rid, fleet[:2])
    many, many_queries = _revert(ctx, rid, fleet[2:])
    assert len(few) == 2 and len(many) == 22
    assert few_queries == many_queries <= 3
    again, again_queries = _revert(ctx, rid, fleet)  # one rollback per (rollout, device): nothing new
    assert again == [] and again_queries == few_queries
    installs = _rows(ctx, rid, "install")
    rollbacks = _rows(ctx, rid, "rollback")
    assert sorted(d.id for ds in rollbacks.values() for d in ds) == sorted(few + many)
    for dev in fleet:
        (back,) = rollbacks[dev]
        assert (back.version, back.state, back.reason) == ("1.0.0", DS.PENDING.value, "server_rollback")
        assert back.previous_bundle_sha256 == installs[dev][0].bundle_sha256
        assert installs[dev][0].reverted_by == back.id


def test_the_note_of_devices_without_a_previous_bundle_stays_short(
    client: TestClient, ctx: ServerContext, make_bundle: BundleFactory
) -> None:
    fleet = [f"n{i:02d}" for i in range(25)]
    rid = _fleet(client, ctx, make_bundle, fleet, with_old=False)  # they ran nothing before 1.1.0
    new, _queries = _revert(ctx, rid, fleet)
    assert new == [] and _rows(ctx, rid, "rollback") == {}
    with ctx.sessions() as session:
        rollout = session.get(Rollout, rid)
        assert rollout is not None
        assert rollout.detail.endswith(f"no previous bundle to revert: {', '.join(fleet[:20])} and 5 more")


def test_a_halt_reverts_a_device_whose_previous_bundle_the_server_learnt_only_after_assigning(
    client: TestClient, ctx: ServerContext, make_bundle: BundleFactory
) -> None:
    """1.1.0 was assigned while the device's 1.0.0 install was still in flight (superseded, previous bundle unknown);
    the late commit of 1.0.0 then recorded what the device runs. The halt reverts it to 1.0.0, not "no previous
    bundle" (seen at 10,000 devices: 779 devices left on 1.1.0)."""
    client.post("/api/v1/devices", json={"device_id": "p0", "hardware_profile": "x86"}, headers=AUTH)
    old = upload(client, make_bundle("1.0.0", "x86")).json()["release_id"]
    new = upload(client, make_bundle("1.1.0", "x86")).json()["release_id"]
    for release in (old, new):
        body = {"release_id": release, "selector": {"device_ids": ["p0"]}, "stages": [{"percent": 100}], "start": True}
        assert client.post("/api/v1/rollouts", json=body, headers=AUTH).status_code == 201
        tick(ctx)
    v1, v2 = (a for a in assignments(ctx, "p0") if a.mode == "install")
    installs = {d.version: d for d in _rows(ctx, _rollout_of(ctx, v2.deployment_id), "install")["p0"]}
    assert installs["1.1.0"].previous_bundle_sha256 is None  # unknown when it was assigned
    finish(ctx, v1)  # the superseded install commits late: the server now knows the device runs 1.0.0
    rid = _rollout_of(ctx, v2.deployment_id)
    assert client.post(f"/api/v1/rollouts/{rid}/rollback", headers=AUTH).status_code == 200
    back = assignments(ctx, "p0")[-1]
    assert (back.mode, back.version, back.bundle_sha256) == ("rollback", "1.0.0", v1.bundle_sha256)


def _rollout_of(ctx: ServerContext, deployment_id: str) -> str:
    with ctx.sessions() as session:
        dep = session.get(Deployment, deployment_id)
        assert dep is not None and dep.rollout_id is not None
        return dep.rollout_id
