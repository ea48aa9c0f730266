"""``edgeota alerts list|ack|check``: the alerts API on the command line, and an offline check of a rules file.

Imports only stdlib, typer, rich and the contract at module level (like :mod:`ota_server.cli`).
"""

from __future__ import annotations

from pathlib import Path

import typer

from edgeota_contract import humanize as hz
from edgeota_contract import tables as tb
from edgeota_contract.errors import ContractError
from edgeota_contract.tables import Col, Output
from ota_server import cli_common as common
from ota_server.cli_common import ServerOpt, TokenOpt

alerts_app = typer.Typer(
    help="Alerts from the alert rules: list, acknowledge, check a rules file.", no_args_is_help=True
)
STATES = ("open", "firing", "acknowledged", "resolved")


@alerts_app.command("list")
def alerts_list(
    state: str | None = typer.Option(
        None, "--state", help="open (firing or acknowledged), firing, acknowledged, resolved"
    ),
    rule: str | None = typer.Option(None, "--rule", help="only this rule"),
    limit: int = typer.Option(100, "--limit", min=1, max=1000, help="at most this many alerts"),
    output: Output = tb.output_option(),
    server: str | None = ServerOpt,
    token: str | None = TokenOpt,
) -> None:
    """Alerts newest first: state, severity, rule, scope, what was seen, and each delivery's state."""
    if state is not None and state not in STATES:
        raise ContractError(f"--state must be one of {', '.join(STATES)}, not {state!r}")
    alerts = common.client(server, token).alerts(state, rule, limit)
    if tb.chosen(output) is Output.json:
        tb.print_json(alerts)
        return
    rows = []
    for a in alerts:
        s = a.scope
        rows.append(
            (
                a.id,
                a.state,
                a.severity,
                a.rule,
                f"{s.model_name} {s.version} {s.hardware_profile}" + (f" cohort={s.cohort}" if s.cohort else ""),
                a.summary,
                hz.timestamp(a.first_seen),
                hz.count(a.evaluations),
                ", ".join(f"{d.target} {d.event} {d.state}" for d in a.deliveries) or None,
            )
        )
    columns: list[str | Col] = [Col("id", min_width=32), "state", "severity", "rule", "scope", "summary"]
    columns += ["first seen", Col("rounds", right=True), "deliveries"]
    common.console.print(tb.table(columns, rows, title="alerts (newest first)"))
    if not rows:
        common.console.print(tb.note("no alerts for these filters"))


@alerts_app.command("ack")
def alerts_ack(
    alert_id: str = typer.Argument(..., help="the alert's id (edgeota alerts list)"),
    reason: str = typer.Option("", "--reason", help="recorded in the audit log"),
    output: Output = tb.output_option(),
    server: str | None = ServerOpt,
    token: str | None = TokenOpt,
) -> None:
    """Acknowledge a firing alert (operator role). It still resolves by itself when its condition clears."""
    alert = common.client(server, token).ack_alert(alert_id, reason)
    if tb.chosen(output) is Output.json:
        tb.print_json(alert)
        return
    typer.echo(f"acknowledged {alert.id} ({alert.rule}: {alert.summary})")


@alerts_app.command("check")
def alerts_check(path: Path = typer.Argument(..., help="rules file (TOML, or JSON by the .json suffix)")) -> None:
    """Validate a rules file as the server does at start (webhook secrets must be set here too)."""
    from ota_server.alerts.config import load_rules

    rules = load_rules(path)
    targets = len(rules.spec.webhooks) + len(rules.spec.commands)
    typer.echo(f"{path}: {len(rules.rules)} rules, {targets} delivery targets: ok")
