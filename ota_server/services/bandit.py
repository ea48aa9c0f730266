"""Creating a bandit rollout: two or more releases of one model (the arms) sharing the selected devices.

:func:`create_bandit` is what ``POST /api/v1/rollouts`` with ``strategy: bandit`` calls. The rollout is an
ordinary rollout row (``release_id`` = the first arm, the plan's single stage covers every target) whose plan
JSON carries a ``bandit`` section (:class:`~ota_server.rollout.bandit.BanditConfig`), plus one ``rollout_arms``
row per release. From then on the engine runs it with :mod:`ota_server.rollout.bandit_logic`, and the operator
commands (start, pause, resume, abort, rollback, retry_failed) work as on any rollout.

Targets: the devices the selector matches whose hardware profile has a bundle in **every** arm (any device may
be moved to any arm), leaving out devices that rolled back one of the arms' bundles on their own (as a staged
rollout does) and decommissioned devices.
"""

from __future__ import annotations

import random
import uuid
from dataclasses import replace
from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from edgeota_contract.states import DeploymentState, ReasonCode
from ota_server.context import ServerContext
from ota_server.errors import InvalidRequest, NotFound
from ota_server.models import Bundle, Deployment, Device, Release, RolloutArm, utcnow
from ota_server.rollout import engine_logic as el
from ota_server.rollout.apply import apply_effects, snapshot
from ota_server.rollout.bandit import BanditConfig
from ota_server.rollout.plan import DeviceInfo, Plan, Selector, Stage, Targeting, select_targets
from ota_server.rollout.records import new_targeted_rollout
from ota_server.rollout.unit_of_work import unit_of_work
from ota_server.services import audit
from ota_server.services.bandit_engine import BANDIT_KEY
from ota_server.services.evaluations import check_blessing
from ota_server.services.rollout_status import rollout_json
from ota_server.services.rollouts import advance, load_view, run_command


def arm_releases(session: Session, release_ids: list[str], config: BanditConfig, plan: Plan) -> list[Release]:
    """The arms' releases, checked: two or more distinct, all known, one model; a valid configuration.

    Raises InvalidRequest (one line) for a bad configuration, a repeated release, a shadow plan or arms of
    different models, and NotFound for an unknown release. Nothing is written.
    """
    seen: set[str] = set()
    for release_id in release_ids:
        if release_id in seen:
            raise InvalidRequest(f"release {release_id} is listed twice: each arm is a different release")
        seen.add(release_id)
    config.validate(len(release_ids))
    if plan.mode != "install":
        raise InvalidRequest("a bandit rollout installs its arms; it cannot be a shadow rollout")
    releases: list[Release] = []
    for release_id in release_ids:
        release = session.get(Release, release_id)
        if release is None:
            raise NotFound(f"release {release_id} not found")
        releases.append(release)
    models = sorted({r.model_name for r in releases})
    if len(models) > 1:
        raise InvalidRequest(f"the arms of a bandit must be releases of one model, got {', '.join(models)}")
    return releases


def bandit_targeting(session: Session, rollout_id: str, releases: list[Release], selector: Selector) -> Targeting:
    """Devices with a bundle in every arm, minus those that rolled back an arm's bundle by themselves."""
    profiles: set[str] | None = None
    shas: list[str] = []
    for release in releases:
        bundles = list(session.scalars(select(Bundle).where(Bundle.release_id == release.id)))
        mine = {b.hardware_profile for b in bundles}
        profiles = mine if profiles is None else profiles & mine
        shas.extend(b.sha256 for b in bundles)
    rolled_back = set(
        session.scalars(
            select(Deployment.device_id).where(
                Deployment.bundle_sha256.in_(shas),
                Deployment.mode == "install",
                Deployment.state == DeploymentState.ROLLED_BACK.value,
                Deployment.reason != ReasonCode.SERVER_ROLLBACK.value,
            )
        )
    )
    active = select(Device).where(Device.decommissioned_at.is_(None))
    devices = [DeviceInfo(d.id, d.hardware_profile, d.labels) for d in session.scalars(active)]
    return select_targets(rollout_id, selector, devices, profiles or set(), rolled_back)


