"""The bandit's pure allocation and engine decisions, fed with plain data (no database, no broker)."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta

import pytest

from edgeota_contract.states import DeploymentState as DS
from edgeota_contract.states import RolloutState
from ota_server.errors import InvalidRequest
from ota_server.rollout import bandit_logic as bl
from ota_server.rollout import engine_logic as el
from ota_server.rollout.bandit import (
    BanditConfig,
    Move,
    floor_count,
    plan_moves,
    posterior,
    step_seed,
    target_shares,
    thompson,
    track_leader,
)
from ota_server.rollout.gate_results import GateResult
from ota_server.rollout.plan import Gates, Plan, Stage

T0 = datetime(2026, 1, 1, tzinfo=UTC)


# ------------------------------------------------------------------ pure allocation


def test_posterior_counts_rewards_and_clamps() -> None:
    p = posterior(10, 7.5)
    assert (p.alpha, p.beta, p.count, p.total) == (8.5, 3.5, 10, 7.5)
    assert posterior(3, 9.0).alpha == 4.0 and posterior(3, 9.0).beta == 1.0  # a sum above the count is clamped
    assert posterior(0, 0.0).mean == 0.5


def test_thompson_is_reproducible_from_its_seed_and_sums_to_one() -> None:
    arms = [posterior(50, 20.0), posterior(50, 30.0), posterior(5, 3.0)]
    first = thompson(arms, 3000, 1234)
    assert first == thompson(arms, 3000, 1234)
    assert thompson(arms, 3000, 1235) != first
    assert sum(first.prob_best) == pytest.approx(1.0)
    assert first.prob_best[1] > first.prob_best[0]
    for low, high, p in zip(first.low, first.high, arms, strict=True):
        assert low < p.mean < high


def test_step_seeds_differ_per_step_and_repeat_per_base_seed() -> None:
    seeds = {step_seed(42, n) for n in range(1, 100)}
    assert len(seeds) == 99 and step_seed(42, 7) == step_seed(42, 7)


def test_target_shares_keep_the_floor_and_sum_to_one() -> None:
    assert target_shares([1.0, 0.0], 0.1) == pytest.approx((0.9, 0.1))
    assert target_shares([0.5, 0.5], 0.1) == pytest.approx((0.5, 0.5))
    assert target_shares([0.2, 0.3, 0.5], 1 / 3) == pytest.approx((1 / 3, 1 / 3, 1 / 3))
    rng = random.Random(3)
    for _ in range(200):
        k = rng.randint(2, 5)
        raw = [rng.random() for _ in range(k)]
        probs = [r / sum(raw) for r in raw]
        floor = rng.uniform(0, 1 / k)
        shares = target_shares(probs, floor)
        assert sum(shares) == pytest.approx(1.0)
        assert min(shares) >= floor - 1e-12


def test_floor_count_rounds_up_when_the_devices_suffice() -> None:
    assert floor_count(4, 2, 0.1) == 1  # ceil(0.4)
    assert floor_count(10, 2, 0.25) == 3
    assert floor_count(2, 3, 0.3) == 0  # 3 arms cannot each keep one of 2 devices
    assert floor_count(10, 2, 0.0) == 0


def _settle(placed: dict[str, int]) -> dict[str, list[str]]:
    return {arm: [f"{arm}-{i}" for i in range(n)] for arm, n in placed.items()}


def test_moves_respect_the_floor_and_the_cap() -> None:
    placed = {"a": 5, "b": 5}
    moves = plan_moves(placed, {"a": 0.9, "b": 0.1}, 0.1, _settle(placed), max_moves=10)
    assert len(moves) == 4 and all(m.from_arm == "b" and m.to_arm == "a" for m in moves)
    capped = plan_moves(placed, {"a": 0.9, "b": 0.1}, 0.1, _settle(placed), max_moves=2)
    assert len(capped) == 2
    # floor 0.25 of 10 devices: b keeps ceil(2.5) = 3 even when a is certainly best
    floored = plan_moves(placed, {"a": 0.75, "b": 0.25}, 0.25, _settle(placed), max_moves=10)
    assert len(floored) == 2


def test_moves_take_only_settled_devices_and_never_chase_noise() -> None:
    placed = {"a": 5, "b": 5}
    only_two = {"a": [], "b": ["b-1", "b-2"]}
    moves = plan_moves(placed, {"a": 0.9, "b": 0.1}, 0.1, only_two, max_moves=10)
    assert moves == (Move("b-1", "b", "a"), Move("b-2", "b", "a"))
    odd = {"a": 3, "b": 2}
    assert plan_moves(odd, {"a": 0.49, "b": 0.51}, 0.1, _settle(odd), max_moves=10) == ()  # within one device


def test_the_floor_holds_for_any_probabilities() -> None:
    rng = random.Random(11)
    for _ in range(300):
        k = rng.randint(2, 4)
        arms = [f"r{i}" for i in range(k)]
        placed = {a: rng.randint(0, 12) for a in arms}
        n = sum(placed.values())
        floor = rng.uniform(0, 1 / k)
        raw = [rng.random() ** 4 for _ in arms]
        shares = dict(zip(arms, target_shares([r / sum(raw) for r in raw], floor), strict=True))
        moves = plan_moves(placed, shares, floor, _settle(placed), max_moves=1000)
        after = dict(placed)
        for m in moves:
            after[m.from_arm] -= 1
            after[m.to_arm] += 1
        least = floor_count(n, k, floor)
        assert sum(after.values()) == n
        for arm in arms:  # no arm is taken below its floor (an arm already under it is only given to)
            assert after[arm] >= min(placed[arm], least)


def test_allocation_converges_toward_the_better_arm_over_many_seeds() -> None:
    """A simulated fleet: 20 devices, each serving 5 labelled requests per step; B is right 70%, A 40%."""
    finals = []
    for seed in range(40):
        rng = random.Random(seed)
        rates = {"a": 0.4, "b": 0.7}
        placed = {"a": 10, "b": 10}
        totals = {"a": [0, 0.0], "b": [0, 0.0]}
        for step in range(1, 31):
            for arm, n in placed.items():
                for _ in range(5 * n):
                    totals[arm][0] += 1
                    totals[arm][1] += 1.0 if rng.random() < rates[arm] else 0.0
            posts = [posterior(int(totals[a][0]), totals[a][1]) for a in ("a", "b")]
            sampling = thompson(posts, 500, step_seed(seed, step))
            shares = dict(zip(("a", "b"), target_shares(sampling.prob_best, 0.1), strict=True))
            for m in plan_moves(placed, shares, 0.1, _settle(placed), max_moves=3):
                placed[m.from_arm] -= 1
                placed[m.to_arm] += 1
            assert min(placed.values()) >= 2  # ceil(0.1 * 20): exploration never stops
        finals.append(placed["b"])
    assert min(finals) >= 15
    assert sum(finals) / len(finals) >= 17.5


def test_the_leader_must_hold_its_lead() -> None:
    arms = ["a", "b"]
    assert track_leader(arms, [0.2, 0.8], 0.95, None, None, T0) == (None, None)
    assert track_leader(arms, [0.02, 0.98], 0.95, None, None, T0) == ("b", T0)
    later = T0 + timedelta(seconds=30)
    assert track_leader(arms, [0.01, 0.99], 0.95, "b", T0, later) == ("b", T0)
    assert track_leader(arms, [0.97, 0.03], 0.95, "b", T0, later) == ("a", later)
    assert track_leader(arms, [0.01, 0.99], None, None, None, T0) == (None, None)


@pytest.mark.parametrize(
    ("config", "arms", "words"),
    [
        (BanditConfig(), 1, "two or more releases"),
        (BanditConfig(floor=0.6), 2, "floor 0.6 is out of range"),
        (BanditConfig(floor=0.4), 3, "floor 0.4 is out of range"),
        (BanditConfig(floor=-0.1), 2, "out of range"),
        (BanditConfig(interval_seconds=0), 2, "interval"),
        (BanditConfig(max_moves=0), 2, "max_moves"),
        (BanditConfig(draws=0), 2, "draws"),
        (BanditConfig(win_probability=0.5), 2, "win probability"),
    ],
)
def test_bad_configurations_are_refused(config: BanditConfig, arms: int, words: str) -> None:
    with pytest.raises(InvalidRequest, match=words):
        config.validate(arms)


def test_config_round_trips_through_json() -> None:
    cfg = BanditConfig(floor=0.2, interval_seconds=5, max_moves=3, draws=100, seed=9, win_probability=None)
    assert BanditConfig.from_json(cfg.to_json()) == cfg


# ------------------------------------------------------------------ engine decisions

DEVICES = tuple(f"d{i}" for i in range(6))
PLAN = Plan(
    (Stage(percent=100),),
    Gates(max_failure_rate=0.2, min_count_for_failure_rate=2, device_timeout_seconds=300),
)
CONFIG = BanditConfig(floor=0.1, interval_seconds=60, max_moves=2, draws=400, seed=5, win_probability=0.95)


def _view(
    arm_of: dict[str, str],
    states: dict[str, DS] | None = None,
    arms: tuple[bl.ArmView, ...] | None = None,
    last: bl.LastStep | None = None,
    plan: Plan = PLAN,
    config: BanditConfig = CONFIG,
    at: datetime = T0,
) -> bl.BanditView:
    states = states or {}
    deployments = {d: el.DeploymentView(d, 0, states.get(d, DS.COMMITTED), at) for d in arm_of}
    rollout = el.RolloutView("r1", RolloutState.RUNNING, plan, DEVICES, 0, T0, None, frozenset(), deployments)
    default_arms = (
        bl.ArmView("A", "1.0.0", "active", posterior(100, 30.0)),
        bl.ArmView("B", "1.1.0", "active", posterior(100, 80.0)),
    )
    return bl.BanditView(rollout, config, arms or default_arms, arm_of, last)


def test_new_targets_are_placed_round_robin() -> None:
    effects = bl.decide_bandit(_view({}), T0)
    assert effects == [bl.AssignArm(("d0", "d2", "d4"), "A"), bl.AssignArm(("d1", "d3", "d5"), "B")]


def test_a_step_moves_settled_devices_toward_the_better_arm_within_the_cap() -> None:
    arm_of = {d: ("A" if i % 2 == 0 else "B") for i, d in enumerate(DEVICES)}
    effects = bl.decide_bandit(_view(arm_of), T0)
    step, move = effects
    assert isinstance(step, bl.RecordStep) and step.step == 1 and step.seed == step_seed(5, 1)
    assert isinstance(move, bl.MoveDevices) and move.cause == "step"
    assert len(move.moves) == 2 and all(m.from_arm == "A" and m.to_arm == "B" for m in move.moves)
    figures = {f.release_id: f for f in step.arms}
    assert figures["B"].prob_best > 0.99 and figures["A"].target_share == pytest.approx(0.1, abs=0.01)
    # no new step before the interval
    last = bl.LastStep(1, T0, {"A": 0.0, "B": 1.0})
    assert bl.decide_bandit(_view(arm_of, last=last), T0 + timedelta(seconds=59)) == []


def test_devices_in_flight_are_not_moved_by_a_step() -> None:
    arm_of = {d: ("A" if i % 2 == 0 else "B") for i, d in enumerate(DEVICES)}
    states = {"d0": DS.DOWNLOADING, "d2": DS.INSTALLING, "d4": DS.TRIAL}
    effects = bl.decide_bandit(_view(arm_of, states), T0)
    assert [type(e) for e in effects] == [bl.RecordStep]


def test_an_arm_that_fails_its_gate_is_dropped_and_its_devices_go_to_the_best_other_arm() -> None:
    arm_of = {d: ("A" if i % 2 == 0 else "B") for i, d in enumerate(DEVICES)}
    bad = GateResult("error_rate", "failed", 0.05, 0.4, 200, None, "requests", "error rate 0.400 over 0.050")
    arms = (
        bl.ArmView("A", "1.0.0", "active", posterior(10, 9.0)),
        bl.ArmView("B", "1.1.0", "active", posterior(10, 9.5), (bad,)),
    )
    effects = bl.decide_bandit(_view(arm_of, arms=arms), T0)
    drop, move = effects
    assert isinstance(drop, bl.ChangeArm) and drop.rule == "drop" and drop.gate == el.Gate.TELEMETRY
    assert "error rate 0.400" in drop.detail
    assert isinstance(move, bl.MoveDevices) and move.cause == "drop"
    assert {m.device_id for m in move.moves} == {"d1", "d3", "d5"} and {m.to_arm for m in move.moves} == {"A"}


def test_an_arm_over_its_failure_rate_is_dropped() -> None:
    arm_of = {d: ("A" if i % 2 == 0 else "B") for i, d in enumerate(DEVICES)}
    states = {"d1": DS.ROLLED_BACK, "d3": DS.FAILED}
    effects = bl.decide_bandit(_view(arm_of, states), T0)
    drop, move = effects
    assert isinstance(drop, bl.ChangeArm) and drop.release_id == "B" and drop.gate == el.Gate.FAILURE_RATE
    assert isinstance(move, bl.MoveDevices) and [m.device_id for m in move.moves] == ["d5"]


def test_when_every_arm_fails_the_rollout_rolls_back() -> None:
    arm_of = {d: ("A" if i % 2 == 0 else "B") for i, d in enumerate(DEVICES)}
    states = {"d0": DS.FAILED, "d2": DS.FAILED, "d1": DS.FAILED, "d3": DS.FAILED}
    effects = bl.decide_bandit(_view(arm_of, states), T0)
    assert effects[0] == el.RevertDevices(("d4", "d5"))
    last = effects[-1]
    assert isinstance(last, el.SetState) and last.state == RolloutState.ROLLED_BACK and last.revert_ordered
    assert "every arm failed" in last.detail
    paused = bl.decide_bandit(_view(arm_of, states, plan=Plan(PLAN.stages, PLAN.gates, on_failure="pause")), T0)
    assert [e.state for e in paused if isinstance(e, el.SetState)] == [RolloutState.PAUSED]


def test_a_leader_that_holds_wins_then_gets_every_device_then_the_rollout_completes() -> None:
    cfg = BanditConfig(floor=0.1, interval_seconds=1, max_moves=1, draws=400, seed=5, win_hold_seconds=30)
    arm_of = {d: ("A" if i % 2 == 0 else "B") for i, d in enumerate(DEVICES)}
    last = bl.LastStep(3, T0, {"A": 0.0, "B": 1.0}, "B", T0)
    effects = bl.decide_bandit(_view(arm_of, last=last, config=cfg), T0 + timedelta(seconds=31))
    assert [type(e) for e in effects] == [bl.RecordStep, bl.ChangeArm, bl.ChangeArm]
    assert [(e.release_id, e.rule) for e in effects if isinstance(e, bl.ChangeArm)] == [("B", "win"), ("A", "retire")]
    won = (bl.ArmView("A", "1.0.0", "retired", posterior(1, 0)), bl.ArmView("B", "1.1.0", "winner", posterior(1, 1)))
    moving = bl.decide_bandit(_view(arm_of, arms=won, last=last, config=cfg), T0)
    assert len(moving) == 1 and isinstance(moving[0], bl.MoveDevices) and moving[0].cause == "winner"
    assert {m.device_id for m in moving[0].moves} == {"d0", "d2", "d4"}  # no cap: the winner takes all
    done = bl.decide_bandit(_view(dict.fromkeys(DEVICES, "B"), arms=won, last=last, config=cfg), T0)
    assert len(done) == 1 and isinstance(done[0], el.SetState) and done[0].state == RolloutState.COMPLETED
    assert "bandit winner 1.1.0" in done[0].detail


def test_silent_devices_time_out_first() -> None:
    arm_of = {"d0": "A", "d1": "B"}
    view = _view(arm_of, {"d0": DS.DOWNLOADING, "d1": DS.COMMITTED}, at=T0)
    effects = bl.decide_bandit(view, T0 + timedelta(seconds=301))
    assert effects[0] == el.TimeOut(("d0",))


def test_a_rollout_not_running_does_nothing() -> None:
    view = _view({})
    paused = bl.BanditView(
        el.RolloutView("r1", RolloutState.PAUSED, PLAN, DEVICES, 0, T0, None, frozenset(), {}), CONFIG, view.arms
    )
    assert bl.decide_bandit(paused, T0) == []


def test_arm_rules_name_their_from_states() -> None:
    assert bl.ARM_RULES["drop"].from_states == {"active", "winner"}
    assert bl.ARM_RULES["win"].to_state == "winner" and bl.ARM_RULES["retire"].from_states == {"active"}
