"""Signed commands, device messages and topics: acceptance and every rejection path."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest

from edgeota_contract.errors import AssignmentError, ContractError, SignatureError
from edgeota_contract.messages import (
    MAX_MESSAGE_BYTES,
    Ack,
    Assignment,
    CheckIn,
    Presence,
    StatusReport,
    TelemetryWindow,
    parse_device_message,
    sign_command,
    verify_command,
)
from edgeota_contract.signing import SigningKey, TrustedKeys
from edgeota_contract.states import DeploymentState, ReasonCode
from edgeota_contract.telemetry import LATENCY_EDGES_MS
from edgeota_contract.topics import (
    Channel,
    device_topic,
    mosquitto_acl_patterns,
    parse_device_topic,
    server_subscriptions,
)

NOW = datetime(2026, 11, 22, 12, 0, tzinfo=UTC)


def _assignment(device: str = "dev-1", **kw: object) -> Assignment:
    fields: dict[str, object] = dict(
        deployment_id="d1",
        device_id=device,
        model_name="digits",
        version="1.2.0",
        release_counter=1_002_000,
        hardware_profile="x86-avx2",
        bundle_sha256="b" * 64,
        bundle_size=1234,
        bundle_url="/api/v1/artifacts/" + "b" * 64,
        issued_at=NOW,
        expires_at=NOW + timedelta(hours=1),
    )
    fields.update(kw)
    return Assignment(**fields)  # type: ignore[arg-type]


@pytest.fixture
def server_key() -> SigningKey:
    return SigningKey.generate()


def test_signed_assignment_roundtrip(server_key: SigningKey) -> None:
    payload = sign_command(_assignment(), server_key)
    cmd = verify_command(payload, TrustedKeys([server_key.public_key]), "dev-1", now=NOW)
    assert isinstance(cmd, Assignment)
    assert cmd == _assignment().model_copy(update={"assignment_id": cmd.assignment_id, "nonce": cmd.nonce})


def test_foreign_device_refused(server_key: SigningKey) -> None:
    payload = sign_command(_assignment("dev-2"), server_key)
    with pytest.raises(AssignmentError) as err:
        verify_command(payload, TrustedKeys([server_key.public_key]), "dev-1", now=NOW)
    assert err.value.reason == ReasonCode.WRONG_DEVICE


@pytest.mark.parametrize(
    ("issued", "expires"),
    [(NOW - timedelta(hours=2), NOW - timedelta(seconds=1)), (NOW + timedelta(hours=1), NOW + timedelta(hours=2))],
)
def test_expired_or_future_refused(server_key: SigningKey, issued: datetime, expires: datetime) -> None:
    payload = sign_command(_assignment(issued_at=issued, expires_at=expires), server_key)
    with pytest.raises(AssignmentError) as err:
        verify_command(payload, TrustedKeys([server_key.public_key]), "dev-1", now=NOW)
    assert err.value.reason == ReasonCode.ASSIGNMENT_EXPIRED


def test_untrusted_key_and_tampered_body_refused(server_key: SigningKey) -> None:
    payload = sign_command(_assignment(), server_key)
    with pytest.raises(SignatureError) as err:
        verify_command(payload, TrustedKeys([SigningKey.generate().public_key]), "dev-1", now=NOW)
    assert err.value.reason == ReasonCode.UNKNOWN_KEY
    envelope = json.loads(payload)
    envelope["body"] = envelope["body"].replace("1.2.0", "1.3.0")
    with pytest.raises(SignatureError) as err:
        verify_command(json.dumps(envelope).encode(), TrustedKeys([server_key.public_key]), "dev-1", now=NOW)
    assert err.value.reason == ReasonCode.SIGNATURE_INVALID


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        b"not json",
        b'{"body": "{}"}',
        json.dumps(_assignment().model_dump(mode="json")).encode(),  # unsigned command
        b"x" * (MAX_MESSAGE_BYTES + 1),
    ],
)
def test_malformed_commands_refused(server_key: SigningKey, payload: bytes) -> None:
    with pytest.raises(ContractError):
        verify_command(payload, TrustedKeys([server_key.public_key]), "dev-1", now=NOW)


def test_signed_but_malformed_body_refused(server_key: SigningKey) -> None:
    body = '{"kind":"assign","device_id":"dev-1"}'
    envelope = {"body": body, "sig": server_key.sign(body.encode()).model_dump()}
    with pytest.raises(ContractError):
        verify_command(json.dumps(envelope).encode(), TrustedKeys([server_key.public_key]), "dev-1", now=NOW)


def test_ack_roundtrip(server_key: SigningKey) -> None:
    ack = Ack(device_id="dev-1", msg_ids=["a", "b"], issued_at=NOW, expires_at=NOW + timedelta(minutes=5))
    cmd = verify_command(sign_command(ack, server_key), TrustedKeys([server_key.public_key]), "dev-1", now=NOW)
    assert isinstance(cmd, Ack) and cmd.msg_ids == ["a", "b"]


def _status() -> StatusReport:
    return StatusReport(
        boot_id="boot1",
        seq=3,
        deployment_id="d1",
        assignment_id="a1",
        state=DeploymentState.TRIAL,
        model_name="digits",
        version="1.2.0",
        bundle_sha256="b" * 64,
    )


def test_device_messages_parse_on_their_channel() -> None:
    status = _status()
    assert parse_device_message(Channel.STATUS, status.model_dump_json().encode()) == status
    checkin = CheckIn(boot_id="b", seq=0, hardware_profile="x86-avx2", agent_version="0.1.0")
    assert parse_device_message(Channel.CHECKIN, checkin.model_dump_json().encode()) == checkin
    window = TelemetryWindow(
        boot_id="b",
        seq=1,
        model_name="digits",
        version="1.2.0",
        bundle_sha256="b" * 64,
        window_start=NOW,
        window_end=NOW + timedelta(seconds=10),
        request_count=5,
        error_count=0,
        latency_counts=[0] * (len(LATENCY_EDGES_MS) + 1),
    )
    assert parse_device_message(Channel.TELEMETRY, window.model_dump_json().encode()) == window
    presence = Presence(online=False, boot_id="b")
    assert parse_device_message(Channel.PRESENCE, presence.model_dump_json().encode()) == presence


def _window(**fields: object) -> TelemetryWindow:
    base: dict[str, object] = {
        "boot_id": "b",
        "seq": 1,
        "model_name": "digits",
        "version": "1.2.0",
        "bundle_sha256": "b" * 64,
        "window_start": NOW,
        "window_end": NOW + timedelta(seconds=10),
        "request_count": 5,
        "error_count": 1,
        "latency_counts": [0] * (len(LATENCY_EDGES_MS) + 1),
    }
    return TelemetryWindow.model_validate(base | fields)


def test_sampled_feature_requests_roundtrip_and_bound() -> None:
    assert _window().feature_requests is None  # absent: every successful request (older agents)
    for sampled in (0, 4):
        window = _window(feature_requests=sampled)
        assert parse_device_message(Channel.TELEMETRY, window.model_dump_json().encode()) == window
    payload = _window(feature_requests=4).model_dump_json().replace('"feature_requests":4', '"feature_requests":5')
    with pytest.raises(ContractError, match="feature_requests") as err:  # more than the 4 successful requests
        parse_device_message(Channel.TELEMETRY, payload.encode())
    assert err.value.reason == ReasonCode.MALFORMED_MESSAGE


@pytest.mark.parametrize(
    ("channel", "payload"),
    [
        (Channel.TELEMETRY, _status().model_dump_json().encode()),  # right schema, wrong channel
        (Channel.STATUS, b"{}"),
        (Channel.STATUS, b"\xff\xfe"),
        (Channel.STATUS, _status().model_dump_json().replace('"trial"', '"exploded"').encode()),
        (Channel.STATUS, _status().model_dump_json()[:-1].encode() + b',"extra":1}'),
        (Channel.STATUS, b"[" * (MAX_MESSAGE_BYTES + 1)),
    ],
)
def test_bad_device_messages_rejected(channel: Channel, payload: bytes) -> None:
    with pytest.raises(ContractError) as err:
        parse_device_message(channel, payload)
    assert err.value.reason == ReasonCode.MALFORMED_MESSAGE


def test_topics() -> None:
    topic = device_topic("dev-1", Channel.STATUS)
    assert topic == "edgeota/v1/devices/dev-1/status"
    assert parse_device_topic(topic) == ("dev-1", Channel.STATUS)
    assert "$share/ingest/edgeota/v1/devices/+/telemetry" in server_subscriptions("ingest")
    assert all("%u" in line for line in mosquitto_acl_patterns())


@pytest.mark.parametrize(
    "topic",
    ["edgeota/v1/devices/dev-1/nope", "edgeota/v2/devices/dev-1/status", "edgeota/v1/devices/+/status", "x", ""],
)
def test_bad_topics_rejected(topic: str) -> None:
    with pytest.raises(ContractError):
        parse_device_topic(topic)


@pytest.mark.parametrize("device_id", ["", "a/b", "+", "#", "a" * 65, "-lead", "sp ace"])
def test_bad_device_ids_rejected(device_id: str) -> None:
    with pytest.raises(ContractError):
        device_topic(device_id, Channel.CMD)
