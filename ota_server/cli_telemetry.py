"""``edgeota telemetry summary``: the fleet telemetry review API on the command line.

Imports only stdlib, typer, rich and the contract at module level (like :mod:`ota_server.cli`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import typer
from rich.console import RenderableType
from rich.table import Table
from rich.text import Text

from ota_server import cli_common as common
from ota_server.cli_common import ServerOpt, TokenOpt

if TYPE_CHECKING:
    from ota_server.api.responses import Attribution, RolloutStatus

telemetry_app = typer.Typer(help="Review fleet telemetry.", no_args_is_help=True)


def coverage_text(attribution: Attribution | None) -> str:
    """``attribution 97.5% (39,000 of 40,000 requests)``, or ``attribution - (no requests)``."""
    if attribution is None or attribution.coverage is None:
        return "attribution - (no requests)"
    return (
        f"attribution {attribution.coverage:.1%} "
        f"({attribution.attributed_requests:,} of {attribution.requests:,} requests)"
    )


def gates_renderables(r: RolloutStatus) -> list[RenderableType]:
    """The rollout's telemetry gates (state, value against threshold, or have of need) and its attribution."""
    out: list[RenderableType] = []
    if r.gates:
        table = Table("gate", "state", "value", "threshold", "data", "detail", title="telemetry gates")
        for g in r.gates:
            data = f"{g.have if g.have is not None else '-'}" + (f" of {g.need}" if g.need is not None else "")
            table.add_row(g.name, g.state, _fmt(g.value), _fmt(g.threshold, "g"), f"{data} {g.unit}", g.detail)
        out.append(table)
    if r.telemetry is not None:
        out.append(Text(coverage_text(r.telemetry)))
    if r.detail:
        out.append(Text(r.detail))
    return out


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
    server: str | None = ServerOpt,
    token: str | None = TokenOpt,
) -> None:
    """Requests, errors, latency quantiles, drift verdicts and attribution per release x hardware profile."""
    data = common.client(server, token).telemetry_summary(model_name, version, profile, since, until, cohort, worst)
    if as_json:
        common.print_json(data)
        return
    table = Table("model", "version", "profile", "devices", "requests", "error rate", "p50/p95/p99 ms", "drift")
    for g in data.groups:
        worst_features = ", ".join(
            f"{f.input}[{f.feature if f.feature is not None else '*'}]={f.level}"
            + (f" PSI {f.psi:.2f}" if f.psi is not None else "")
            for f in g.drift.features
        )
        drift_text = f"{g.drift.label or '-'} {worst_features}".strip()
        table.add_row(
            g.model_name,
            g.version,
            g.hardware_profile,
            str(g.devices),
            str(g.requests),
            _fmt(g.error_rate),
            "/".join(_fmt(g.latency_ms.get(k), "g") for k in ("p50", "p95", "p99")),
            drift_text,
        )
    common.console.print(table)
    common.console.print(coverage_text(data.attribution))
