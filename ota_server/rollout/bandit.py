"""Multi-armed bandit allocation between releases, as pure functions over plain data.

A bandit rollout splits its devices between two or more releases of one model (the arms) and, every
``interval_seconds``, moves devices toward the arm most likely to be best:

- **Reward.** Each feedback row an application reported for an arm's version since the rollout started counts
  once: its ``reward`` (in [0, 1]) when given, else ``correct`` as 1 or 0; rows with neither are not counted.
- **Posterior.** Beta(1 + sum of rewards, 1 + count - sum of rewards) per arm (a fractional reward is the
  expected value of a Bernoulli trial with that probability, so the update stays conjugate in expectation).
- **Probability best** (:func:`thompson`): ``draws`` joint draws from the arms' posteriors with a seeded
  :class:`random.Random`; an arm's share of the draws it wins. The seed is recorded with every step, so a step
  can be recomputed exactly. The same draws give each posterior's central 95% interval.
- **Target shares** (:func:`target_shares`): ``floor + (1 - k * floor) * probability_best`` for ``k`` healthy
  arms, so every healthy arm keeps at least ``floor`` of the devices (exploration never stops), and the rest
  follows the probability of being best (probability matching, as Thompson sampling does per request).
- **Moves** (:func:`plan_moves`): toward ``share * n`` devices per arm (``n`` placed devices), every arm keeping
  at least ``ceil(floor * n)`` when the devices suffice for every arm, with a dead band of one device (no move
  while an arm is within one device of its exact target); at most ``max_moves`` devices per step, only devices
  settled on their arm (committed): a device in flight is never moved by a step.
- **End** (:func:`track_leader`): when ``win_probability`` is set and one arm's probability of being best
  stays at or above it for ``win_hold_seconds``, that arm wins: it gets every device and the rollout completes
  with the winner recorded. Without ``win_probability`` the bandit runs until an operator stops it.

Nothing here does I/O; :mod:`ota_server.rollout.bandit_logic` turns these figures into engine effects.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from ota_server.errors import InvalidRequest

PRIOR = (1.0, 1.0)
"""Beta(1, 1): uniform on [0, 1] before any reward."""
MAX_DRAWS = 100_000


@dataclass(frozen=True)
class BanditConfig:
    """How a bandit rollout allocates (stored in the plan JSON under ``bandit``)."""

    floor: float = 0.1
    """Share of the devices every healthy arm keeps at least (0 <= floor <= 1 / arms)."""
    interval_seconds: float = 60.0
    """Time between allocation steps."""
    max_moves: int = 10
    """Devices moved per step at most (dropping a failed arm moves all its devices at once)."""
    draws: int = 2000
    """Thompson draws per step to estimate each arm's probability of being best."""
    seed: int = 0
    """Base seed; step ``n`` draws with :func:`step_seed` ``(seed, n)``."""
    win_probability: float | None = 0.95
    """An arm that stays this likely to be best for ``win_hold_seconds`` wins; None: run until stopped."""
    win_hold_seconds: float = 600.0

    def validate(self, arms: int) -> None:
        """Raises :class:`~ota_server.errors.InvalidRequest` with a one-line reason for a bad configuration."""
        if arms < 2:
            raise InvalidRequest(f"a bandit needs two or more releases (arms), got {arms}")
        if not (self.floor >= 0.0 and self.floor * arms <= 1.0 + 1e-9):
            raise InvalidRequest(
                f"bandit floor {self.floor:g} is out of range: 0 <= floor <= 1/{arms} ({1 / arms:.3f}) for {arms} arms"
            )
        if not (self.interval_seconds > 0 and math.isfinite(self.interval_seconds)):
            raise InvalidRequest(f"bandit interval must be a positive number of seconds, got {self.interval_seconds}")
        if self.max_moves < 1:
            raise InvalidRequest(f"bandit max_moves must be at least 1, got {self.max_moves}")
        if not 1 <= self.draws <= MAX_DRAWS:
            raise InvalidRequest(f"bandit draws must be in 1..{MAX_DRAWS}, got {self.draws}")
        if self.win_probability is not None and not 0.5 < self.win_probability < 1.0:
            raise InvalidRequest(f"bandit win probability must be in (0.5, 1), got {self.win_probability}")
        if not self.win_hold_seconds >= 0:
            raise InvalidRequest(f"bandit win hold must be >= 0 seconds, got {self.win_hold_seconds}")

    def to_json(self) -> dict[str, Any]:
        return dict(vars(self))

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> BanditConfig:
        return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})


@dataclass(frozen=True)
class Posterior:
    """Beta(alpha, beta) of one arm's reward rate, from ``count`` rewards summing to ``total``."""

    alpha: float
    beta: float
    count: int = 0
    total: float = 0.0

    @property
    def mean(self) -> float:
        return self.alpha / (self.alpha + self.beta)


def posterior(count: int, total: float) -> Posterior:
    """The Beta posterior after ``count`` rewards in [0, 1] summing to ``total`` (prior :data:`PRIOR`)."""
    total = min(max(total, 0.0), float(count))
    return Posterior(PRIOR[0] + total, PRIOR[1] + count - total, count, total)


