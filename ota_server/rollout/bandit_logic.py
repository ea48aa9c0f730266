"""The bandit rollout's engine decisions: pure, over plain data, returning effects.

:func:`decide_bandit` is to a bandit rollout what :func:`ota_server.rollout.engine_logic.decide` is to a staged
one. One tick does the first of these that applies, in this order (safety first):

1. **Time-outs** (as the staged engine): open deployments silent for ``device_timeout_seconds`` fail.
2. **Health gates per arm**: an arm whose telemetry gates fail (each gate judged on that arm's release), or whose
   failure rate (over its devices' latest attempts, ``min_count_for_failure_rate`` finished at least) passes
   ``max_failure_rate``, is dropped (:data:`ARM_RULES` ``drop``) and all its devices that did not fail move at
   once to the best healthy arm (the highest probability of being best at the last step, else the highest
   posterior mean), whatever the maintenance windows, the move cap or ``max_concurrent``: like a rollback, it
   is a retreat. When no healthy arm is left, the rollout halts as a staged one does (``on_failure``: pause, or
   roll back every device to what it ran before the rollout).
3. **A winner** gets every device not failed, then the rollout completes naming it.
4. **Placement**: targets not yet placed are assigned round-robin over the healthy arms (in target order), and
   due retries re-run on the same arm; within the maintenance windows and ``max_concurrent``.
5. **An allocation step** every ``interval_seconds`` (:mod:`ota_server.rollout.bandit`): posteriors, Thompson
   draws with a recorded seed, target shares with the floor, capped moves of settled devices; or, when one arm
   has held ``win_probability`` for ``win_hold_seconds``, it wins (``win``) and the others retire (``retire``).

Telemetry gates that lack data do not hold anything here (a bandit has no stage to hold); their ``have`` of
``need`` is shown per arm. The effects of :mod:`ota_server.rollout.effects` that a bandit shares with staged
rollouts (time-outs, state, reverts, retries) are applied by :mod:`ota_server.rollout.apply`; the bandit's own
(:data:`BanditEffect`) by :mod:`ota_server.rollout.bandit_apply`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Literal

from edgeota_contract.states import ReasonCode, RolloutState
from ota_server.rollout import engine_logic as el
from ota_server.rollout.bandit import (
    BanditConfig,
    Move,
    Posterior,
    plan_moves,
    step_seed,
    target_shares,
    thompson,
    track_leader,
)
from ota_server.rollout.gate_results import GateResult, failed
from ota_server.rollout.plan import order_key

ArmState = Literal["active", "dropped", "winner", "retired"]


@dataclass(frozen=True)
class ArmRule:
    """One allowed arm transition: from-states, to-state (the guard is the decision that emits it)."""

    name: str
    from_states: frozenset[str]
    to_state: ArmState


ARM_RULES: Mapping[str, ArmRule] = {
    r.name: r
    for r in (
        ArmRule("drop", frozenset({"active", "winner"}), "dropped"),
        ArmRule("win", frozenset({"active"}), "winner"),
        ArmRule("retire", frozenset({"active"}), "retired"),
    )
}
"""Every arm transition there is; :func:`ota_server.rollout.bandit_apply.change_arm` refuses any other."""
LIVE_ARMS = frozenset({"active", "winner"})


@dataclass(frozen=True)
class ArmView:
    release_id: str
    version: str
    state: ArmState
    posterior: Posterior
    gate_results: tuple[GateResult, ...] = ()


@dataclass(frozen=True)
class LastStep:
    step: int
    at: datetime
    prob_best: Mapping[str, float]
    leader: str | None = None
    leader_since: datetime | None = None


@dataclass(frozen=True)
class BanditView:
    """A bandit rollout as the engine sees it. ``rollout.deployments``: each device's latest install attempt,
    on whichever arm; ``arm_of``: the arm (release id) of that attempt; ``arms`` in position order."""

    rollout: el.RolloutView
    config: BanditConfig
    arms: tuple[ArmView, ...]
    arm_of: Mapping[str, str] = field(default_factory=dict)
    last_step: LastStep | None = None


# ------------------------------------------------------------------ effects


@dataclass(frozen=True)
class AssignArm:
    """First placement of devices on an arm (new deployments of the arm's release)."""

    device_ids: tuple[str, ...]
    release_id: str


@dataclass(frozen=True)
class MoveDevices:
    """Move devices between arms: each gets a new attempt of its new arm's release (the old one is kept)."""

    moves: tuple[Move, ...]
    cause: Literal["step", "drop", "winner"]


@dataclass(frozen=True)
class ChangeArm:
    """Move an arm by rule ``rule`` of :data:`ARM_RULES`; ``gate`` names the gate that dropped it."""

    release_id: str
    rule: str
    detail: str
    gate: el.Gate | None = None
    gates: tuple[GateResult, ...] = ()


@dataclass(frozen=True)
class ArmFigures:
    """One arm at one step: its posterior, probability of being best, 95% interval, target share, devices."""

    release_id: str
    posterior: Posterior
    prob_best: float
    low: float
    high: float
    target_share: float
    placed: int


@dataclass(frozen=True)
class RecordStep:
    step: int
    at: datetime
    seed: int
    arms: tuple[ArmFigures, ...]
    moves: tuple[Move, ...]
    leader: str | None
    leader_since: datetime | None


BanditEffect = AssignArm | MoveDevices | ChangeArm | RecordStep
AnyEffect = el.Effect | BanditEffect


# ------------------------------------------------------------------ decisions


def placed_on(view: BanditView, deployments: Mapping[str, el.DeploymentView], arm: str) -> list[str]:
    """Devices whose latest attempt is on ``arm`` and did not fail (settled there or on their way)."""
    return sorted(
        d for d, dep in deployments.items() if view.arm_of.get(d) == arm and dep.state not in el.FAILED_STATES
    )


def _arm_counts(view: BanditView, deployments: Mapping[str, el.DeploymentView], arm: str) -> el.Counts:
    mine = {d: dep for d, dep in deployments.items() if view.arm_of.get(d) == arm}
    return el.count(mine, view.rollout.plan.max_retries)


def _unhealthy(view: BanditView, deployments: Mapping[str, el.DeploymentView], arm: ArmView) -> ChangeArm | None:
    """A ``drop`` for ``arm`` when one of its gates fails, else None."""
    bad = failed(arm.gate_results)
    if bad:
        detail = f"arm {arm.version}: " + "; ".join(g.describe() for g in bad)
        return ChangeArm(arm.release_id, "drop", detail, el.Gate.TELEMETRY, arm.gate_results)
    gates = view.rollout.plan.gates
    counts = _arm_counts(view, deployments, arm.release_id)
    if counts.finished >= max(1, gates.min_count_for_failure_rate):
        rate = counts.failed / counts.finished
        if rate > gates.max_failure_rate:
            detail = (
                f"arm {arm.version}: failure rate {rate:.2f} over {gates.max_failure_rate:.2f} "
                f"after {counts.finished} devices"
            )
            return ChangeArm(arm.release_id, "drop", detail, el.Gate.FAILURE_RATE, arm.gate_results)
    return None


def best_arm(arms: Sequence[ArmView], last: LastStep | None) -> ArmView:
    """The arm with the highest probability of being best at the last step, else the highest posterior mean."""

    def score(arm: ArmView) -> tuple[float, float]:
        prob = last.prob_best.get(arm.release_id, 0.0) if last is not None else 0.0
        return prob, arm.posterior.mean

    return max(arms, key=score)


def _halt(
    view: BanditView, deployments: Mapping[str, el.DeploymentView], gate: el.Gate, detail: str
) -> list[AnyEffect]:
    """No healthy arm left: pause, or roll every device back to what it ran before the rollout."""
    if view.rollout.plan.on_failure == "pause":
        return [el.SetState(RolloutState.PAUSED, ReasonCode.GATE_FAILED, detail, halted_by=gate)]
    out: list[AnyEffect] = [*el.revert_effects(deployments)]  # the same revert as every halt
    out.append(
        el.SetState(RolloutState.ROLLED_BACK, ReasonCode.GATE_FAILED, detail, halted_by=gate, revert_ordered=True)
    )
    return out


def _slots(view: BanditView, deployments: Mapping[str, el.DeploymentView]) -> int:
    gates = view.rollout.plan.gates
    if gates.max_concurrent is None:
        return len(deployments) + len(view.rollout.targets)
    active = sum(1 for d in deployments.values() if not d.state.terminal)
    return max(0, gates.max_concurrent - active)


def _settled(view: BanditView, deployments: Mapping[str, el.DeploymentView], arm: str) -> list[str]:
    """Devices committed on ``arm``, in the rollout's stable pseudo-random order (the order moves take them)."""
    rid = view.rollout.rollout_id
    committed = [d for d in placed_on(view, deployments, arm) if deployments[d].state == el.DS.COMMITTED]
    return sorted(committed, key=lambda d: order_key(rid, d))


def decide_bandit(view: BanditView, now: datetime) -> list[AnyEffect]:
    """The effects a running bandit rollout needs now (see the module docstring); an empty list means "wait"."""
    r = view.rollout
    if r.state != RolloutState.RUNNING:
        return []
    effects: list[AnyEffect] = []
    deployments = dict(r.deployments)
    timeout = r.plan.gates.device_timeout_seconds
    timed_out = tuple(
        sorted(
            d.device_id
            for d in deployments.values()
            if not d.state.terminal and (now - d.last_change).total_seconds() > timeout
        )
    )
    if timed_out:
        effects.append(el.TimeOut(timed_out))
        for device_id in timed_out:
            old = deployments[device_id]
            deployments[device_id] = el.DeploymentView(
                device_id, old.stage, el.DS.FAILED, now, old.attempt, ReasonCode.DEVICE_TIMEOUT
            )

    live = [a for a in view.arms if a.state in LIVE_ARMS]
    drops = [c for c in (_unhealthy(view, deployments, a) for a in live) if c is not None]
    if drops:
        dropped = {c.release_id for c in drops}
        healthy = [a for a in live if a.release_id not in dropped]
        if not healthy:
            detail = "every arm failed its gates: " + "; ".join(c.detail for c in drops)
            gate = drops[0].gate or el.Gate.FAILURE_RATE
            return [*effects, *_halt(view, deployments, gate, detail)]
        to = best_arm(healthy, view.last_step).release_id
        moves = tuple(Move(d, c.release_id, to) for c in drops for d in placed_on(view, deployments, c.release_id))
        return [*effects, *drops, *([MoveDevices(moves, "drop")] if moves else [])]

    winner = next((a for a in view.arms if a.state == "winner"), None)
    if winner is not None:
        return [*effects, *_finish(view, deployments, winner, now)]

    placement = _placement(view, deployments, live, now)
    if placement:
        return [*effects, *placement]

    last = view.last_step
    if last is None or (now - last.at).total_seconds() >= view.config.interval_seconds:
        effects.extend(_step(view, deployments, live, now))
    return effects


def _finish(
    view: BanditView, deployments: Mapping[str, el.DeploymentView], winner: ArmView, now: datetime
) -> list[AnyEffect]:
    """Give the winner every device that did not fail; once all are settled there, complete."""
    others = [a.release_id for a in view.arms if a.release_id != winner.release_id]
    off = [Move(d, arm, winner.release_id) for arm in others for d in _settled(view, deployments, arm)]
    if off:
        if not view.rollout.plan.may_assign(now):
            return []
        off = off[: _slots(view, deployments)]
        return [MoveDevices(tuple(off), "winner")] if off else []
    if any(not d.state.terminal for d in deployments.values()):
        return []  # moves (or retries) still on their way
    if any(placed_on(view, deployments, arm) for arm in others):
        return []  # a device on a loser that is not settled yet: it is moved once it is
    on_winner = len(placed_on(view, deployments, winner.release_id))
    prob = view.last_step.prob_best.get(winner.release_id) if view.last_step is not None else None
    odds = f" (probability best {prob:.3f})" if prob is not None else ""
    detail = f"bandit winner {winner.version}{odds}: {on_winner} devices run it"
    return [el.SetState(RolloutState.COMPLETED, ReasonCode.OK, detail)]


def _placement(
    view: BanditView, deployments: Mapping[str, el.DeploymentView], live: Sequence[ArmView], now: datetime
) -> list[AnyEffect]:
    """Place new targets round-robin over the healthy arms; re-run due retries on their arm."""
    r = view.rollout
    due = tuple(sorted(d.device_id for d in deployments.values() if el.retry_due(d, r.plan, now)))
    new = [d for d in r.targets if d not in deployments]
    if not (due or new) or not live or not r.plan.may_assign(now):
        return []
    slots = _slots(view, deployments)
    out: list[AnyEffect] = []
    retry = due[:slots]
    if retry:
        out.append(el.Retry(retry))
    index = {d: i for i, d in enumerate(r.targets)}
    by_arm: dict[str, list[str]] = {}
    for device in new[: slots - len(retry)]:
        arm = live[index[device] % len(live)].release_id
        by_arm.setdefault(arm, []).append(device)
    out.extend(AssignArm(tuple(ids), arm) for arm, ids in by_arm.items())
    return out


def _step(
    view: BanditView, deployments: Mapping[str, el.DeploymentView], live: Sequence[ArmView], now: datetime
) -> list[AnyEffect]:
    """One allocation step: Thompson draws, target shares, capped moves; or a winner."""
    cfg = view.config
    last = view.last_step
    number = (last.step + 1) if last is not None else 1
    seed = step_seed(cfg.seed, number)
    ids = [a.release_id for a in live]
    sampling = thompson([a.posterior for a in live], cfg.draws, seed)
    shares = target_shares(sampling.prob_best, cfg.floor)
    placed = {a: len(placed_on(view, deployments, a)) for a in ids}
    leader, since = track_leader(
        ids,
        sampling.prob_best,
        cfg.win_probability,
        last.leader if last is not None else None,
        last.leader_since if last is not None else None,
        now,
    )
    figures = tuple(
        ArmFigures(a.release_id, a.posterior, p, lo, hi, share, placed[a.release_id])
        for a, p, lo, hi, share in zip(live, sampling.prob_best, sampling.low, sampling.high, shares, strict=True)
    )
    wins = leader is not None and since is not None and (now - since).total_seconds() >= cfg.win_hold_seconds
    if wins:
        assert leader is not None
        won = next(a for a in live if a.release_id == leader)
        held = (now - since).total_seconds() if since is not None else 0.0
        detail = (
            f"probability best {sampling.prob_best[ids.index(leader)]:.3f} held {held:.0f} s "
            f"(threshold {cfg.win_probability})"
        )
        retire = [ChangeArm(a.release_id, "retire", f"arm {won.version} won") for a in live if a.release_id != leader]
        return [
            RecordStep(number, now, seed, figures, (), leader, since),
            ChangeArm(leader, "win", f"arm {won.version} won: {detail}"),
            *retire,
        ]
    moves: tuple[Move, ...] = ()
    if view.rollout.plan.may_assign(now):
        cap = min(cfg.max_moves, _slots(view, deployments))
        movable = {a: _settled(view, deployments, a) for a in ids}
        moves = plan_moves(placed, dict(zip(ids, shares, strict=True)), cfg.floor, movable, cap)
    out: list[AnyEffect] = [RecordStep(number, now, seed, figures, moves, leader, since)]
    if moves:
        out.append(MoveDevices(moves, "step"))
    return out
