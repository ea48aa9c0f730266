"""Turning a chosen candidate into a signed bundle (per ``docs/contract.md``).

Manifest metrics, lineage, model card and the archive. Reference statistics and test vectors
are in :mod:`packager.stats`.
"""

from __future__ import annotations

import getpass
import json
import platform
import socket
import subprocess
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from edgeota_contract.bundle import bundle_file_name, create_bundle
from edgeota_contract.calibration import CALIBRATION_FILE
from edgeota_contract.manifest import (
    METRIC_LATENCY_BUDGET_MS,
    METRIC_SMOKE_ATOL,
    METRIC_SMOKE_RTOL,
    MODEL_CARD_FILE,
    MODEL_FILE,
    REFERENCE_STATS_FILE,
    TEST_VECTORS_FILE,
    BundleManifest,
    GateOverrides,
    Lineage,
    PassRecord,
)
from edgeota_contract.signing import SigningKey, canonical_json
from edgeota_contract.version import __version__
from packager.calibration import confidence_calibration
from packager.data import Dataset
from packager.gates import TASK_GATES, GateResult
from packager.ladder import LadderOutcome
from packager.onnx_utils import io_specs, main_opset
from packager.profiles import HardwareProfile
from packager.request import PackageRequest
from packager.stats import reference_stats, smoke_tolerances, test_vectors

# ---- lineage, card, manifest -------------------------------------------------------------


def code_commit() -> str | None:
    """The git commit of the packager's source tree, when it is a checkout."""
    root = Path(__file__).resolve().parent.parent
    try:
        out = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    commit = out.stdout.strip()
    return commit if out.returncode == 0 and len(commit) >= 7 else None


def default_created_by() -> str:
    try:
        user = getpass.getuser()
    except Exception:
        user = "unknown"
    return f"{user}@{socket.gethostname()} (edgeota packager)"


def _round(value: float) -> float:
    return float(f"{value:.6g}")


def manifest_metrics(outcome: LadderOutcome, profile: HardwareProfile, atol: float, rtol: float) -> dict[str, float]:
    """Deterministic figures only: latency and memory vary run to run, so they go to report.json."""
    chosen = outcome.chosen
    assert chosen is not None
    m = chosen.metrics
    metrics = {
        METRIC_SMOKE_ATOL: _round(atol),
        METRIC_SMOKE_RTOL: _round(rtol),
        METRIC_LATENCY_BUDGET_MS: float(profile.latency.budget_ms),
        "model_bytes": m["model_bytes"],
        "fp32_model_bytes": outcome.baseline["model_bytes"],
        "size_ratio_vs_fp32": _round(m["model_bytes"] / outcome.baseline["model_bytes"]),
        "ram_budget_bytes": float(profile.ram_budget_bytes),
    }
    if outcome.gates_overridden:
        metrics["gates_overridden"] = 1.0
    # Task measures and a mixed-precision search's outcome appear only for the models they apply to.
    task = ("mask_iou", "mask_agreement", "box_iou", "score_agreement", "embedding_cosine")
    mixed = ("float_nodes", "int8_weight_share", "full_int8_model_bytes")
    for key in ("accuracy", "top1_agreement", "cosine_mean", "sqnr_db", *task, *mixed):
        if key in m and np.isfinite(m[key]):
            metrics[key] = _round(m[key])
    if "accuracy" in outcome.baseline:
        metrics["fp32_accuracy"] = _round(outcome.baseline["accuracy"])
        if "accuracy" in m:
            metrics["accuracy_drop"] = _round(outcome.baseline["accuracy"] - m["accuracy"])
    return metrics


def _task_gates(gates: list[GateResult], kinds: dict[str, str]) -> str:
    """``, fidelity_mask_iou >= 0.9; output kinds: out score_map`` when task gates applied, else nothing."""
    names = {g[1] for g in TASK_GATES}
    task = [f", {g.name} >= {g.threshold:g}" for g in gates if g.name in names and g.threshold is not None]
    if not task:
        return ""
    return "".join(task) + "; output kinds: " + ", ".join(f"{name} {kind}" for name, kind in kinds.items())


