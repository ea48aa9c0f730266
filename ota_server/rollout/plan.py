"""Rollout plans and device selection, as plain data.

A plan's stage sizes are cumulative: ``percent`` is the share of the eligible devices (rounded
up) and ``count`` the number of devices that have been assigned once that stage has started.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal


@dataclass(frozen=True)
class Stage:
    percent: float | None = None
    count: int | None = None
    soak_seconds: float = 0.0
    requires_approval: bool = False

    def cumulative_size(self, total: int) -> int:
        if self.count is not None:
            return min(total, self.count)
        pct = 100.0 if self.percent is None else self.percent
        return min(total, max(1 if total and pct > 0 else 0, math.ceil(total * pct / 100.0 - 1e-9)))


@dataclass(frozen=True)
class Gates:
    min_devices: int = 1
    max_failure_rate: float = 0.0
    min_count_for_failure_rate: int = 1
    device_timeout_seconds: float = 900.0
    # Telemetry gates (None = off), judged once the new bundle has served min_telemetry_requests.
    max_error_rate: float | None = None
    max_nan_output_rate: float | None = None
    """Non-finite output values (NaN, inf) per successful request of the new release; 0: any fails."""
    max_p95_latency_ratio: float | None = None
    """p95 latency of the new release over the p95 of what the same devices ran before."""
    max_drift_psi: float | None = None
    """Largest PSI of any input feature against the bundle's reference_stats.json."""
    min_telemetry_requests: int = 100
    min_shadow_agreement: float | None = None
    """Top-1 agreement of the candidate with the serving model where devices shadow it."""
    max_concurrent: int | None = None
    """At most this many deployments in flight (assigned, not finished) at once: a download cap."""
    gate_data_timeout_seconds: float | None = None
    """How long a stage waits after its soak for a telemetry gate that has too little data to be evaluated,
    before the plan's ``on_missing_data`` applies; None: the stage's soak time, at least 600 s."""
    min_drift_values: int | None = None
    """Values (not requests) per feature before the drift gate gives a verdict; None: the drift rule's default."""


@dataclass(frozen=True)
class Window:
    """A daily UTC maintenance window in minutes after midnight; ``end < start`` wraps past midnight."""

    start_minute: int
    end_minute: int

    def contains(self, when: datetime) -> bool:
        minute = when.astimezone(UTC).hour * 60 + when.astimezone(UTC).minute
        if self.start_minute <= self.end_minute:
            return self.start_minute <= minute < self.end_minute
        return minute >= self.start_minute or minute < self.end_minute


@dataclass(frozen=True)
class Plan:
    stages: tuple[Stage, ...]
    gates: Gates = Gates()
    on_failure: Literal["pause", "rollback"] = "rollback"
    windows: tuple[Window, ...] = ()
    """New assignments start only inside one of these windows (none = any time)."""
    mode: Literal["install", "shadow"] = "install"
    """``shadow``: devices run the candidate beside the serving model (no switch); revert = shadow_stop."""
    max_retries: int = 0
    """Re-assignments of a device whose deployment failed for a transient reason (0: fail at once)."""
    retry_backoff_seconds: float = 60.0
    """Wait before retry n: ``retry_backoff_seconds * 2 ** (n - 1)`` after the failed attempt."""
    on_missing_data: Literal["fail", "pass"] = "fail"
    """A telemetry gate still not evaluated when its stage's wait for data ends: ``fail`` takes ``on_failure``;
    ``pass`` lets the stage pass and says which gates were not evaluated."""

    def may_assign(self, now: datetime) -> bool:
        return not self.windows or any(w.contains(now) for w in self.windows)

    def stage_sizes(self, total: int) -> list[int]:
        """Cumulative device counts per stage, never shrinking."""
        sizes: list[int] = []
        for stage in self.stages:
            sizes.append(max(stage.cumulative_size(total), sizes[-1] if sizes else 0))
        return sizes

    def to_json(self) -> dict[str, Any]:
        return {
            "stages": [vars(s) for s in self.stages],
            "gates": vars(self.gates),
            "on_failure": self.on_failure,
            "windows": [vars(w) for w in self.windows],
            "mode": self.mode,
            "max_retries": self.max_retries,
            "retry_backoff_seconds": self.retry_backoff_seconds,
            "on_missing_data": self.on_missing_data,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Plan:
        return cls(
            stages=tuple(Stage(**s) for s in data["stages"]),
            gates=Gates(**data.get("gates", {})),
            on_failure=data.get("on_failure", "rollback"),
            windows=tuple(Window(**w) for w in data.get("windows", [])),
            mode=data.get("mode", "install"),
            max_retries=int(data.get("max_retries", 0)),
            retry_backoff_seconds=float(data.get("retry_backoff_seconds", 60.0)),
            on_missing_data=data.get("on_missing_data", "fail"),
        )


@dataclass(frozen=True)
class Selector:
    hardware_profiles: tuple[str, ...] = ()
    labels: Mapping[str, str] = field(default_factory=dict)
    device_ids: tuple[str, ...] = ()

    def matches(self, device_id: str, profile: str, labels: Mapping[str, Any]) -> bool:
        if self.device_ids and device_id not in self.device_ids:
            return False
        if self.hardware_profiles and profile not in self.hardware_profiles:
            return False
        return all(str(labels.get(k)) == v and k in labels for k, v in self.labels.items())


@dataclass(frozen=True)
class DeviceInfo:
    device_id: str
    hardware_profile: str
    labels: Mapping[str, Any]


@dataclass(frozen=True)
class Targeting:
    targets: tuple[str, ...]
    """Eligible devices in assignment order."""
    no_bundle: tuple[str, ...]
    """Matched devices whose profile has no bundle in the release (reported, never assigned)."""
    skipped: tuple[str, ...]
    """Matched devices that rolled this bundle back before (not sent the same release again)."""


def order_key(rollout_id: str, device_id: str) -> str:
    """A stable pseudo-random order, so canary stages spread over the fleet but survive restarts."""
    return hashlib.sha256(f"{rollout_id}/{device_id}".encode()).hexdigest()


def select_targets(
    rollout_id: str,
    selector: Selector,
    devices: Iterable[DeviceInfo],
    profiles_with_bundle: set[str],
    rolled_back_before: set[str] = frozenset(),  # type: ignore[assignment]
) -> Targeting:
    """Split the devices the selector matches into targets, no-bundle and skipped devices."""
    targets: list[str] = []
    no_bundle: list[str] = []
    skipped: list[str] = []
    for dev in devices:
        if not selector.matches(dev.device_id, dev.hardware_profile, dev.labels):
            continue
        if dev.hardware_profile not in profiles_with_bundle:
            no_bundle.append(dev.device_id)
        elif dev.device_id in rolled_back_before:
            skipped.append(dev.device_id)
        else:
            targets.append(dev.device_id)
    targets.sort(key=lambda d: order_key(rollout_id, d))
    return Targeting(tuple(targets), tuple(sorted(no_bundle)), tuple(sorted(skipped)))


def dry_run(plan: Plan, targeting: Targeting) -> list[dict[str, Any]]:
    """Which devices each stage would take."""
    out: list[dict[str, Any]] = []
    prev = 0
    for index, size in enumerate(plan.stage_sizes(len(targeting.targets))):
        out.append({"stage": index, "cumulative": size, "devices": list(targeting.targets[prev:size])})
        prev = size
    return out
