"""Request bodies (validated strictly; unknown fields are refused)."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from edgeota_contract.manifest import NAME_PATTERN
from edgeota_contract.topics import DEVICE_ID_PATTERN
from ota_server.core.security import Role

LABEL_KEY = r"^[A-Za-z0-9][A-Za-z0-9_.\-/]{0,62}$"


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TokenCreate(_Body):
    role: Role
    name: str = Field(default="token", min_length=1, max_length=128)


class DeviceCreate(_Body):
    device_id: str | None = Field(default=None, pattern=DEVICE_ID_PATTERN)
    hardware_profile: str = Field(pattern=NAME_PATTERN)
    labels: dict[str, str] = Field(default_factory=dict, max_length=64)

    @model_validator(mode="after")
    def _labels(self) -> DeviceCreate:
        import re

        for key, value in self.labels.items():
            if not re.match(LABEL_KEY, key) or len(value) > 128:
                raise ValueError(f"invalid label {key!r}")
        return self


class SelectorBody(_Body):
    hardware_profiles: list[str] = Field(default_factory=list, max_length=100)
    labels: dict[str, str] = Field(default_factory=dict, max_length=64)
    device_ids: list[str] = Field(default_factory=list, max_length=100_000)


class StageBody(_Body):
    percent: float | None = Field(default=None, gt=0, le=100)
    count: int | None = Field(default=None, ge=1, le=10_000_000)
    soak_seconds: float = Field(default=0.0, ge=0, le=30 * 86400)
    requires_approval: bool = False

    @model_validator(mode="after")
    def _one_size(self) -> StageBody:
        if (self.percent is None) == (self.count is None):
            raise ValueError("a stage needs exactly one of percent or count")
        return self


class GatesBody(_Body):
    min_devices: int = Field(default=1, ge=0, le=10_000_000)
    max_failure_rate: float = Field(default=0.0, ge=0, le=1)
    min_count_for_failure_rate: int = Field(default=1, ge=1, le=10_000_000)
    device_timeout_seconds: float = Field(default=900.0, gt=0, le=30 * 86400)
    max_error_rate: float | None = Field(default=None, ge=0, le=1)
    max_nan_output_rate: float | None = Field(
        default=None, ge=0, le=1_000_000, description="non-finite output values per successful request; 0: any"
    )
    max_p95_latency_ratio: float | None = Field(default=None, gt=0, le=1000)
    max_drift_psi: float | None = Field(default=None, ge=0, le=100)
    min_telemetry_requests: int = Field(default=100, ge=1, le=10**12)
    min_shadow_agreement: float | None = Field(default=None, ge=0, le=1, description="top-1 agreement of shadows")
    max_concurrent: int | None = Field(default=None, ge=1, le=10_000_000, description="cap on deployments in flight")
    gate_data_timeout_seconds: float | None = Field(
        default=None,
        ge=0,
        le=30 * 86400,
        description="how long a stage waits after its soak for telemetry gates without enough data; "
        "default: the stage's soak, at least 600 s",
    )
    min_drift_values: int | None = Field(
        default=None, ge=1, le=10**9, description="values per feature before the drift gate judges; default 200"
    )


class WindowBody(_Body):
    start: str = Field(pattern=r"^([01]\d|2[0-3]):[0-5]\d$", description="HH:MM UTC")
    end: str = Field(pattern=r"^([01]\d|2[0-3]):[0-5]\d$", description="HH:MM UTC (before start: wraps midnight)")

    def minutes(self) -> tuple[int, int]:
        def m(text: str) -> int:
            return int(text[:2]) * 60 + int(text[3:])

        return m(self.start), m(self.end)


class BanditBody(_Body):
    """How a bandit rollout allocates (``ota_server.rollout.bandit.BanditConfig``)."""

    floor: float = Field(default=0.1, ge=0, le=0.5, description="share every healthy arm keeps (<= 1/arms)")
    interval_seconds: float = Field(default=60.0, gt=0, le=7 * 86400, description="seconds between steps")
    max_moves: int = Field(default=10, ge=1, le=10_000_000, description="devices moved per step at most")
    draws: int = Field(default=2000, ge=1, le=100_000, description="Thompson draws per step")
    seed: int = Field(default=0, ge=0, le=2**31, description="base seed of the draws; 0: a random one (recorded)")
    win_probability: float | None = Field(
        default=0.95,
        gt=0.5,
        lt=1,
        description="an arm this likely to be best for win_hold_seconds wins and gets every device; null: run "
        "until stopped",
    )
    win_hold_seconds: float = Field(default=600.0, ge=0, le=30 * 86400)


class RolloutCreate(_Body):
    release_id: str = Field(min_length=1, max_length=64)
    selector: SelectorBody = Field(default_factory=SelectorBody)
    strategy: Literal["canary", "blue_green", "ab", "shadow", "bandit"] = Field(
        default="canary",
        description="canary: the stages as given; blue_green: every device at once (one stage of 100%, the first "
        "stage's soak), switched back on failure; ab: a fixed split_percent of the fleet gets the release; shadow: "
        "the stages as given, but devices run the release beside the serving model (no switch); bandit: the "
        "devices are split between release_id and the arms, and moved toward the best by Thompson sampling on "
        "feedback rewards (docs/rollouts.md)",
    )
    arms: list[str] = Field(
        default_factory=list,
        max_length=15,
        description="bandit only: the other arms' release ids (release_id is the first arm)",
    )
    bandit: BanditBody = Field(default_factory=lambda: BanditBody(), description="bandit only: the allocation")
    split_percent: float | None = Field(default=None, gt=0, lt=100, description="ab only: share of devices on B")
    stages: list[StageBody] = Field(default_factory=lambda: [StageBody(percent=100)], min_length=1, max_length=50)
    gates: GatesBody = Field(default_factory=GatesBody)
    on_failure: Literal["rollback", "pause"] = "rollback"
    on_missing_data: Literal["fail", "pass"] = Field(
        default="fail",
        description="a telemetry gate still not evaluated when its stage's wait for data ends: fail (take "
        "on_failure) or pass (the stage passes and the rollout says which gates were not evaluated)",
    )
    maintenance_windows: list[WindowBody] = Field(default_factory=list, max_length=48)
    max_retries: int = Field(
        default=0,
        ge=0,
        le=10,
        description="re-assignments of a device whose deployment failed for a transient reason (download failure "
        "or timeout, disk full, device timeout, interrupted); a bad model or failed health trial is never retried",
    )
    retry_backoff_seconds: float = Field(
        default=60.0, ge=0, le=86400, description="wait before retry n: retry_backoff_seconds * 2 ** (n - 1)"
    )
    start: bool = False
    start_at: datetime | None = Field(default=None, description="scheduled start (state scheduled until then)")
    dry_run: bool = False
    allow_empty: bool = Field(
        default=False, description="create the rollout even when its selection targets no device (else 422)"
    )
    override_blessing: str | None = Field(
        default=None,
        min_length=1,
        max_length=1000,
        description="the reason to start (start or start_at) a release whose latest evaluation is not blessed; "
        "written to the audit log (docs/evaluation.md)",
    )


def strategy_stages(body: RolloutCreate) -> list[StageBody]:
    """The stages a strategy stands for (canary: as given)."""
    first = body.stages[0]
    if body.strategy == "blue_green":
        return [StageBody(percent=100, soak_seconds=first.soak_seconds, requires_approval=first.requires_approval)]
    if body.strategy == "ab":
        if body.split_percent is None:
            raise ValueError("strategy ab needs split_percent")
        return [StageBody(percent=body.split_percent, soak_seconds=first.soak_seconds)]
    return body.stages


class CommandBody(_Body):
    reason: str = Field(default="", max_length=1000)
    revert: bool = Field(default=False, description="abort only: also revert devices already updated")
    override_blessing: str | None = Field(
        default=None,
        min_length=1,
        max_length=1000,
        description="start only: the reason to start a release that is not blessed (audited)",
    )


class DecommissionBody(_Body):
    """``POST /api/v1/devices/{id}/decommission``."""

    reason: str = Field(default="", max_length=1000, description="why, recorded in the audit log")
