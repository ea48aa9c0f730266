"""Every ``edgeota`` command and every option has help text; every command that prints data takes ``--output``.

Walks the click command tree behind the typer app (with every component that is installed registered), so
a new command or option without help fails here. Typer ships its own copy of click, so the tree is read by
its attributes (``commands``, ``params``, ``param_type_name``), not by class.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import typer.main

from edgeota import cli

DATA_COMMANDS = {
    "device list",
    "device show",
    "device decommission",
    "release list",
    "release show",
    "rollout list",
    "rollout status",
    "telemetry summary",
    "dataset export",
    "profiles list",
    "profiles show",
    "bundle inspect",
    "server tuf status",
    "agent status",
}
"""Commands whose output is data (tables for people, JSON for scripts)."""


def _tree() -> Any:
    cli._register_components()
    return typer.main.get_command(cli.app)


def _walk(command: Any, path: str = "") -> Iterator[tuple[str, Any]]:
    yield path, command
    for name, sub in getattr(command, "commands", {}).items():
        yield from _walk(sub, f"{path} {name}".strip())


def _options(command: Any) -> list[Any]:
    return [p for p in command.params if p.param_type_name == "option"]


def test_every_command_and_option_has_help() -> None:
    missing: list[str] = []
    commands = dict(_walk(_tree()))
    assert {"device decommission", "rollout list", "rollout status", "keys generate"} <= set(commands)
    for path, command in commands.items():
        if not (command.help or command.short_help):
            missing.append(f"command `edgeota {path}`")
        for param in command.params:
            if param.param_type_name == "option" and not param.hidden and not (param.help or "").strip():
                missing.append(f"option {'/'.join(param.opts)} of `edgeota {path}`")
            if param.param_type_name == "argument" and not (getattr(param, "help", None) or "").strip():
                missing.append(f"argument {param.name} of `edgeota {path}`")
    assert not missing, "no help text:\n" + "\n".join(missing)


def test_data_commands_take_output_table_or_json() -> None:
    commands = dict(_walk(_tree()))
    without = []
    for path in sorted(DATA_COMMANDS):
        options = {opt for p in _options(commands[path]) for opt in p.opts}
        if "--output" not in options:
            without.append(path)
    assert not without, f"no --output table|json: {without}"