def _preview(targeting: Targeting, releases: list[Release]) -> dict[str, Any]:
    """The dry run: one stage with every target, and the first placement per arm (round-robin in target order)."""
    split: dict[str, list[str]] = {r.id: [] for r in releases}
    for i, device in enumerate(targeting.targets):
        split[releases[i % len(releases)].id].append(device)
    return {
        "stages": [{"stage": 0, "cumulative": len(targeting.targets), "devices": list(targeting.targets)}],
        "no_bundle_for_profile": list(targeting.no_bundle),
        "skipped_rolled_back_before": list(targeting.skipped),
        "eligible": len(targeting.targets),
        "arms": [{"release_id": r.id, "version": r.version, "devices": split[r.id]} for r in releases],
    }


def create_bandit(
    ctx: ServerContext,
    release_ids: list[str],
    selector: Selector,
    plan: Plan,
    config: BanditConfig,
    actor: str,
    *,
    dry: bool = False,
    start: bool = False,
    start_at: datetime | None = None,
    allow_empty: bool = False,
    override_blessing: str | None = None,
) -> dict[str, Any]:
    """Create a bandit rollout in one unit of work (as :func:`ota_server.services.rollouts.create`).

    The plan's stages are replaced by one stage of every target. A ``seed`` of 0 is replaced by a random one
    (recorded in the plan). Each arm passes the blessing gate when the rollout starts. Raises what
    :func:`arm_releases` raises, InvalidRequest for a selection without targets (unless ``allow_empty``) and
    Conflict for an arm that is not blessed without an override reason. Nothing is stored on any error.
    """
    if override_blessing and not (start or start_at is not None):
        raise InvalidRequest("override_blessing applies only to a rollout that starts (start or start_at)")
    if config.seed == 0:
        config = BanditConfig(**{**config.to_json(), "seed": random.SystemRandom().randrange(1, 2**31)})
    with unit_of_work(ctx) as unit:
        session = unit.session
        releases = arm_releases(session, release_ids, config, plan)
        rollout_id = uuid.uuid4().hex
        targeting = bandit_targeting(session, rollout_id, releases, selector)
        preview = _preview(targeting, releases)
        if dry:
            return {"dry_run": True, **preview}
        if not targeting.targets and not allow_empty:
            raise InvalidRequest(
                f"the selection targets no device with a bundle for every arm ({len(targeting.no_bundle)} matched "
                f"without one, {len(targeting.skipped)} rolled an arm back before); use allow_empty to create it"
            )
        one_stage = replace(plan, stages=(Stage(percent=100.0),))
        plan_json = {**one_stage.to_json(), BANDIT_KEY: config.to_json()}
        rollout = new_targeted_rollout(rollout_id, releases[0].id, plan_json, selector, targeting, actor)
        session.add(rollout)
        session.flush()
        for position, release in enumerate(releases):
            session.add(RolloutArm(rollout_id=rollout.id, release_id=release.id, position=position, state="active"))
        audit.record(
            session,
            actor,
            "rollout.create",
            "rollout",
            rollout.id,
            None,
            {
                **snapshot(rollout),
                "strategy": "bandit",
                "arms": [{"release_id": r.id, "version": r.version} for r in releases],
                "bandit": config.to_json(),
                "targets": len(targeting.targets),
            },
        )
        session.flush()
        if start or start_at is not None:
            for release in releases:  # every arm may end up serving: each passes the blessing gate
                check_blessing(session, rollout.id, release.id, actor, override_blessing, ctx.settings.require_blessing)
        if start:
            run_command(session, rollout, "start", actor, "", unit.outbox)
            advance(session, ctx.store, rollout, actor, unit.outbox, ctx.metrics)
        elif start_at is not None:
            effects = el.schedule(load_view(session, rollout), start_at)
            apply_effects(session, rollout, effects, actor, utcnow(), unit.outbox)
        unit.mark_sends()
        session.flush()
        out = {**rollout_json(session, rollout), "preview": preview}
    return out
