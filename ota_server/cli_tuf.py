"""``edgeota server tuf init|status|refresh|rotate``: the server's TUF repository, on its local data folder.

Imports only stdlib, typer, rich and the contract at module level. These commands work on the files
directly (under the same lock as the running server, which picks changes up at once), so they need the
server's config (``--config`` or ``EDGEOTA_SERVER_*``), not its API.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import typer

from edgeota_contract import humanize as hz
from edgeota_contract import tables as tb
from edgeota_contract.errors import ContractError
from edgeota_contract.tables import Col, Output
from ota_server.cli_common import console

if TYPE_CHECKING:
    from ota_server.tuf_repo import TufRepository

tuf_app = typer.Typer(help="The TUF repository: root keys, freshness, key rotation.", no_args_is_help=True)
ConfigOpt = typer.Option(None, "--config", help="server TOML config (env vars override it)")


def _repo(config: Path | None) -> TufRepository:
    from ota_server.core.config import Settings
    from ota_server.tuf_service import open_repository

    repo = open_repository(Settings.load(config))
    if repo is None:
        raise ContractError("TUF is disabled (tuf_enabled = false)")
    if not repo.is_initialized():  # before any command takes the repository's lock (which creates its folder)
        raise ContractError(
            f"no TUF repository at {repo.base}; run this with the server's settings (--config or "
            "EDGEOTA_SERVER_DATA_DIR), or `edgeota server tuf init` to create it"
        )
    return repo


@tuf_app.command("init")
def tuf_init(
    config: Path | None = ConfigOpt,
    root_keys: int | None = typer.Option(None, "--root-keys", min=1, max=16, help="default: tuf_root_keys"),
    threshold: int | None = typer.Option(None, "--threshold", min=1, max=16, help="default: tuf_root_threshold"),
    root_key_dir: Path | None = typer.Option(
        None, "--root-key-dir", help="write the root private keys here (e.g. removable media) instead of keys/"
    ),
) -> None:
    """Create the repository before the server's first start (which would otherwise create a 1-of-1 root)."""
    from ota_server.core.config import Settings
    from ota_server.tuf_service import open_repository

    settings = Settings.load(config)
    repo = open_repository(settings)
    if repo is None:
        raise ContractError("TUF is disabled (tuf_enabled = false)")
    written = repo.initialize(
        root_keys=root_keys or settings.tuf_root_keys,
        threshold=threshold or settings.tuf_root_threshold,
        root_key_dir=root_key_dir,
    )
    for path in written:
        typer.echo(f"wrote root key {path}")
    typer.echo(f"TUF repository at {repo.base}; keep the root keys offline")


@tuf_app.command("status")
def tuf_status(config: Path | None = ConfigOpt, output: Output = tb.output_option()) -> None:
    """Versions, expiries, key ids and thresholds of root, targets, snapshot and timestamp."""
    status = _repo(config).status()
    if output is Output.json:
        tb.print_json(status)
        return
    roles = [
        (name, role["version"], hz.timestamp(role["expires"]), f"{role['threshold']} of {len(role['keyids'])}",
         ", ".join(k[:12] for k in role["keyids"]))
        for name, role in status.items()
        if isinstance(role, dict)
    ]  # fmt: skip
    columns = ["role", Col("version", right=True), "expires", "threshold", "key ids"]
    console.print(tb.table(columns, roles, title=f"TUF repository ({hz.count(status.get('targets_count'))} targets)"))


@tuf_app.command("refresh")
def tuf_refresh(config: Path | None = ConfigOpt) -> None:
    """Re-sign the online roles that have less than half their lifetime left (the server does this itself)."""
    roles = _repo(config).refresh()
    typer.echo(f"re-signed: {', '.join(roles)}" if roles else "nothing due")


@tuf_app.command("rotate")
def tuf_rotate(
    root_key: list[Path] = typer.Option(..., "--root-key", help="a current root private key; a threshold of them"),
    role: list[str] = typer.Option([], "--role", help="online role to give a new key: timestamp|snapshot|targets"),
    new_root_key: list[Path] = typer.Option([], "--new-root-key", help="private key for the new root key set"),
    generate_root_keys: int = typer.Option(0, "--generate-root-keys", min=0, max=16, help="new root keys to make"),
    new_key_dir: Path | None = typer.Option(None, "--new-key-dir", help="where generated root keys are written"),
    threshold: int | None = typer.Option(None, "--threshold", min=1, max=16, help="root threshold of the new root"),
    config: Path | None = ConfigOpt,
) -> None:
    """Write the next root version, signed by a threshold of the current and of the new root keys.

    ``--role timestamp`` replaces (revokes) a compromised online key; ``--new-root-key`` /
    ``--generate-root-keys`` replace the root keys. With neither, the root is re-signed with a new expiry.
    """
    result = _repo(config).rotate(
        root_key,
        new_root_key_files=new_root_key,
        generate_root_keys=generate_root_keys,
        threshold=threshold,
        rotate_roles=role,
        new_key_dir=new_key_dir,
    )
    for path in result.new_key_files:
        typer.echo(f"wrote root key {path}")
    rotated = ", ".join(result.rotated_roles) or "none"
    typer.echo(
        f"root version {result.root_version}: {len(result.root_keyids)} root keys, threshold "
        f"{result.root_threshold}; new online keys: {rotated}"
    )
