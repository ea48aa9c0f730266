"""``edgeota telemetry summary``: the fleet telemetry review API on the command line.

Imports only stdlib, typer, rich and the contract at module level (like :mod:`ota_server.cli`).
"""

from __future__ import annotations

from typing import Any

import typer
from rich.table import Table

telemetry_app = typer.Typer(help="Review fleet telemetry.", no_args_is_help=True)


def _fmt(value: Any, spec: str = ".3f") -> str:
    if value is None:
        return "-"
    return format(value, spec) if isinstance(value, float) else str(value)


@telemetry_app.command("summary")
def telemetry_summary(
    model_name: str | None = typer.Option(None, "--model", help="model name"),
    version: str | None = typer.Option(None, "--version"),
    profile: str | None = typer.Option(None, "--profile", help="hardware profile"),
    since: str | None = typer.Option(None, "--since", help="ISO 8601 time; windows ending at or after it"),
    until: str | None = typer.Option(None, "--until", help="ISO 8601 time; windows ending at or before it"),
    cohort: str | None = typer.Option(None, "--cohort", help="device label selector k=v,k2=v2"),
    worst: int = typer.Option(3, "--worst", min=1, max=1024, help="features listed per group, worst PSI first"),
    as_json: bool = typer.Option(False, "--json"),
    server: str | None = typer.Option(None, "--server", help="server URL (env EDGEOTA_URL)"),
    token: str | None = typer.Option(None, "--token", help="API token (env EDGEOTA_TOKEN)"),
) -> None:
    """Requests, errors, latency quantiles, input drift (PSI) and outputs per release x hardware profile."""
    from ota_server import cli

    query = {"model_name": model_name, "version": version, "profile": profile, "since": since, "until": until}
    params: dict[str, Any] = {k: v for k, v in {**query, "cohort": cohort}.items() if v is not None}
    params["worst"] = worst
    data = cli._client(server, token).request("GET", "/api/v1/telemetry/summary", params=params)
    if as_json:
        cli._print_json(data)
        return
    table = Table("model", "version", "profile", "devices", "requests", "error rate", "p50/p95/p99 ms", "drift")
    for g in data["groups"]:
        lat = g["latency_ms"]
        drift = g["drift"]
        worst_features = ", ".join(
            f"{f['input']}[{f['feature'] if f['feature'] is not None else '*'}]={f['psi']:.2f}"
            for f in drift["features"]
        )
        drift_text = f"{drift['label'] or '-'} {worst_features}".strip()
        table.add_row(
            g["model_name"],
            g["version"],
            g["hardware_profile"],
            str(g["devices"]),
            str(g["requests"]),
            _fmt(g["error_rate"]),
            "/".join(_fmt(lat[k], "g") for k in ("p50", "p95", "p99")),
            drift_text,
        )
    cli.console.print(table)
