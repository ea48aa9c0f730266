"""``edgeota dataset export``: stored samples as a Parquet dataset with a manifest, for retraining.

Imports only stdlib, typer, rich and the contract at module level (like :mod:`ota_server.cli`); the export
itself runs on the server (``POST /api/v1/datasets/export``) and the client verifies what it writes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer
from rich.table import Table

from edgeota_contract.errors import ContractError
from ota_server import cli_common as common
from ota_server.cli_common import ServerOpt, TokenOpt

dataset_app = typer.Typer(help="Export data for retraining.", no_args_is_help=True)


def _drift_report(path: Path | None) -> dict[str, Any] | None:
    """The JSON object in ``path``. Raises ContractError when it cannot be read or is not an object."""
    if path is None:
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ContractError(f"cannot read drift report {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise ContractError(f"drift report {path} is not a JSON object")
    return data


@dataset_app.command("export")
def dataset_export(
    out: Path = typer.Option(..., "--out", help="folder to create (must not exist, or be empty)"),
    model_name: str = typer.Option(..., "--model", help="model name"),
    version: str | None = typer.Option(None, "--version"),
    profile: str | None = typer.Option(None, "--profile", help="hardware profile"),
    since: str | None = typer.Option(None, "--since", help="ISO 8601 time with zone; samples received at or after"),
    until: str | None = typer.Option(None, "--until", help="ISO 8601 time with zone; samples received at or before"),
    cohort_label: str | None = typer.Option(
        None, "--cohort-label", help="device label that partitions cohorts (default: the server's telemetry cohort)"
    ),
    trigger: str = typer.Option("manual", "--trigger", help="why: manual, or e.g. alert:<id>"),
    parent_release: str | None = typer.Option(
        None,
        "--parent-release",
        help="release the retrained model descends from (default: the latest release in the data)",
    ),
    drift_report: Path | None = typer.Option(None, "--drift-report", help="JSON file recorded in the manifest"),
    as_json: bool = typer.Option(False, "--json", help="print the manifest"),
    server: str | None = ServerOpt,
    token: str | None = TokenOpt,
) -> None:
    """Write release=<id>/cohort=<value>/part-0.parquet files and _manifest.json into --out (verified)."""
    manifest = common.client(server, token).export_dataset(
        out,
        model_name,
        version=version,
        profile=profile,
        since=since,
        until=until,
        cohort_label=cohort_label,
        trigger=trigger,
        parent_release=parent_release,
        drift_report=_drift_report(drift_report),
    )
    if as_json:
        common.print_json(manifest)
        return
    table = Table("partition", "rows", "uniform", "hard")
    for f in manifest.files:
        table.add_row(f.path, str(f.rows), *(str(f.streams.get(s, {}).get("rows", 0)) for s in ("uniform", "hard")))
    common.console.print(table)
    streams = manifest.counts["per_stream"]
    share = streams["hard"]["share_of_rows"]
    typer.echo(
        f"wrote {out}: {manifest.counts['rows']} rows from {manifest.counts['samples']} samples "
        f"({share:.1%} of rows chosen by the model), digest {manifest.digest['value']}"
    )
