"""MQTT message schemas (JSON, schema version 1).

Server -> device: a :class:`SignedCommand` envelope on the device's ``cmd`` topic. Its
``body`` is the canonical JSON of one command (an :class:`Assignment`, :class:`Ack`,
:class:`CheckinRequest` or :class:`ShadowStop`); ``sig`` is the server key's signature over
exactly those UTF-8 bytes. A device acts on nothing that fails :func:`verify_command`.

Device -> server: :class:`StatusReport`, :class:`CheckIn`, :class:`TelemetryWindow`,
:class:`FeedbackReport` and :class:`Presence`. Each (but presence) has a ``msg_id`` (for acks), and a ``boot_id`` and
per-boot ``seq`` (so ingest can deduplicate and order). Use :func:`parse_device_message`
to parse one with the size limit and a clear error.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, model_validator

from edgeota_contract.errors import AssignmentError, ContractError
from edgeota_contract.manifest import NAME_PATTERN, SEMVER_PATTERN, SHA256_PATTERN
from edgeota_contract.signing import DetachedSignature, SigningKey, TrustedKeys, canonical_json, verify_detached
from edgeota_contract.states import DeploymentState, ReasonCode
from edgeota_contract.telemetry import FeatureSummary, OutputSummary, ShadowSummary
from edgeota_contract.topics import DEVICE_ID_PATTERN, Channel

MESSAGE_SCHEMA_VERSION = 1
MAX_MESSAGE_BYTES = 256 * 1024
"""Largest payload either side accepts; brokers should be configured with the same limit."""

_ID = r"^[A-Za-z0-9_.:-]{1,64}$"


def new_id() -> str:
    return uuid.uuid4().hex


def utcnow() -> datetime:
    return datetime.now(UTC)


class _Msg(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    schema_version: Literal[1] = 1


# ---------------------------------------------------------------- server -> device commands


class Assignment(_Msg):
    """Install (or shadow, or roll back to) one bundle on one device.

    ``mode="rollback"`` is the explicit, server-signed permission to install a bundle whose
    release counter is below the device's committed one; ``install`` never allows that.
    ``bundle_url`` is a path on the server (``/api/v1/...``) or an absolute URL.
    """

    kind: Literal["assign"] = "assign"
    assignment_id: str = Field(default_factory=new_id, pattern=_ID)
    deployment_id: str = Field(pattern=_ID)
    rollout_id: str | None = Field(default=None, pattern=_ID)
    device_id: str = Field(pattern=DEVICE_ID_PATTERN)
    mode: Literal["install", "rollback", "shadow"] = "install"
    model_name: str = Field(pattern=NAME_PATTERN)
    version: str = Field(pattern=SEMVER_PATTERN)
    release_counter: int = Field(ge=1)
    hardware_profile: str = Field(pattern=NAME_PATTERN)
    bundle_sha256: str = Field(pattern=SHA256_PATTERN)
    bundle_size: int = Field(ge=1)
    bundle_url: str = Field(min_length=1, max_length=2048)
    shadow_sample_rate: float = Field(default=1.0, gt=0, le=1)
    issued_at: datetime
    expires_at: datetime
    nonce: str = Field(default_factory=new_id, pattern=_ID)


class ShadowStop(_Msg):
    kind: Literal["shadow_stop"] = "shadow_stop"
    device_id: str = Field(pattern=DEVICE_ID_PATTERN)
    model_name: str = Field(pattern=NAME_PATTERN)
    issued_at: datetime
    expires_at: datetime
    nonce: str = Field(default_factory=new_id, pattern=_ID)


class Ack(_Msg):
    """The server stored these device messages; the device may drop them from its retry queue."""

    kind: Literal["ack"] = "ack"
    device_id: str = Field(pattern=DEVICE_ID_PATTERN)
    msg_ids: list[str] = Field(max_length=5000)
    issued_at: datetime
    expires_at: datetime
    nonce: str = Field(default_factory=new_id, pattern=_ID)


class CheckinRequest(_Msg):
    kind: Literal["checkin_request"] = "checkin_request"
    device_id: str = Field(pattern=DEVICE_ID_PATTERN)
    issued_at: datetime
    expires_at: datetime
    nonce: str = Field(default_factory=new_id, pattern=_ID)


Command = Annotated[Assignment | ShadowStop | Ack | CheckinRequest, Field(discriminator="kind")]
_COMMAND = TypeAdapter(Command)


class SignedCommand(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    body: str = Field(max_length=MAX_MESSAGE_BYTES)
    sig: DetachedSignature


def sign_command(command: Assignment | ShadowStop | Ack | CheckinRequest, key: SigningKey) -> bytes:
    """The MQTT payload carrying ``command`` signed by the server key."""
    body = canonical_json(command.model_dump(mode="json")).decode("utf-8")
    return SignedCommand(body=body, sig=key.sign(body.encode("utf-8"))).model_dump_json().encode("utf-8")


def verify_command(
    payload: bytes,
    trusted_server_keys: TrustedKeys,
    device_id: str,
    now: datetime | None = None,
    max_clock_skew: timedelta = timedelta(minutes=5),
) -> Assignment | ShadowStop | Ack | CheckinRequest:
    """Parse and authenticate a command for ``device_id``.

    Replay of a once-valid command within its lifetime is the device's to refuse (it keeps
    the assignment ids and nonces it has used); this checks signature, device and freshness.

    Raises:
        ContractError: oversized or malformed payload.
        SignatureError: missing, untrusted or invalid signature.
        AssignmentError: meant for another device (``wrong_device``), expired or issued in
            the future beyond the allowed clock skew (``assignment_expired``).
    """
    if len(payload) > MAX_MESSAGE_BYTES:
        raise ContractError("command payload too large", ReasonCode.MALFORMED_MESSAGE)
    try:
        envelope = SignedCommand.model_validate_json(payload)
    except ValidationError as exc:
        raise ContractError("command is not a signed envelope", ReasonCode.MALFORMED_MESSAGE) from exc
    verify_detached(envelope.body.encode("utf-8"), envelope.sig, trusted_server_keys)
    try:
        command = _COMMAND.validate_json(envelope.body)
    except ValidationError as exc:
        raise ContractError(f"malformed command: {exc.errors()[0]['msg']}", ReasonCode.MALFORMED_MESSAGE) from exc
    if command.device_id != device_id:
        raise AssignmentError(f"command is for device {command.device_id!r}", ReasonCode.WRONG_DEVICE)
    now = now or utcnow()
    if command.expires_at < now:
        raise AssignmentError("command expired", ReasonCode.ASSIGNMENT_EXPIRED)
    if command.issued_at > now + max_clock_skew:
        raise AssignmentError("command issued in the future", ReasonCode.ASSIGNMENT_EXPIRED)
    return command


# ---------------------------------------------------------------- device -> server reports


class _DeviceMsg(_Msg):
    msg_id: str = Field(default_factory=new_id, pattern=_ID)
    boot_id: str = Field(pattern=_ID)
    seq: int = Field(ge=0)
    sent_at: datetime = Field(default_factory=utcnow)


class StatusReport(_DeviceMsg):
    """A deployment moved to ``state``. Reported for every step, retried until acked."""

    kind: Literal["status"] = "status"
    deployment_id: str = Field(pattern=_ID)
    assignment_id: str = Field(pattern=_ID)
    state: DeploymentState
    reason: ReasonCode = ReasonCode.OK
    detail: str = Field(default="", max_length=1000)
    model_name: str = Field(pattern=NAME_PATTERN)
    version: str = Field(pattern=SEMVER_PATTERN)
    bundle_sha256: str = Field(pattern=SHA256_PATTERN)


class RunningModel(_Msg):
    model_name: str = Field(pattern=NAME_PATTERN)
    version: str = Field(pattern=SEMVER_PATTERN)
    bundle_sha256: str = Field(pattern=SHA256_PATTERN)
    release_counter: int = Field(ge=1)
    slot: str = Field(max_length=16)
    state: Literal["serving", "trial"] = "serving"
    shadow_version: str | None = Field(default=None, pattern=SEMVER_PATTERN)


class CheckIn(_DeviceMsg):
    """What the device really runs, sent on every connect and on a heartbeat."""

    kind: Literal["checkin"] = "checkin"
    hardware_profile: str = Field(pattern=NAME_PATTERN)
    agent_version: str = Field(max_length=64)
    models: list[RunningModel] = Field(default_factory=list, max_length=64)
    active_deployment_id: str | None = Field(default=None, pattern=_ID)
    active_state: DeploymentState | None = None


class TelemetryWindow(_DeviceMsg):
    """Additive summaries of one fixed window of inference on one model version."""

    kind: Literal["telemetry"] = "telemetry"
    model_name: str = Field(pattern=NAME_PATTERN)
    version: str = Field(pattern=SEMVER_PATTERN)
    bundle_sha256: str = Field(pattern=SHA256_PATTERN)
    window_start: datetime
    window_end: datetime
    request_count: int = Field(ge=0)
    error_count: int = Field(ge=0)
    latency_counts: list[int] = Field(description="counts on LATENCY_EDGES_MS (len(edges)+1)")
    features: list[FeatureSummary] = Field(default_factory=list, max_length=1024)
    feature_requests: int | None = Field(
        default=None,
        ge=0,
        description="successful requests whose inputs the feature summaries cover: a uniform random sample of"
        " them, independent of the inputs and outputs (the agent's telemetry_feature_sample_rate); None: every"
        " successful request. Counts, latency and output summaries always cover every request.",
    )
    outputs: list[OutputSummary] = Field(default_factory=list, max_length=64)
    shadow: ShadowSummary | None = None
    spool_dropped: int = Field(default=0, ge=0, description="windows dropped by a full spool so far")

    @model_validator(mode="after")
    def _sample_within_requests(self) -> TelemetryWindow:
        if self.feature_requests is not None and self.feature_requests > self.request_count - self.error_count:
            raise ValueError("feature_requests exceeds the window's successful requests")
        return self


MAX_FEEDBACK_ITEMS = 500
"""Items in one :class:`FeedbackReport` (a report stays far below ``MAX_MESSAGE_BYTES``)."""


class FeedbackItem(_Msg):
    """What an application said about one prediction (one row of one request) the device served.

    ``prediction_id`` is the id the agent returned with the answer (``parameters.prediction_id``), ``row`` the
    row of a batched request (0 otherwise). ``predicted`` (the top-1 class index as text) and ``confidence``
    are what the agent remembered of its answer (None for an output that is not a class output). At least one
    of ``label`` (the true class, as text) and ``reward`` (the application's own reward in [0, 1]) is set.
    """

    prediction_id: str = Field(pattern=_ID)
    row: int = Field(default=0, ge=0, le=1_000_000)
    model_name: str = Field(pattern=NAME_PATTERN)
    version: str = Field(pattern=SEMVER_PATTERN, max_length=128)
    bundle_sha256: str = Field(pattern=SHA256_PATTERN)
    predicted: str | None = Field(default=None, max_length=128)
    confidence: float | None = Field(default=None, ge=0, le=1)
    label: str | None = Field(default=None, min_length=1, max_length=128)
    reward: float | None = Field(default=None, ge=0, le=1)
    predicted_at: datetime | None = None

    @model_validator(mode="after")
    def _label_or_reward(self) -> FeedbackItem:
        if self.label is None and self.reward is None:
            raise ValueError("feedback needs a label or a reward")
        return self


class FeedbackReport(_DeviceMsg):
    """A batch of application feedback, spooled and re-sent until acked (on the ``feedback`` channel).

    The server stores each item once per (device, prediction id, row): a later item for the same prediction
    replaces its label or reward. ``spool_dropped``: feedback reports the device's full spool dropped so far.
    """

    kind: Literal["feedback"] = "feedback"
    items: list[FeedbackItem] = Field(min_length=1, max_length=MAX_FEEDBACK_ITEMS)
    spool_dropped: int = Field(default=0, ge=0)


class Presence(BaseModel):
    """Retained on ``presence``; the offline form is the MQTT last will."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    online: bool
    boot_id: str = Field(pattern=_ID)


DeviceMessage = Annotated[StatusReport | CheckIn | TelemetryWindow | FeedbackReport, Field(discriminator="kind")]
_DEVICE_MESSAGE = TypeAdapter(DeviceMessage)
_EXPECTED_KIND = {
    Channel.STATUS: "status",
    Channel.CHECKIN: "checkin",
    Channel.TELEMETRY: "telemetry",
    Channel.FEEDBACK: "feedback",
}


def parse_device_message(
    channel: Channel, payload: bytes
) -> StatusReport | CheckIn | TelemetryWindow | FeedbackReport | Presence:
    """Parse a payload received on a device channel; raises ContractError with a short reason."""
    if len(payload) > MAX_MESSAGE_BYTES:
        raise ContractError(
            f"payload of {len(payload)} bytes exceeds {MAX_MESSAGE_BYTES}", ReasonCode.MALFORMED_MESSAGE
        )
    try:
        if channel == Channel.PRESENCE:
            return Presence.model_validate_json(payload)
        message = _DEVICE_MESSAGE.validate_json(payload)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = ".".join(str(p) for p in err.get("loc", ()))
        raise ContractError(
            f"malformed {channel.value} message: {loc}: {err['msg']}", ReasonCode.MALFORMED_MESSAGE
        ) from exc
    if _EXPECTED_KIND.get(channel) != message.kind:
        raise ContractError(f"a {message.kind} message on the {channel.value} channel", ReasonCode.MALFORMED_MESSAGE)
    return message
