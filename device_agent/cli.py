"""``edgeota agent ...``: run the daemon, apply a signed command offline, show the state.

Imports only the stdlib, typer, rich and the contract at module level, so the command starts
quickly; the daemon's heavy imports (ONNX Runtime, paho) happen inside the commands.
"""

from __future__ import annotations

import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import Any

import typer

from edgeota_contract import tables as tb
from edgeota_contract.errors import EdgeotaError
from edgeota_contract.tables import Output

agent_app = typer.Typer(
    help="The on-device agent: verified model updates, inference and telemetry.", no_args_is_help=True
)

CONFIG_OPTION = typer.Option(Path("agent.toml"), "--config", "-c", help="Provisioning file (agent.toml).")


def _fail(message: str) -> typer.Exit:
    typer.secho(f"error: {message}", err=True, fg="red")
    return typer.Exit(2)


@agent_app.command("run")
def run(config: Path = CONFIG_OPTION) -> None:
    """Run the agent until SIGTERM or SIGINT, then shut down cleanly (an update in progress resumes later).

    Commands come over MQTT, or by HTTP polls with command_transport = "http_poll" in the agent table.
    Local applications call the inference endpoint (Open Inference Protocol) on the Unix socket
    <state_dir>/serve.sock, or on serve_tcp_port; serve_enabled = false turns it off.
    """
    from device_agent.agent import Agent
    from device_agent.settings import AgentConfig
    from edgeota_contract.logs import configure_logging

    try:
        cfg = AgentConfig.load(config)
        configure_logging(cfg.settings.log_level)
        agent = Agent(cfg, serve=True)
        agent.start()
    except EdgeotaError as exc:
        raise _fail(str(exc)) from None
    except OSError as exc:
        raise _fail(f"cannot use state folder or endpoint: {exc.strerror or exc} ({exc.filename})") from None
    stop = threading.Event()

    def handle(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, handle)
    signal.signal(signal.SIGINT, handle)
    try:
        while not stop.wait(1.0):
            pass
    finally:
        agent.stop()


@agent_app.command("apply")
def apply(
    command_file: Path | None = typer.Argument(None, help="A signed command (SignedCommand JSON), e.g. from USB."),
    config: Path = CONFIG_OPTION,
    timeout: float = typer.Option(3600.0, help="Give up waiting after this many seconds."),
) -> None:
    """Offline: resume any interrupted update, act on COMMAND_FILE if given, and exit once nothing is in progress.

    Status reports are kept in the state folder and sent by the next ``agent run``.
    """
    from device_agent.agent import Agent
    from device_agent.settings import AgentConfig
    from edgeota_contract.logs import configure_logging

    try:
        payload = command_file.read_bytes() if command_file is not None else None
    except OSError as exc:
        raise _fail(f"cannot read {command_file}: {exc.strerror or exc}") from None
    try:
        cfg = AgentConfig.load(config)
        configure_logging(cfg.settings.log_level)
        agent = Agent(cfg, connect=False)
        agent.start()
    except EdgeotaError as exc:
        raise _fail(str(exc)) from None
    except OSError as exc:
        raise _fail(f"cannot use state folder: {exc.strerror or exc} ({exc.filename})") from None
    try:
        with _progress() as show:
            idle = _wait(agent, timeout, show)
            if payload is not None and idle:
                agent.handle_command(payload)
                idle = _wait(agent, timeout, show)
        _print_status(agent.state_dir)
    finally:
        agent.stop()
    if not idle:
        raise _fail("an update is still in progress")


@contextmanager
def _progress() -> Iterator[Callable[[str], None]]:
    """A rich status line on stderr while an update runs (quiet when stderr is not a terminal)."""
    from rich.console import Console

    console = Console(stderr=True)
    if not console.is_terminal:
        yield lambda text: None
        return
    with console.status("starting") as status:
        yield status.update


def _wait(agent: Any, timeout: float, show: Callable[[str], None]) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        dep = agent.state.deployment
        if dep is None and agent.state.pending_command is None:
            return True
        if dep is not None:
            show(f"{dep.deployment_id}: {dep.assignment.model_name} {dep.assignment.version} at {dep.step.value}")
        agent.wait_idle(0.2)
    return False


@agent_app.command("status")
def status(config: Path = CONFIG_OPTION, output: Output = tb.output_option()) -> None:
    """Show the state folder: active slot, model, version, deployment in progress and the last one; and, while an
    agent runs on it, whether that agent reaches its broker and its server (and why not)."""
    from device_agent.health import health_lines, read_health
    from device_agent.settings import AgentConfig

    try:
        cfg = AgentConfig.load(config)
        if output is Output.json:
            tb.print_json({**_status_data(cfg.settings.state_dir), "health": read_health(cfg.settings.state_dir)})
            return
        _print_status(cfg.settings.state_dir)
    except EdgeotaError as exc:
        raise _fail(str(exc)) from None
    sys.stdout.write("\n".join(health_lines(read_health(cfg.settings.state_dir))) + "\n")


def _status_data(state_dir: Path) -> dict[str, Any]:
    """What ``agent status --output json`` prints (besides ``health``): the same facts as the text."""
    from device_agent.store import read_state

    state = read_state(state_dir)
    info = state.active()
    dep, last = state.deployment, state.last_deployment
    return {
        "state_dir": str(state_dir),
        "active_slot": state.active_slot,
        "model_name": info.model_name if info else None,
        "version": info.version if info else None,
        "release_counter": info.manifest.release_counter if info else None,
        "bundle_sha256": info.bundle_sha256 if info else None,
        "in_progress": {"deployment_id": dep.deployment_id, "step": dep.step.value} if dep else None,
        "last_deployment": None
        if last is None
        else {
            "deployment_id": last.deployment_id,
            "model_name": last.model_name,
            "version": last.version,
            "state": last.state.value,
            "reason": last.reason.value,
        },
        "unacked_reports": len(state.outbox),
    }


def _print_status(state_dir: Path) -> None:
    from device_agent.store import read_state

    state = read_state(state_dir)
    info = state.active()
    lines = [f"state folder:   {state_dir}", f"active slot:    {state.active_slot or '-'}"]
    if info is not None:
        lines += [
            f"model:          {info.model_name}",
            f"version:        {info.version}",
            f"release:        {info.manifest.release_counter}",
            f"bundle sha256:  {info.bundle_sha256}",
        ]
    else:
        lines.append("model:          - (none installed)")
    dep = state.deployment
    lines.append(f"in progress:    {f'{dep.deployment_id} at {dep.step.value}' if dep else '-'}")
    last = state.last_deployment
    if last is not None:
        lines.append(
            f"last deployment: {last.deployment_id} {last.model_name} {last.version} -> {last.state.value}"
            f" ({last.reason.value})"
        )
    lines.append(f"unacked reports: {len(state.outbox)}")
    sys.stdout.write("\n".join(lines) + "\n")


def register(app: typer.Typer) -> None:
    """Add ``edgeota agent`` to the root CLI."""
    app.add_typer(agent_app, name="agent")
