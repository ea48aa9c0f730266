"""The agent's configuration: the provisioning file plus its typed ``[agent]`` table.

``agent.toml`` follows :class:`edgeota_contract.provisioning.DeviceProvisioning`; the
``[agent]`` table holds the local settings parsed into :class:`AgentSettings`. Environment
variables ``EDGEOTA_AGENT_<NAME>`` fill any setting the file leaves out (handy for tests and
systemd drop-ins); values in the file win.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from edgeota_contract.errors import ContractError
from edgeota_contract.provisioning import DeviceProvisioning
from edgeota_contract.signing import TrustedKeys
from edgeota_contract.states import ReasonCode


class AgentSettings(BaseSettings):
    """Local settings of one agent. Every duration is in seconds, every size in bytes."""

    model_config = SettingsConfigDict(env_prefix="EDGEOTA_AGENT_", extra="forbid", frozen=True)

    state_dir: Path = Field(default=Path("/var/lib/edgeota-agent"), description="one agent per folder")
    heartbeat_seconds: float = Field(default=60.0, gt=0)
    telemetry_window_seconds: float = Field(default=60.0, gt=0)
    telemetry_background: bool = Field(
        default=False,
        description="summarise telemetry batches on a shared background thread rather than on the request that"
        " fills a batch: no ~0.3 ms pause once per batch, but more CPU in total (GIL hand-offs; see bench/README.md)",
    )
    telemetry_feature_sample_rate: float = Field(
        default=0.0625,
        gt=0,
        le=1,
        description="share of requests (uniform, random) whose inputs feed the feature summaries (drift); counts,"
        " latency and outputs always cover every request; 1 summarises every request's inputs",
    )
    telemetry_native: bool = Field(
        default=True,
        description="summarise the usual request in C (device_agent._telemetry_native, built at install where a C"
        " compiler is found); False, or an install without it: the same windows from pure Python, at about twice"
        " the cost (bench/README.md)",
    )
    report_retry_seconds: float = Field(default=30.0, gt=0, description="first re-send of an unacknowledged message")
    report_retry_max_seconds: float = Field(
        default=600.0, gt=0, description="re-sends back off (doubling, jittered) up to this interval"
    )
    # download
    download_timeout_seconds: float = Field(default=600.0, gt=0, description="hard deadline per attempt")
    download_stall_seconds: float = Field(default=30.0, gt=0, description="no byte for this long aborts")
    download_retries: int = Field(default=5, ge=0)
    download_backoff_seconds: float = Field(default=1.0, ge=0, description="first retry delay, doubled each time")
    download_backoff_max_seconds: float = Field(default=60.0, ge=0)
    download_rate_limit_bps: int | None = Field(default=None, gt=0, description="bandwidth cap, bytes/s")
    disk_margin_bytes: int = Field(default=1 << 20, ge=0, description="free space kept beyond the needs")
    keep_bundle_archives: bool = Field(
        default=True,
        description="keep the archives of the last two committed bundles (the one serving and the one before) in"
        " state_dir/download, so a server-ordered rollback to the previous release needs no download; costs the"
        " disk of up to two bundle archives; a kept archive is hashed again before reuse; False: removed on commit",
    )
    # trial window and health thresholds
    trial_requests: int = Field(default=200, ge=0, description="live requests that end the trial early")
    trial_seconds: float = Field(default=30.0, ge=0, description="the trial lasts at most this long")
    trial_probe_interval_seconds: float = Field(default=1.0, gt=0, description="test-vector probes during trial")
    health_max_error_rate: float = Field(default=0.05, ge=0, le=1)
    health_min_requests: int = Field(default=10, ge=1, description="requests before the error rate counts")
    health_max_nan_outputs: int = Field(default=0, ge=0)
    health_latency_factor: float = Field(default=3.0, gt=1, description="median may be this many times the old one")
    health_latency_slack_ms: float = Field(default=2.0, ge=0, description="absolute slack for tiny latencies")
    max_boot_attempts: int = Field(default=2, ge=1, description="boots in trial before a local rollback")
    fast_rollback: bool = Field(
        default=True,
        description="a server-ordered rollback to a bundle this device committed before (its sha256 is in the"
        " state's committed_bundles) gets the smoke test and a short probe (rollback_probe_seconds) instead of a"
        " full trial window; False: the full trial, as for a new release",
    )
    rollback_probe_seconds: float = Field(
        default=1.0, ge=0, description="fast rollback: how long the known-good model is probed after the switch"
    )
    max_update_deferral_seconds: float = Field(default=3600.0, ge=0, description="cap on the app's deferral")
    deferral_poll_seconds: float = Field(default=5.0, gt=0, description="how often a deferring app is asked")
    # spool and retry queue
    spool_max_windows: int = Field(default=10_000, ge=1)
    spool_drain_batch: int = Field(default=20, ge=1, description="spooled windows sent per retry tick")
    outbox_max_reports: int = Field(default=500, ge=10)
    # application feedback (true labels, rewards) for predictions served by the local endpoint or predict_tracked
    feedback_max_predictions: int = Field(
        default=10_000,
        ge=0,
        description="recent predictions remembered for feedback (oldest forgotten first; ~300 bytes each plus ~60"
        " a row, first 64 rows of a request); 0: no feedback through the agent",
    )
    feedback_max_age_seconds: float = Field(
        default=86_400.0,
        gt=0,
        description="a prediction older than this takes no feedback (404); report it to the"
        " server's POST /api/v1/feedback instead",
    )
    feedback_spool_max_reports: int = Field(
        default=10_000, ge=1, description="feedback reports kept until acked (oldest dropped and counted beyond)"
    )
    # raw-input sampling for retraining (off by default)
    sample_rate: float = Field(default=0.0, ge=0, le=1, description="share of requests kept, uniformly at random")
    sample_max_files: int = Field(default=1000, ge=1, description="uniform stream: sample files stored, at most")
    sample_max_per_hour: int | None = Field(default=None, ge=1, description="uniform stream: samples kept per hour")
    hard_sample_rate: float = Field(
        default=0.0,
        ge=0,
        le=1,
        description="hard-example stream: share of requests examined (drawn at random); of those, rows under"
        " hard_confidence_threshold, or classified differently by a running shadow candidate, are kept",
    )
    hard_confidence_threshold: float = Field(default=0.5, gt=0, le=1, description="hard stream: confidence below")
    hard_sample_max_per_hour: int | None = Field(default=60, ge=1, description="hard stream: samples kept per hour")
    hard_sample_max_files: int = Field(default=1000, ge=1, description="hard stream: sample files stored, at most")
    sample_upload_path: str | None = Field(
        default="/api/v1/devices/{device_id}/samples",
        description="POST target on the server (the OTA server's sample route); None disables uploads",
    )
    mqtt_connect_probe_seconds: float = Field(default=5.0, gt=0, description="auto protocol: wait for MQTT 5")
    server_check_seconds: float = Field(
        default=60.0,
        ge=0,
        description="how often the agent checks that its server answers (GET /healthz; the first check at start,"
        " retried sooner while it fails); the result is logged and shown by `edgeota agent status`; 0: never",
    )
    # how commands arrive (device_agent.transport): reports always go over MQTT, the only way the server takes them
    command_transport: Literal["mqtt", "http_poll"] = Field(
        default="mqtt",
        description="mqtt: the server pushes signed commands on the device's MQTT command topic; http_poll: the agent"
        " fetches its assignments from GET /api/v1/devices/{device_id}/commands (device token) every"
        " command_poll_seconds and drops assignments pushed over MQTT, while MQTT still carries its reports and the"
        " server's acks, check-in requests and shadow stops",
    )
    command_poll_seconds: float = Field(
        default=60.0, gt=0, description="http_poll: seconds between polls (jittered by +-10%), the first at start"
    )
    # the local inference endpoint (Open Inference Protocol / KServe v2 over HTTP; device_agent.serving)
    serve_enabled: bool = Field(default=True, description="`edgeota agent run` opens the local inference endpoint")
    serve_socket: Path | None = Field(
        default=None, description="Unix socket path; default <state_dir>/serve.sock (relative: to state_dir)"
    )
    serve_socket_mode: str = Field(
        default="0660", pattern="^0?[0-7]{3}$", description="file mode of the socket: file permissions decide who calls"
    )
    serve_tcp_port: int | None = Field(
        default=None, ge=0, le=65535, description="also listen on this TCP port (0: any free port); None: no TCP"
    )
    serve_tcp_host: str = Field(default="127.0.0.1", description="TCP bind address; must be loopback unless allowed")
    serve_allow_remote: bool = Field(
        default=False, description="allow a non-loopback serve_tcp_host (the endpoint has no TLS: think twice)"
    )
    serve_token: str | None = Field(
        default=None, min_length=16, description="when set, every request needs `Authorization: Bearer <token>`"
    )
    serve_max_body_bytes: int = Field(default=16 << 20, ge=1024, description="larger request bodies get 413")
    allow_insecure_http: bool = Field(
        default=False,
        description="send the device token over plain http to a server that is not on this machine (loopback is"
        " always allowed); off: such a server URL is refused when the configuration is loaded",
    )
    # fault injection (tests): SIGKILL this process when the named step starts
    crash_at: str | None = Field(default=None, description="kill -9 at this named step (testing only)")
    log_level: str = Field(default="INFO", pattern="(?i)^(debug|info|warning|error|critical)$")

    @model_validator(mode="after")
    def _trial_bounded(self) -> AgentSettings:
        if self.trial_requests == 0 and self.trial_seconds == 0:
            raise ValueError("trial_requests and trial_seconds cannot both be 0")
        if not self.serve_allow_remote and not is_loopback(self.serve_tcp_host):
            raise ValueError(
                f"serve_tcp_host {self.serve_tcp_host!r} is not a loopback address (set serve_allow_remote to allow it)"
            )
        return self

    @property
    def serve_socket_path(self) -> Path:
        """Where the Unix socket of the inference endpoint lives."""
        if self.serve_socket is None:
            return self.state_dir / "serve.sock"
        return self.serve_socket if self.serve_socket.is_absolute() else self.state_dir / self.serve_socket


def check_endpoints(provisioning: DeviceProvisioning) -> None:
    """Refuse a server URL that is not an absolute http(s) URL (``127.0.0.1:8080`` would otherwise fail only at
    the first download, hours later) and a broker host written as a URL.

    Raises:
        ContractError: naming the field, the value and the expected form.
    """
    from urllib.parse import urlsplit

    url = provisioning.server.url
    split = urlsplit(url)
    if split.scheme not in ("http", "https") or not split.hostname:
        raise ContractError(
            f"[server] url {url!r} is not an http(s) URL: write it with its scheme, e.g. http://{url.split('://')[-1]}",
            ReasonCode.MALFORMED_MESSAGE,
        )
    host = provisioning.mqtt.host
    if "://" in host or "/" in host or not host.strip():
        raise ContractError(
            f"[mqtt] host {host!r} must be a host name or address (no scheme, no path; the port goes in [mqtt] port)",
            ReasonCode.MALFORMED_MESSAGE,
        )


def is_loopback(host: str) -> bool:
    """Whether ``host`` names the loopback interface (``localhost`` or a 127/8 or ::1 address)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class AgentConfig:
    """Everything one agent needs: identity, endpoints, trust roots and local settings."""

    provisioning: DeviceProvisioning
    settings: AgentSettings
    release_keys: TrustedKeys
    server_keys: TrustedKeys

    @property
    def device_id(self) -> str:
        return self.provisioning.device.id

    @property
    def hardware_profile(self) -> str:
        return self.provisioning.device.hardware_profile

    @classmethod
    def from_provisioning(
        cls, provisioning: DeviceProvisioning, base_dir: Path | None = None, **overrides: Any
    ) -> AgentConfig:
        """Build the config; relative ``state_dir`` is taken relative to ``base_dir``.

        Raises:
            ContractError: an ``[agent]`` key is unknown or has a bad value, or a trust key is not
                an Ed25519 PEM public key.
        """
        raw = {**provisioning.agent, **overrides}
        try:
            settings = AgentSettings(**raw)
        except ValidationError as exc:
            err = exc.errors()[0]
            loc = ".".join(str(p) for p in err.get("loc", ()))
            raise ContractError(f"[agent] {loc}: {err['msg']}", ReasonCode.MALFORMED_MESSAGE) from exc
        from device_agent.transport.http import FetchError, check_token_transport

        check_endpoints(provisioning)
        try:  # the token goes to the server URL's origin only, so this one check covers every request with it
            check_token_transport(provisioning.server.url, settings.allow_insecure_http)
        except FetchError as exc:
            raise ContractError(f"[server] url: {exc}", ReasonCode.MALFORMED_MESSAGE) from exc
        if base_dir is not None and not settings.state_dir.is_absolute():
            settings = settings.model_copy(update={"state_dir": (base_dir / settings.state_dir).resolve()})
        try:
            release = TrustedKeys.from_pems(provisioning.trust.release_keys)
            server = TrustedKeys.from_pems(provisioning.trust.server_keys)
        except Exception as exc:  # SignatureError or a PEM parse error
            raise ContractError(f"[trust]: {exc}", ReasonCode.MALFORMED_MESSAGE) from exc
        return cls(provisioning, settings, release, server)

    @classmethod
    def load(cls, path: str | Path, **overrides: Any) -> AgentConfig:
        """Read ``agent.toml``. Raises ContractError naming the first problem."""
        p = Path(path)
        return cls.from_provisioning(DeviceProvisioning.load(p), base_dir=p.resolve().parent, **overrides)
