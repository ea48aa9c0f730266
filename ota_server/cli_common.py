"""What the server's CLI modules share: the console, the ``--server``/``--token`` options, the API client
factory, JSON printing and the parsing of ``key=value`` options.

Imports only stdlib, typer, rich and the contract at module level (the HTTP client is imported when a
command makes one), so ``edgeota --help`` stays fast. Commands call :func:`client` through this module
(``cli_common.client(...)``), so a test can replace it with an in-process client.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import typer
from rich.console import Console

from edgeota_contract.errors import ContractError

if TYPE_CHECKING:
    from ota_server.client import ApiClient

console = Console()

ServerOpt = typer.Option(None, "--server", help="server URL (env EDGEOTA_URL)")
TokenOpt = typer.Option(None, "--token", help="API token (env EDGEOTA_TOKEN)")


def client(server: str | None, token: str | None) -> ApiClient:
    """An API client from ``EDGEOTA_URL``/``EDGEOTA_TOKEN``, each overridden by its option when given."""
    from ota_server.client import ApiClient, ClientSettings

    settings = ClientSettings()
    if server:
        settings.url = server
    if token:
        settings.token = token
    return ApiClient(settings)


def print_json(data: Any) -> None:
    """``data`` (plain JSON data or response models) as highlighted JSON."""
    from pydantic import BaseModel

    from ota_server.client import as_json

    if isinstance(data, BaseModel) or (isinstance(data, list) and data and isinstance(data[0], BaseModel)):
        data = as_json(data)
    console.print_json(json.dumps(data, default=str))


def parse_labels(values: list[str]) -> dict[str, str]:
    """``["k=v", ...]`` -> dict. Raises ContractError on a term without ``=`` or key."""
    out: dict[str, str] = {}
    for item in values:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ContractError(f"label {item!r} is not key=value")
        out[key] = value
    return out


def parse_stage(spec: str) -> dict[str, Any]:
    """``10%`` / ``10%:60`` (soak seconds) / ``5`` (device count) / ``50%:0:approve``. Raises ContractError."""
    parts = spec.split(":")
    size = parts[0]
    stage: dict[str, Any] = {}
    try:
        if size.endswith("%"):
            stage["percent"] = float(size[:-1])
        else:
            stage["count"] = int(size)
        if len(parts) > 1 and parts[1]:
            stage["soak_seconds"] = float(parts[1])
    except ValueError as exc:
        raise ContractError(f"bad stage {spec!r}: use PERCENT% or COUNT, optionally :SOAK[:approve]") from exc
    if len(parts) > 2 and parts[2] == "approve":
        stage["requires_approval"] = True
    return stage


def parse_windows(specs: list[str]) -> list[dict[str, str]]:
    """``["HH:MM-HH:MM", ...]`` -> maintenance windows. Raises ContractError on a spec without ``-``."""
    windows = []
    for spec in specs:
        begin, sep, end = spec.partition("-")
        if not sep:
            raise ContractError(f"bad window {spec!r}: use HH:MM-HH:MM (UTC)")
        windows.append({"start": begin, "end": end})
    return windows
