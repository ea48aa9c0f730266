"""Re-sends of unacknowledged messages back off: doubling, capped, jittered (unit)."""

from __future__ import annotations

import random

from device_agent.transport.outbox import next_send


def test_resend_intervals_double_up_to_the_cap_with_jitter() -> None:
    rng = random.Random(7)
    now, sends, intervals = 0.0, 0, []
    for _ in range(8):
        due, sends = next_send(sends, now, first=30.0, cap=600.0, rng=rng)
        intervals.append(due - now)
        now = due
    nominal = [30, 60, 120, 240, 480, 600, 600, 600]
    assert sends == 8
    for got, want in zip(intervals, nominal, strict=True):
        assert 0.8 * want <= got <= 1.2 * want
    assert intervals[0] != intervals[1] / 2  # jittered: not exactly on the doubling grid


def test_a_fleet_does_not_resend_in_lockstep() -> None:
    rng = random.Random(1)
    dues = {round(next_send(0, 100.0, first=30.0, cap=600.0, rng=rng)[0], 3) for _ in range(50)}
    assert len(dues) > 40
    assert all(124.0 <= d <= 136.0 for d in dues)