def model_card(
    *,
    name: str,
    version: str,
    profile: HardwareProfile,
    outcome: LadderOutcome,
    metrics: dict[str, float],
    lineage: Lineage,
    eval_role: str,
    eval_count: int,
    gate_overrides: GateOverrides | None = None,
) -> str:
    chosen = outcome.chosen
    assert chosen is not None
    lines = [
        f"# {name} {version} for {profile.name} (`{profile.id}`)",
        "",
    ]
    if outcome.gates_overridden:
        lines += [
            f"> **WARNING: packaged with gates overridden.** The shipped recipe {chosen.label} FAILED: "
            + ", ".join(g.name for g in chosen.gates if not g.ok)
            + ". Do not deploy outside a test or a demo.",
            "",
        ]
    lines += [
        "## Intended use",
        f"On-device inference on {profile.name} ({profile.architecture}, {profile.cpu.model}) through "
        f"`{profile.primary_ep.name}`. Inputs and outputs are as in the fp32 source model; see the manifest.",
        "",
        "## Recipe",
        f"Chosen recipe: **{chosen.label}** after {len(outcome.attempts)} attempt(s) of the ladder "
        f"`{' -> '.join(r.name for r in profile.ladder)}`.",
        "",
        "| attempt | result | failed gates |",
        "|---|---|---|",
    ]
    for a in outcome.attempts:
        failed = ", ".join(g.name for g in a.gates if not g.ok) or ("-" if a.passed_gates else "pass failed")
        status = "chosen" if a.accepted else ("passed, not chosen" if a.passed_gates else "rejected")
        lines.append(f"| {a.label} | {status} | {failed} |")
    lines += ["", "Figures and reasons for every attempt are in the packaging report (report.json)."]
    lines += ["", "## Metrics", f"Measured on {eval_count} {eval_role} samples on the packaging host.", ""]
    lines += ["| metric | value |", "|---|---|"]
    for key in sorted(metrics):
        lines.append(f"| {key} | {metrics[key]:g} |")
    lines += [
        "",
        f"Gated on: {outcome.gate_metric}"
        + (
            f" (max drop {profile.accuracy.max_accuracy_drop * 100:g} points)"
            if outcome.gate_metric == "accuracy"
            else f" (top-1 >= {profile.accuracy.min_top1_agreement}, cosine >= {profile.accuracy.min_cosine}, "
            f"SQNR >= {profile.accuracy.min_sqnr_db} dB" + _task_gates(chosen.gates, outcome.output_kinds) + ")"
        )
        + f"; latency budget {profile.latency.budget_ms:g} ms on the device, size <= {profile.max_bundle_bytes} bytes.",
        "",
    ]
    if gate_overrides is not None:
        given = ", ".join(f"{k} {v:g}" for k, v in gate_overrides.given().items())
        lines += [f"These thresholds include this model's own gate overrides ({given}) over the profile's.", ""]
    lines += [
        "## Lineage",
        f"- source model sha256: `{lineage.source_model_sha256}`",
        f"- calibration data sha256: `{lineage.calibration_data_sha256}`",
        f"- evaluation data sha256: `{lineage.eval_data_sha256}`",
        f"- packager: edgeota {lineage.packager_version}, commit `{lineage.code_commit or 'unknown'}`",
        "",
        "## Limits",
        "- Latency was measured on the packaging host with ONNX Runtime's CPUExecutionProvider "
        f"(scaled by an estimated {profile.latency.host_scale:g}x for this device), not on the device itself; "
        "the device agent checks the budget on the device. Host latency figures are in the packaging report.",
        "- Quality figures hold for data like the evaluation set; drift is watched with reference_stats.json.",
    ]
    if chosen.pruned:
        lines.append("- Weights were magnitude-pruned without fine-tuning.")
    return "\n".join(lines) + "\n"


