"""Settings sources, key material, and migrations on both databases."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest
from sqlalchemy import inspect, text

from edgeota_contract.errors import ContractError
from edgeota_contract.signing import load_private_key, load_public_key
from ota_server.core.config import Settings
from ota_server.db import alembic_config, make_engine, make_sessionmaker, upgrade_to_head
from ota_server.main import build_context
from ota_server.models import AuditEntry


def test_env_prefix_and_release_key_lists(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("EDGEOTA_SERVER_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("EDGEOTA_SERVER_RELEASE_KEYS", "/k/a.pem, /k/b.pem")
    monkeypatch.setenv("EDGEOTA_SERVER_MQTT_PORT", "1999")
    s = Settings.load()
    assert s.release_keys == [Path("/k/a.pem"), Path("/k/b.pem")]
    assert s.mqtt_port == 1999
    assert s.resolved_database_url == f"sqlite:///{(tmp_path / 'edgeota.db').resolve()}"
    monkeypatch.setenv("EDGEOTA_SERVER_RELEASE_KEYS", json.dumps(["/k/c.pem"]))
    assert Settings.load().release_keys == [Path("/k/c.pem")]


def test_toml_file_is_overridden_by_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    conf = tmp_path / "server.toml"
    conf.write_text('public_url = "http://file:1"\nmqtt_host = "broker.file"\nengine_tick_seconds = 2.5\n')
    monkeypatch.setenv("EDGEOTA_SERVER_MQTT_HOST", "broker.env")
    s = Settings.load(conf)
    assert (s.public_url, s.mqtt_host, s.engine_tick_seconds) == ("http://file:1", "broker.env", 2.5)


def test_sample_cap_and_api_workers_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    assert (Settings.load().max_sample_bytes, Settings.load().api_workers) == (16 * 1024 * 1024, 0)
    monkeypatch.setenv("EDGEOTA_SERVER_MAX_SAMPLE_BYTES", "4096")
    monkeypatch.setenv("EDGEOTA_SERVER_API_WORKERS", "2")
    assert (Settings.load().max_sample_bytes, Settings.load().api_workers) == (4096, 2)


@pytest.mark.parametrize(
    "bad",
    [
        {"mqtt_protocol": "4"},
        {"mqtt_port": 0},
        {"engine_tick_seconds": -1},
        {"max_sample_bytes": 10},
        {"api_workers": -1},
        {"api_workers": 65},
    ],
)
def test_invalid_settings_raise_contract_error(bad: dict[str, object]) -> None:
    with pytest.raises(ContractError, match="invalid setting"):
        Settings.load(**bad)


def test_missing_config_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ContractError, match="not found"):
        Settings.load(tmp_path / "nope.toml")


def test_server_key_generated_once_and_public_half_exported(tmp_path: Path) -> None:
    s = Settings(data_dir=tmp_path, mqtt_enabled=False)
    first = build_context(s)
    assert s.resolved_server_key.stat().st_mode & 0o777 == 0o600
    assert load_public_key(s.server_public_key_path) == first.server_key.public_key
    second = build_context(s)
    assert second.server_key.key_id == first.server_key.key_id == load_private_key(s.resolved_server_key).key_id
    first.engine.dispose()
    second.engine.dispose()


def _head_revision() -> str:
    """The newest migration's revision, as the migration scripts declare it."""
    from alembic.script import ScriptDirectory

    head = ScriptDirectory.from_config(alembic_config("sqlite://")).get_current_head()
    assert head is not None
    return head


def test_migrations_create_schema_and_are_idempotent(db_url: str) -> None:
    engine = make_engine(db_url)
    upgrade_to_head(engine)
    upgrade_to_head(engine)  # a second start must be a no-op
    tables = set(inspect(engine).get_table_names())
    assert {"alembic_version", "devices", "deployments", "rollouts", "audit_log", "telemetry_windows"} <= tables
    with engine.connect() as conn:
        assert conn.execute(text("SELECT version_num FROM alembic_version")).scalar() == _head_revision()
    engine.dispose()


def test_datetimes_come_back_as_utc(db_url: str) -> None:
    engine = make_engine(db_url)
    upgrade_to_head(engine)
    at = datetime(2026, 5, 1, 12, 0, tzinfo=timezone(timedelta(hours=2)))
    with make_sessionmaker(engine)() as session:
        entry = AuditEntry(at=at, actor="t", action="x", entity_type="t", entity_id="1", reason="")
        session.add(entry)
        session.commit()
        entry_id = entry.id
    with make_sessionmaker(engine)() as session:
        loaded = session.get(AuditEntry, entry_id)
        assert loaded is not None
        assert loaded.at == at and loaded.at.tzinfo is not None and loaded.at.utcoffset() == UTC.utcoffset(None)
    engine.dispose()