@dataclass(frozen=True)
class Sampling:
    """What the draws say, per arm in the order given: probability of being best, and a 95% interval."""

    prob_best: tuple[float, ...]
    low: tuple[float, ...]
    high: tuple[float, ...]


def step_seed(seed: int, step: int) -> int:
    """The seed of step ``step``'s draws: distinct per step, reproducible from the recorded base seed."""
    return (seed * 1_000_003 + step) % (2**62)


def thompson(posteriors: Sequence[Posterior], draws: int, seed: int) -> Sampling:
    """Estimate each arm's probability of being best from ``draws`` joint posterior draws (seeded).

    Ties (equal draws) go to the arm listed first. Deterministic for a given ``seed``.
    """
    if not posteriors:
        return Sampling((), (), ())
    rng = random.Random(seed)
    wins = [0] * len(posteriors)
    samples: list[list[float]] = [[] for _ in posteriors]
    for _ in range(draws):
        best, best_value = 0, -1.0
        for i, p in enumerate(posteriors):
            value = rng.betavariate(p.alpha, p.beta)
            samples[i].append(value)
            if value > best_value:
                best, best_value = i, value
        wins[best] += 1
    low, high = [], []
    for values in samples:
        values.sort()
        low.append(values[int(0.025 * (len(values) - 1))])
        high.append(values[math.ceil(0.975 * (len(values) - 1))])
    return Sampling(tuple(w / draws for w in wins), tuple(low), tuple(high))


def target_shares(prob_best: Sequence[float], floor: float) -> tuple[float, ...]:
    """``floor + (1 - k * floor) * p`` per arm: at least ``floor`` each, the rest by probability of being best."""
    k = len(prob_best)
    spare = max(0.0, 1.0 - k * floor)
    total = sum(prob_best)
    if total <= 0:
        return tuple(1.0 / k for _ in prob_best)
    return tuple(floor + spare * p / total for p in prob_best)


def floor_count(devices: int, arms: int, floor: float) -> int:
    """The fewest devices an arm keeps: ``ceil(floor * devices)``, less when the devices do not suffice."""
    if arms == 0 or floor <= 0:
        return 0
    want = math.ceil(floor * devices - 1e-9)
    return want if want * arms <= devices else devices // arms


@dataclass(frozen=True)
class Move:
    """Move ``device_id`` from arm ``from_arm`` to arm ``to_arm`` (release ids)."""

    device_id: str
    from_arm: str
    to_arm: str


def plan_moves(
    placed: Mapping[str, int],
    shares: Mapping[str, float],
    floor: float,
    movable: Mapping[str, Sequence[str]],
    max_moves: int,
) -> tuple[Move, ...]:
    """Moves toward ``shares`` of the placed devices, at most ``max_moves``.

    ``placed``: devices per arm now (settled or on their way); ``shares``: the target share per arm;
    ``movable``: per arm, its devices that may move (settled), in the order to take them. With ``n`` placed
    devices and exact targets ``share * n``, an arm is owed ``max(least, floor(exact))`` devices (``least``:
    :func:`floor_count`) and gives only above ``max(least, ceil(exact))``: an allocation within one device of
    its exact target stays put, so sampling noise never moves a device back and forth. The arm most owed is
    served first, from the arm most over; ties go to the arm listed first.
    """
    arms = list(shares)
    n = sum(placed.get(a, 0) for a in arms)
    least = floor_count(n, len(arms), floor)
    exact = {a: shares[a] * n for a in arms}
    owed = {a: max(least, math.floor(exact[a] + 1e-9)) for a in arms}
    keep = {a: max(least, math.ceil(exact[a] - 1e-9)) for a in arms}
    counts = {a: placed.get(a, 0) for a in arms}
    taken = {a: 0 for a in arms}
    moves: list[Move] = []
    while len(moves) < max_moves:
        under = [a for a in arms if counts[a] < owed[a]]
        over = [a for a in arms if counts[a] > keep[a] and taken[a] < len(movable.get(a, ()))]
        if not under or not over:
            break
        to_arm = max(under, key=lambda a: (owed[a] - counts[a], -arms.index(a)))
        from_arm = max(over, key=lambda a: (counts[a] - keep[a], -arms.index(a)))
        device = movable[from_arm][taken[from_arm]]
        taken[from_arm] += 1
        counts[from_arm] -= 1
        counts[to_arm] += 1
        moves.append(Move(device, from_arm, to_arm))
    return tuple(moves)


def track_leader(
    arms: Sequence[str],
    prob_best: Sequence[float],
    threshold: float | None,
    previous: str | None,
    previous_since: datetime | None,
    now: datetime,
) -> tuple[str | None, datetime | None]:
    """The arm at or over ``threshold`` probability of being best, and since when it has been (continuously).

    ``(None, None)`` when no arm reaches the threshold (or it is None). A leader that was already leading keeps its
    ``since``; a new leader starts at ``now``.
    """
    if threshold is None or not arms:
        return None, None
    best = max(range(len(arms)), key=lambda i: (prob_best[i], -i))
    if prob_best[best] < threshold:
        return None, None
    leader = arms[best]
    if leader == previous and previous_since is not None:
        return leader, previous_since
    return leader, now
