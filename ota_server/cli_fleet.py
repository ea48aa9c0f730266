"""``edgeota device list|show|decommission``, ``release list|show``: views of the fleet; :func:`register` also adds
``rollout list|status`` (:mod:`ota_server.cli_rollouts`).

Every command prints through :mod:`edgeota_contract.tables` (``--output table|json``) with numbers from
:mod:`edgeota_contract.humanize`. Lists are tables; ``device show`` and ``release show`` are sections of aligned
key/value lines followed by tables. Imports only stdlib, typer, rich and the contract at module level, like
:mod:`ota_server.cli`. :func:`register` adds the commands to the groups.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import typer
from rich.console import RenderableType

from edgeota_contract import humanize as hz
from edgeota_contract import tables as tb
from edgeota_contract.tables import Col, Output
from ota_server import cli_common as common
from ota_server import cli_rollouts
from ota_server.cli_common import ServerOpt, TokenOpt, console

if TYPE_CHECKING:
    from ota_server.api.responses import DeviceDetail, ReleaseRecord

LIMIT_HELP = "rows per page"
"""Help of every list's ``--limit`` (also :mod:`ota_server.cli_rollouts`)."""
OFFSET_HELP = "rows to skip (the next page: --offset + --limit)"


def register(device_app: typer.Typer, release_app: typer.Typer, rollout_app: typer.Typer) -> None:
    device_app.command("list")(device_list)
    device_app.command("show")(device_show)
    device_app.command("decommission")(device_decommission)
    release_app.command("list")(release_list)
    release_app.command("show")(release_show)
    rollout_app.command("list")(cli_rollouts.rollout_list)
    rollout_app.command("status")(cli_rollouts.rollout_status)


# ------------------------------------------------------------------ devices


def _labels(labels: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in labels.items()) or "-"


def device_list(
    profile: str | None = typer.Option(None, "--profile", help="only this hardware profile"),
    label: str | None = typer.Option(None, "--label", help="label selector k=v,k2=v2"),
    online: bool | None = typer.Option(None, "--online/--offline", help="only devices online (or offline)"),
    all_devices: bool = typer.Option(False, "--all", help="also decommissioned devices"),
    limit: int = typer.Option(1000, "--limit", min=1, max=100_000, help=LIMIT_HELP),
    offset: int = typer.Option(0, "--offset", min=0, help=OFFSET_HELP),
    output: Output = tb.output_option(),
    as_json: bool = typer.Option(False, "--json", help=tb.JSON_FLAG_HELP),
    server: str | None = ServerOpt,
    token: str | None = TokenOpt,
) -> None:
    """Devices in id order (decommissioned ones only with --all)."""
    rows = common.client(server, token).devices(
        label, limit=limit, online=online, profile=profile, offset=offset, include_decommissioned=all_devices
    )
    if tb.chosen(output, as_json) is Output.json:
        tb.print_json(rows)
        return
    columns: list[str | Col] = ["device", "profile", "online", "last seen", "agent", "labels"]
    if all_devices:
        columns.append("decommissioned")
    body = []
    for r in rows:
        row: list[object] = [
            r.device_id,
            r.hardware_profile,
            "yes" if r.online else "no",
            hz.timestamp(r.last_seen),
            r.agent_version,
            _labels(r.labels),
        ]
        if all_devices:
            row.append(hz.timestamp(r.decommissioned_at) if r.decommissioned_at else "-")
        body.append(row)
    console.print(tb.table(columns, body, title=f"devices ({hz.count(len(rows))})"))


def device_view(d: DeviceDetail) -> list[RenderableType]:
    """``device show``: the device's facts, what it runs, its latest deployments."""
    facts: list[tuple[str, object]] = [
        ("profile", d.hardware_profile),
        ("labels", _labels(d.labels)),
        ("online", "yes" if d.online else "no"),
        ("last seen", hz.timestamp(d.last_seen)),
        ("agent version", d.agent_version),
    ]
    if d.decommissioned_at:
        facts.append(("decommissioned", hz.timestamp(d.decommissioned_at)))
    models = tb.table(
        ["model", "version", "bundle", Col("counter", right=True), "previous", "updated"],
        [
            (
                m.model_name,
                m.version,
                m.bundle_sha256[:12],
                hz.count(m.release_counter),
                m.previous_version,
                hz.timestamp(m.updated_at),
            )
            for m in d.models
        ],
        title="models",
    )
    deployments = tb.table(
        ["rollout", "version", "mode", "state", "reason", Col("try", right=True), "updated"],
        [
            (x.rollout_id, x.version, x.mode, x.state, x.reason, x.attempt, hz.timestamp(x.updated_at))
            for x in d.deployments
        ],
        title=f"latest deployments ({len(d.deployments)})",
    )
    return [tb.kv(facts, title=f"device {d.device_id}"), models, deployments]


