"""Migration 0010 (``evaluations``, ``rollout_blessings``) matches the models, and goes down and up again (both
databases)."""

from __future__ import annotations

from alembic import command
from sqlalchemy import inspect

from ota_server.db import alembic_config, make_engine, upgrade_to_head
from ota_server.services.evaluations import Evaluation, RolloutBlessing


def test_evaluation_tables_match_the_models_and_downgrade(db_url: str) -> None:
    engine = make_engine(db_url)
    try:
        upgrade_to_head(engine)
        for model in (Evaluation, RolloutBlessing):
            columns = {c["name"]: c["nullable"] for c in inspect(engine).get_columns(model.__tablename__)}
            assert columns == {c.name: c.nullable for c in model.__table__.columns}
        indexes = {i["name"] for i in inspect(engine).get_indexes("evaluations")}
        assert "ix_evaluations_candidate_created" in indexes
        cfg = alembic_config(engine.url.render_as_string(hide_password=False))
        with engine.begin() as conn:
            cfg.attributes["connection"] = conn
            command.downgrade(cfg, "0009")
        assert not {"evaluations", "rollout_blessings"} & set(inspect(engine).get_table_names())
        upgrade_to_head(engine)
        assert {"evaluations", "rollout_blessings"} <= set(inspect(engine).get_table_names())
    finally:
        engine.dispose()
