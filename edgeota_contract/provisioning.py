"""What a provisioned device is given: identity, endpoints, credentials and trust roots.

The server's ``device provision`` writes this as ``agent.toml``; the agent reads it (and
adds its own ``[agent]`` section of local settings). Keeping the schema here means both
sides agree on every key.
"""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from edgeota_contract.errors import ContractError
from edgeota_contract.manifest import NAME_PATTERN
from edgeota_contract.states import ReasonCode
from edgeota_contract.topics import DEVICE_ID_PATTERN

TUF_URL_PATH = "/tuf/"
"""Where the server serves its TUF metadata (read-only, no auth), relative to its base URL."""


def tuf_target_path(bundle_sha256: str) -> str:
    """The TUF target path naming a bundle archive; server and agent agree on it through this function."""
    return f"bundles/{bundle_sha256}"


def tuf_metadata_url(server_url: str) -> str:
    """The TUF metadata base URL of a server (always ending in ``/``)."""
    return server_url.rstrip("/") + TUF_URL_PATH


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DeviceSection(_Strict):
    id: str = Field(pattern=DEVICE_ID_PATTERN)
    hardware_profile: str = Field(pattern=NAME_PATTERN)


class ServerSection(_Strict):
    url: str = Field(description="base URL of the OTA server, e.g. http://127.0.0.1:8080")
    token: str = Field(min_length=16, description="device bearer token for downloads and uploads")


class MqttSection(_Strict):
    host: str = "127.0.0.1"
    port: int = Field(default=1883, ge=1, le=65535)
    username: str | None = None
    password: str | None = None
    tls: bool = False
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    keepalive: int = Field(default=30, ge=5, le=3600)
    protocol: str = Field(default="auto", pattern="^(auto|3.1.1|5)$")


class TrustSection(_Strict):
    release_keys: list[str] = Field(min_length=1, description="PEM public keys trusted to sign bundles")
    server_keys: list[str] = Field(min_length=1, description="PEM public keys trusted to sign commands")
    tuf_root: str | None = Field(
        default=None,
        max_length=512_000,
        description="trusted TUF root metadata (JSON text); when set, the agent requires every assigned bundle "
        f"to be a target of the server's TUF repository at <server url>{TUF_URL_PATH}",
    )


class DeviceProvisioning(_Strict):
    device: DeviceSection
    server: ServerSection
    mqtt: MqttSection = Field(default_factory=MqttSection)
    trust: TrustSection
    agent: dict[str, Any] = Field(default_factory=dict, description="the agent's own local settings")

    def to_toml(self) -> str:
        return dump_toml(self.model_dump(mode="json", exclude_none=True))

    @classmethod
    def load(cls, path: str | Path) -> DeviceProvisioning:
        """Read ``agent.toml``; raises ContractError with the first problem on any defect."""
        try:
            data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
        except OSError as exc:
            raise ContractError(f"cannot read {path}: {exc.strerror or exc}", ReasonCode.MALFORMED_MESSAGE) from exc
        except tomllib.TOMLDecodeError as exc:
            raise ContractError(f"{path} is not valid TOML: {exc}", ReasonCode.MALFORMED_MESSAGE) from exc
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            err = exc.errors()[0]
            loc = ".".join(str(p) for p in err.get("loc", ()))
            raise ContractError(f"{path}: {loc}: {err['msg']}", ReasonCode.MALFORMED_MESSAGE) from exc


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        if "\n" in value:
            return '"""\n' + value.replace("\\", "\\\\").replace('"""', '\\"\\"\\"') + '"""'
        return json.dumps(value)
    if isinstance(value, list):
        return "[\n" + "".join(f"  {_toml_value(v)},\n" for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} as TOML")


def dump_toml(data: dict[str, Any]) -> str:
    """A minimal TOML writer for two-level tables of scalars and lists (all this schema needs)."""
    lines: list[str] = []
    for section, body in data.items():
        if not isinstance(body, dict):
            lines.append(f"{section} = {_toml_value(body)}")
            continue
        lines.append(f"\n[{section}]")
        for key, value in body.items():
            if value is None:
                continue
            if isinstance(value, dict):
                raise TypeError("nested tables are not supported")
            lines.append(f"{key} = {_toml_value(value)}")
    return "\n".join(lines).lstrip() + "\n"
