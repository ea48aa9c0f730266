"""The operator's "retry failed devices" command in the pure rollout state machine."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from edgeota_contract.states import DeploymentState as DS
from edgeota_contract.states import ReasonCode, RolloutState
from ota_server.rollout import engine_logic as el
from ota_server.rollout.plan import Gates, Plan, Stage

T0 = datetime(2026, 1, 1, tzinfo=UTC)
PLAN = Plan((Stage(percent=100),), Gates(min_devices=1), on_failure="pause")


def _view(state: RolloutState, deployments: dict[str, el.DeploymentView]) -> el.RolloutView:
    return el.RolloutView("r1", state, PLAN, ("a", "b", "c", "d"), 0, T0, None, frozenset(), deployments)


def _dep(device: str, state: DS, reason: ReasonCode = ReasonCode.OK) -> el.DeploymentView:
    return el.DeploymentView(device, 0, state, T0, 1, reason)


DEPLOYMENTS = {
    "a": _dep("a", DS.COMMITTED),
    "b": _dep("b", DS.FAILED, ReasonCode.SMOKE_TEST_FAILED),
    "c": _dep("c", DS.FAILED, ReasonCode.DOWNLOAD_FAILED),
    "d": _dep("d", DS.ROLLED_BACK, ReasonCode.HEALTH_FAILED),
}


@pytest.mark.parametrize("state", [RolloutState.PAUSED, RolloutState.RUNNING])
def test_retry_failed_retries_every_failed_device_and_keeps_the_state(state: RolloutState) -> None:
    effects = el.apply_command(_view(state, DEPLOYMENTS), "retry_failed", T0)
    # Failed for any reason (the operator decides), never rolled back (the device judged the bundle), no state change.
    assert effects == [el.Retry(("b", "c"))]


@pytest.mark.parametrize(
    "state", [RolloutState.DRAFT, RolloutState.COMPLETED, RolloutState.ABORTED, RolloutState.ROLLED_BACK]
)
def test_retry_failed_is_refused_outside_running_and_paused(state: RolloutState) -> None:
    with pytest.raises(el.TransitionError, match="cannot retry the failed devices"):
        el.apply_command(_view(state, DEPLOYMENTS), "retry_failed", T0)


def test_retry_failed_without_failed_devices_is_refused() -> None:
    ok = {"a": _dep("a", DS.COMMITTED), "d": _dep("d", DS.ROLLED_BACK, ReasonCode.HEALTH_FAILED)}
    with pytest.raises(el.TransitionError, match="no failed devices"):
        el.apply_command(_view(RolloutState.PAUSED, ok), "retry_failed", T0)
