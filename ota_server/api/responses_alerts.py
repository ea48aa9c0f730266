"""Response bodies of the alert endpoints (``/api/v1/alerts``), as pydantic models.

Same rules as :mod:`ota_server.api.responses`: pydantic only, field names and shapes are part of the API,
times are ISO 8601 strings as the server formats them, unknown fields are ignored by readers.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field


class AlertScope(BaseModel):
    """What the alert is about: one release on one hardware profile and cohort ("" = devices without one)."""

    model_name: str
    version: str
    hardware_profile: str
    cohort: str


class AlertExport(BaseModel):
    """The dataset export made when the alert fired (``state`` none / pending / done / failed)."""

    state: str
    path: str | None = None
    error: str | None = None


class AlertDeliveryRecord(BaseModel):
    """One event (fired / resolved) announced to one target, with every attempt."""

    event: str
    target: str
    target_kind: str
    delivery_id: str
    state: str
    attempts: list[dict[str, Any]] = Field(default_factory=list)
    created_at: str
    updated_at: str


class AlertRecord(BaseModel):
    """One alert episode. ``features`` names the drifting histograms of a drift alert (worst first);
    ``details`` holds the latest observation (for drift, the full report per family)."""

    id: str
    fingerprint: str
    rule: str
    kind: str
    severity: str
    state: str
    scope: AlertScope
    feature: str | None = None
    features: list[str] = Field(default_factory=list)
    summary: str
    value: float | None = None
    threshold: float
    first_seen: str
    last_seen: str
    evaluations: int
    resolved_at: str | None = None
    resolve_reason: str | None = None
    acked_at: str | None = None
    acked_by: str | None = None
    export: AlertExport
    details: dict[str, Any] = Field(default_factory=dict)
    deliveries: list[AlertDeliveryRecord] = Field(default_factory=list)
