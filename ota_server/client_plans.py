"""Rollout plans for the REST client (:meth:`ota_server.client.ApiClient.create_rollout`): plain data that
builds the ``POST /api/v1/rollouts`` request body."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class StagePlan:
    """One stage of a :class:`RolloutPlan`: a ``percent`` of the targets or a device ``count``, then a soak."""

    percent: float | None = None
    count: int | None = None
    soak_seconds: float = 0.0
    requires_approval: bool = False

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"soak_seconds": self.soak_seconds}
        if self.count is not None:
            out["count"] = self.count
        else:
            out["percent"] = self.percent if self.percent is not None else 100.0
        if self.requires_approval:
            out["requires_approval"] = True
        return out


@dataclass(frozen=True)
class RolloutPlan:
    """The common shape of a rollout request: stages, failure gates and a label selector."""

    stages: Sequence[StagePlan]
    max_failure_rate: float = 0.2
    min_count_for_failure_rate: int = 2
    device_timeout_seconds: float = 120.0
    on_failure: str = "rollback"
    labels: dict[str, str] = field(default_factory=dict)
    extra_gates: dict[str, Any] = field(default_factory=dict)  # any other gate fields: max_concurrent, telemetry gates

    def body(self, release_id: str) -> dict[str, Any]:
        """The ``POST /api/v1/rollouts`` request body for ``release_id``."""
        return {
            "release_id": release_id,
            "selector": {"labels": dict(self.labels)},
            "stages": [s.to_json() for s in self.stages],
            "gates": {
                "max_failure_rate": self.max_failure_rate,
                "min_count_for_failure_rate": self.min_count_for_failure_rate,
                "device_timeout_seconds": self.device_timeout_seconds,
                **self.extra_gates,
            },
            "on_failure": self.on_failure,
        }
