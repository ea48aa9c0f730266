"""Per-device fault injection for the fleet simulator: the ``--faults`` language and who gets what.

A spec is a ``;``-separated list of faults, each ``KIND:TARGET[:key=value,key=value]``::

    network_cut:10%:after=5,duration=20    # a tenth of the fleet loses broker and server for 20 s, 5 s in
    offline:3:after=0,duration=60           # three devices start 60 s late
    kill_mid_update:dev-0007:step=download  # this agent is killed -9 when its update reaches `download`
    drift:25%:shift=2.5                     # a quarter of the fleet sends inputs shifted by 2.5 std

TARGET is ``N%`` (share of the fleet, at least one device when N > 0), ``N`` (a count), ``all``, or
device ids joined by ``+``. Devices are chosen by a seeded random draw, so a spec and a seed always
pick the same devices. Faults of a *model* (fails to load, NaN outputs, slow) are properties of the
bundle a release publishes, not of a device, so they are not part of this language.

Errors: :class:`FaultSpecError` (one line naming the bad term) for anything that does not parse.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum

from edgeota_contract.errors import ContractError
from edgeota_contract.topics import DEVICE_ID_PATTERN


class FaultSpecError(ContractError):
    """A ``--faults`` spec that does not parse or names an unknown device."""


class FaultKind(StrEnum):
    NETWORK_CUT = "network_cut"
    OFFLINE = "offline"
    KILL_MID_UPDATE = "kill_mid_update"
    DRIFT = "drift"


# Allowed parameters per kind and their defaults; values are floats except `step`.
_PARAMS: dict[FaultKind, dict[str, float | str]] = {
    FaultKind.NETWORK_CUT: {"after": 5.0, "duration": 20.0},
    FaultKind.OFFLINE: {"after": 0.0, "duration": 60.0},
    FaultKind.KILL_MID_UPDATE: {"step": "download", "restart_after": 2.0},
    FaultKind.DRIFT: {"shift": 2.0, "scale": 1.0},
}
_NON_NEGATIVE = {"after", "duration", "restart_after"}


@dataclass(frozen=True)
class Target:
    """Which devices a fault hits: a share, a count, everyone, or named devices."""

    share: float | None = None  # 0..1
    count: int | None = None
    device_ids: tuple[str, ...] = ()
    everyone: bool = False


@dataclass(frozen=True)
class Fault:
    kind: FaultKind
    target: Target
    params: dict[str, float | str] = field(default_factory=dict)

    def num(self, key: str) -> float:
        value = self.params[key]
        assert isinstance(value, float)
        return value

    def text(self, key: str) -> str:
        return str(self.params[key])


def parse_faults(spec: str | None) -> list[Fault]:
    """Parse a ``--faults`` spec ('' or None: no faults).

    Raises:
        FaultSpecError: unknown kind or parameter, bad target, bad or negative number.
    """
    faults: list[Fault] = []
    for raw in (spec or "").split(";"):
        term = raw.strip()
        if term:
            faults.append(_parse_one(term))
    return faults


def _parse_one(term: str) -> Fault:
    parts = term.split(":", 2)
    if len(parts) < 2 or not parts[1].strip():
        raise FaultSpecError(f"fault {term!r}: expected KIND:TARGET[:key=value,...]")
    kind_text = parts[0].strip()
    try:
        kind = FaultKind(kind_text)
    except ValueError:
        known = ", ".join(k.value for k in FaultKind)
        raise FaultSpecError(f"fault {term!r}: unknown kind {kind_text!r} (known: {known})") from None
    target = _parse_target(term, parts[1].strip())
    params = dict(_PARAMS[kind])
    if len(parts) == 3:
        for item in parts[2].split(","):
            key, sep, value = item.partition("=")
            key, value = key.strip(), value.strip()
            if not sep or not key:
                raise FaultSpecError(f"fault {term!r}: parameter {item!r} is not key=value")
            if key not in params:
                allowed = ", ".join(sorted(params))
                raise FaultSpecError(f"fault {term!r}: unknown parameter {key!r} for {kind} (allowed: {allowed})")
            params[key] = value if isinstance(params[key], str) else _number(term, key, value)
    return Fault(kind=kind, target=target, params=params)


def _number(term: str, key: str, value: str) -> float:
    try:
        number = float(value.removesuffix("s"))
    except ValueError:
        raise FaultSpecError(f"fault {term!r}: {key}={value!r} is not a number") from None
    if number != number or number in (float("inf"), float("-inf")):
        raise FaultSpecError(f"fault {term!r}: {key}={value!r} is not a finite number")
    if key in _NON_NEGATIVE and number < 0:
        raise FaultSpecError(f"fault {term!r}: {key} must not be negative")
    return number


def _parse_target(term: str, text: str) -> Target:
    import re

    if text == "all":
        return Target(everyone=True)
    if text.endswith("%"):
        try:
            pct = float(text[:-1])
        except ValueError:
            raise FaultSpecError(f"fault {term!r}: target {text!r} is not a percentage") from None
        if not 0 <= pct <= 100:
            raise FaultSpecError(f"fault {term!r}: target {text!r} must be between 0% and 100%")
        return Target(share=pct / 100)
    if text.isdigit():
        return Target(count=int(text))
    ids = tuple(part.strip() for part in text.split("+"))
    for device_id in ids:
        if not re.match(DEVICE_ID_PATTERN, device_id):
            raise FaultSpecError(f"fault {term!r}: {device_id!r} is not a device id, count, share or 'all'")
    return Target(device_ids=ids)


def assign_faults(faults: Sequence[Fault], device_ids: Sequence[str], seed: int = 0) -> dict[str, list[Fault]]:
    """Map each device id to the faults that hit it (devices without faults are absent).

    Deterministic for a given ``seed``; each fault draws independently, so one device may get several.

    Raises:
        FaultSpecError: a fault names a device that is not in ``device_ids``.
    """
    known = set(device_ids)
    ordered = sorted(device_ids)
    out: dict[str, list[Fault]] = {}
    for index, fault in enumerate(faults):
        target = fault.target
        if target.everyone:
            chosen = ordered
        elif target.device_ids:
            missing = [d for d in target.device_ids if d not in known]
            if missing:
                raise FaultSpecError(f"fault {fault.kind}: unknown device {missing[0]!r}")
            chosen = list(target.device_ids)
        else:
            n = target.count if target.count is not None else _share_count(target.share or 0.0, len(ordered))
            chosen = random.Random(f"{seed}:{index}:{fault.kind}").sample(ordered, min(n, len(ordered)))
        for device_id in chosen:
            out.setdefault(device_id, []).append(fault)
    return out


def _share_count(share: float, total: int) -> int:
    if share <= 0 or total == 0:
        return 0
    return max(1, round(share * total))
