"""Response bodies of the REST API, as pydantic models: the routes declare them, clients parse with them.

Imports only pydantic and the contract (no FastAPI, no SQLAlchemy), so a client can import this module
without the server. Each model states the JSON the API has always returned: field names and shapes are
part of the API. Times stay ISO 8601 strings exactly as the server formats them (re-serialising them as
``datetime`` would change their text). Models are lenient readers (``extra="ignore"`` by default), so a
client keeps working against a server that adds fields; the rollout status models keep unknown fields
(``extra="allow"``) because the rollout package adds facts to the status as it grows, and a declared
response model would otherwise drop them from the answer. The sample, dataset and telemetry models live in
:mod:`ota_server.api.responses_telemetry` and are re-exported here.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from edgeota_contract.messages import SignedCommand
from ota_server.api.responses_evaluation import BlessingStatus
from ota_server.api.responses_telemetry import (
    Attribution,
    DatasetFile,
    DatasetManifest,
    DriftFeature,
    DriftSummary,
    OutputClasses,
    SampleList,
    SampleRecord,
    ShadowAgreement,
    TelemetryFilters,
    TelemetryGroup,
    TelemetrySummary,
)

__all__ = [  # the sample, dataset and telemetry models (api/responses_telemetry.py) are re-exported
    "BINARY",
    "TUF_METADATA",
    "Attribution",
    "AuditEntry",
    "BundleRecord",
    "DatasetFile",
    "DatasetManifest",
    "DeploymentRecord",
    "DeviceCommands",
    "DeviceDetail",
    "DeviceModelRecord",
    "DeviceProvisioned",
    "DeviceSummary",
    "DriftFeature",
    "DriftSummary",
    "Health",
    "OutputClasses",
    "ReleaseBundle",
    "ReleaseRecord",
    "RolloutCreated",
    "RolloutDryRun",
    "RolloutPreview",
    "RolloutRetries",
    "RolloutStatus",
    "SampleList",
    "SampleRecord",
    "ShadowAgreement",
    "StagePreview",
    "TelemetryFilters",
    "TelemetryGroup",
    "TelemetrySummary",
    "TokenCreated",
    "binary_content",
]


def binary_content(media_type: str) -> dict[str, Any]:
    """The OpenAPI ``content`` of a route answering raw bytes of ``media_type`` (``responses={200: ...}``)."""
    return {media_type: {"schema": {"type": "string", "format": "binary"}}}


BINARY = binary_content("application/octet-stream")
# The envelope of every TUF metadata file (the TUF specification, "Document formats").
TUF_METADATA: dict[str, Any] = {
    "type": "object",
    "properties": {"signed": {"type": "object"}, "signatures": {"type": "array", "items": {"type": "object"}}},
    "required": ["signed", "signatures"],
}


class Health(BaseModel):
    """``GET /healthz``."""

    status: str
    mqtt_connected: bool


class TokenCreated(BaseModel):
    """``POST /api/v1/tokens``: the plaintext ``token`` is shown only here."""

    token_id: str
    role: str
    name: str
    token: str


class AuditEntry(BaseModel):
    """One row of ``GET /api/v1/audit``."""

    id: int
    at: str
    actor: str
    action: str
    entity_type: str
    entity_id: str
    before: dict[str, Any] | None
    after: dict[str, Any] | None
    reason: str


class BundleRecord(BaseModel):
    """``POST /api/v1/bundles`` (201 new, 200 already known)."""

    release_id: str
    model_name: str
    version: str
    hardware_profile: str
    release_counter: int
    bundle_sha256: str
    bundle_size: int


class ReleaseBundle(BundleRecord):
    """A bundle as a release lists it, with what its signed manifest says about it."""

    signing_key_id: str
    metrics: dict[str, Any]
    lineage: dict[str, Any]
    recipe: Any = None


class ReleaseRecord(BaseModel):
    """``GET /api/v1/releases/{id}`` and the rows of ``GET /api/v1/releases``."""

    release_id: str
    model_name: str
    version: str
    created_at: str
    created_by: str
    bundles: list[ReleaseBundle]
    metrics: dict[str, dict[str, Any]] = Field(description="per hardware profile")
    lineage: dict[str, Any]


class DeviceProvisioned(BaseModel):
    """``POST /api/v1/devices``: the credentials are shown only here."""

    device_id: str
    token: str
    mqtt_username: str
    mqtt_password: str
    agent_toml: str


class DeviceSummary(BaseModel):
    """A row of ``GET /api/v1/devices``."""

    device_id: str
    hardware_profile: str
    labels: dict[str, Any]
    online: bool
    last_seen: str | None
    agent_version: str | None
    decommissioned_at: str | None = Field(default=None, description="set when the device was decommissioned")


class DeviceModelRecord(BaseModel):
    """What a device last reported running for one model."""

    model_name: str
    version: str
    bundle_sha256: str
    release_counter: int
    previous_version: str | None
    updated_at: str


class DeploymentRecord(BaseModel):
    """One attempt at bringing one device to one bundle."""

    deployment_id: str
    rollout_id: str
    device_id: str
    mode: str
    stage: int
    model_name: str
    version: str
    bundle_sha256: str
    release_counter: int
    state: str
    reason: str
    detail: str
    attempt: int
    retried: bool
    created_at: str
    updated_at: str


class DeviceDetail(DeviceSummary):
    """``GET /api/v1/devices/{id}``: the summary, its models and its 20 latest deployments."""

    models: list[DeviceModelRecord]
    deployments: list[DeploymentRecord]


class DeviceDecommissioned(BaseModel):
    """``POST /api/v1/devices/{id}/decommission``: what decommissioning changed."""

    device_id: str
    decommissioned_at: str
    left_rollouts: list[str] = Field(description="open rollouts whose targets no longer hold the device")
    cancelled_deployments: list[str] = Field(description="the device's open deployments, now cancelled")


class DeviceCommands(BaseModel):
    """``GET /api/v1/devices/{id}/commands``: the signed commands the device has open, oldest first."""

    commands: list[SignedCommand]


class RolloutRetries(BaseModel):
    retried_attempts: int
    waiting: int


class GateStatus(BaseModel):
    """One telemetry gate: ``passed`` / ``failed`` (value against threshold) or ``not_evaluated`` (have of need)."""

    name: str
    state: str
    value: float | None
    threshold: float | None
    have: int | None
    need: int | None
    unit: str
    detail: str


class FailedDevice(BaseModel):
    """A device whose latest attempt in a rollout failed or was rolled back, and why."""

    device_id: str
    state: str
    reason: str
    detail: str


class RolloutFailures(BaseModel):
    """Why devices failed in a rollout: every reason code counted, the newest few devices named."""

    total: int
    by_reason: dict[str, int]
    devices: list[FailedDevice] = Field(description="the newest failures (at most 10); total counts them all")


class RolloutStatus(BaseModel):
    """``GET /api/v1/rollouts/{id}``, the rows of ``GET /api/v1/rollouts`` and the answer to a command.

    ``deployments`` (every attempt) is present only where the route says so; the list omits it.
    Unknown fields are kept (see the module docstring).
    """

    model_config = ConfigDict(extra="allow")

    rollout_id: str
    release_id: str
    model_name: str | None = Field(default=None, description="the release's model")
    version: str | None = Field(default=None, description="the release's version")
    state: str
    reason: str
    detail: str
    current_stage: int
    stage_count: int
    stage_sizes: list[int]
    plan: dict[str, Any]
    selector: dict[str, Any]
    targets: int
    no_bundle_for_profile: list[Any]
    skipped_rolled_back_before: list[Any]
    counts: dict[str, int]
    rollback_counts: dict[str, int]
    retries: RolloutRetries
    created_at: str
    updated_at: str
    created_by: str
    start_at: str | None
    gates: list[GateStatus] | None = Field(
        default=None, description="the telemetry gates of the plan, as last judged (current stage)"
    )
    gates_evaluated_at: str | None = None
    telemetry: Attribution | None = Field(
        default=None, description="requests on the release's profiles since the rollout was created, and attribution"
    )
    deployments: list[DeploymentRecord] | None = None
    failures: RolloutFailures | None = Field(default=None, description="failed and rolled-back devices, by reason")
    blessing: BlessingStatus | None = Field(
        default=None, description="what the blessing gate found when the rollout started (null before)"
    )
    bandit: BanditStatus | None = Field(default=None, description="a bandit rollout's arms and allocation")


class BanditPosterior(BaseModel):
    """Beta(alpha, beta) of an arm's reward rate; ``low``..``high``: central 95% from the last step's draws."""

    alpha: float
    beta: float
    mean: float
    low: float | None
    high: float | None


class BanditArm(BaseModel):
    """One arm of a bandit rollout (``ota_server.services.bandit_status``)."""

    release_id: str
    version: str
    position: int
    state: str = Field(description="active, dropped (failed its gates), winner or retired")
    reason: str
    detail: str
    devices: int = Field(description="devices whose latest attempt is on this arm and did not fail")
    committed: int
    in_progress: int
    failed: int
    share: float | None = Field(description="devices / devices placed on any arm")
    target_share: float | None = Field(description="the share the last step aimed at")
    prob_best: float | None = Field(description="probability of being the best arm at the last step")
    rewards: int = Field(description="feedback rows counted since the rollout started")
    reward_sum: float
    posterior: BanditPosterior
    gates: list[GateStatus] | None = Field(description="the plan's telemetry gates judged on this arm's release")


class BanditStatus(BaseModel):
    """The ``bandit`` section of a bandit rollout's status."""

    config: dict[str, Any]
    steps: int
    last_step_at: str | None
    last_seed: int | None = Field(description="the seed of the last step's draws (recomputable)")
    leader: str | None = Field(description="the arm at or over win_probability at the last step")
    leader_since: str | None
    winner_release_id: str | None
    moved_by_steps: int
    arms: list[BanditArm]


class StagePreview(BaseModel):
    """Which devices a stage takes (``cumulative``: the devices through this stage)."""

    stage: int
    cumulative: int
    devices: list[str]


class RolloutPreview(BaseModel):
    """What a new rollout targets, stage by stage."""

    model_config = ConfigDict(extra="allow")

    stages: list[StagePreview]
    no_bundle_for_profile: list[Any]
    skipped_rolled_back_before: list[Any]
    eligible: int


class RolloutCreated(RolloutStatus):
    """``POST /api/v1/rollouts`` (201): the new rollout's status and its preview."""

    preview: RolloutPreview


class RolloutDryRun(BaseModel):
    """``POST /api/v1/rollouts`` with ``dry_run`` (200): the preview only; nothing is stored.

    The fields of :class:`RolloutPreview` after ``dry_run``, in the order the server sends them.
    """

    model_config = ConfigDict(extra="allow")

    dry_run: bool
    stages: list[StagePreview]
    no_bundle_for_profile: list[Any]
    skipped_rolled_back_before: list[Any]
    eligible: int