def test_upgrade_from_first_revision_keeps_data(db_url: str) -> None:
    from alembic import command

    from ota_server.db import alembic_config

    engine = make_engine(db_url)
    cfg = alembic_config(db_url)
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "0001")
        conn.execute(
            text(
                "INSERT INTO releases (id, model_name, version, created_at, created_by) "
                "VALUES ('r1', 'm', '1.0.0', CURRENT_TIMESTAMP, 't')"
            )
        )
        conn.execute(
            text(
                "INSERT INTO rollouts (id, release_id, state, plan, selector, targets, no_bundle, skipped, "
                "current_stage, approved_stages, reason, detail, created_at, updated_at, created_by) VALUES "
                "('o1', 'r1', 'draft', '{}', '{}', '[]', '[]', '[]', 0, '[]', '', '', CURRENT_TIMESTAMP, "
                "CURRENT_TIMESTAMP, 't')"
            )
        )
    upgrade_to_head(engine)
    columns = {c["name"] for c in inspect(engine).get_columns("rollouts")}
    assert "start_at" in columns
    with engine.connect() as conn:
        assert conn.execute(text("SELECT state FROM rollouts WHERE id = 'o1'")).scalar() == "draft"
    engine.dispose()


_DEPLOYMENT_SQL = (
    "INSERT INTO deployments (id, rollout_id, device_id, mode, stage, model_name, version, bundle_sha256, "
    "release_counter, state, reason, detail, send_count, created_at, updated_at{extra}) VALUES "
    "(:id, 'o1', 'd1', 'install', 0, 'm', '1.0.0', :sha, 1, 'failed', 'download_failed', '', 0, "
    "CURRENT_TIMESTAMP, CURRENT_TIMESTAMP{values})"
)


def test_upgrade_to_attempts_keeps_deployments_and_allows_one_row_per_attempt(db_url: str) -> None:
    from alembic import command
    from sqlalchemy.exc import IntegrityError

    from ota_server.db import alembic_config

    engine = make_engine(db_url)
    cfg = alembic_config(db_url)
    sha = "b" * 64
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "0002")
        conn.execute(
            text(
                "INSERT INTO releases (id, model_name, version, created_at, created_by) "
                "VALUES ('r1', 'm', '1.0.0', CURRENT_TIMESTAMP, 't')"
            )
        )
        conn.execute(
            text(
                "INSERT INTO bundles (sha256, release_id, model_name, version, hardware_profile, release_counter, "
                "size, signing_key_id, manifest, created_at) VALUES "
                "(:sha, 'r1', 'm', '1.0.0', 'x86', 1, 10, 'k', '{}', CURRENT_TIMESTAMP)"
            ),
            {"sha": sha},
        )
        conn.execute(
            text(
                "INSERT INTO devices (id, hardware_profile, labels, token_hash, mqtt_password_hash, created_at, "
                "presence_online) VALUES ('d1', 'x86', '{}', 'h', 'p', CURRENT_TIMESTAMP, false)"
            )
        )
        conn.execute(
            text(
                "INSERT INTO rollouts (id, release_id, state, plan, selector, targets, no_bundle, skipped, "
                "current_stage, approved_stages, reason, detail, created_at, updated_at, created_by) VALUES "
                "('o1', 'r1', 'running', '{}', '{}', '[\"d1\"]', '[]', '[]', 0, '[]', '', '', CURRENT_TIMESTAMP, "
                "CURRENT_TIMESTAMP, 't')"
            )
        )
        conn.execute(text(_DEPLOYMENT_SQL.format(extra="", values="")), {"id": "dep1", "sha": sha})
    upgrade_to_head(engine)
    with engine.begin() as conn:
        row = conn.execute(text("SELECT attempt, retried FROM deployments WHERE id = 'dep1'")).one()
        assert row[0] == 1 and not row[1]
        # 0004: the device's report watermark starts empty (its next message sets it)
        device = conn.execute(text("SELECT report_boot_id, report_seq, report_sent_at FROM devices")).one()
        assert tuple(device) == (None, None, None)
        second = _DEPLOYMENT_SQL.format(extra=", attempt", values=", 2")
        conn.execute(text(second), {"id": "dep2", "sha": sha})  # a second attempt is allowed now
    with pytest.raises(IntegrityError), engine.begin() as conn:
        conn.execute(text(second), {"id": "dep3", "sha": sha})  # the same attempt twice is not
    engine.dispose()


def test_mqtt_client_id_is_stable_per_data_dir(tmp_path: Path) -> None:
    a1 = Settings(data_dir=tmp_path / "a").resolved_mqtt_client_id
    assert a1 == Settings(data_dir=tmp_path / "a").resolved_mqtt_client_id and len(a1) <= 23
    assert a1 != Settings(data_dir=tmp_path / "b").resolved_mqtt_client_id
    assert Settings(data_dir=tmp_path, mqtt_client_id="fixed").resolved_mqtt_client_id == "fixed"
