"""``edgeota telemetry summary``: the fleet telemetry review API on the command line.

Imports only stdlib, typer, rich and the contract at module level (like :mod:`ota_server.cli`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import typer

from edgeota_contract import humanize as hz
from edgeota_contract import tables as tb
from edgeota_contract.tables import Col, Output
from ota_server import cli_common as common
from ota_server.cli_common import ServerOpt, TokenOpt

if TYPE_CHECKING:
    from ota_server.api.responses import Attribution

telemetry_app = typer.Typer(help="Review fleet telemetry.", no_args_is_help=True)


def coverage_text(attribution: Attribution | None) -> str:
    """``attribution 97.5% (39,000 of 40,000 requests)``, or ``attribution - (no requests)``."""
    if attribution is None or attribution.coverage is None:
        return "attribution - (no requests)"
    return (
        f"attribution {hz.percent(attribution.coverage)} "
        f"({hz.count(attribution.attributed_requests)} of {hz.count(attribution.requests)} requests)"
    )


def _latency(value: float | str | None) -> str:
    return hz.number(value) if value is None or isinstance(value, int | float) else str(value)


def _fmt(value: Any, spec: str = ".3f") -> str:
    if value is None:
        return "-"
    return format(value, spec) if isinstance(value, float) else str(value)


@telemetry_app.command("summary")
def telemetry_summary(
    model_name: str | None = typer.Option(None, "--model", help="model name"),
    version: str | None = typer.Option(None, "--version", help="one release version"),
    profile: str | None = typer.Option(None, "--profile", help="hardware profile"),
    since: str | None = typer.Option(None, "--since", help="ISO 8601 time; windows ending at or after it"),
    until: str | None = typer.Option(None, "--until", help="ISO 8601 time; windows ending at or before it"),
    cohort: str | None = typer.Option(None, "--cohort", help="device label selector k=v,k2=v2"),
    worst: int = typer.Option(3, "--worst", min=1, max=1024, help="features listed per group, worst PSI first"),
    output: Output = tb.output_option(),
    as_json: bool = typer.Option(False, "--json", help=tb.JSON_FLAG_HELP),
    server: str | None = ServerOpt,
    token: str | None = TokenOpt,
) -> None:
    """Requests, errors, latency quantiles, drift verdicts and attribution per release x hardware profile."""
    data = common.client(server, token).telemetry_summary(model_name, version, profile, since, until, cohort, worst)
    if tb.chosen(output, as_json) is Output.json:
        tb.print_json(data)
        return
    rows = []
    for g in data.groups:
        worst_features = ", ".join(
            f"{f.input}[{f.feature if f.feature is not None else '*'}]={f.level}"
            + (f" PSI {f.psi:.2f}" if f.psi is not None else "")
            for f in g.drift.features
        )
        drift_text = f"{g.drift.label or '-'} {worst_features}".strip()
        rows.append(
            (
                f"{g.model_name} {g.version}",
                g.hardware_profile,
                hz.count(g.devices),
                hz.count(g.requests),
                hz.percent(g.error_rate, 2),
                " / ".join(_latency(g.latency_ms.get(k)) for k in ("p50", "p95", "p99")),
                drift_text,
            )
        )
    columns = ["release", "profile", Col("devices", right=True), Col("requests", right=True),
               Col("errors", right=True), Col("p50/p95/p99 ms", right=True), "drift"]  # fmt: skip
    common.console.print(tb.table(columns, rows, title="fleet telemetry"))
    common.console.print(coverage_text(data.attribution))


@telemetry_app.command("accuracy")
def telemetry_accuracy(
    model_name: str = typer.Option(..., "--model", help="model name"),
    version: str | None = typer.Option(None, "--version", help="one release version"),
    cohort: str | None = typer.Option(None, "--cohort", help="value of the cohort label ('' : devices without one)"),
    since: str | None = typer.Option(None, "--since", help="ISO 8601 time; feedback received / telemetry from it"),
    output: Output = tb.output_option(),
    server: str | None = ServerOpt,
    token: str | None = TokenOpt,
) -> None:
    """Field accuracy from application feedback beside the label-free estimate (CBPE-style, from the model's
    confidence and the bundle's calibration), per release x hardware profile x cohort."""
    data = common.client(server, token).field_accuracy(model_name, version, cohort, since)
    if tb.chosen(output) is Output.json:
        tb.print_json(data)
        return
    rows = [
        (
            f"{r.model_name} {r.version}",
            r.hardware_profile,
            r.cohort or None,
            hz.count(r.labelled),
            hz.percent(r.accuracy),
            hz.percent(r.estimated_accuracy),
            hz.count(r.estimate_requests),
        )
        for r in data.rows
    ]
    columns = ["release", "profile", "cohort", Col("labelled", right=True), Col("accuracy", right=True),
               Col("estimated", right=True), Col("estimate over", right=True)]  # fmt: skip
    common.console.print(tb.table(columns, rows, title="field accuracy"))
    if not data.rows:
        common.console.print(tb.note("no feedback and no telemetry for these filters"))
