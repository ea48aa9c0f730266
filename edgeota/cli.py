"""The ``edgeota`` command. Each component adds its own sub-commands through ``register(app)``.

Component CLI modules import only typer, rich and the contract at module level, so that a
device with just ``edgeota[agent]`` installed can run ``edgeota agent ...``; a component whose
optional dependencies are missing simply does not appear.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import typer

from edgeota_contract.errors import EdgeotaError
from edgeota_contract.signing import write_keypair
from edgeota_contract.version import __version__

app = typer.Typer(
    name="edgeota",
    help="Package models per hardware profile, publish them, and roll them out to device fleets over the air.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
keys_app = typer.Typer(help="Ed25519 release and server keys.", no_args_is_help=True)
app.add_typer(keys_app, name="keys")

COMPONENT_CLIS = ("packager.cli", "ota_server.cli", "device_agent.cli", "edgeota.demo_cli", "edgeota.evaluation.cli")


def _print_version(value: bool) -> None:
    # An option callback, not the group callback's body: click runs the group callback only with a command.
    if value:
        typer.echo(__version__)
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", help="Print the version and exit.", is_eager=True, callback=_print_version
    ),
) -> None:
    pass


@keys_app.command("generate")
def keys_generate(
    out: Path = typer.Argument(..., help="Private key path, e.g. keys/release.pem; NAME.pub.pem is written beside it."),
) -> None:
    """Generate an Ed25519 key pair (private key written with mode 0600; never overwritten).

    Missing parent folders are created. On any failure: one ``error:`` line, exit 2, nothing written.
    """
    from edgeota_contract.signing import load_private_key

    try:
        priv, pub = write_keypair(out)
    except EdgeotaError as exc:
        typer.secho(f"error: {exc}", err=True, fg="red")
        raise typer.Exit(2) from None
    typer.echo(f"wrote {priv} and {pub} (key id {load_private_key(priv).key_id})")


def _register_components() -> None:
    for module_name in COMPONENT_CLIS:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            # Only a missing optional dependency may hide a component; our own bugs must surface.
            if exc.name and exc.name.split(".")[0] in {"packager", "ota_server", "device_agent", "edgeota"}:
                if exc.name == module_name or module_name.startswith(exc.name):
                    continue
                raise
            continue
        module.register(app)


def main() -> None:
    _register_components()
    try:
        app()
    except EdgeotaError as exc:
        typer.secho(f"error: {exc}", err=True, fg="red")
        sys.exit(2)


if __name__ == "__main__":
    main()
