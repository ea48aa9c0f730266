"""``edgeota server|device|release|rollout|broker`` commands.

Imports only stdlib, typer, rich and the contract at module level; the server and HTTP client
are imported inside the commands. Errors print one ``error: ...`` line and exit non-zero. What the
CLI modules share (options, client, printing) is in :mod:`ota_server.cli_common`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from edgeota_contract import tables as tb
from edgeota_contract.errors import ContractError, EdgeotaError
from edgeota_contract.tables import Output
from ota_server import cli_common as common
from ota_server import cli_fleet
from ota_server.cli_common import ServerOpt, TokenOpt, console

server_app = typer.Typer(help="Run and administer the OTA server.", no_args_is_help=True)
token_app = typer.Typer(help="API tokens.", no_args_is_help=True)
device_app = typer.Typer(help="Provision and inspect devices.", no_args_is_help=True)
release_app = typer.Typer(help="Publish and inspect releases.", no_args_is_help=True)
rollout_app = typer.Typer(help="Create and control rollouts.", no_args_is_help=True)
broker_app = typer.Typer(help="Mosquitto configuration for the provisioned fleet.", no_args_is_help=True)
server_app.add_typer(token_app, name="token")
cli_fleet.register(device_app, release_app, rollout_app)  # list, show, decommission, status: ota_server.cli_fleet
RolloutIdArg = typer.Argument(..., help="rollout id (see `edgeota rollout list`)")
ReasonOpt = typer.Option("", "--reason", help="why (recorded in the audit log)")


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
    from ota_server.cli_alerts import alerts_app

    app.add_typer(alerts_app, name="alerts")
    server_app.add_typer(tuf_app, name="tuf")
    from ota_server.cli_ingest import server_ingest

    server_app.command("ingest")(server_ingest)


# ------------------------------------------------------------------ server


@server_app.command("run")
def server_run(
    config: Path | None = typer.Option(None, "--config", help="TOML config file (env vars override it)"),
    host: str = typer.Option("127.0.0.1", "--host", help="address to listen on (0.0.0.0: every interface)"),
    port: int = typer.Option(8080, "--port", min=1, max=65535, help="HTTP port to listen on"),
    workers: int | None = typer.Option(
        None,
        "--workers",
        min=0,
        max=64,
        help="API processes (default: the api_workers setting, 0 = one process for everything); with N > 0 a core "
        "process runs the rollout engine and MQTT bridge and N processes serve HTTP",
    ),
) -> None:
    """Run the server: migrations, rollout engine, MQTT bridge, HTTP API (stops cleanly on SIGTERM/SIGINT).

    Creates its data folder when missing. Unless public_url is set, devices are told http://HOST:PORT.
    """
    import uvicorn

    from edgeota_contract.logs import configure_logging
    from ota_server.core.config import Settings
    from ota_server.main import create_app

    settings = Settings.load(config).listening_on(host, port)
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
    name: str = typer.Option("cli", "--name", help="a name for the token, shown in the audit log"),
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
    profile: str = typer.Option(..., "--profile", help="the device's hardware profile, e.g. x86-avx2"),
    label: list[str] = typer.Option([], "--label", help="key=value, repeatable"),
    device_id: str | None = typer.Option(None, "--id", help="device id (default: dev-<random>)"),
    out: Path | None = typer.Option(None, "--out", help="write agent.toml here (mode 0600)"),
    server: str | None = ServerOpt,
    token: str | None = TokenOpt,
) -> None:
    """Register a device and write its agent.toml.

    The profile must be one the server knows (its profile folder, its hardware_profiles setting, a release).

    With --out the file is reserved before the device is registered: an unwritable path registers nothing.
    """
    from ota_server.cli_output import OutputError, ReservedFile

    labels = common.parse_labels(label)
    if out is None:
        typer.echo(common.client(server, token).provision(profile, labels, device_id).agent_toml)
        return
    with ReservedFile(out) as reserved:
        result = common.client(server, token).provision(profile, labels, device_id)
        try:
            reserved.commit(result.agent_toml)
        except OutputError as exc:
            raise OutputError(
                f"device {result.device_id} is registered but its credentials were not saved ({exc}); "
                f"decommission it (edgeota device decommission {result.device_id}) and provision again"
            ) from None
    typer.echo(f"provisioned {result.device_id}; wrote {out}")


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


# ------------------------------------------------------------------ rollouts


@rollout_app.command("create")
def rollout_create(
    release: list[str] = typer.Option(
        ..., "--release", help="release id (see `edgeota release list`); repeat for the arms of --strategy bandit"
    ),
    stage: list[str] = typer.Option(["100%"], "--stage", help="10%[:soak[:approve]] or COUNT; repeatable"),
    profile: list[str] = typer.Option([], "--profile", help="select devices of this hardware profile; repeatable"),
    label: list[str] = typer.Option([], "--label", help="select devices with this label key=value; repeatable"),
    device: list[str] = typer.Option([], "--device", help="select this device id; repeatable"),
    min_devices: int = typer.Option(1, "--min-devices", help="gate: devices that must commit in each stage"),
    max_failure_rate: float = typer.Option(
        0.0, "--max-failure-rate", help="gate: highest share of failed devices, 0-1 (0.05 = 5%)"
    ),
    min_count: int = typer.Option(1, "--min-count", help="finished devices before the failure rate is judged"),
    device_timeout: float = typer.Option(900.0, "--device-timeout", help="seconds a device may take to report"),
    on_failure: str = typer.Option("rollback", "--on-failure", help="rollback | pause: what a failed gate does"),
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
    strategy: str = typer.Option("canary", "--strategy", help="canary | blue_green | ab | shadow | bandit"),
    split: float | None = typer.Option(None, "--split", help="ab: percent of devices on the release"),
    window: list[str] = typer.Option([], "--window", help="daily UTC maintenance window HH:MM-HH:MM; repeatable"),
    max_retries: int = typer.Option(0, "--max-retries", min=0, max=10, help="retries of transient device failures"),
    retry_backoff: float = typer.Option(60.0, "--retry-backoff", min=0, help="seconds before the first retry"),
    start: bool = typer.Option(False, "--start", help="start at once (default: a draft; `edgeota rollout start`)"),
    dry_run: bool = typer.Option(False, "--dry-run", help="print which devices each stage takes; store nothing"),
    allow_empty: bool = typer.Option(
        False, "--allow-empty", help="create it even when the selection targets no device (refused otherwise)"
    ),
    override_blessing: str | None = typer.Option(
        None, "--override-blessing", help="reason to start (--start/--start-at) a release that is not blessed (audited)"
    ),
    bandit_floor: float = typer.Option(0.1, "--bandit-floor", help="bandit: share every healthy arm keeps"),
    bandit_interval: float = typer.Option(60.0, "--bandit-interval", help="bandit: seconds between steps"),
    bandit_max_moves: int = typer.Option(10, "--bandit-max-moves", help="bandit: devices moved per step at most"),
    bandit_draws: int = typer.Option(2000, "--bandit-draws", help="bandit: Thompson draws per step"),
    bandit_seed: int = typer.Option(0, "--bandit-seed", help="bandit: base seed of the draws (0: random, recorded)"),
    bandit_win: float = typer.Option(
        0.95, "--bandit-win-probability", help="bandit: an arm this likely to be best for the hold time wins"
    ),
    bandit_hold: float = typer.Option(600.0, "--bandit-win-hold", help="bandit: seconds the leader must hold"),
    bandit_until_stopped: bool = typer.Option(
        False, "--bandit-until-stopped", help="bandit: no winner, run until paused or aborted"
    ),
    output: Output = tb.output_option(),
    server: str | None = ServerOpt,
    token: str | None = TokenOpt,
) -> None:
    """Create a rollout of a release to the selected devices, stage by stage (prints its id).

    With --strategy bandit and --release A --release B ...: split the devices between the releases and move them
    toward the one with the best feedback rewards (Thompson sampling; see docs/rollouts.md)."""
    from ota_server.cli_bandit import bandit_request

    release_id = release[0]
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
        "allow_empty": allow_empty,
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
    if override_blessing is not None:
        body["override_blessing"] = override_blessing
    if split is not None:
        body["split_percent"] = split
    if window:
        body["maintenance_windows"] = common.parse_windows(window)
    body.update(
        bandit_request(
            release,
            strategy,
            floor=bandit_floor,
            interval=bandit_interval,
            max_moves=bandit_max_moves,
            draws=bandit_draws,
            seed=bandit_seed,
            win_probability=bandit_win,
            win_hold=bandit_hold,
            until_stopped=bandit_until_stopped,
        )
    )
    client = common.client(server, token)
    if dry_run:
        from ota_server.cli_rollouts import print_dry_run

        print_dry_run(tb.to_json(client.dry_run_rollout(release_id, body)), output)
    else:
        typer.echo(client.create_rollout(release_id, body).rollout_id)


def _command(
    command: str, rollout_id: str, server: str | None, token: str | None, reason: str = "", revert: bool = False
) -> None:
    out = common.client(server, token).command(rollout_id, command, reason, revert)
    typer.echo(f"rollout {rollout_id}: {out.state}")


@rollout_app.command("start")
def rollout_start(
    rollout_id: str = RolloutIdArg,
    override_blessing: str | None = typer.Option(
        None, "--override-blessing", help="reason to start a release whose latest evaluation is not blessed (audited)"
    ),
    server: str | None = ServerOpt,
    token: str | None = TokenOpt,
) -> None:
    """Start a draft or scheduled rollout (refused for a release that is not blessed, unless overridden)."""
    out = common.client(server, token).command(rollout_id, "start", override_blessing=override_blessing)
    typer.echo(f"rollout {rollout_id}: {out.state}")


@rollout_app.command("pause")
def rollout_pause(
    rollout_id: str = RolloutIdArg,
    reason: str = ReasonOpt,
    server: str | None = ServerOpt,
    token: str | None = TokenOpt,
) -> None:
    """Pause a running rollout: no new assignments until it is resumed."""
    _command("pause", rollout_id, server, token, reason)


@rollout_app.command("resume")
def rollout_resume(
    rollout_id: str = RolloutIdArg, server: str | None = ServerOpt, token: str | None = TokenOpt
) -> None:
    """Resume a paused rollout."""
    _command("resume", rollout_id, server, token)


@rollout_app.command("approve")
def rollout_approve(
    rollout_id: str = RolloutIdArg, server: str | None = ServerOpt, token: str | None = TokenOpt
) -> None:
    """Approve the current stage of a rollout whose stage needs approval (COUNT:SOAK:approve)."""
    _command("approve", rollout_id, server, token)


@rollout_app.command("abort")
def rollout_abort(
    rollout_id: str = RolloutIdArg,
    revert: bool = typer.Option(False, "--revert", help="also revert updated devices"),
    reason: str = ReasonOpt,
    server: str | None = ServerOpt,
    token: str | None = TokenOpt,
) -> None:
    """Stop a rollout for good: open deployments are cancelled (--revert: updated devices go back too)."""
    _command("abort", rollout_id, server, token, reason, revert)


@rollout_app.command("retry-failed")
def rollout_retry_failed(
    rollout_id: str = RolloutIdArg,
    reason: str = ReasonOpt,
    server: str | None = ServerOpt,
    token: str | None = TokenOpt,
) -> None:
    """Give every failed device of the rollout a new attempt (the rollout's state stays)."""
    _command("retry_failed", rollout_id, server, token, reason)


@rollout_app.command("rollback")
def rollout_rollback(
    rollout_id: str = RolloutIdArg,
    reason: str = ReasonOpt,
    server: str | None = ServerOpt,
    token: str | None = TokenOpt,
) -> None:
    """End a rollout and send every updated device back to the bundle it ran before."""
    _command("rollback", rollout_id, server, token, reason)


# ------------------------------------------------------------------ broker


@broker_app.command("config")
def broker_config(
    out: Path = typer.Option(..., "--out", help="folder for passwd, acl and mosquitto.conf snippet"),
    config: Path | None = typer.Option(None, "--config", help="server TOML config (for the database URL)"),
) -> None:
    """Write a Mosquitto password file and ACL for every provisioned device plus the server user.

    Needs the server's existing database (run it with the settings of `server run`).

    Warns when the server has no broker user of its own: the configuration turns anonymous access off.
    """
    from ota_server.broker_config import config_warnings, write_broker_config
    from ota_server.core.config import Settings

    settings = Settings.load(config)
    for warning in config_warnings(settings):
        typer.secho(f"warning: {warning}", err=True, fg="yellow")
    try:
        paths = write_broker_config(settings, out)
    except OSError as exc:
        raise EdgeotaError(f"cannot write broker config: {exc}") from exc
    for path in paths:
        typer.echo(f"wrote {path}")
