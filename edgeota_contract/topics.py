"""MQTT topic names under a versioned prefix.

Per device ``{id}``::

    edgeota/v1/devices/{id}/cmd        server -> device   signed commands (QoS 1)
    edgeota/v1/devices/{id}/status     device -> server   deployment status reports (QoS 1)
    edgeota/v1/devices/{id}/checkin    device -> server   what the device really runs (QoS 1)
    edgeota/v1/devices/{id}/telemetry  device -> server   telemetry windows (QoS 1)
    edgeota/v1/devices/{id}/feedback   device -> server   application feedback: true labels, rewards (QoS 1)
    edgeota/v1/devices/{id}/presence   device -> server   "online"/"offline" (last will, retained)

The server takes a device's identity from the topic it published on (the broker's ACL only
lets a device publish under its own id), never from a payload.
"""

from __future__ import annotations

import re
from enum import StrEnum

from edgeota_contract.errors import ContractError
from edgeota_contract.states import ReasonCode

PREFIX = "edgeota/v1"
DEVICE_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
_DEVICE_ID = re.compile(DEVICE_ID_PATTERN)


class Channel(StrEnum):
    CMD = "cmd"
    STATUS = "status"
    CHECKIN = "checkin"
    TELEMETRY = "telemetry"
    PRESENCE = "presence"
    FEEDBACK = "feedback"


DEVICE_TO_SERVER = (Channel.STATUS, Channel.CHECKIN, Channel.TELEMETRY, Channel.PRESENCE, Channel.FEEDBACK)


def validate_device_id(device_id: str) -> str:
    """Device ids are flat, topic-safe names (no ``/``, ``+``, ``#``); raises ContractError."""
    if not isinstance(device_id, str) or not _DEVICE_ID.match(device_id):
        raise ContractError(f"invalid device id {device_id!r}", ReasonCode.MALFORMED_MESSAGE)
    return device_id


def device_topic(device_id: str, channel: Channel) -> str:
    return f"{PREFIX}/devices/{validate_device_id(device_id)}/{channel.value}"


def server_subscriptions(shared_group: str | None = None) -> list[str]:
    """Filters the server subscribes to; with ``shared_group`` (MQTT 5) replicas split the load."""
    filters = [f"{PREFIX}/devices/+/{c.value}" for c in DEVICE_TO_SERVER]
    if shared_group:
        return [f"$share/{shared_group}/{f}" for f in filters]
    return filters


def parse_device_topic(topic: str) -> tuple[str, Channel]:
    """Split ``edgeota/v1/devices/{id}/{channel}``; raises ContractError on anything else."""
    parts = topic.split("/")
    if len(parts) != 5 or "/".join(parts[:3]) != f"{PREFIX}/devices":
        raise ContractError(f"not an edgeota device topic: {topic!r}", ReasonCode.MALFORMED_MESSAGE)
    try:
        channel = Channel(parts[4])
    except ValueError as exc:
        raise ContractError(f"unknown channel in topic {topic!r}", ReasonCode.MALFORMED_MESSAGE) from exc
    return validate_device_id(parts[3]), channel


def mosquitto_acl_patterns() -> list[str]:
    """ACL ``pattern`` lines (``%u`` = username = device id) giving each device only its own topics."""
    return [
        f"pattern read {PREFIX}/devices/%u/cmd",
        f"pattern write {PREFIX}/devices/%u/status",
        f"pattern write {PREFIX}/devices/%u/checkin",
        f"pattern write {PREFIX}/devices/%u/telemetry",
        f"pattern write {PREFIX}/devices/%u/presence",
        f"pattern write {PREFIX}/devices/%u/feedback",
    ]
