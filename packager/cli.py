"""``edgeota package``, ``edgeota profiles list|show`` and ``edgeota bundle verify|inspect``.

Imports only typer, rich and the contract (with its CLI output helpers :mod:`edgeota_contract.tables` and
:mod:`edgeota_contract.humanize`) at module level: ``bundle verify/inspect`` work with the base install; the
packaging commands import onnx/onnxruntime when they run.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from datetime import datetime
from functools import wraps
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import typer
from rich.console import Console
from rich.markup import escape
from rich.text import Text

from edgeota_contract import humanize as hz
from edgeota_contract import tables as tb
from edgeota_contract.errors import EdgeotaError
from edgeota_contract.tables import Col, Output

if TYPE_CHECKING:
    from packager.api import PackagingReport

F = TypeVar("F", bound=Callable[..., Any])

profiles_app = typer.Typer(help="Hardware profiles the packager targets.", no_args_is_help=True)
bundle_app = typer.Typer(help="Inspect and verify signed model bundles.", no_args_is_help=True)


def _fail(message: str, code: int = 2) -> None:
    typer.secho(f"error: {message}", err=True, fg="red")
    raise typer.Exit(code)


def _one_line_errors(func: F) -> F:
    """Deliberate errors become ``error: <one line>`` and exit 2; a missing extra says what to install."""

    @wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except EdgeotaError as exc:
            _fail(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        except ModuleNotFoundError as exc:
            _fail(f"missing dependency {exc.name!r}: install edgeota[packager] (and edgeota[torch] for PyTorch input)")
        return None

    return wrapper  # type: ignore[return-value]


def _profiles_dir_option() -> Any:
    return typer.Option(None, "--profiles-dir", help="Folder of profile YAML files (default: hardware_profiles/).")


@profiles_app.command("list")
@_one_line_errors
def profiles_list(
    profiles_dir: Path | None = _profiles_dir_option(),
    output: Output = tb.output_option(),
    as_json: bool = typer.Option(False, "--json", help=tb.JSON_FLAG_HELP),
) -> None:
    """List the hardware profiles (id, device, execution provider, recipe ladder)."""
    from packager.profiles import list_profile_ids, load_profile

    profiles = [load_profile(pid, profiles_dir) for pid in list_profile_ids(profiles_dir)]
    if tb.chosen(output, as_json) is Output.json:
        tb.print_json([p.summary() for p in profiles])
        return
    rows = [
        (p.id, p.name, p.architecture, p.primary_ep.name.removesuffix("ExecutionProvider"),
         " > ".join(r.name for r in p.ladder), hz.milliseconds(p.latency.budget_ms))
        for p in profiles
    ]  # fmt: skip
    columns = [Col("id", no_wrap=True), "device", "arch", "EP", "ladder", Col("budget", right=True, no_wrap=True)]
    Console().print(tb.table(columns, rows, title="hardware profiles"))


@profiles_app.command("show")
@_one_line_errors
def profiles_show(
    profile_id: str = typer.Argument(..., help="Profile id, e.g. rpi4."),
    profiles_dir: Path | None = _profiles_dir_option(),
    output: Output = tb.output_option(),
    as_json: bool = typer.Option(False, "--json", help=tb.JSON_FLAG_HELP),
) -> None:
    """Show one validated profile, with its ladder resolved to full recipes."""
    from packager.profiles import load_profile

    p = load_profile(profile_id, profiles_dir)
    data = p.model_dump(mode="json")
    data["recipes"] = [r.model_dump(mode="json") for r in p.ladder]
    if tb.chosen(output, as_json) is Output.json:
        typer.echo(json.dumps(data, indent=2))
        return
    import yaml

    Console().print(f"[bold]{escape(p.id)}[/bold]: {escape(p.name)}")
    typer.echo(yaml.safe_dump(data, sort_keys=False, width=110))


@_one_line_errors
def package(
    model: Path = typer.Argument(..., help="ONNX file, TorchScript file (.pt/.pth/.ts) or ExportedProgram (.pt2)."),
    profile: list[str] = typer.Option(..., "--profile", "-p", help="Hardware profile id; repeat for several."),
    calibration: Path = typer.Option(..., "--calibration", help=".npz keyed by input name (+ 'labels')."),
    eval_data: Path | None = typer.Option(None, "--eval", help=".npz for the gates (default: the calibration data)."),
    key: Path = typer.Option(..., "--key", help="Ed25519 release private key (PEM), see `edgeota keys generate`."),
    out: Path = typer.Option(..., "--out", help="Output folder for bundles and report.json."),
    name: str | None = typer.Option(None, "--name", help="Model name (default: the model file stem)."),
    version: str = typer.Option("0.1.0", "--version", help="Semantic version of this release."),
    release_counter: int | None = typer.Option(None, "--release-counter", help="Default: major*1e6+minor*1e3+patch."),
    jobs: int = typer.Option(1, "--jobs", "-j", min=1, help="Profiles packaged in parallel."),
    profiles_dir: Path | None = _profiles_dir_option(),
    gate: str | None = typer.Option(None, "--gate", help="Override the quality gate: accuracy or fidelity."),
    example_shape: str | None = typer.Option(
        None, "--example-shape", help="PyTorch input: example input shape, e.g. 1,1,8,8 (default: from calibration)."
    ),
    created_at: datetime | None = typer.Option(
        None, "--created-at", help="Pin lineage.created_at (reproducible builds)."
    ),
    recipe: list[str] | None = typer.Option(
        None, "--recipe", help="Replace every profile's ladder with these built-in recipes (repeatable)."
    ),
    override_gates: bool = typer.Option(
        False, "--override-gates", help="DEMOS/TESTS ONLY: ship the last attempt even if it failed its gates."
    ),
    model_config: Path | None = typer.Option(
        None, "--model-config", help="YAML with this model's gate thresholds ('gates:'), see docs/packager.md."
    ),
    latency_budget_ms: float | None = typer.Option(
        None, "--latency-budget-ms", help="This model's device latency budget (ms), over every profile's."
    ),
    max_accuracy_drop: float | None = typer.Option(
        None, "--max-accuracy-drop", help="Allowed labelled-accuracy drop vs fp32 (0.02 = two points)."
    ),
    min_top1_agreement: float | None = typer.Option(
        None, "--min-top1-agreement", help="Fidelity gate: minimum top-1 agreement with fp32 (0..1)."
    ),
    min_cosine: float | None = typer.Option(None, "--min-cosine", help="Fidelity gate: minimum mean cosine to fp32."),
    min_sqnr_db: float | None = typer.Option(None, "--min-sqnr-db", help="Fidelity gate: minimum SQNR (dB) to fp32."),
    min_mask_iou: float | None = typer.Option(
        None, "--min-mask-iou", help="Fidelity gate for score maps/masks: minimum mean mask IoU to fp32 (0..1)."
    ),
    output_kind: list[str] | None = typer.Option(
        None,
        "--output-kind",
        help="NAME=KIND: how an output is judged (class_scores, score_map, mask, detection_boxes, "
        "detection_scores, embedding, generic); repeatable; others are inferred.",
    ),
    mixed_precision_budget_s: float | None = typer.Option(
        None, "--mixed-precision-budget-s", help="Time budget (s) of each mixed-precision search, over the profiles'."
    ),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Progress bars on stderr."),
) -> None:
    """Package MODEL for each --profile: run the recipe ladder, gate, and write signed bundles.

    Gate thresholds given with --model-config or the options below it replace every profile's
    (options win over the file) and are recorded in each manifest and the report.
    """
    from packager.api import package_model
    from packager.model_config import ModelConfig, load_model_config, merge_overrides
    from packager.request import PackageRequest, RequestError

    config = load_model_config(model_config) if model_config is not None else ModelConfig()
    thresholds = {
        "latency_budget_ms": latency_budget_ms,
        "max_accuracy_drop": max_accuracy_drop,
        "min_top1_agreement": min_top1_agreement,
        "min_cosine": min_cosine,
        "min_sqnr_db": min_sqnr_db,
        "min_mask_iou": min_mask_iou,
    }
    kinds = dict(config.output_kinds)
    for entry in output_kind or []:
        out_name, sep, kind = entry.partition("=")
        if not sep or not out_name or not kind:
            raise EdgeotaError(f"--output-kind {entry!r}: expected NAME=KIND")
        kinds[out_name] = kind
    try:  # options win over the file, for every profile
        overrides = merge_overrides(config.gates, **thresholds)
        per_profile = {pid: merge_overrides(g, **thresholds) for pid, g in config.profiles.items()}
    except RequestError as exc:
        raise EdgeotaError(_in_option_terms(str(exc), exc.field), exc.reason) from None
    try:
        request = PackageRequest(
            model=model,
            profiles=profile,
            calibration=calibration,
            eval_data=eval_data,
            key=key,
            out_dir=out,
            name=name,
            version=version,
            release_counter=release_counter,
            profiles_dir=profiles_dir,
            example_inputs=_example_shape(example_shape),
            jobs=jobs,
            progress=progress and sys.stderr.isatty(),
            gate_metric=gate,
            created_at=created_at,
            recipes=recipe or None,
            enforce_gates=not override_gates,
            gate_overrides=overrides,
            profile_gate_overrides=per_profile,
            output_kinds=kinds,
            mixed_precision_budget_s=mixed_precision_budget_s,
        )
    except RequestError as exc:
        raise EdgeotaError(_in_option_terms(str(exc), exc.field), exc.reason) from None
    _print_report(package_model(request))


# The option that sets each request field, so that an error names what the user typed.
_OPTION_OF_FIELD = {
    "profiles": "--profile",
    "eval_data": "--eval",
    "out_dir": "--out",
    "release_counter": "--release-counter",
    "profiles_dir": "--profiles-dir",
    "example_inputs": "--example-shape",
    "gate_metric": "--gate",
    "created_at": "--created-at",
    "recipes": "--recipe",
}


def _in_option_terms(message: str, field: str | None) -> str:
    """``gate_metric must be ...`` -> ``--gate must be ...``: a message that starts with a field names the option."""
    if field is None or not message.startswith(field):
        return message
    return _OPTION_OF_FIELD.get(field, "--" + field.replace("_", "-")) + message[len(field) :]


def _example_shape(text: str | None) -> tuple[int, ...] | None:
    if not text:
        return None
    try:
        return tuple(int(d) for d in text.split(","))
    except ValueError:
        raise EdgeotaError(f"--example-shape must be comma-separated integers, not {text!r}") from None


def _print_report(report: PackagingReport) -> None:
    """The result table on stdout; overridden gates and failures on stderr; exit 1 when a profile failed."""
    console = Console()
    rows: list[tuple[object, ...]] = []
    for r in report.results.values():
        m = r.metrics
        quality = (
            f"acc {m['accuracy']:.4f}"
            if "accuracy" in m
            else f"mask IoU {m['mask_iou']:.4f}"
            if "mask_iou" in m
            else f"box IoU {m['box_iou']:.4f}"
            if "box_iou" in m
            else f"cos {m['cosine_mean']:.4f}"
            if "cosine_mean" in m
            else "-"
        )
        rows.append(
            (
                r.profile,
                Text("ok", style="green") if r.ok else Text("failed", style="red"),
                r.recipe or "-",
                hz.size(m["model_bytes"]) if "model_bytes" in m else "-",
                quality,
                hz.milliseconds(m["host_latency_p50_ms"]) if "host_latency_p50_ms" in m else "-",
                r.bundle_path.name if r.bundle_path else "-",
            )
        )
    columns = ["profile", "result", "recipe", Col("size", right=True), "quality", Col("host p50", right=True), "bundle"]
    console.print(tb.table(columns, rows, title=f"{report.model_name} {report.version}"))
    for r in report.results.values():
        if r.gate_overrides:
            given = ", ".join(f"{k} {v:g}" for k, v in r.gate_overrides.items())
            console.print(f"{escape(r.profile)}: this model's gate overrides: {escape(given)}")
    console.print(f"report: {escape(str(report.report_path))}")
    for r in report.results.values():
        if r.gates_overridden:
            typer.secho(
                f"warning: {r.profile}: gates overridden, the bundle FAILED: {r.error or r.attempts[-1].reason}",
                err=True,
                fg="yellow",
            )
    failed = [r for r in report.results.values() if not r.ok]
    if failed:
        for r in failed:
            typer.secho(f"error: {r.error}", err=True, fg="red")
        raise typer.Exit(1)


@bundle_app.command("verify")
@_one_line_errors
def bundle_verify(
    bundle: Path = typer.Argument(..., help="A .bundle.tar file."),
    trusted_key: list[Path] = typer.Option(..., "--trusted-key", help="Trusted release public key (PEM); repeatable."),
    profile: str | None = typer.Option(None, "--profile", help="Require this hardware profile."),
    min_release_counter: int | None = typer.Option(None, "--min-release-counter", help="Refuse older releases."),
) -> None:
    """Verify a bundle's signature, every file digest, and optionally its profile and release counter."""
    from edgeota_contract.bundle import verify_bundle
    from edgeota_contract.signing import TrustedKeys

    trusted = TrustedKeys.from_files(trusted_key)
    verified = verify_bundle(bundle, trusted, expected_profile=profile, min_release_counter=min_release_counter)
    m = verified.manifest
    typer.secho(
        f"OK {bundle.name}: {m.model_name} {m.version} for {m.hardware_profile}, signed by {verified.signing_key_id}, "
        f"{len(m.files)} files verified, sha256 {verified.archive_sha256}",
        fg="green",
    )


