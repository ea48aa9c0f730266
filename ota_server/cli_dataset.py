"""``edgeota dataset export``: stored samples as a Parquet dataset with a manifest, for retraining.

Imports only stdlib, typer, rich and the contract at module level (like :mod:`ota_server.cli`); the export
itself runs on the server (``POST /api/v1/datasets/export``) and the client verifies what it writes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer

from edgeota_contract import humanize as hz
from edgeota_contract import tables as tb
from edgeota_contract.errors import ContractError
from edgeota_contract.tables import Col, Output
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
    version: str | None = typer.Option(None, "--version", help="one release version"),
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
    output: Output = tb.output_option(),
    as_json: bool = typer.Option(False, "--json", help=tb.JSON_FLAG_HELP),
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
    if tb.chosen(output, as_json) is Output.json:
        tb.print_json(manifest)
        return
    rows = [
        (f.path, hz.count(f.rows), *(hz.count(f.streams.get(s, {}).get("rows", 0)) for s in ("uniform", "hard")))
        for f in manifest.files
    ]
    columns = ["partition", Col("rows", right=True), Col("uniform", right=True), Col("hard", right=True)]
    common.console.print(tb.table(columns, rows, title="dataset"))
    streams = manifest.counts["per_stream"]
    share = streams["hard"]["share_of_rows"]
    typer.echo(
        f"wrote {out}: {hz.count(manifest.counts['rows'])} rows from {hz.count(manifest.counts['samples'])} samples "
        f"({hz.percent(share)} of rows chosen by the model), digest {manifest.digest['value']}"
    )
