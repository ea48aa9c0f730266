"""The packager's public Python API: :func:`package_model` over one :class:`~packager.request.PackageRequest`.

One source model (ONNX file, TorchScript file, ``ExportedProgram`` ``.pt2`` file, or an
``nn.Module``), one calibration set, optionally one evaluation set, any number of hardware
profiles -> one signed bundle per profile that passed its gates, plus ``out_dir/report.json``.

Bad input (an invalid request value, corrupt model, unknown or broken profile, data that does not
fit the model, missing labels for a labelled gate, unreadable key) raises a
:class:`~edgeota_contract.errors.EdgeotaError` with a one-line message before any bundle is
written. A profile whose ladder finds no passing recipe is reported (``ok = False``), and no
bundle is written for it.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgeota_contract.bundle import bundle_file_name, sha256_file
from edgeota_contract.errors import EdgeotaError
from edgeota_contract.signing import SigningKey, load_private_key
from edgeota_contract.version import __version__
from packager.bundling import build_bundle, dumps, host_info
from packager.data import Dataset, load_dataset
from packager.errors import PackagerError, ProfileError
from packager.gates import GateResult
from packager.ladder import (
    Attempt,
    LadderRunner,
    RunOptions,
    SourceModel,
    failure_message,
    resolve_gate_metric,
)
from packager.onnx_utils import io_specs, load_onnx_file, sha256_bytes
from packager.profiles import HardwareProfile, load_profiles, with_gate_overrides
from packager.progress import Reporter
from packager.recipes import resolve_recipe
from packager.request import EXPORTED_PROGRAM_SUFFIXES, TORCHSCRIPT_SUFFIXES, PackageRequest

if TYPE_CHECKING:
    import torch

REPORT_FILE = "report.json"


@dataclass
class ProfileResult:
    profile: str
    ok: bool
    error: str | None = None
    recipe: str | None = None
    bundle_path: Path | None = None
    bundle_sha256: str | None = None
    bundle_size: int | None = None
    gate_metric: str | None = None
    gates_overridden: bool = False
    gate_overrides: dict[str, float] = field(default_factory=dict)  # this model's thresholds over the profile's
    output_kinds: dict[str, str] = field(default_factory=dict)  # fidelity kind of each output (packager.fidelity)
    mixed_precision: dict[str, Any] | None = None  # the chosen attempt's mixed-precision search, if it ran one
    baseline: dict[str, float] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    gates: list[GateResult] = field(default_factory=list)
    attempts: list[Attempt] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        data = {k: v for k, v in asdict(self).items() if k != "attempts"}
        data["attempts"] = [a.to_dict() for a in self.attempts]
        data["bundle_path"] = str(self.bundle_path) if self.bundle_path else None
        return data


@dataclass
class PackagingReport:
    model_name: str
    version: str
    release_counter: int
    source: dict[str, Any]
    calibration: dict[str, Any]
    evaluation: dict[str, Any]
    results: dict[str, ProfileResult]  # by profile id, in the order the profiles were given
    host: dict[str, Any]
    packager_version: str
    seconds: float = 0.0
    report_path: Path | None = None

    @property
    def ok(self) -> bool:
        return all(r.ok for r in self.results.values())

    def to_dict(self) -> dict[str, Any]:
        data = {k: v for k, v in asdict(self).items() if k not in ("results", "report_path")}
        data["ok"] = self.ok
        data["results"] = {pid: r.to_dict() for pid, r in self.results.items()}
        return data

    def to_json(self) -> str:
        return dumps(self.to_dict())


EventFn = Callable[[str, str], None]


def _load_key(key: Path | SigningKey) -> SigningKey:
    if isinstance(key, SigningKey):
        return key
    return load_private_key(key)


def load_source(model: Path | str | torch.nn.Module, example_inputs: Any, calibration_path: Path | None) -> SourceModel:
    """Read the model; PyTorch inputs are exported to ONNX (torch is imported only for them)."""
    if isinstance(model, (str, os.PathLike)):
        path = Path(model)
        suffix = path.suffix.lower()
        if suffix in TORCHSCRIPT_SUFFIXES or suffix in EXPORTED_PROGRAM_SUFFIXES:
            from packager.torch_input import load_torch_file

            return load_torch_file(path, example_inputs, calibration_path)
        onnx_model, data = load_onnx_file(path)
        return SourceModel(onnx_model, sha256_bytes(data), "onnx")
    from packager.torch_input import load_torch_module

    return load_torch_module(model, example_inputs, calibration_path)


def package_model(request: PackageRequest, *, on_event: EventFn | None = None) -> PackagingReport:
    """Package ``request.model`` for each of ``request.profiles``; see the module doc. Returns the report.

    ``on_event(profile_id, message)`` is told each step as it happens (it is an observer, not part of
    the request). Request fields, in short (see :class:`~packager.request.PackageRequest`):
    ``latency`` shrinks or grows the host latency measurement; ``gate_metric`` (``accuracy`` or
    ``fidelity``) overrides every profile's choice; ``created_at``/``created_by`` pin the lineage
    fields (bundles are byte-identical for identical inputs apart from them and the signature).
    ``structured_pruning`` (PyTorch input only) forces channel pruning on or off; by default it
    follows each profile's ``pruning.structured`` settings (pruned first, unpruned if no recipe passes).
    ``recipes`` replaces every profile's ladder with these built-in recipe names (each must use a
    precision the profile allows). ``enforce_gates=False`` is for demos and tests only: a profile
    whose ladder fails still gets a bundle, built from the last attempt that produced a model, with
    ``gates_overridden = 1`` in the manifest metrics and a warning in the model card.
    ``gate_overrides`` (this model's latency budget and quality thresholds, with
    ``profile_gate_overrides[profile id]`` over them) replace each profile's values before anything
    is gated; they are recorded in that profile's manifest, model card and report entry.

    Raises:
        EdgeotaError: an output folder that is a file; unreadable model, key or data; unknown or broken
            profile; a recipe override the profile does not allow; data that does not fit the model or is
            not finite (nothing is written then).
    """
    started = time.perf_counter()
    check_out_dir(request.out_dir)
    profile_objs = load_profiles(list(request.profiles), request.profiles_dir)
    if request.recipes is not None:
        profile_objs = [_with_ladder(p, list(request.recipes)) for p in profile_objs]
    profile_objs = [with_gate_overrides(p, request.gates_for(p.id)) for p in profile_objs]
    if request.mixed_precision_budget_s is not None:
        profile_objs = [_with_budget(p, request.mixed_precision_budget_s) for p in profile_objs]
    signing_key = _load_key(request.key)
    calibration, eval_data = request.calibration, request.eval_data
    if not calibration.is_file():
        raise PackagerError(f"calibration data {calibration} does not exist")
    if eval_data is not None and not eval_data.is_file():
        raise PackagerError(f"evaluation data {eval_data} does not exist")

    source = load_source(request.model, request.example_inputs, calibration)
    specs = io_specs(source.model, "input")
    outputs = [o.name for o in source.model.graph.output]
    for name in request.output_kinds:
        if name not in outputs:
            raise PackagerError(f"output_kinds names {name!r}, which is not an output (outputs: {', '.join(outputs)})")
    calib = load_dataset(calibration, specs, "calibration")
    evald = load_dataset(eval_data, specs, "evaluation") if eval_data is not None else calib
    options = RunOptions(
        latency=request.latency,
        measure_memory=request.measure_memory,
        gate_metric=request.gate_metric,
        enforce_gates=request.enforce_gates,
        output_kinds=dict(request.output_kinds),
    )
    for profile in profile_objs:  # a labelled gate without labels fails before any work
        resolve_gate_metric(profile, evald, request.gate_metric)
    try:
        request.out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise PackagerError(f"cannot create output folder {request.out_dir}: {exc.strerror or exc}") from exc

    reporter = Reporter(profile_objs, request.progress, on_event)
    runners: dict[float | None, LadderRunner] = {None: LadderRunner(source, calib, evald, options, reporter.event)}
    plans: dict[str, list[LadderRunner]] = {}
    try:
        for p in profile_objs:
            ratio = _structured_ratio(p, request)
            if ratio is not None and ratio not in runners:
                from packager.torch_input import load_torch_pruned

                pruned = load_torch_pruned(request.model, request.example_inputs, calibration, ratio)
                runners[ratio] = LadderRunner(
                    pruned, calib, evald, options, reporter.event, variant=f"channels-{round(ratio * 100)}%"
                )
            plans[p.id] = ([runners[ratio]] if ratio is not None else []) + [runners[None]]
        run = _Run(request, signing_key, calib, evald, reporter)
        with reporter:
            if request.jobs == 1 or len(profile_objs) == 1:
                results = [_package_one(plans[p.id], p, run) for p in profile_objs]
            else:
                with ThreadPoolExecutor(max_workers=request.jobs, thread_name_prefix="edgeota-pack") as pool:
                    futures = [pool.submit(_package_one, plans[p.id], p, run) for p in profile_objs]
                    results = [f.result() for f in futures]
    finally:
        for runner in runners.values():
            runner.close()
    report = PackagingReport(
        model_name=request.model_name,
        version=request.version,
        release_counter=request.counter,
        source={
            "path": None if request.model_path is None else str(request.model_path),
            "format": source.format,
            "sha256": source.sha256,
            "inputs": [s.to_contract() for s in specs],
        },
        calibration={
            "path": str(calibration),
            "sha256": calib.sha256,
            "samples": calib.count,
            "labels": calib.labels is not None,
        },
        evaluation={
            "path": str(eval_data) if eval_data is not None else None,
            "sha256": evald.sha256,
            "samples": evald.count,
            "labels": evald.labels is not None,
            "note": None if eval_data is not None else "no evaluation data given: evaluated on the calibration data",
        },
        results={r.profile: r for r in results},
        host={**host_info(), "jobs": request.jobs},
        packager_version=__version__,
        seconds=time.perf_counter() - started,
    )
    report.report_path = request.out_dir / REPORT_FILE
    tmp = report.report_path.with_name(f".{REPORT_FILE}.tmp-{os.getpid()}")
    tmp.write_text(report.to_json() + "\n", encoding="utf-8")
    os.replace(tmp, report.report_path)
    return report


def check_out_dir(out_dir: Path) -> None:
    """Refuse an output folder that is a file, or lies under one, before any work is done.

    Raises:
        PackagerError: ``out_dir`` or one of its parents exists and is not a folder.
    """
    for path in (out_dir, *out_dir.parents):
        if path.is_dir():
            return
        if path.exists():
            where = "is a file" if path == out_dir else f"is under {path}, which is a file"
            raise PackagerError(f"output folder {out_dir} {where}, not a folder")


def _with_ladder(profile: HardwareProfile, names: list[str]) -> HardwareProfile:
    """``profile`` with its ladder replaced by ``names``; raises ProfileError for a recipe it does not allow."""
    for entry in names:
        recipe = resolve_recipe(entry)
        if recipe.precision not in profile.allowed_precisions:
            raise ProfileError(f"recipe {recipe.name!r} ({recipe.precision}) is not allowed by profile {profile.id}")
    return profile.model_copy(update={"recipes": names})


def _with_budget(profile: HardwareProfile, budget_s: float) -> HardwareProfile:
    """``profile`` with its mixed-precision search budget replaced by ``budget_s``."""
    spec = profile.mixed_precision.model_copy(update={"budget_s": budget_s})
    return profile.model_copy(update={"mixed_precision": spec})


def _structured_ratio(profile: HardwareProfile, request: PackageRequest) -> float | None:
    """Channel-pruning ratio for this profile: PyTorch input only, when the profile enables it."""
    sp = profile.pruning.structured
    forced = request.structured_pruning
    if forced is False or not request.is_torch_input:
        return None
    if sp.enabled and sp.ratio > 0:
        return sp.ratio
    return 0.25 if forced else None


@dataclass(frozen=True)
class _Run:
    """What every profile of one run shares: the request, the loaded key and data, the progress reporter."""

    request: PackageRequest
    key: SigningKey
    calib: Dataset
    evald: Dataset
    reporter: Reporter


def _package_one(runners: list[LadderRunner], profile: HardwareProfile, run: _Run) -> ProfileResult:
    request, reporter = run.request, run.reporter
    started = time.perf_counter()
    own = request.gates_for(profile.id)
    result = ProfileResult(profile=profile.id, ok=False, gate_overrides=own.given() if own is not None else {})
    target = request.out_dir / bundle_file_name(request.model_name, request.version, profile.id)
    try:
        attempts: list[Attempt] = []
        for runner in runners:  # a channel-pruned source first (PyTorch input), then the unpruned one
            outcome = runner.run_profile(profile)
            attempts += outcome.attempts
            if outcome.chosen is not None:
                break
        outcome.attempts = attempts
        source = runner.source
        result.attempts = outcome.attempts
        result.baseline = outcome.baseline
        result.gate_metric = outcome.gate_metric
        result.output_kinds = dict(outcome.output_kinds)
        if outcome.chosen is None:
            result.error = failure_message(outcome)
            result.gates = outcome.attempts[-1].gates if outcome.attempts else []
        else:
            result.recipe = outcome.chosen.label
            result.mixed_precision = outcome.chosen.search
            result.gates_overridden = outcome.gates_overridden
            result.metrics = outcome.chosen.metrics
            result.gates = outcome.chosen.gates
            reporter.event(profile.id, "writing bundle")
            path, _manifest = build_bundle(
                request,
                profile=profile,
                outcome=outcome,
                source_sha256=source.sha256,
                calibration=run.calib,
                eval_data=run.evald,
                key=run.key,
            )
            size = path.stat().st_size
            if size > profile.max_bundle_bytes:
                path.unlink(missing_ok=True)
                result.error = (
                    f"profile {profile.id}: bundle is {size} bytes, over the profile's {profile.max_bundle_bytes}"
                )
            else:
                result.ok = True
                result.bundle_path = path
                result.bundle_sha256 = sha256_file(path)
                result.bundle_size = size
    except EdgeotaError as exc:
        result.error = str(exc)
    except Exception as exc:  # one profile's crash must not hide the others' results
        result.error = f"profile {profile.id}: internal error: {type(exc).__name__}: {exc}"
    if not result.ok:
        target.unlink(missing_ok=True)  # never leave a bundle of this name that this run did not vouch for
    result.seconds = time.perf_counter() - started
    reporter.done(profile.id, result.ok, result.recipe or result.error or "")
    return result
