"""``edgeota evaluate``: a candidate release against the serving release on an exported dataset, then upload.

Imports only stdlib, typer, rich and the contract at module level; the client, ONNX Runtime and pyarrow are
imported when the command runs. Exit status: 0 blessed, 1 evaluated but not blessed, 2 refused (one
``error:`` line).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.console import Console, RenderableType

from edgeota_contract import tables as tb
from edgeota_contract.errors import ContractError
from edgeota_contract.tables import Col, Output

if TYPE_CHECKING:
    from edgeota.evaluation.record import EvaluationRecord
    from edgeota.evaluation.runner import ReleaseBundles
    from ota_server.client import ApiClient

console = Console()


def register(app: typer.Typer) -> None:
    app.command("evaluate")(evaluate_command)


def _fetch(client: ApiClient, release_id: str, profiles: set[str] | None, work: Path) -> ReleaseBundles:
    """Download the release's bundles (of ``profiles``, or all) and check each file's sha256 against the
    release record. The signature and contents are verified later, by the evaluation itself."""
    from edgeota.evaluation.blessing import EvaluationError
    from edgeota.evaluation.runner import ReleaseBundles
    from edgeota_contract.bundle import sha256_file

    release = client.release(release_id)
    paths: dict[str, Path] = {}
    for b in release.bundles:
        if profiles is not None and b.hardware_profile not in profiles:
            continue
        dest = work / f"{release.release_id}-{b.hardware_profile}.bundle.tar"
        client.download_bundle(b.bundle_sha256, dest)
        if sha256_file(dest) != b.bundle_sha256:
            raise EvaluationError(f"the server sent another file for bundle {b.bundle_sha256[:12]}")
        paths[b.hardware_profile] = dest
    return ReleaseBundles(release.release_id, release.version, paths)


def _fmt(value: float | None, signed: bool = False) -> str:
    if value is None:
        return "-"
    return f"{value:+.4f}" if signed else f"{value:.4f}"


def _view(record: EvaluationRecord, evaluation_id: str | None) -> tuple[RenderableType, list[str]]:
    """The slices as a table; lines saying what was skipped, the warnings, the failed rules and the verdict."""
    assert record.verdict is not None
    rows = []
    for s in record.verdict.slices:
        name = "overall" if s.level == "overall" else f"{s.profile}"
        if s.level == "cohort":
            name += f" / {'(none)' if s.cohort is None else s.cohort}"
        ci = None if s.change_ci95 is None else f"[{s.change_ci95[0]:+.4f}, {s.change_ci95[1]:+.4f}]"
        rows.append(
            (name, s.state, s.rows, _fmt(s.baseline_accuracy), _fmt(s.candidate_accuracy), _fmt(s.change, True), ci)
        )
    columns = ["slice", "state", Col("rows", right=True), Col("baseline", right=True), Col("candidate", right=True)]
    columns += [Col("change", right=True), "95% interval"]
    d = record.dataset
    lines = [
        f"dataset {d.digest[:12]}: {d.labelled_rows} labelled rows evaluated, {d.unlabelled_rows} without a label "
        f"and {d.unusable_rows} without an input skipped",
        *(f"warning: {w}" for w in record.verdict.warnings),
        *(f"failed: {r}" for r in record.verdict.reasons),
        f"{record.candidate.release_id} vs {record.baseline.release_id}: "
        + ("BLESSED" if record.verdict.blessed else "NOT BLESSED")
        + (f" (evaluation {evaluation_id})" if evaluation_id else " (not uploaded)"),
    ]
    return tb.table(columns, rows, title="accuracy per slice"), lines


def evaluate_command(
    candidate: str = typer.Option(..., "--candidate", help="release id of the candidate"),
    baseline: str = typer.Option(..., "--baseline", help="release id of the serving release"),
    dataset: Path = typer.Option(..., "--dataset", help="folder written by `edgeota dataset export`"),
    release_key: list[Path] = typer.Option(
        ..., "--release-key", help="trusted release public key (PEM); repeatable; bundles must be signed by one"
    ),
    profile: list[str] = typer.Option([], "--profile", help="evaluate only this hardware profile; repeatable"),
    min_accuracy: float | None = typer.Option(None, "--min-accuracy", help="value threshold per judged slice"),
    max_accuracy_drop: float = typer.Option(
        0.01, "--max-accuracy-drop", help="change threshold, overall and per profile"
    ),
    max_slice_accuracy_drop: float = typer.Option(
        0.03, "--max-slice-accuracy-drop", help="change threshold per cohort x profile"
    ),
    min_slice_rows: int = typer.Option(100, "--min-slice-rows", help="labelled rows before a slice is judged"),
    min_rows: int = typer.Option(200, "--min-rows", help="labelled rows overall before anything is blessed"),
    output: Output = tb.output_option(),
    upload: bool = typer.Option(True, "--upload/--no-upload", help="store the record on the server"),
    server: str | None = typer.Option(None, "--server", help="server URL (env EDGEOTA_URL)"),
    token: str | None = typer.Option(None, "--token", help="API token (env EDGEOTA_TOKEN)"),
) -> None:
    """Run the candidate and the serving release on the labelled rows of an export, per cohort x profile, and
    decide the blessing; upload the record (operator role). Exit 0 blessed, 1 not blessed, 2 refused."""
    from pydantic import ValidationError

    from edgeota.evaluation.blessing import Thresholds
    from edgeota.evaluation.runner import evaluate
    from edgeota_contract.signing import TrustedKeys
    from ota_server import cli_common as common

    try:
        thresholds = Thresholds(
            min_accuracy=min_accuracy,
            max_accuracy_drop=max_accuracy_drop,
            max_slice_accuracy_drop=max_slice_accuracy_drop,
            min_slice_rows=min_slice_rows,
            min_rows=min_rows,
        )
    except ValidationError as exc:
        err = exc.errors()[0]
        raise ContractError(f"bad threshold {err['loc'][0]}: {err['msg']}") from None
    trusted = TrustedKeys.from_files(release_key)
    profiles = set(profile) or None
    client = common.client(server, token)
    with tempfile.TemporaryDirectory(prefix="edgeota-evaluate-") as tmp:
        typer.echo(f"fetching the bundles of {candidate} and {baseline}", err=True)
        cand = _fetch(client, candidate, profiles, Path(tmp))
        base = _fetch(client, baseline, profiles, Path(tmp))
        typer.echo(f"evaluating on {dataset}", err=True)
        record = evaluate(cand, base, dataset, thresholds, trusted, profiles=profiles)
    evaluation_id = None
    if upload:
        stored = client.create_evaluation(record)
        record, evaluation_id = stored.record, stored.evaluation_id
    if output == Output.json:
        tb.print_json({"evaluation_id": evaluation_id, **record.model_dump(mode="json")})
    else:
        table, lines = _view(record, evaluation_id)
        console.print(table)
        for line in lines:  # whole lines, never wrapped: scripts grep them
            typer.echo(line)
    assert record.verdict is not None
    if not record.verdict.blessed:
        raise typer.Exit(1)