def build_bundle(
    request: PackageRequest,
    *,
    profile: HardwareProfile,
    outcome: LadderOutcome,
    source_sha256: str,
    calibration: Dataset,
    eval_data: Dataset,
    key: SigningKey,
) -> tuple[Path, BundleManifest]:
    """Write the bundle of ``outcome``'s chosen candidate for ``profile``, atomically, and return its path and manifest.

    The release fields (name, version, release counter, lineage pins, output folder) come from
    ``request``; the file is ``request.out_dir / bundle_file_name(...)``
    (:func:`edgeota_contract.bundle.bundle_file_name`). ``eval_data`` is the calibration set when
    the request gave no evaluation data (the lineage then records no evaluation digest).
    """
    name, version = request.model_name, request.version
    eval_is_calibration = request.eval_data is None
    chosen = outcome.chosen
    assert chosen is not None and outcome.model is not None and outcome.model_bytes is not None
    model_bytes = outcome.model_bytes
    model: onnx.ModelProto = outcome.model
    stats = reference_stats(model_bytes, calibration)
    tv_bytes, tv_arrays = test_vectors(model_bytes, eval_data)
    recipe = next(r for r in profile.ladder if r.name == chosen.recipe)
    atol, rtol = smoke_tolerances(recipe.precision, tv_arrays)
    metrics = manifest_metrics(outcome, profile, atol, rtol)
    lineage = Lineage(
        source_model_sha256=source_sha256,
        calibration_data_sha256=calibration.sha256 or None,
        eval_data_sha256=None if eval_is_calibration else (eval_data.sha256 or None),
        packager_version=__version__,
        code_commit=code_commit(),
        created_at=request.created_at or datetime.now(UTC),
        created_by=request.created_by or default_created_by(),
    )
    card = model_card(
        name=name,
        version=version,
        profile=profile,
        outcome=outcome,
        metrics=metrics,
        lineage=lineage,
        eval_role=eval_data.role,
        eval_count=eval_data.count,
        gate_overrides=request.gates_for(profile.id),
    )
    payload = {
        MODEL_FILE: model_bytes,
        MODEL_CARD_FILE: card.encode("utf-8"),
        REFERENCE_STATS_FILE: canonical_json(stats.model_dump(mode="json")),
        TEST_VECTORS_FILE: tv_bytes,
    }
    confidence_cal = confidence_calibration(model_bytes, eval_data)
    if confidence_cal is not None:  # labelled evaluation data: the server's label-free accuracy estimate uses it
        payload[CALIBRATION_FILE] = canonical_json(confidence_cal.model_dump(mode="json"))
    path = request.out_dir / bundle_file_name(name, version, profile.id)
    manifest = create_bundle(
        path,
        payload,
        key,
        model_name=name,
        version=version,
        release_counter=request.counter,
        hardware_profile=profile.id,
        inputs=[s.to_contract() for s in io_specs(model, "input")],
        outputs=[s.to_contract() for s in io_specs(model, "output")],
        opset=main_opset(model),
        execution_provider=profile.primary_ep.name,
        recipe=chosen.label,
        passes=[PassRecord.model_validate(p) if isinstance(p, dict) else p for p in outcome.pass_records],
        metrics=metrics,
        lineage=lineage,
        gate_overrides=request.gates_for(profile.id),
    )
    return path, manifest


def host_info() -> dict[str, Any]:
    import onnxruntime as ort

    flags: list[str] = []
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("flags"):
                    have = set(line.split(":", 1)[1].split())
                    flags = sorted(have & {"avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8", "f16c"})
                    break
    except OSError:
        pass
    return {
        "machine": platform.machine(),
        "processor": platform.processor() or None,
        "cpu_flags": flags,
        "onnxruntime": ort.__version__,
        "onnx": onnx.__version__,
        "execution_providers": ort.get_available_providers(),
        "latency_ep": "CPUExecutionProvider",
        "note": "latency and memory were measured on this host with the CPU EP as a proxy for the device",
    }


def json_default(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def _finite(value: Any) -> Any:
    """NaN/Inf are not JSON: they become null (a NaN metric means the model produced NaN outputs)."""
    if isinstance(value, float) and not np.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def dumps(value: Any) -> str:
    """Strict JSON (no NaN) with paths, datetimes and numpy scalars converted."""
    return json.dumps(_finite(value), indent=2, sort_keys=True, default=json_default, allow_nan=False)
