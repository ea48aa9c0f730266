"""Webhook and command delivery on their own: retries, permanent refusals, the deadline, missing programs."""

from __future__ import annotations

import sys
from pathlib import Path

from ota_server.alerts.config import CommandTarget, WebhookTarget
from ota_server.alerts.delivery import run_command, send_webhook

from .alert_receivers import webhook_receiver

SECRET = b"d" * 32


def _target(url: str, **fields: object) -> WebhookTarget:
    return WebhookTarget.model_validate({"url": url, "secret_env": "X", "backoff_seconds": 0, **fields})


def test_webhook_retries_on_5xx_and_429_but_not_on_a_permanent_refusal() -> None:
    waits: list[float] = []
    with webhook_receiver(SECRET, statuses=[500, 429]) as hook:
        ok, attempts = send_webhook(
            _target(hook.url, backoff_seconds=1), SECRET, b"{}", "d1", "fired", sleep=waits.append
        )
        assert ok and [a["status"] for a in attempts] == [500, 429, 200] and waits == [1.0, 2.0]
        assert len({r.headers["X-Edgeota-Delivery"] for r in hook.received}) == 1
    with webhook_receiver(SECRET, statuses=[400, 400]) as hook:
        ok, attempts = send_webhook(_target(hook.url), SECRET, b"{}", "d2", "fired", sleep=lambda _s: None)
        assert not ok and [a["outcome"] for a in attempts] == ["refused"] and len(hook.received) == 1
    with webhook_receiver(b"another-secret-entirely") as hook:  # the receiver refuses a bad HMAC with 401
        ok, attempts = send_webhook(_target(hook.url), SECRET, b"{}", "d3", "fired", sleep=lambda _s: None)
        assert not ok and hook.received[0].problem == "signature does not match"


def test_webhook_gives_up_at_max_attempts_or_the_deadline() -> None:
    with webhook_receiver(SECRET, statuses=[503] * 10) as hook:
        ok, attempts = send_webhook(
            _target(hook.url, max_attempts=3), SECRET, b"{}", "d4", "fired", sleep=lambda _s: None
        )
        assert not ok and len(attempts) == 3
        ok, attempts = send_webhook(
            _target(hook.url, max_attempts=5, backoff_seconds=20, deadline_seconds=10), SECRET, b"{}", "d5", "fired"
        )
        assert not ok and len(attempts) == 1  # the first back-off would pass the deadline: no second attempt
    ok, attempts = send_webhook(_target("http://127.0.0.1:9/nothing", max_attempts=2), SECRET, b"{}", "d6", "fired")
    assert not ok and [a["outcome"] for a in attempts] == ["error", "error"]


def test_command_outcomes(tmp_path: Path) -> None:
    fail = CommandTarget(
        argv=[sys.executable, "-c", "import sys; sys.stderr.write('boom'); sys.exit(3)"], max_attempts=2
    )
    ok, attempts = run_command(fail, b"{}", {}, sleep=lambda _s: None)
    assert not ok and [(a["status"], a["detail"]) for a in attempts] == [(3, "boom"), (3, "boom")]
    missing = CommandTarget(argv=[str(tmp_path / "no-such-program")], max_attempts=3)
    ok, attempts = run_command(missing, b"{}", {})
    assert not ok and len(attempts) == 1 and "cannot run" in attempts[0]["detail"]
    slow = CommandTarget(argv=[sys.executable, "-c", "import time; time.sleep(30)"], timeout_seconds=0.5)
    ok, attempts = run_command(slow, b"{}", {})
    assert not ok and "timed out" in attempts[0]["detail"]
    echo = CommandTarget(argv=[sys.executable, "-c", "import sys; assert sys.stdin.read() == '{\"a\":1}'"])
    assert run_command(echo, b'{"a":1}', {})[0]


def test_which_failures_are_tried_again_in_later_rounds() -> None:
    from datetime import UTC, datetime, timedelta

    from ota_server.alerts.config import parse_rules
    from ota_server.alerts.delivery import _next_state
    from ota_server.alerts.records import AlertDelivery

    rules = parse_rules(
        {
            "webhooks": {"w": {"url": "http://h/x", "secret_env": "S", "retry_for": "1h"}},
            "commands": {"c": {"argv": ["/bin/true"]}},
        },
        environ={"S": "s" * 16},
    )
    t0 = datetime(2026, 3, 1, tzinfo=UTC)
    hook = AlertDelivery(target="w", target_kind="webhook", created_at=t0)
    down = [{"outcome": "error", "status": None}]
    assert _next_state(hook, True, [], rules, t0) == ("delivered", None)
    assert _next_state(hook, False, down, rules, t0 + timedelta(seconds=5)) == ("pending", t0 + timedelta(seconds=65))
    later = t0 + timedelta(minutes=30)
    assert _next_state(hook, False, [{"outcome": "refused", "status": 503}], rules, later) == (
        "pending",
        later + timedelta(minutes=15),
    )
    assert _next_state(hook, False, [{"outcome": "refused", "status": 404}], rules, t0) == ("failed", None)
    assert _next_state(hook, False, down, rules, t0 + timedelta(hours=1)) == ("failed", None)
    command = AlertDelivery(target="c", target_kind="command", created_at=t0)
    assert _next_state(command, False, down, rules, t0) == ("failed", None)
