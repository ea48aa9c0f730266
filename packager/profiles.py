"""Hardware profiles: what a device class can run and what a bundle for it must achieve.

One YAML file per device class in ``hardware_profiles/``; the profile id is the file stem
(``hardware_profiles/rpi4.yaml`` is profile ``rpi4``), and an ``id:`` field, when present,
must equal it. Files are validated against :class:`HardwareProfile` (unknown keys are errors).

Latency: this packager measures latency on the packaging host with ONNX Runtime's
``CPUExecutionProvider`` (the only EP available here), batch 1, ``latency.threads`` threads.
A profile's ``latency.budget_ms`` is the *device* budget; the gate compares
``host p95 x latency.host_scale`` against it. ``host_scale`` is a rough, documented
host-to-device slowdown estimate (1.0 for the x86 profiles, which the host is an example of),
not a measurement: the device agent's on-device latency check against the same budget
(``latency_budget_ms`` in the manifest) is the real test.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from edgeota_contract.manifest import GateOverrides
from packager.errors import ProfileError
from packager.recipes import Precision, RecipeSpec, resolve_recipe

PROFILE_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
PROFILES_DIR_ENV = "EDGEOTA_PROFILES_DIR"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class CpuSpec(_Strict):
    model: str = Field(min_length=1, description="CPU core or SoC, e.g. Cortex-A72")
    cores: int = Field(ge=1, le=1024)
    features: list[str] = Field(default_factory=list, description="required CPU features, e.g. neon, asimddp, avx2")


class AcceleratorSpec(_Strict):
    kind: Literal["gpu", "npu", "dsp", "none"] = "none"
    name: str | None = None
    memory_bytes: int | None = Field(default=None, ge=0)


class ExecutionProviderSpec(_Strict):
    name: str = Field(min_length=1, description="ONNX Runtime EP name, e.g. CPUExecutionProvider")
    options: dict[str, str | int | float | bool] = Field(default_factory=dict)


class OpsetRange(_Strict):
    min: int = Field(ge=7, le=30)
    max: int = Field(ge=7, le=30)

    @model_validator(mode="after")
    def _ordered(self) -> OpsetRange:
        if self.min > self.max:
            raise ValueError(f"opset.min {self.min} is above opset.max {self.max}")
        return self


class ShapeConstraints(_Strict):
    static_only: bool = Field(default=False, description="every graph input dim must be a number")
    fixed_batch: int | None = Field(
        default=None, ge=1, description="pin a dynamic batch dimension to this value before packaging"
    )
    max_rank: int | None = Field(default=None, ge=1, le=8)


class OpConstraints(_Strict):
    allow_control_flow: bool = True
    allow: list[str] | None = Field(default=None, description="if set, only these op types (ai.onnx or domain:op)")
    deny: list[str] = Field(default_factory=list)


class UnstructuredPruning(_Strict):
    enabled: bool = False
    sparsity: float = Field(default=0.0, ge=0.0, lt=1.0, description="share of smallest-magnitude weights zeroed")
    min_params: int = Field(default=1024, ge=0, description="leave initializers smaller than this alone")


class StructuredPruning(_Strict):
    enabled: bool = False
    ratio: float = Field(default=0.0, ge=0.0, lt=1.0, description="share of channels removed per prunable layer")


class PruningSpec(_Strict):
    unstructured: UnstructuredPruning = UnstructuredPruning()
    structured: StructuredPruning = StructuredPruning()


class LatencySpec(_Strict):
    budget_ms: float = Field(gt=0, description="per-inference budget on the device, batch 1")
    host_scale: float = Field(default=1.0, gt=0, description="estimated device/host slowdown; host p95 x this is gated")
    threads: int = Field(default=1, ge=1, le=64, description="intra-op threads for the host measurement")
    min_speedup_vs_fp32: float | None = Field(
        default=None, gt=0, description="reject a non-fp32 recipe whose host p50 is not this much faster than fp32"
    )


class AccuracySpec(_Strict):
    metric: Literal["auto", "accuracy", "fidelity"] = Field(
        default="auto", description="auto: labelled accuracy when labels exist, else fidelity to fp32"
    )
    max_accuracy_drop: float = Field(default=0.01, ge=0, le=1, description="absolute drop, 0.01 = one point")
    min_top1_agreement: float = Field(default=0.98, ge=0, le=1)
    min_cosine: float = Field(default=0.99, ge=-1, le=1)
    min_sqnr_db: float = Field(default=20.0)
    # Task measures (packager.fidelity), used for outputs of those kinds only.
    score_threshold: float = Field(
        default=0.3, ge=0, le=1, description="score maps and detections: a pixel/box counts at or above this score"
    )
    min_mask_iou: float = Field(default=0.9, ge=0, le=1, description="score maps and masks: mean per-sample IoU")
    min_box_iou: float = Field(default=0.9, ge=0, le=1, description="detections: matched-box IoU")
    min_score_agreement: float = Field(default=0.95, ge=0, le=1, description="detections: 1 - |score diff|, matched")


class MixedPrecisionSpec(_Strict):
    """The adaptive mixed-precision search of recipes with ``quantization.mixed_precision`` (issue 19)."""

    budget_s: float = Field(default=180.0, gt=0, le=86400, description="wall-time budget of one search")
    max_float_nodes: int = Field(default=64, ge=1, le=4096, description="never keep more nodes than this in float")
    float_type: Literal["fp32", "fp16"] = Field(
        default="fp32", description="precision of the nodes kept in float (fp16 needs fp16 in allowed_precisions)"
    )


class HardwareProfile(_Strict):
    id: str = Field(pattern=PROFILE_ID_PATTERN)
    name: str = Field(min_length=1)
    description: str = ""
    architecture: Literal["aarch64", "armv7", "x86_64", "riscv64"]
    cpu: CpuSpec
    accelerator: AcceleratorSpec = AcceleratorSpec()
    execution_providers: list[ExecutionProviderSpec] = Field(min_length=1, description="in order of preference")
    recipes: list[str | RecipeSpec] = Field(min_length=1, description="the ladder, tried in order")
    selection: Literal["first", "best"] = Field(
        default="first",
        description="first: ship the first rung passing every gate; best: try every non-fp32 rung and ship the "
        "Pareto-best passing one (packager.selection.pick_best); fp32 rungs only when nothing else passed",
    )
    allowed_precisions: list[Precision] = Field(min_length=1)
    opset: OpsetRange
    shapes: ShapeConstraints = ShapeConstraints()
    ops: OpConstraints = OpConstraints()
    max_bundle_bytes: int = Field(gt=0)
    ram_budget_bytes: int = Field(gt=0, description="peak session memory allowed on the device")
    latency: LatencySpec
    accuracy: AccuracySpec = AccuracySpec()
    pruning: PruningSpec = PruningSpec()
    mixed_precision: MixedPrecisionSpec = MixedPrecisionSpec()

    @field_validator("allowed_precisions")
    @classmethod
    def _fp32_or_not(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError("allowed_precisions has duplicates")
        return value

    @model_validator(mode="after")
    def _recipes_resolve(self) -> HardwareProfile:
        names: set[str] = set()
        for entry in self.recipes:
            try:
                recipe = resolve_recipe(entry)
            except ProfileError as exc:
                raise ValueError(str(exc)) from None
            if recipe.name in names:
                raise ValueError(f"recipe {recipe.name!r} appears twice in the ladder")
            names.add(recipe.name)
            if recipe.precision not in self.allowed_precisions:
                raise ValueError(f"recipe {recipe.name!r} has precision {recipe.precision}, not in allowed_precisions")
        if self.mixed_precision.float_type == "fp16" and "fp16" not in self.allowed_precisions:
            raise ValueError("mixed_precision.float_type fp16 needs fp16 in allowed_precisions")
        return self

    @property
    def ladder(self) -> list[RecipeSpec]:
        return [resolve_recipe(entry) for entry in self.recipes]

    @property
    def primary_ep(self) -> ExecutionProviderSpec:
        return self.execution_providers[0]

    def summary(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "name": self.name,
            "architecture": self.architecture,
            "execution_provider": self.primary_ep.name,
            "ladder": [r.name for r in self.ladder],
            "max_bundle_bytes": self.max_bundle_bytes,
            "latency_budget_ms": self.latency.budget_ms,
        }


def with_gate_overrides(profile: HardwareProfile, overrides: GateOverrides | None) -> HardwareProfile:
    """``profile`` with the thresholds set in ``overrides`` in place of its own (a copy; ``None``: unchanged).

    ``latency_budget_ms`` replaces ``latency.budget_ms``; the others replace the fields of the same
    name in ``accuracy``. Everything downstream (gates, manifest metrics, model card) then sees
    the model's values.
    """
    given = overrides.given() if overrides is not None else {}
    if not given:
        return profile
    latency = profile.latency
    if "latency_budget_ms" in given:
        latency = latency.model_copy(update={"budget_ms": given.pop("latency_budget_ms")})
    accuracy = profile.accuracy.model_copy(update=given)
    return profile.model_copy(update={"latency": latency, "accuracy": accuracy})


def default_profiles_dir() -> Path:
    """``$EDGEOTA_PROFILES_DIR``, else ``hardware_profiles/`` beside the packager package."""
    env = os.environ.get(PROFILES_DIR_ENV)
    if env:
        return Path(env)
    return Path(__file__).resolve().parent.parent / "hardware_profiles"


def _first_error(exc: ValidationError) -> str:
    err = exc.errors()[0]
    loc = ".".join(str(p) for p in err.get("loc", ())) or "(top level)"
    msg = str(err.get("msg", "invalid")).removeprefix("Value error, ")
    more = f" (+{exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
    return f"{loc}: {msg}{more}"


def parse_profile(path: Path) -> HardwareProfile:
    """Load and validate one profile file; raises :class:`ProfileError` with a one-line reason."""
    import yaml

    profile_id = path.stem
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ProfileError(f"cannot read profile file {path}: {exc.strerror or exc}") from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise ProfileError(f"profile {profile_id} ({path}):{where} is not valid YAML") from exc
    if not isinstance(data, dict):
        raise ProfileError(f"profile {profile_id} ({path}): expected a mapping at the top level")
    declared = data.setdefault("id", profile_id)
    if declared != profile_id:
        raise ProfileError(f"profile {profile_id} ({path}): id {declared!r} differs from the file name")
    try:
        return HardwareProfile.model_validate(data)
    except ValidationError as exc:
        raise ProfileError(f"profile {profile_id} ({path}) breaks the schema: {_first_error(exc)}") from exc


def list_profile_ids(profiles_dir: Path | None = None) -> list[str]:
    folder = profiles_dir or default_profiles_dir()
    if not folder.is_dir():
        raise ProfileError(f"profiles folder {folder} does not exist")
    return sorted(p.stem for p in folder.glob("*.yaml"))


def load_profile(profile_id: str, profiles_dir: Path | None = None) -> HardwareProfile:
    """The profile ``profile_id`` from ``profiles_dir`` (default :func:`default_profiles_dir`)."""
    folder = profiles_dir or default_profiles_dir()
    import re

    if not re.match(PROFILE_ID_PATTERN, profile_id):
        raise ProfileError(f"invalid profile id {profile_id!r}")
    path = folder / f"{profile_id}.yaml"
    if not path.is_file():
        known = ", ".join(list_profile_ids(folder)) if folder.is_dir() else "none"
        raise ProfileError(f"unknown hardware profile {profile_id!r} (known: {known})")
    return parse_profile(path)


def load_profiles(profile_ids: list[str], profiles_dir: Path | None = None) -> list[HardwareProfile]:
    if not profile_ids:
        raise ProfileError("no hardware profile given")
    if len(set(profile_ids)) != len(profile_ids):
        raise ProfileError("a hardware profile is given twice")
    return [load_profile(pid, profiles_dir) for pid in profile_ids]
