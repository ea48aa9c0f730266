"""Provision simulated devices through the OTA server and lay out one folder per device.

Each device gets ``<workdir>/<device id>/provisioning.toml`` (the server's answer, as given),
``agent.toml`` derived from it (the simulator's ``[agent]`` settings and, for devices behind a
cuttable proxy, the proxy's address) and a ``state/`` folder the agent owns. Provisioning is
idempotent per workdir: a device whose ``provisioning.toml`` exists is reused, so a simulator
restart keeps its identities.

Errors: :class:`ProvisioningError` with the server's answer when a device cannot be provisioned.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgeota_contract.errors import EdgeotaError
from edgeota_contract.logs import log_event
from edgeota_contract.provisioning import DeviceProvisioning
from edgeota_contract.states import ReasonCode
from edgeota_contract.topics import validate_device_id

log = logging.getLogger(__name__)
AGENT_TOML = "agent.toml"
ORIGINAL_TOML = "provisioning.toml"  # the server's answer, kept as given; agent.toml is derived from it
STATE_DIR = "state"


class ProvisioningError(EdgeotaError):
    default_reason = ReasonCode.INTERNAL_ERROR


@dataclass(frozen=True)
class DevicePlan:
    device_id: str
    hardware_profile: str
    labels: Mapping[str, str]


def plan_devices(
    count: int, profiles: Sequence[str], prefix: str = "sim", labels: Mapping[str, str] | None = None
) -> list[DevicePlan]:
    """``count`` devices ``PREFIX-0000``.., profiles assigned round robin, each labelled ``fleet=PREFIX``.

    Raises:
        ProvisioningError: no profiles, or the prefix makes invalid device ids.
    """
    if not profiles:
        raise ProvisioningError("at least one hardware profile is needed")
    width = max(4, len(str(count - 1)))
    out = []
    for i in range(count):
        device_id = f"{prefix}-{i:0{width}d}"
        try:
            validate_device_id(device_id)
        except EdgeotaError as exc:
            raise ProvisioningError(f"prefix {prefix!r} gives an invalid device id: {exc}") from None
        out.append(DevicePlan(device_id, profiles[i % len(profiles)], {"fleet": prefix, **(labels or {})}))
    return out


def provision_device(client: Any, plan: DevicePlan, folder: Path) -> DeviceProvisioning:
    """Ask the server for ``plan``'s identity (``POST /api/v1/devices``), or reuse ``folder/provisioning.toml``.

    ``client`` is an ``httpx.Client`` with the server's base URL and an operator/admin token.

    Raises:
        ProvisioningError: the server refused (e.g. 409: the id exists but this folder lost its file).
    """
    existing = folder / ORIGINAL_TOML
    if existing.is_file():
        return DeviceProvisioning.load(existing)
    body = {"device_id": plan.device_id, "hardware_profile": plan.hardware_profile, "labels": dict(plan.labels)}
    try:
        resp = client.post("/api/v1/devices", json=body)
    except Exception as exc:  # httpx.HTTPError; the module imports no httpx at top level
        raise ProvisioningError(f"cannot reach the server to provision {plan.device_id}: {exc}") from exc
    if resp.status_code != 201:
        raise ProvisioningError(f"provisioning {plan.device_id} failed: HTTP {resp.status_code} {resp.text[:300]}")
    text = resp.json()["agent_toml"]
    provisioning = DeviceProvisioning.model_validate(_toml(text))
    folder.mkdir(parents=True, exist_ok=True)
    existing.write_text(text, encoding="utf-8")
    log_event(log, "device_provisioned", device=plan.device_id, profile=plan.hardware_profile)
    return provisioning


def _toml(text: str) -> dict[str, Any]:
    import tomllib

    return tomllib.loads(text)


def write_device_folder(
    folder: Path,
    provisioning: DeviceProvisioning,
    agent_settings: Mapping[str, Any],
    mqtt_address: tuple[str, int] | None = None,
) -> Path:
    """Write ``folder/agent.toml`` with ``[agent]`` = ``agent_settings`` (state_dir = ``state``); return its path.

    ``mqtt_address`` replaces the broker address (a cuttable proxy in front of the real broker).
    """
    folder.mkdir(parents=True, exist_ok=True)
    (folder / STATE_DIR).mkdir(exist_ok=True)
    mqtt = provisioning.mqtt
    if mqtt_address is not None:
        mqtt = mqtt.model_copy(update={"host": mqtt_address[0], "port": mqtt_address[1]})
    agent = {**provisioning.agent, **agent_settings, "state_dir": STATE_DIR}
    final = provisioning.model_copy(update={"mqtt": mqtt, "agent": agent})
    path = folder / AGENT_TOML
    tmp = path.with_suffix(".tmp")
    tmp.write_text(final.to_toml(), encoding="utf-8")
    tmp.replace(path)
    return path