def device_show(
    device_id: str = typer.Argument(..., help="device id"),
    output: Output = tb.output_option(),
    server: str | None = ServerOpt,
    token: str | None = TokenOpt,
) -> None:
    """One device: profile, labels, presence, the models it runs and its latest deployments."""
    detail = common.client(server, token).device(device_id)
    if output is Output.json:
        tb.print_json(detail)
        return
    tb.print_renderables(console, device_view(detail))


def device_decommission(
    device_id: str = typer.Argument(..., help="device id"),
    reason: str = typer.Option("", "--reason", help="why (recorded in the audit log)"),
    output: Output = tb.output_option(),
    server: str | None = ServerOpt,
    token: str | None = TokenOpt,
) -> None:
    """Retire a device for good (needs an operator token); its history stays.

    Its token stops working at once; it leaves every open rollout (its open deployments are cancelled).

    Lists hide it unless --all. Run `edgeota broker config` again and reload Mosquitto to end its MQTT access.
    """
    out = common.client(server, token).decommission_device(device_id, reason)
    if output is Output.json:
        tb.print_json(out)
        return
    console.print(
        tb.kv(
            [
                ("decommissioned", hz.timestamp(out.decommissioned_at)),
                ("left rollouts", ", ".join(out.left_rollouts) or "-"),
                ("cancelled deployments", hz.count(len(out.cancelled_deployments))),
            ],
            title=f"device {out.device_id}",
        )
    )


# ------------------------------------------------------------------ releases


def release_list(
    model: str | None = typer.Option(None, "--model", help="only this model"),
    limit: int = typer.Option(100, "--limit", min=1, max=1000, help=LIMIT_HELP),
    offset: int = typer.Option(0, "--offset", min=0, help=OFFSET_HELP),
    output: Output = tb.output_option(),
    server: str | None = ServerOpt,
    token: str | None = TokenOpt,
) -> None:
    """Published releases, newest first."""
    rows = common.client(server, token).releases(model, limit=limit, offset=offset)
    if output is Output.json:
        tb.print_json(rows)
        return
    body = [
        (
            r.release_id,
            r.model_name,
            r.version,
            ", ".join(b.hardware_profile for b in r.bundles),
            hz.timestamp(r.created_at),
        )
        for r in rows
    ]
    console.print(
        tb.table(["release", "model", "version", "profiles", "created"], body, title=f"releases ({len(rows)})")
    )


def release_view(r: ReleaseRecord) -> list[RenderableType]:
    facts = [
        ("model", r.model_name),
        ("version", r.version),
        ("created", hz.timestamp(r.created_at)),
        ("created by", r.created_by),
    ]
    bundles = tb.table(
        ["profile", Col("size", right=True), "sha256", Col("counter", right=True), "key"],
        [
            (
                b.hardware_profile,
                hz.size(b.bundle_size),
                b.bundle_sha256[:16],
                hz.count(b.release_counter),
                b.signing_key_id[:16],
            )
            for b in r.bundles
        ],
        title="bundles",
    )
    metric_rows = [
        (b.hardware_profile, name, hz.metric(name, value))
        for b in r.bundles
        for name, value in sorted(b.metrics.items())
        if isinstance(value, int | float)
    ]
    metrics = tb.table(["profile", "metric", Col("value", right=True)], metric_rows, title="metrics")
    return [tb.kv(facts, title=f"release {r.release_id}"), bundles, metrics]


def release_show(
    release_id: str = typer.Argument(..., help="release id"),
    output: Output = tb.output_option(),
    server: str | None = ServerOpt,
    token: str | None = TokenOpt,
) -> None:
    """One release: its bundles per hardware profile and their signed metrics."""
    release = common.client(server, token).release(release_id)
    if output is Output.json:
        tb.print_json(release)
        return
    tb.print_renderables(console, release_view(release))
