"""The alert lifecycle as a pure decision: observations + what is open + when each fingerprint last resolved
-> actions. The service applies the actions in one transaction and delivers after the commit.

- **De-duplication**: an observation ``firing`` on a fingerprint that has an open alert (``firing`` or
  ``acknowledged``) refreshes that alert (last seen, value, summary); it never opens a second one.
- **Cooldown**: a ``firing`` observation on a fingerprint whose last alert resolved less than the rule's
  ``cooldown`` ago is suppressed (counted, not recorded), so a flapping condition pages at most once per
  cooldown.
- **Resolve**: a ``clear`` observation resolves the open alert of its fingerprint. ``insufficient`` changes
  nothing (too little data is not a recovery). An open alert whose rule left the rules file is resolved.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta

from ota_server.alerts.config import AlertRule
from ota_server.alerts.evaluate import Observation


@dataclass(frozen=True)
class OpenAlert:
    """What the decision needs of an open alert."""

    id: str
    fingerprint: str
    rule: str


@dataclass(frozen=True)
class Fire:
    observation: Observation


@dataclass(frozen=True)
class Refresh:
    alert_id: str
    observation: Observation


@dataclass(frozen=True)
class Resolve:
    alert_id: str
    reason: str
    observation: Observation | None = None


@dataclass(frozen=True)
class Suppress:
    observation: Observation
    until: datetime


Action = Fire | Refresh | Resolve | Suppress


def decide(
    observations: Iterable[Observation],
    open_alerts: Iterable[OpenAlert],
    last_resolved: Mapping[str, datetime],
    rules: Mapping[str, AlertRule],
    now: datetime,
) -> list[Action]:
    """The actions for one evaluation round (pure). At most one action per fingerprint; the first observation of
    a fingerprint wins when several arrive (they cannot, from :func:`ota_server.alerts.evaluate.evaluate_rule`)."""
    open_by_fp = {a.fingerprint: a for a in open_alerts}
    actions: list[Action] = []
    seen: set[str] = set()
    for obs in observations:
        if obs.fingerprint in seen:
            continue
        seen.add(obs.fingerprint)
        current = open_by_fp.get(obs.fingerprint)
        if obs.status == "firing":
            if current is not None:
                actions.append(Refresh(current.id, obs))
                continue
            resolved = last_resolved.get(obs.fingerprint)
            until = resolved + timedelta(seconds=rules[obs.rule].cooldown) if resolved is not None else None
            if until is not None and now < until:
                actions.append(Suppress(obs, until))
            else:
                actions.append(Fire(obs))
        elif obs.status == "clear" and current is not None:
            actions.append(Resolve(current.id, "condition cleared", obs))
    for alert in open_by_fp.values():
        if alert.rule not in rules and alert.fingerprint not in seen:
            actions.append(Resolve(alert.id, f"rule {alert.rule} is no longer configured"))
    return actions
