"""The ``edgeota fleet simulate`` loop: provision, start, show the fleet live, and report status to a file."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from edgeota.fleet.simulator import FleetConfig, FleetSimulator, FleetSnapshot


def run_fleet(config: FleetConfig, duration: float | None = None, status_file: Path | None = None) -> None:
    """The ``edgeota fleet simulate`` loop: provision, start, show a live table until Ctrl-C or ``duration``.

    With ``status_file``, a JSON status (:meth:`FleetSimulator.status`) is rewritten there every second,
    so a parent process can watch several simulator processes.
    """
    from rich.console import Console
    from rich.live import Live
    from rich.progress import Progress

    from edgeota.procs import Terminated, signals_raise

    console = Console(stderr=True)
    config.workdir.mkdir(parents=True, exist_ok=True)
    with signals_raise(), FleetSimulator(config) as sim:
        with Progress(console=console, transient=True) as bar:
            task = bar.add_task("provisioning devices", total=config.devices)
            sim.provision(lambda done, total: bar.update(task, completed=done))
        sim.start()
        console.print(f"{config.devices} agents running; Ctrl-C stops")
        deadline = time.monotonic() + duration if duration else None
        try:
            with Live(console=console, refresh_per_second=1) as live:
                while deadline is None or time.monotonic() < deadline:
                    live.update(_snapshot_table(sim.snapshot()))
                    if status_file is not None:
                        _write_json(status_file, sim.status())
                    time.sleep(1.0)
        except (KeyboardInterrupt, Terminated):
            console.print("stopping the fleet")


def _write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data), encoding="utf-8")
    tmp.replace(path)


def _snapshot_table(snap: FleetSnapshot) -> Any:
    from rich.table import Table

    table = Table(title=f"fleet at {snap.at:5.0f}s: {snap.running} agents running")
    table.add_column("serving version")
    table.add_column("devices", justify="right")
    for version, count in sorted(snap.versions.items()):
        table.add_row(version, str(count))
    table.caption = f"requests {snap.requests}, errors {snap.errors}"
    return table
