"""Migration 0009 (``alerts``, ``alert_deliveries``) matches the models, allows one open alert per fingerprint, and
goes down and up again (both databases)."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from alembic import command
from sqlalchemy import inspect
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from ota_server.alerts.records import Alert, AlertDelivery
from ota_server.db import alembic_config, make_engine, upgrade_to_head

NOW = datetime(2026, 3, 1, tzinfo=UTC)


def _alert(alert_id: str, state: str) -> Alert:
    return Alert(
        id=alert_id,
        fingerprint="f" * 32,
        rule="r",
        kind="drift",
        severity="warning",
        state=state,
        model_name="digits",
        version="1.0.0",
        hardware_profile="x86",
        cohort="",
        features=[],
        summary="s",
        threshold=0.1,
        first_seen=NOW,
        last_seen=NOW,
        evaluations=1,
        payload={},
        export_state="none",
    )


def test_alert_tables_match_the_models_and_downgrade(db_url: str) -> None:
    engine = make_engine(db_url)
    try:
        upgrade_to_head(engine)
        for model in (Alert, AlertDelivery):
            table = model.__table__
            columns = {c["name"]: c["nullable"] for c in inspect(engine).get_columns(table.name)}
            assert columns == {c.name: c.nullable for c in table.columns}, table.name
        with Session(engine) as session, session.begin():
            session.add_all([_alert("a" * 32, "resolved"), _alert("b" * 32, "resolved"), _alert("c" * 32, "firing")])
        with pytest.raises(IntegrityError), Session(engine) as session, session.begin():
            session.add(_alert("d" * 32, "acknowledged"))  # a second open alert of the same fingerprint
        cfg = alembic_config(engine.url.render_as_string(hide_password=False))
        with engine.begin() as conn:
            cfg.attributes["connection"] = conn
            command.downgrade(cfg, "0008")
        assert not {"alerts", "alert_deliveries"} & set(inspect(engine).get_table_names())
        upgrade_to_head(engine)
        assert {"alerts", "alert_deliveries"} <= set(inspect(engine).get_table_names())
    finally:
        engine.dispose()
