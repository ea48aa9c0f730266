"""The server's one typed settings object.

Values come, highest priority first, from keyword arguments, ``EDGEOTA_SERVER_*`` environment
variables, and an optional TOML config file (``Settings.load(config_file)``). Paths default to
folders inside ``data_dir``.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from edgeota_contract.errors import ContractError
from edgeota_contract.states import ReasonCode


def _split_paths(value: Any) -> Any:
    """Accept a JSON list, a comma-separated string or a list of paths."""
    if isinstance(value, str):
        text = value.strip()
        if not text:
            return []
        if text.startswith("["):
            return json.loads(text)
        return [part.strip() for part in text.split(",") if part.strip()]
    return value


class Settings(BaseSettings):
    """Everything the OTA server needs to run. Env prefix ``EDGEOTA_SERVER_``."""

    model_config = SettingsConfigDict(env_prefix="EDGEOTA_SERVER_", extra="forbid", validate_default=True)

    data_dir: Path = Path("./edgeota-data")
    database_url: str | None = Field(default=None, description="SQLAlchemy URL; default sqlite file in data_dir")
    artifact_dir: Path | None = Field(default=None, description="bundle store; default data_dir/artifacts")
    artifact_store: Literal["local", "s3"] = Field(
        default="local", description="where bundles live: artifact_dir, or an S3-compatible object store (s3_*)"
    )
    s3_bucket: str | None = Field(default=None, description="bucket of the s3 artifact store (must exist)")
    s3_prefix: str = Field(default="bundles/", max_length=512, description="object name prefix of the bundles")
    s3_endpoint_url: str | None = Field(
        default=None, description="S3-compatible endpoint (MinIO, Ceph, ...); default AWS for s3_region"
    )
    s3_region: str = Field(default="us-east-1", description="region of the bucket")
    s3_access_key_id: str | None = Field(default=None, description="default: boto3's own chain (env, profile, role)")
    s3_secret_access_key: SecretStr | None = None
    s3_presign_seconds: int = Field(
        default=900, ge=60, le=7 * 86400, description="lifetime of the presigned download URLs devices are sent to"
    )
    s3_redirect_downloads: bool = Field(
        default=True, description="answer device downloads with a 307 to a presigned URL; false: the server streams"
    )
    public_url: str = Field(
        default="http://127.0.0.1:8080",
        description="URL devices use to reach this server (written into agent.toml); unless set, `edgeota server "
        "run` derives it from its --host and --port",
    )

    mqtt_enabled: bool = True
    engine_enabled: bool = True
    mqtt_host: str = "127.0.0.1"
    mqtt_port: int = Field(default=1883, ge=1, le=65535)
    mqtt_username: str | None = None
    mqtt_password: SecretStr | None = None
    mqtt_tls: bool = False
    mqtt_ca_file: Path | None = None
    mqtt_protocol: Literal["auto", "3.1.1", "5"] = "auto"
    mqtt_shared_group: str | None = Field(
        default=None,
        pattern=r"^[A-Za-z0-9_-]{1,64}$",
        description="MQTT shared-subscription group: every server and `server ingest` process in the group gets a "
        "share of the device messages instead of all of them",
    )
    mqtt_subscribe: bool = Field(
        default=True, description="false: this process publishes commands but ingests no device message"
    )
    mqtt_client_id: str | None = Field(
        default=None, description="persistent MQTT session id; default edgeota-server-<hash of data_dir>"
    )
    mqtt_device_host: str | None = Field(default=None, description="broker host written into agent.toml")
    mqtt_device_port: int | None = Field(default=None, ge=1, le=65535)

    server_key: Path | None = Field(default=None, description="Ed25519 key signing commands; generated if missing")
    release_keys: Annotated[list[Path], NoDecode] = Field(default_factory=list)
    hardware_profiles: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="profile ids devices may be provisioned with besides those of hardware_profiles_dir and of "
        "stored releases (comma-separated in the environment)",
    )
    hardware_profiles_dir: Path | None = Field(
        default=None,
        description="folder of hardware profile YAML files whose ids devices may be provisioned with; default the "
        "hardware_profiles/ folder shipped beside the server, when present",
    )
    admin_token: SecretStr | None = Field(default=None, description="bootstrap admin bearer token")

    max_bundle_bytes: int = Field(default=512 * 1024 * 1024, ge=1024)
    engine_tick_seconds: float = Field(default=1.0, gt=0, le=3600)
    engine_lease_seconds: float = Field(default=15.0, gt=0)
    engine_leadership: Literal["auto", "advisory_lock", "lease"] = Field(
        default="auto",
        description="how server processes pick the one running the engine: a PostgreSQL advisory lock (taken over "
        "when its holder's connection ends) or a lease row (taken over after engine_lease_seconds); auto: the lock on "
        "PostgreSQL",
    )
    device_heartbeat_timeout_seconds: float = Field(default=300.0, gt=0)
    assignment_ttl_seconds: float = Field(default=3600.0, gt=0)
    ingest_rate_per_device: float = Field(default=20.0, gt=0, description="sustained device messages/s")
    ingest_burst_per_device: int = Field(default=200, ge=1, description="messages a device may send at once")
    ingest_batch_max: int = Field(
        default=200,
        ge=0,
        le=5000,
        description="device messages applied per database transaction by an ingest writer; "
        "0 is accepted for old configuration files and means 1 (there is no other ingest path)",
    )
    ingest_workers: int | None = Field(
        default=None, ge=1, le=32, description="ingest writer threads; default 2 on PostgreSQL, always 1 on SQLite"
    )
    ingest_queue_max: int = Field(
        default=1000, ge=1, description="messages waiting per ingest writer before MQTT intake blocks"
    )
    ingest_queue_max_bytes: int = Field(
        default=32 * 1024 * 1024, ge=1024 * 1024, description="payload bytes waiting per ingest writer"
    )
    api_threads: int = Field(default=4, ge=1, le=256, description="worker threads for the sync API routes")
    api_workers: int = Field(
        default=0,
        ge=0,
        le=64,
        description="0: one process serves everything; N: N API processes plus a core process (engine, MQTT)",
    )
    telemetry_cohort_label: str = Field(
        default="cohort",
        max_length=63,
        description="device label whose value is a telemetry cohort (aggregates, summary, metrics); '' for none",
    )
    telemetry_bucket_seconds: int = Field(
        default=300, ge=60, le=86400, description="time bucket of the telemetry aggregates (by window end)"
    )
    metrics_public: bool = Field(
        default=False, description="serve the Prometheus /metrics without a token (a private network only)"
    )
    max_sample_bytes: int = Field(default=16 * 1024 * 1024, ge=1024, description="raw-input sample upload cap")
    log_level: str = "INFO"
    # TUF repository (python-tuf metadata at /tuf/): an added layer beside the release and server signatures
    tuf_enabled: bool = Field(default=True, description="serve TUF metadata and give devices its root")
    tuf_dir: Path | None = Field(default=None, description="TUF metadata and online keys; default data_dir/tuf")
    tuf_root_keys: int = Field(default=1, ge=1, le=16, description="root keys generated by the first start")
    tuf_root_threshold: int = Field(default=1, ge=1, le=16, description="root signatures required")
    tuf_timestamp_expiry_seconds: float = Field(default=86400.0, ge=60, description="timestamp lifetime")
    tuf_snapshot_expiry_seconds: float = Field(default=7 * 86400.0, ge=60, description="snapshot lifetime")
    tuf_targets_expiry_seconds: float = Field(default=7 * 86400.0, ge=60, description="targets lifetime")
    tuf_root_expiry_seconds: float = Field(default=365 * 86400.0, ge=3600, description="root lifetime")
    tuf_refresh_seconds: float = Field(default=60.0, gt=0, description="how often the core re-signs due roles")
    # Alerts (docs/alerts.md): rules evaluated in the core process over the telemetry aggregates
    alert_rules_file: Path | None = Field(
        default=None, description="alert rules (TOML, or JSON by the .json suffix); none: no alerts are evaluated"
    )
    alert_eval_seconds: float = Field(default=30.0, ge=0.1, le=3600, description="how often the core evaluates")
    alert_export_dir: Path | None = Field(
        default=None, description="where exports made for alerts go; default data_dir/alert-exports"
    )
    # Blessing gate (docs/evaluation.md): a release whose latest evaluation failed always needs an override
    require_blessing: bool = Field(
        default=False, description="also refuse to start rollouts of releases never evaluated (unless overridden)"
    )

    @field_validator("release_keys", "hardware_profiles", mode="before")
    @classmethod
    def _parse_release_keys(cls, value: Any) -> Any:
        return _split_paths(value)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        if settings_cls.model_config.get("toml_file"):
            sources.append(TomlConfigSettingsSource(settings_cls))
        return tuple(sources)

    @classmethod
    def load(cls, config_file: str | Path | None = None, **overrides: Any) -> Settings:
        """Build settings from env (and ``config_file`` when given, under the env vars).

        Raises:
            ContractError: the config file is missing or a value is invalid.
        """
        from pydantic import ValidationError

        target: type[Settings] = cls
        if config_file is not None:
            path = Path(config_file)
            if not path.is_file():
                raise ContractError(f"config file {path} not found", ReasonCode.MALFORMED_MESSAGE)
            target = type("FileSettings", (cls,), {"model_config": {**cls.model_config, "toml_file": path}})
        try:
            return target(**overrides)
        except ValidationError as exc:
            err = exc.errors()[0]
            loc = ".".join(str(p) for p in err.get("loc", ()))
            raise ContractError(f"invalid setting {loc}: {err['msg']}", ReasonCode.MALFORMED_MESSAGE) from exc
        except (ValueError, OSError) as exc:
            raise ContractError(f"invalid settings: {exc}", ReasonCode.MALFORMED_MESSAGE) from exc

    # ----------------------------------------------------------------- derived values

    @property
    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite:///{(self.data_dir / 'edgeota.db').resolve()}"

    @property
    def resolved_ingest_workers(self) -> int:
        """Writer threads: SQLite allows one writer at a time, so it always gets one."""
        if self.resolved_database_url.startswith("sqlite"):
            return 1
        return self.ingest_workers or 2

    @property
    def resolved_artifact_dir(self) -> Path:
        return self.artifact_dir or self.data_dir / "artifacts"

    @property
    def resolved_server_key(self) -> Path:
        return self.server_key or self.data_dir / "server_key.pem"

    @property
    def server_public_key_path(self) -> Path:
        key = self.resolved_server_key
        return key.with_name(key.name.removesuffix(".pem") + ".pub.pem")

    @property
    def resolved_mqtt_client_id(self) -> str:
        """Stable per data folder (the broker keeps the session across restarts), distinct between servers."""
        if self.mqtt_client_id:
            return self.mqtt_client_id
        digest = hashlib.sha256(str(self.data_dir.resolve()).encode()).hexdigest()[:8]
        return f"edgeota-server-{digest}"

    @property
    def resolved_tuf_dir(self) -> Path:
        return self.tuf_dir or self.data_dir / "tuf"

    @property
    def tmp_dir(self) -> Path:
        return self.data_dir / "tmp"

    def listening_on(self, host: str, port: int) -> Settings:
        """These settings for a server listening on ``host:port``: unless ``public_url`` was set (argument,
        environment or config file), it becomes that address, so ``server run --port`` changes what devices are
        told. A wildcard host (``0.0.0.0``, ``::``, empty) is advertised as loopback: devices on other machines
        need ``public_url`` set explicitly."""
        if "public_url" in self.model_fields_set:
            return self
        shown = "127.0.0.1" if host in ("", "0.0.0.0", "::") else host
        if ":" in shown and not shown.startswith("["):
            shown = f"[{shown}]"  # an IPv6 address in a URL
        return self.model_copy(update={"public_url": f"http://{shown}:{port}"})
