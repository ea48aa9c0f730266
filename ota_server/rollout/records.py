"""The only code that writes a rollout's or a deployment's state onto its row.

Each writer checks the transition against its rule (:data:`~ota_server.rollout.deployment_rules.RULES`
for deployments, the effect's own check for rollouts) and changes the ORM row in the caller's
transaction; the caller's unit of work commits (:mod:`ota_server.rollout.unit_of_work`).
"""

from __future__ import annotations

import logging
from datetime import datetime
from typing import Any

from edgeota_contract.logs import log_event
from edgeota_contract.messages import new_id
from edgeota_contract.states import DeploymentState, ReasonCode, RolloutState
from ota_server.models import Deployment, Rollout
from ota_server.rollout import deployment_rules as rules
from ota_server.rollout.effects import SetState
from ota_server.rollout.plan import Selector, Targeting

log = logging.getLogger("edgeota.server.rollout")


def move(dep: Deployment, t: rules.Transition, now: datetime) -> bool:
    """Apply transition ``t`` to ``dep`` if its rule allows it from ``dep``'s state; False (unchanged) if not.

    The rule's fixed reason wins over the effect's; a ``None`` reason or detail keeps the row's.
    """
    rule = rules.RULES[t.rule]
    if not rules.allows(rule, DeploymentState(dep.state), t.state):
        log_event(log, "transition_refused", logging.DEBUG, deployment=dep.id, rule=t.rule, state=dep.state)
        return False
    dep.state = t.state.value
    reason = rule.reason if rule.reason is not None else t.reason
    if reason is not None:
        dep.reason = reason.value if isinstance(reason, ReasonCode) else reason
    if t.detail is not None:
        dep.detail = t.detail
    dep.updated_at = now
    return True


def server_move(dep: Deployment, rule: str, now: datetime, detail: str | None = None) -> bool:
    """Move ``dep`` by one of the server's own rules (fixed to-state and reason); False if not allowed."""
    to_state = rules.RULES[rule].to_state
    assert to_state is not None, f"rule {rule} takes its state from the event"
    return move(dep, rules.Transition(dep.id, rule, to_state, None, detail), now)


def mark_notified(dep: Deployment, now: datetime) -> None:
    """Give ``dep`` a fresh assignment id before a send; a pending one becomes ``notified``."""
    dep.assignment_id = new_id()
    dep.send_count += 1
    if dep.state == DeploymentState.PENDING.value and server_move(dep, "notify", now):
        dep.notified_at = now


def set_rollout_state(rollout: Rollout, effect: SetState, now: datetime) -> None:
    """Write ``effect`` (state, reason, detail, and the typed facts ``halted_by`` / ``reverted``).

    ``halted_by`` stays while the rollout is paused or ended by that gate, and is cleared when it runs
    again; ``reverted`` once set stays set.
    """
    rollout.state = effect.state.value
    rollout.reason = effect.reason.value
    rollout.detail = effect.detail
    if effect.halted_by is not None:
        rollout.halted_by = effect.halted_by.value
    elif effect.state == RolloutState.RUNNING:
        rollout.halted_by = None  # resumed: no gate holds it any more
    if effect.revert_ordered:
        rollout.reverted = True
    rollout.updated_at = now


def new_rollout(**fields: Any) -> Rollout:
    """A new rollout row: every rollout is born a ``draft``."""
    return Rollout(state=RolloutState.DRAFT.value, **fields)


def new_targeted_rollout(
    rollout_id: str, release_id: str, plan: dict[str, Any], selector: Selector, targeting: Targeting, actor: str
) -> Rollout:
    """A new draft rollout of ``release_id`` with its selection and targets as :func:`select_targets` found them."""
    return new_rollout(
        id=rollout_id,
        release_id=release_id,
        plan=plan,
        selector={
            "hardware_profiles": list(selector.hardware_profiles),
            "labels": dict(selector.labels),
            "device_ids": list(selector.device_ids),
        },
        targets=list(targeting.targets),
        no_bundle=list(targeting.no_bundle),
        skipped=list(targeting.skipped),
        current_stage=0,
        approved_stages=[],
        created_by=actor,
    )


def note(rollout: Rollout, text: str) -> None:
    """Append a note for people to the rollout's detail (never read by a decision)."""
    rollout.detail = (rollout.detail + f"; {text}").lstrip("; ")
