"""Alert rows (``alerts``) and their deliveries (``alert_deliveries``); schema in migration 0009.

An alert is one episode of one fingerprint: it opens ``firing``, may be ``acknowledged`` by an operator, and
ends ``resolved``; at most one open (not resolved) alert per fingerprint (a partial unique index). A delivery
row is written ``pending`` in the same transaction as the event it announces (``fired`` or ``resolved``), so a
crash between the commit and the send leaves it pending, and the next round sends it (an outbox).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, Float, ForeignKey, Index, Integer, String, Text, text
from sqlalchemy.orm import Mapped, mapped_column

from ota_server.models import Base, utcnow

STATES = ("firing", "acknowledged", "resolved")
OPEN_STATES = ("firing", "acknowledged")
EXPORT_STATES = ("none", "pending", "done", "failed")
DELIVERY_STATES = ("pending", "delivered", "failed")


class Alert(Base):
    """One alert episode. ``payload`` holds the latest observation's details (drift report, counts)."""

    __tablename__ = "alerts"
    __table_args__ = (
        Index(
            "uq_alerts_open_fingerprint",
            "fingerprint",
            unique=True,
            postgresql_where=text("state <> 'resolved'"),
            sqlite_where=text("state <> 'resolved'"),
        ),
        Index("ix_alerts_fingerprint_resolved", "fingerprint", "resolved_at"),
    )

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    fingerprint: Mapped[str] = mapped_column(String(64))
    rule: Mapped[str] = mapped_column(String(64), index=True)
    kind: Mapped[str] = mapped_column(String(32))
    severity: Mapped[str] = mapped_column(String(16))
    state: Mapped[str] = mapped_column(String(16), index=True)
    model_name: Mapped[str] = mapped_column(String(64))
    version: Mapped[str] = mapped_column(String(128))
    hardware_profile: Mapped[str] = mapped_column(String(64))
    cohort: Mapped[str] = mapped_column(String(128))
    feature: Mapped[str | None] = mapped_column(String(256), nullable=True)
    features: Mapped[list[Any]] = mapped_column(JSON, default=list)
    summary: Mapped[str] = mapped_column(Text)
    value: Mapped[float | None] = mapped_column(Float, nullable=True)
    threshold: Mapped[float] = mapped_column(Float)
    first_seen: Mapped[datetime] = mapped_column(default=utcnow)
    last_seen: Mapped[datetime] = mapped_column(default=utcnow)
    evaluations: Mapped[int] = mapped_column(Integer, default=1)
    """Rounds that found the condition (the first and every de-duplicated one)."""
    resolved_at: Mapped[datetime | None] = mapped_column(nullable=True)
    resolve_reason: Mapped[str | None] = mapped_column(Text, nullable=True)
    acked_at: Mapped[datetime | None] = mapped_column(nullable=True)
    acked_by: Mapped[str | None] = mapped_column(String(128), nullable=True)
    ack_reason: Mapped[str | None] = mapped_column(Text, nullable=True)
    payload: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    export_state: Mapped[str] = mapped_column(String(16), default="none")
    export_path: Mapped[str | None] = mapped_column(Text, nullable=True)
    export_error: Mapped[str | None] = mapped_column(Text, nullable=True)


class AlertDelivery(Base):
    """One announcement of one alert event to one target; ``attempts`` lists every try (time, outcome, detail)."""

    __tablename__ = "alert_deliveries"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    alert_id: Mapped[str] = mapped_column(ForeignKey("alerts.id", ondelete="CASCADE"), index=True)
    event: Mapped[str] = mapped_column(String(16))
    target: Mapped[str] = mapped_column(String(64))
    target_kind: Mapped[str] = mapped_column(String(16))
    delivery_id: Mapped[str] = mapped_column(String(32), unique=True)
    state: Mapped[str] = mapped_column(String(16), index=True)
    attempts: Mapped[list[Any]] = mapped_column(JSON, default=list)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)
    next_attempt_at: Mapped[datetime | None] = mapped_column(nullable=True)
    """A pending webhook delivery that failed transiently is not tried again before this time."""
