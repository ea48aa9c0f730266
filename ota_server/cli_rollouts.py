"""``edgeota rollout list`` and ``edgeota rollout status [--watch]``: rollouts as people read them.

``rollout status`` is a section of aligned facts, then tables: devices per state, every gate of the plan with its
state (``passed`` / ``failed`` / ``not evaluated`` with ``n of m``), a bandit's arms, and the failed devices by
reason code (the newest few named, the rest counted). ``--watch`` ends with an exit code that says how the
rollout ended (:data:`WATCH_EXIT_CODES`). Imports only stdlib, typer, rich and the contract at module level, like
:mod:`ota_server.cli`; registered by :func:`ota_server.cli_fleet.register`.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import typer
from rich.console import Group, RenderableType

from edgeota_contract import humanize as hz
from edgeota_contract import tables as tb
from edgeota_contract.tables import Col, Output
from ota_server import cli_common as common
from ota_server.cli_bandit import bandit_renderables
from ota_server.cli_common import ServerOpt, TokenOpt, console
from ota_server.cli_telemetry import coverage_text

if TYPE_CHECKING:
    from ota_server.api.responses import RolloutStatus

WATCH_EXIT_CODES = {"completed": 0, "rolled_back": 3, "aborted": 4}
"""``rollout status --watch`` exit codes by final state; a completed rollout with failed devices exits 5."""
EXIT_COMPLETED_WITH_FAILURES = 5
WATCH_HELP = (
    "Refresh until the rollout ends. Exit code: 0 completed, 3 rolled back, 4 aborted, "
    "5 completed with failed devices (within the failure-rate gate), 2 error."
)
NOT_EVALUATED = "not evaluated"
LIMIT_HELP = "rows per page"
OFFSET_HELP = "rows to skip (the next page: --offset + --limit)"


def _extra(r: RolloutStatus, name: str) -> Any:
    return (r.model_extra or {}).get(name)


def _stage(r: RolloutStatus) -> str:
    return f"{min(r.current_stage + 1, r.stage_count)}/{r.stage_count}"


def rollout_list(
    state: str | None = typer.Option(None, "--state", help="only this state (draft, running, completed, ...)"),
    model: str | None = typer.Option(None, "--model", help="only rollouts of this model"),
    limit: int = typer.Option(20, "--limit", min=1, max=1000, help=LIMIT_HELP),
    offset: int = typer.Option(0, "--offset", min=0, help=OFFSET_HELP),
    output: Output = tb.output_option(),
    server: str | None = ServerOpt,
    token: str | None = TokenOpt,
) -> None:
    """Rollouts, newest first (paged with --limit and --offset)."""
    rows = common.client(server, token).rollouts(state, limit=limit, offset=offset, model=model)
    if output is Output.json:
        tb.print_json(rows)
        return
    body = [
        (
            r.rollout_id,
            f"{r.model_name or '-'} {r.version or ''}".strip(),
            r.state,
            _stage(r),
            f"{hz.count(r.counts.get('committed', 0))}/{hz.count(r.targets)}",
            hz.count(r.counts.get("failed", 0) + r.counts.get("rolled_back", 0)),
            hz.timestamp(r.created_at),
        )
        for r in rows
    ]
    columns = ["rollout", "model", "state", "stage", Col("done", right=True), Col("failed", right=True), "created"]
    title = f"rollouts {offset + 1}-{offset + len(rows)}" if rows else "rollouts (none)"
    console.print(tb.table(columns, body, title=title))
    if len(rows) == limit:
        console.print(tb.note(f"more may follow: --offset {offset + limit}"))


def gate_rows(r: RolloutStatus) -> list[tuple[str, str, str, str, str, str]]:
    """Every gate of the rollout's plan: (gate, state, value, threshold, data, detail).

    ``state`` is ``passed``, ``failed`` or ``not evaluated``, and ``data`` says how much the verdict rests on
    (``n of m``). The failure-rate and minimum-devices gates are judged from the counts as the engine judges
    them (the gate that halted the rollout is ``failed``); the telemetry gates are the engine's last verdicts.
    """
    gates = dict(r.plan.get("gates", {}))
    halted_by = _extra(r, "halted_by")
    committed = r.counts.get("committed", 0)
    failed = r.counts.get("failed", 0) + r.counts.get("rolled_back", 0) - r.retries.waiting
    finished = committed + failed
    rows: list[tuple[str, str, str, str, str, str]] = []
    need = max(1, int(gates.get("min_count_for_failure_rate", 1)))
    limit = float(gates.get("max_failure_rate", 0.0))
    if halted_by == "failure_rate":
        state = "failed"
    elif finished < need:
        state = NOT_EVALUATED
    else:
        state = "failed" if failed / finished > limit else "passed"
    rate = hz.percent(failed / finished) if finished else "-"
    data = f"{hz.count(finished)} of {hz.count(need)} finished" if finished < need else f"{hz.count(finished)} finished"
    rows.append(("failure rate", state, rate, f"<= {hz.percent(limit)}", data, f"{hz.count(failed)} failed"))
    min_devices = int(gates.get("min_devices", 1))
    if halted_by == "min_devices":
        state = "failed"
    elif committed >= min_devices:
        state = "passed"
    else:
        state = NOT_EVALUATED
    data = f"{hz.count(committed)} of {hz.count(min_devices)} committed"
    rows.append(("min devices", state, hz.count(committed), f">= {hz.count(min_devices)}", data, "at stage end"))
    for g in r.gates or []:
        state = NOT_EVALUATED if g.state == "not_evaluated" else g.state
        have = "-" if g.have is None else hz.count(g.have)
        data = f"{have} of {hz.count(g.need)} {g.unit}" if g.need is not None else f"{have} {g.unit}"
        value = "-" if g.value is None else hz.number(g.value)
        threshold = "-" if g.threshold is None else hz.number(g.threshold)
        rows.append((g.name, state, value, threshold, data.strip(), g.detail))
    return rows


def rollout_view(r: RolloutStatus) -> list[RenderableType]:
    """``rollout status``: facts (with the blessing gate's finding), devices per state, gates, a bandit's arms,
    failed devices by reason."""
    sizes = ", ".join(hz.count(s) for s in r.stage_sizes)
    facts: list[tuple[str, object]] = [
        ("state", f"{r.state} ({r.reason})" if r.reason and r.reason != "ok" else r.state),
        ("release", f"{r.release_id} ({r.model_name or '-'} {r.version or ''})".replace(" )", ")")),
        ("stage", f"{_stage(r)} (cumulative sizes {sizes})"),
        ("targets", hz.count(r.targets)),
        ("created", f"{hz.timestamp(r.created_at)} by {r.created_by}"),
        ("updated", hz.timestamp(r.updated_at)),
    ]
    if _extra(r, "halted_by"):
        facts.append(("halted by", _extra(r, "halted_by")))
    if r.blessing is not None:  # what the blessing gate found at the start (docs/evaluation.md)
        b = r.blessing
        seen = f"{b.state} (evaluation {b.evaluation_id})" if b.evaluation_id else b.state
        if b.overridden:
            seen = f"{seen}, OVERRIDDEN by {b.checked_by}: {b.override_reason}"
        facts.append(("blessing", seen))
    if r.detail:
        facts.append(("detail", r.detail))
    if r.telemetry is not None:
        facts.append(("telemetry", coverage_text(r.telemetry)))
    states = [(s, hz.count(n)) for s, n in r.counts.items() if n]
    states += [(f"rollback {s}", hz.count(n)) for s, n in r.rollback_counts.items() if n]
    parts: list[RenderableType] = [
        tb.kv(facts, title=f"rollout {r.rollout_id}"),
        tb.table(["state", Col("devices", right=True)], states or [("(no deployments yet)", "")], title="devices"),
        tb.table(
            ["gate", "state", Col("value", right=True), "threshold", "data", "detail"], gate_rows(r), title="gates"
        ),
    ]
    if r.failures is not None and r.failures.total:
        f = r.failures
        by_reason = ", ".join(f"{reason} {hz.count(n)}" for reason, n in f.by_reason.items())
        shown = tb.table(
            ["device", "state", "reason", "detail"],
            [(d.device_id, d.state, d.reason, d.detail) for d in f.devices],
            title=f"failed devices ({hz.count(f.total)}: {by_reason})",
        )
        parts.append(shown)
        if f.total > len(f.devices):
            parts.append(tb.note(f"... and {hz.count(f.total - len(f.devices))} more (--output json for the counts)"))
    parts.extend(bandit_renderables(r))  # a bandit rollout: one row per arm (ota_server.cli_bandit)
    return parts


def watch_exit_code(r: RolloutStatus) -> int:
    """The exit code of ``rollout status --watch`` for a rollout that ended (see :data:`WATCH_HELP`)."""
    code = WATCH_EXIT_CODES.get(r.state, 1)
    if code == 0 and r.failures is not None and r.failures.total:
        return EXIT_COMPLETED_WITH_FAILURES
    return code


def rollout_status(
    rollout_id: str = typer.Argument(..., help="rollout id"),
    watch: bool = typer.Option(False, "--watch", help=WATCH_HELP),
    interval: float = typer.Option(1.0, "--interval", min=0.1, help="seconds between refreshes with --watch"),
    output: Output = tb.output_option(),
    server: str | None = ServerOpt,
    token: str | None = TokenOpt,
) -> None:
    """A rollout's state, stage, devices per state, each gate's verdict and why devices failed.

    With --watch: refresh until the rollout ends; the exit code says how it ended.

    Exit codes with --watch: 0 completed, 3 rolled back, 4 aborted, 5 completed with failed devices, 2 error.
    """
    from edgeota_contract.states import RolloutState

    client = common.client(server, token)
    r = client.rollout(rollout_id, deployments=False)
    if watch and output is Output.table:
        from rich.live import Live

        with Live(Group(*rollout_view(r)), console=console, refresh_per_second=4) as live:
            while not RolloutState(r.state).terminal:
                time.sleep(interval)
                r = client.rollout(rollout_id, deployments=False)
                live.update(Group(*rollout_view(r)))
    elif watch:
        while not RolloutState(r.state).terminal:
            time.sleep(interval)
            r = client.rollout(rollout_id, deployments=False)
    if output is Output.json:
        tb.print_json(r)
    elif not watch:
        tb.print_renderables(console, rollout_view(r))
    if watch:
        code = watch_exit_code(r)
        if output is Output.table:
            typer.echo(f"rollout {rollout_id}: {r.state}{' ' + r.detail if r.detail else ''} (exit {code})")
        raise typer.Exit(code)


DRY_RUN_DEVICES_SHOWN = 5
"""Devices named per stage (or arm) in a dry run's table; the rest are counted (``--output json`` lists all)."""


def print_dry_run(preview: dict[str, Any], output: Output) -> None:
    """``rollout create --dry-run``: which devices each stage (or bandit arm) would take, and who is left out."""
    if output == Output.json:
        tb.print_json(preview)
        return

    def named(devices: list[Any]) -> str:
        shown = ", ".join(str(d) for d in devices[:DRY_RUN_DEVICES_SHOWN])
        rest = len(devices) - DRY_RUN_DEVICES_SHOWN
        return f"{shown} ... and {hz.count(rest)} more" if rest > 0 else shown or "-"

    parts: list[RenderableType] = [
        tb.kv(
            [
                ("eligible devices", hz.count(int(preview.get("eligible", 0)))),
                ("no bundle for their profile", named(list(preview.get("no_bundle_for_profile", [])))),
                ("rolled this release back before", named(list(preview.get("skipped_rolled_back_before", [])))),
            ],
            title="Dry run (nothing stored)",
        )
    ]
    stages = preview.get("stages", [])
    if stages:
        rows = [
            (s.get("stage"), hz.count(int(s.get("cumulative", 0))), named(list(s.get("devices", [])))) for s in stages
        ]
        parts.append(tb.table([Col("stage", right=True), Col("devices so far", right=True), "new devices"], rows))
    arms = preview.get("arms", [])
    if arms:
        rows = [
            (a.get("release_id"), hz.count(len(a.get("devices", []))), named(list(a.get("devices", [])))) for a in arms
        ]
        parts.append(tb.table(["arm (release)", Col("devices", right=True), "devices"], rows, title="Bandit arms"))
    tb.print_renderables(console, parts)
