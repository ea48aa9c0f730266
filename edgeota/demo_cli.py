"""``edgeota demo``, ``edgeota fleet simulate`` and ``edgeota embedded-broker run``.

Imports only stdlib, typer, rich and the contract at module level; everything heavy is imported
inside the commands. (``edgeota broker ...`` belongs to the server, hence ``embedded-broker``.)
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import typer

from edgeota_contract.errors import EdgeotaError

fleet_app = typer.Typer(help="Simulated device fleets running the real agent.", no_args_is_help=True)
broker_app = typer.Typer(help="A local MQTT broker for demos and tests (Mosquitto or amqtt).", no_args_is_help=True)


def register(app: typer.Typer) -> None:
    """Add ``demo``, ``fleet`` and ``embedded-broker`` to the root ``edgeota`` app."""
    app.command("demo")(demo)
    app.add_typer(fleet_app, name="fleet")
    app.add_typer(broker_app, name="embedded-broker")


def _fail(message: str, code: int = 2) -> typer.Exit:
    typer.secho(f"error: {message}", err=True, fg="red")
    return typer.Exit(code)


@broker_app.command("run")
def broker_run(
    kind: str = typer.Option("auto", "--kind", help="auto (Mosquitto when installed), mosquitto or amqtt."),
    port: int = typer.Option(1883, "--port", min=1, max=65535, help="Port on 127.0.0.1."),
    data_dir: Path = typer.Option(Path(".edgeota-broker"), "--data-dir", help="Config, persistence and logs."),
) -> None:
    """Run a local broker in the foreground until Ctrl-C (raised limits; payloads capped at 256 KiB)."""
    import time

    from edgeota.broker import start_broker
    from edgeota.procs import Terminated, signals_raise

    if kind not in ("auto", "mosquitto", "amqtt"):
        raise _fail(f"unknown broker kind {kind!r}: choose auto, mosquitto or amqtt")
    try:
        with signals_raise(), start_broker(kind, port=port, data_dir=data_dir) as broker:  # type: ignore[arg-type]
            typer.echo(
                f"{broker.kind} listening on {broker.host}:{broker.port} (data in {broker.data_dir}); Ctrl-C stops"
            )
            while broker.alive():
                time.sleep(0.5)
            raise _fail(f"{broker.kind} exited; see {broker.data_dir}")
    except (KeyboardInterrupt, Terminated):
        typer.echo("stopped")
    except EdgeotaError as exc:
        raise _fail(str(exc)) from None


@fleet_app.command("simulate")
def fleet_simulate(
    devices: int = typer.Option(10, "--devices", min=1, max=100_000, help="How many simulated devices."),
    profiles: str = typer.Option(..., "--profiles", help="Comma-separated hardware profiles, assigned round robin."),
    server: str = typer.Option(..., "--server", help="OTA server base URL, e.g. http://127.0.0.1:8080."),
    token: str = typer.Option(..., "--token", envvar="EDGEOTA_ADMIN_TOKEN", help="Admin bearer token (provisioning)."),
    faults: str = typer.Option("", "--faults", help="e.g. 'network_cut:10%:after=5,duration=20;drift:25%'."),
    workdir: Path = typer.Option(Path(".fleet"), "--workdir", help="One state folder per device under here."),
    duration: float = typer.Option(0, "--duration", min=0, help="Seconds to run; 0 = until Ctrl-C."),
    rate: float = typer.Option(5.0, "--rate", min=0, help="Inference requests per second per device."),
    seed: int = typer.Option(0, "--seed", help="Seed for fault selection and synthetic inputs."),
    prefix: str = typer.Option("sim", "--prefix", help="Device ids are PREFIX-0000, PREFIX-0001, ..."),
    agent_setting: list[str] = typer.Option([], "--agent-setting", help="KEY=VALUE for each agent's [agent] table."),
    label: list[str] = typer.Option([], "--label", help="KEY=VALUE label for every device (default fleet=PREFIX)."),
    status_file: Path | None = typer.Option(None, "--status-file", help="Write a JSON status here every second."),
) -> None:
    """Run DEVICES real device agents in this process, each with its own identity, folder and MQTT connection."""
    from edgeota.fleet.faults import parse_faults
    from edgeota.fleet.run import run_fleet
    from edgeota.fleet.simulator import FleetConfig

    try:
        profile_list = [p.strip() for p in profiles.split(",") if p.strip()]
        if not profile_list:
            raise _fail("--profiles needs at least one hardware profile")
        config = FleetConfig(
            devices=devices,
            profiles=profile_list,
            server_url=server.rstrip("/"),
            admin_token=token,
            faults=parse_faults(faults),
            workdir=workdir,
            rate_per_device=rate,
            seed=seed,
            prefix=prefix,
            agent_overrides=_parse_settings(agent_setting, "--agent-setting"),
            labels={k: str(v) for k, v in _parse_settings(label, "--label").items()},
        )
        run_fleet(config, duration=duration or None, status_file=status_file)
    except EdgeotaError as exc:
        raise _fail(str(exc)) from None


def _parse_settings(items: list[str], option: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise _fail(f"{option} {item!r} is not KEY=VALUE")
        out[key.strip()] = value.strip()
    return out


def demo(
    devices: int = typer.Option(50, "--devices", min=3, max=2000, help="Simulated devices across three profiles."),
    quick: bool = typer.Option(False, "--quick", help="Shortened run (smaller model, shorter windows) for tests."),
    keep_running: bool = typer.Option(False, "--keep-running", help="Leave server, broker and fleet up at the end."),
    workdir: Path = typer.Option(Path(".demo"), "--workdir", help="Where keys, bundles, database and logs go."),
    broker: str = typer.Option("auto", "--broker", help="auto, mosquitto or amqtt."),
    loop: bool = typer.Option(
        False,
        "--loop",
        help="After the rollouts, the retraining loop: drift on cohort north, the alert, an export, retraining,"
        " packaging, the evaluation's blessing, a gated rollout to north, drift back to stable (`make demo`).",
    ),
    loop_only: bool = typer.Option(False, "--loop-only", help="Only the retraining loop (trains its own 1.1.0)."),
    approve: bool = typer.Option(
        False,
        "--approve",
        help="The loop's gated rollout has a stage that needs approval: grant it (else the demo prints the"
        " `edgeota rollout approve` command and waits up to 15 minutes for an operator).",
    ),
) -> None:
    """The whole loop on one machine: train, package, publish, roll out v1 and v2, catch a bad v3 and roll it back;
    with --loop, then drift on one cohort, retraining, a blessed and gated rollout, and the cohort stable again."""
    from edgeota.demo import DemoOptions, run_demo
    from edgeota.procs import Terminated

    if broker not in ("auto", "mosquitto", "amqtt"):
        raise _fail(f"unknown broker {broker!r}: choose auto, mosquitto or amqtt")
    if approve and not (loop or loop_only):
        raise _fail("--approve grants the retraining loop's approval stage: add --loop or --loop-only")
    try:
        ok = run_demo(
            DemoOptions(
                devices=devices,
                quick=quick,
                keep_running=keep_running,
                workdir=workdir,
                broker=broker,  # type: ignore[arg-type]
                rollouts=not loop_only,
                loop=loop or loop_only,
                approve=approve,
            )
        )
    except (KeyboardInterrupt, Terminated):
        typer.secho("\ninterrupted: every process the demo started has been stopped", err=True, fg="yellow")
        raise typer.Exit(130) from None
    except EdgeotaError as exc:
        raise _fail(str(exc)) from None
    if not ok:
        sys.exit(1)