@bundle_app.command("inspect")
@_one_line_errors
def bundle_inspect(
    bundle: Path = typer.Argument(..., help="A .bundle.tar file."),
    output: Output = tb.output_option(),
    as_json: bool = typer.Option(False, "--json", help=tb.JSON_FLAG_HELP),
) -> None:
    """Show a bundle's manifest, files and metrics WITHOUT verifying it (use `bundle verify` for that)."""
    from edgeota_contract.bundle import read_manifest, sha256_file

    manifest, sig = read_manifest(bundle)
    if tb.chosen(output, as_json) is Output.json:
        typer.echo(json.dumps({"verified": False, "manifest": manifest.model_dump(mode="json")}, indent=2))
        return
    console = Console()
    console.print(
        "[yellow]UNVERIFIED[/yellow]: signature and file digests were not checked; run "
        "`edgeota bundle verify --trusted-key ...` before trusting this bundle."
    )
    console.print(
        f"[bold]{escape(manifest.model_name)} {escape(manifest.version)}[/bold] for profile "
        f"[bold]{escape(manifest.hardware_profile)}[/bold] (release counter {manifest.release_counter})"
    )
    console.print(f"archive sha256 {sha256_file(bundle)}; signature {'by key ' + sig.key_id if sig else 'MISSING'}")
    console.print(
        f"recipe {escape(manifest.recipe)}, execution provider {escape(manifest.execution_provider)}, opset {manifest.opset}"
    )
    io_rows = [
        (kind, s.name, s.dtype, str(s.shape))
        for kind, specs in (("input", manifest.inputs), ("output", manifest.outputs))
        for s in specs
    ]
    console.print(tb.table(["kind", "name", "dtype", "shape"], io_rows, title="inputs / outputs"))
    files = [(f.name, hz.size(f.size), f.sha256) for f in manifest.files]
    console.print(tb.table(["name", Col("size", right=True), "sha256"], files, title="files"))
    metrics = [(k, hz.metric(k, manifest.metrics[k])) for k in sorted(manifest.metrics)]
    console.print(tb.table(["metric", Col("value", right=True)], metrics, title="metrics"))
    if manifest.gate_overrides is not None:
        given = ", ".join(f"{k} {v:g}" for k, v in manifest.gate_overrides.given().items())
        console.print(f"gate overrides (this model's thresholds over the profile's): {escape(given)}")
    console.print("passes: " + escape(" -> ".join(p.name for p in manifest.passes)))
    lin = manifest.lineage
    console.print(
        f"lineage: source {lin.source_model_sha256[:16]}..., packager {escape(lin.packager_version)}, "
        f"commit {escape(str(lin.code_commit))}, created {lin.created_at.isoformat()} by {escape(lin.created_by)}"
    )


def register(app: typer.Typer) -> None:
    app.add_typer(profiles_app, name="profiles")
    app.add_typer(bundle_app, name="bundle")
    app.command("package")(package)
