"""``edgeota server|device|release|rollout|broker`` commands.

Imports only stdlib, typer, rich and the contract at module level; the server and HTTP client
are imported inside the commands. Errors print one ``error: ...`` line and exit non-zero. What the
CLI modules share (options, client, printing) is in :mod:`ota_server.cli_common`.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer
from rich.console import Group
from rich.table import Table

from edgeota_contract.errors import ContractError, EdgeotaError
from ota_server import cli_common as common
from ota_server.cli_common import ServerOpt, TokenOpt, console
from ota_server.cli_telemetry import gates_renderables

if TYPE_CHECKING:
    from ota_server.api.responses import RolloutStatus

server_app = typer.Typer(help="Run and administer the OTA server.", no_args_is_help=True)
token_app = typer.Typer(help="API tokens.", no_args_is_help=True)
device_app = typer.Typer(help="Provision and inspect devices.", no_args_is_help=True)
release_app = typer.Typer(help="Publish and inspect releases.", no_args_is_help=True)
rollout_app = typer.Typer(help="Create and control rollouts.", no_args_is_help=True)
broker_app = typer.Typer(help="Mosquitto configuration for the provisioned fleet.", no_args_is_help=True)
server_app.add_typer(token_app, name="token")


def register(app: typer.Typer) -> None:
    app.add_typer(server_app, name="server")
    app.add_typer(device_app, name="device")
    app.add_typer(release_app, name="release")
    app.add_typer(rollout_app, name="rollout")
    app.add_typer(broker_app, name="broker")
    from ota_server.cli_telemetry import telemetry_app
    from ota_server.cli_tuf import tuf_app

    app.add_typer(telemetry_app, name="telemetry")
    from ota_server.cli_dataset import dataset_app

    app.add_typer(dataset_app, name="dataset")
    server_app.add_typer(tuf_app, name="tuf")
    from ota_server.cli_ingest import server_ingest

    server_app.command("ingest")(server_ingest)


# ------------------------------------------------------------------ server


@server_app.command("run")
def server_run(
    config: Path | None = typer.Option(None, "--config", help="TOML config file (env vars override it)"),
    host: str = typer.Option("127.0.0.1", "--host"),
    port: int = typer.Option(8080, "--port", min=1, max=65535),
    workers: int | None = typer.Option(
        None,
        "--workers",
        min=0,
        max=64,
        help="API processes (default: the api_workers setting, 0 = one process for everything); with N > 0 a core "
        "process runs the rollout engine and MQTT bridge and N processes serve HTTP",
    ),
) -> None:
    """Run the server: migrations, rollout engine, MQTT bridge, HTTP API (stops cleanly on SIGTERM/SIGINT)."""
    import uvicorn

    from edgeota_contract.logs import configure_logging
    from ota_server.core.config import Settings
    from ota_server.main import create_app

    settings = Settings.load(config)
    configure_logging(settings.log_level)
    n = settings.api_workers if workers is None else workers
    if n > 0:
        from ota_server.workers import run_workers

        run_workers(settings, host, port, n)
        return
    app = create_app(settings)
    uvicorn.run(app, host=host, port=port, log_config=None, access_log=False, timeout_graceful_shutdown=5)


@token_app.command("create")
def token_create(
    role: str = typer.Option(..., "--role", help="admin | release_manager | operator | viewer"),
    name: str = typer.Option("cli", "--name"),
    server: str | None = ServerOpt,
    token: str | None = TokenOpt,
) -> None:
    """Create an API token (needs an admin token); prints the token once."""
    if role not in ("admin", "release_manager", "operator", "viewer"):
        raise ContractError(f"unknown role {role!r}")
    typer.echo(common.client(server, token).create_token(role, name).token)


# ------------------------------------------------------------------ devices


@device_app.command("provision")
def device_provision(
    profile: str = typer.Option(..., "--profile"),
    label: list[str] = typer.Option([], "--label", help="key=value, repeatable"),
    device_id: str | None = typer.Option(None, "--id"),
    out: Path | None = typer.Option(None, "--out", help="write agent.toml here (mode 0600)"),
    server: str | None = ServerOpt,
    token: str | None = TokenOpt,
) -> None:
    """Register a device and write its agent.toml."""
    result = common.client(server, token).provision(profile, common.parse_labels(label), device_id)
    if out is not None:
        import os

        out.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(result.agent_toml)
        typer.echo(f"provisioned {result.device_id}; wrote {out}")
    else:
        typer.echo(result.agent_toml)


@device_app.command("list")
def device_list(
    profile: str | None = typer.Option(None, "--profile"),
    label: str | None = typer.Option(None, "--label", help="selector k=v,k2=v2"),
    online: bool | None = typer.Option(None, "--online/--offline"),
    as_json: bool = typer.Option(False, "--json"),
    server: str | None = ServerOpt,
    token: str | None = TokenOpt,
) -> None:
    rows = common.client(server, token).devices(label, online=online, profile=profile)
    if as_json:
        common.print_json(rows)
        return
    table = Table("device", "profile", "online", "last seen", "labels")
    for r in rows:
        table.add_row(
            r.device_id,
            r.hardware_profile,
            "yes" if r.online else "no",
            r.last_seen or "-",
            ",".join(f"{k}={v}" for k, v in r.labels.items()),
        )
    console.print(table)


@device_app.command("show")
def device_show(device_id: str, server: str | None = ServerOpt, token: str | None = TokenOpt) -> None:
    common.print_json(common.client(server, token).device(device_id))


# ------------------------------------------------------------------ releases


@release_app.command("publish")
def release_publish(
    bundles: list[Path] = typer.Argument(..., help="bundle archives"),
    server: str | None = ServerOpt,
    token: str | None = TokenOpt,
) -> None:
    """Upload signed bundles; the server verifies each before accepting it."""
    from rich.progress import Progress

    client = common.client(server, token)
    for path in bundles:
        if not path.is_file():
            raise ContractError(f"no such bundle file: {path}")
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("uploading", total=len(bundles))
        for path in bundles:
            out = client.upload(path)
            console.print(
                f"{path.name}: release {out.release_id} {out.model_name} {out.version} "
                f"{out.hardware_profile} sha256 {out.bundle_sha256[:12]}",
                soft_wrap=True,
            )
            progress.advance(task)


@release_app.command("list")
def release_list(server: str | None = ServerOpt, token: str | None = TokenOpt) -> None:
    rows = common.client(server, token).releases()
    table = Table("release", "model", "version", "profiles")
    for r in rows:
        table.add_row(r.release_id, r.model_name, r.version, ",".join(b.hardware_profile for b in r.bundles))
    console.print(table)


@release_app.command("show")
def release_show(release_id: str, server: str | None = ServerOpt, token: str | None = TokenOpt) -> None:
    common.print_json(common.client(server, token).release(release_id))


# ------------------------------------------------------------------ rollouts


@rollout_app.command("create")
def rollout_create(
    release_id: str = typer.Option(..., "--release"),
    stage: list[str] = typer.Option(["100%"], "--stage", help="10%[:soak[:approve]] or COUNT; repeatable"),
    profile: list[str] = typer.Option([], "--profile"),
    label: list[str] = typer.Option([], "--label"),
    device: list[str] = typer.Option([], "--device"),
    min_devices: int = typer.Option(1, "--min-devices"),
    max_failure_rate: float = typer.Option(0.0, "--max-failure-rate"),
    min_count: int = typer.Option(1, "--min-count"),
    device_timeout: float = typer.Option(900.0, "--device-timeout"),
    on_failure: str = typer.Option("rollback", "--on-failure"),
    max_concurrent: int | None = typer.Option(None, "--max-concurrent", help="cap on deployments in flight"),
    max_error_rate: float | None = typer.Option(None, "--max-error-rate", help="telemetry gate"),
    max_nan_rate: float | None = typer.Option(None, "--max-nan-rate", help="telemetry gate: NaN/inf per request"),
    max_p95_ratio: float | None = typer.Option(None, "--max-p95-ratio", help="telemetry gate vs previous release"),
    max_psi: float | None = typer.Option(
        None, "--max-drift-psi", help="telemetry gate vs reference stats: the drift rule's effect-size floor (PSI)"
    ),
    min_drift_values: int | None = typer.Option(None, "--min-drift-values", help="values per feature to judge drift"),
    gate_data_timeout: float | None = typer.Option(
        None, "--gate-data-timeout", help="seconds a stage waits after its soak for gates without enough data"
    ),
    on_missing_data: str = typer.Option(
        "fail", "--on-missing-data", help="fail | pass: a gate still without data when the wait ends"
    ),
    start_at: str | None = typer.Option(None, "--start-at", help="ISO time of a scheduled start"),
    strategy: str = typer.Option("canary", "--strategy", help="canary | blue_green | ab | shadow"),
    split: float | None = typer.Option(None, "--split", help="ab: percent of devices on the release"),
    window: list[str] = typer.Option([], "--window", help="daily UTC maintenance window HH:MM-HH:MM; repeatable"),
    max_retries: int = typer.Option(0, "--max-retries", min=0, max=10, help="retries of transient device failures"),
    retry_backoff: float = typer.Option(60.0, "--retry-backoff", min=0, help="seconds before the first retry"),
    start: bool = typer.Option(False, "--start"),
    dry_run: bool = typer.Option(False, "--dry-run"),
    server: str | None = ServerOpt,
    token: str | None = TokenOpt,
) -> None:
    body: dict[str, Any] = {
        "release_id": release_id,
        "selector": {"hardware_profiles": profile, "labels": common.parse_labels(label), "device_ids": device},
        "stages": [common.parse_stage(s) for s in stage],
        "gates": {
            "min_devices": min_devices,
            "max_failure_rate": max_failure_rate,
            "min_count_for_failure_rate": min_count,
            "device_timeout_seconds": device_timeout,
        },
        "on_failure": on_failure,
        "on_missing_data": on_missing_data,
        "max_retries": max_retries,
        "retry_backoff_seconds": retry_backoff,
        "strategy": strategy,
        "start": start,
        "dry_run": dry_run,
    }
    optional = {
        "max_concurrent": max_concurrent,
        "max_error_rate": max_error_rate,
        "max_nan_output_rate": max_nan_rate,
        "max_p95_latency_ratio": max_p95_ratio,
        "max_drift_psi": max_psi,
        "min_drift_values": min_drift_values,
        "gate_data_timeout_seconds": gate_data_timeout,
    }
    body["gates"].update({k: v for k, v in optional.items() if v is not None})
    if start_at:
        body["start_at"] = start_at
    if split is not None:
        body["split_percent"] = split
    if window:
        body["maintenance_windows"] = common.parse_windows(window)
    client = common.client(server, token)
    if dry_run:
        common.print_json(client.dry_run_rollout(release_id, body))
    else:
        typer.echo(client.create_rollout(release_id, body).rollout_id)


def _command(
    command: str, rollout_id: str, server: str | None, token: str | None, reason: str = "", revert: bool = False
) -> None:
    out = common.client(server, token).command(rollout_id, command, reason, revert)
    typer.echo(f"rollout {rollout_id}: {out.state}")


@rollout_app.command("start")
def rollout_start(rollout_id: str, server: str | None = ServerOpt, token: str | None = TokenOpt) -> None:
    _command("start", rollout_id, server, token)


@rollout_app.command("pause")
def rollout_pause(
    rollout_id: str,
    reason: str = typer.Option("", "--reason"),
    server: str | None = ServerOpt,
    token: str | None = TokenOpt,
) -> None:
    _command("pause", rollout_id, server, token, reason)


@rollout_app.command("resume")
def rollout_resume(rollout_id: str, server: str | None = ServerOpt, token: str | None = TokenOpt) -> None:
    _command("resume", rollout_id, server, token)


@rollout_app.command("approve")
def rollout_approve(rollout_id: str, server: str | None = ServerOpt, token: str | None = TokenOpt) -> None:
    _command("approve", rollout_id, server, token)


@rollout_app.command("abort")
def rollout_abort(
    rollout_id: str,
    revert: bool = typer.Option(False, "--revert", help="also revert updated devices"),
    reason: str = typer.Option("", "--reason"),
    server: str | None = ServerOpt,
    token: str | None = TokenOpt,
) -> None:
    _command("abort", rollout_id, server, token, reason, revert)


@rollout_app.command("rollback")
def rollout_rollback(
    rollout_id: str,
    reason: str = typer.Option("", "--reason"),
    server: str | None = ServerOpt,
    token: str | None = TokenOpt,
) -> None:
    _command("rollback", rollout_id, server, token, reason)


def _status_table(r: RolloutStatus) -> Group:
    table = Table(title=f"rollout {r.rollout_id}  {r.state}  stage {r.current_stage + 1}/{r.stage_count}")
    for state in r.counts:
        table.add_column(state)
    table.add_row(*(str(v) for v in r.counts.values()))
    return Group(table, *gates_renderables(r))


@rollout_app.command("status")
def rollout_status(
    rollout_id: str,
    watch: bool = typer.Option(False, "--watch", help="refresh until the rollout ends"),
    interval: float = typer.Option(1.0, "--interval"),
    server: str | None = ServerOpt,
    token: str | None = TokenOpt,
) -> None:
    client = common.client(server, token)
    r = client.rollout(rollout_id, deployments=False)
    if not watch:
        console.print(_status_table(r))
        return
    from rich.live import Live

    terminal = {"completed", "aborted", "rolled_back"}
    with Live(_status_table(r), console=console, refresh_per_second=4) as live:
        while r.state not in terminal:
            time.sleep(interval)
            r = client.rollout(rollout_id, deployments=False)
            live.update(_status_table(r))
    typer.echo(f"rollout {rollout_id}: {r.state} {r.detail}")


# ------------------------------------------------------------------ broker


@broker_app.command("config")
def broker_config(
    out: Path = typer.Option(..., "--out", help="folder for passwd, acl and mosquitto.conf snippet"),
    config: Path | None = typer.Option(None, "--config", help="server TOML config (for the database URL)"),
) -> None:
    """Write a Mosquitto password file and ACL for every provisioned device plus the server user."""
    from ota_server.broker_config import write_broker_config
    from ota_server.core.config import Settings

    settings = Settings.load(config)
    try:
        paths = write_broker_config(settings, out)
    except OSError as exc:
        raise EdgeotaError(f"cannot write broker config: {exc}") from exc
    for path in paths:
        typer.echo(f"wrote {path}")
