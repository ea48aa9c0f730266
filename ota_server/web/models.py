"""The dashboard's tables (migration 0014): sign-in sessions and saved device filters.

Both are keyed by the API token that signed in (``token_id``; ``bootstrap-admin:<digest>`` for the configured admin
token), so revoking a token ends its sessions and a person's saved filters follow their token.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, Index, Integer, String, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from ota_server.models import Base, utcnow


class UiSession(Base):
    """A signed-in browser. ``id`` is the sha256 of the cookie's secret: a database read leaks no usable cookie."""

    __tablename__ = "ui_sessions"
    __table_args__ = (Index("ix_ui_sessions_token", "token_id"),)

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    token_id: Mapped[str] = mapped_column(String(64))
    principal: Mapped[str] = mapped_column(String(128))
    role: Mapped[str] = mapped_column(String(32))
    csrf: Mapped[str] = mapped_column(String(64))
    """The per-session token every form posts back in its hidden ``csrf`` field."""
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    expires_at: Mapped[datetime] = mapped_column()


class SavedFilter(Base):
    """A named device filter (the query of ``/ui/devices``), one name per token."""

    __tablename__ = "ui_saved_filters"
    __table_args__ = (UniqueConstraint("token_id", "name", name="uq_ui_saved_filters_name"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    token_id: Mapped[str] = mapped_column(String(64))
    name: Mapped[str] = mapped_column(String(64))
    query: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
