"""One headless simulator process of a benchmark fleet: ``python -m edgeota.fleet.shard CONFIG.json``.

The fleet benchmark splits a fleet over a few of these. ``CONFIG.json`` holds the
:class:`~edgeota.fleet.simulator.FleetConfig` fields (``workdir`` as a string, no faults) plus
``status_file``: the process provisions its devices, starts them, and rewrites ``status_file`` every
second with :meth:`FleetSimulator.status` (``"phase"`` tells ``provisioning``, ``running`` or
``stopped``) until SIGTERM or SIGINT, then stops its agents cleanly and writes a last status.
Unlike ``edgeota fleet simulate`` it draws no live table (a fleet of thousands would pay for it).

Exit codes: 0 after a clean stop, 2 for a bad configuration (one ``error:`` line on stderr).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

from edgeota_contract.errors import EdgeotaError


def load_config(path: Path) -> tuple[Any, Path]:
    """``(FleetConfig, status_file)`` from the JSON at ``path``.

    Raises:
        EdgeotaError: unreadable file, or fields FleetConfig does not take.
    """
    from edgeota.fleet.load import INPUT_SOURCES
    from edgeota.fleet.simulator import FleetConfig

    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        status_file = Path(data.pop("status_file"))
        data["workdir"] = Path(data["workdir"])
        config = FleetConfig(**data)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise EdgeotaError(f"bad shard configuration {path}: {exc}") from None
    if config.input_source not in INPUT_SOURCES:
        raise EdgeotaError(f"bad shard configuration {path}: unknown input_source {config.input_source!r}")
    return config, status_file


def write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data), encoding="utf-8")
    tmp.replace(path)


def main(argv: list[str] | None = None) -> int:
    from edgeota.fleet.simulator import FleetSimulator
    from edgeota.procs import Terminated, signals_raise

    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("error: usage: python -m edgeota.fleet.shard CONFIG.json", file=sys.stderr)
        return 2
    try:
        config, status_file = load_config(Path(args[0]))
    except EdgeotaError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    config.workdir.mkdir(parents=True, exist_ok=True)
    write_json(status_file, {"phase": "provisioning", "devices": config.devices, "running": 0, "versions": {}})
    with signals_raise(), FleetSimulator(config) as sim:
        try:
            sim.provision()
            sim.start()
            while True:
                started = time.perf_counter()
                status = sim.status()
                # What watching costs this process (it walks every agent), so a big fleet's overhead is on record.
                status["status_ms"] = round((time.perf_counter() - started) * 1000, 2)
                write_json(status_file, {"phase": "running", **status})
                time.sleep(1.0)
        except (KeyboardInterrupt, Terminated):
            pass
        finally:
            sim.stop()
            write_json(status_file, {"phase": "stopped", **sim.status()})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
