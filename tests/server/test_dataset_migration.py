"""Migration 0007 (the ``samples`` table) matches the model, and goes down and up again (both databases)."""

from __future__ import annotations

from alembic import command
from sqlalchemy import inspect

from ota_server.db import alembic_config, make_engine, upgrade_to_head
from ota_server.models import StoredSample


def test_samples_table_matches_the_model_and_downgrades(db_url: str) -> None:
    engine = make_engine(db_url)
    try:
        upgrade_to_head(engine)
        columns = {c["name"]: c["nullable"] for c in inspect(engine).get_columns("samples")}
        assert columns == {c.name: c.nullable for c in StoredSample.__table__.columns}
        indexes = {i["name"] for i in inspect(engine).get_indexes("samples")}
        assert {"ix_samples_device_id", "ix_samples_received_at", "ix_samples_model_version"} <= indexes
        uniques = [sorted(u["column_names"]) for u in inspect(engine).get_unique_constraints("samples")]
        assert sorted(["device_id", "bundle_sha256", "sha256"]) in uniques
        cfg = alembic_config(engine.url.render_as_string(hide_password=False))
        with engine.begin() as conn:
            cfg.attributes["connection"] = conn
            command.downgrade(cfg, "0006")
        assert "samples" not in inspect(engine).get_table_names()
        upgrade_to_head(engine)
        assert "samples" in inspect(engine).get_table_names()
    finally:
        engine.dispose()
