"""The packager's one typed input: :class:`PackageRequest`.

The CLI builds one from its options, :func:`packager.api.package_model` takes it, and the bundle
writer reads the release fields from it. Checks that need only the request's own values (model
name, version, release counter, gate metric, recipe override, job count...) run when it is built:
a bad value raises :class:`RequestError`, an :class:`~edgeota_contract.errors.EdgeotaError` with a
one-line message, never a pydantic ``ValidationError``. Checks that read files (the model, the data,
the key, the profiles) run in :func:`~packager.api.package_model`, before any bundle is written.
"""

from __future__ import annotations

import os
import re
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ModelWrapValidatorHandler,
    ValidationError,
    field_validator,
    model_validator,
)

from edgeota_contract.manifest import NAME_PATTERN, SEMVER_PATTERN, GateOverrides, release_counter_from_version
from edgeota_contract.signing import SigningKey
from packager.errors import PackagerError
from packager.evaluate import LatencySettings

TORCHSCRIPT_SUFFIXES = (".pt", ".pth", ".ts", ".torchscript")
EXPORTED_PROGRAM_SUFFIXES = (".pt2",)
GATE_METRICS = ("accuracy", "fidelity")
MAX_RELEASE_COUNTER = 2**53


class RequestError(PackagerError):
    """A :class:`PackageRequest` value is missing or invalid.

    ``field`` names the request field at fault (``None`` when the fault is the combination of
    several); the CLI uses it to name its own option instead.
    """

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


def _is_torch_module(value: Any) -> bool:
    torch = sys.modules.get("torch")  # an nn.Module exists only if torch is imported already
    return torch is not None and isinstance(value, torch.nn.Module)


class PackageRequest(BaseModel):
    """One packaging run: what to package, the release it makes, and the overrides of the profiles' settings.

    Immutable once built. ``name`` and ``release_counter`` may be left out: :attr:`model_name` and
    :attr:`counter` give the values the run uses (the model file stem; major*1e6 + minor*1e3 + patch).

    Raises:
        RequestError: on construction, for any invalid value (see the module doc).
    """

    model_config = ConfigDict(frozen=True, extra="forbid", arbitrary_types_allowed=True)

    # -- what to package
    model: Any = Field(description="ONNX, TorchScript (.pt/.pth/.ts) or ExportedProgram (.pt2) file, or nn.Module")
    profiles: list[str] = Field(description="hardware profile ids, in the order results are reported")
    calibration: Path = Field(description=".npz keyed by model input name (+ 'labels')")
    eval_data: Path | None = Field(default=None, description=".npz for the gates (default: the calibration data)")
    profiles_dir: Path | None = Field(default=None, description="folder of profile YAML files")
    example_inputs: Any = Field(
        default=None, description="PyTorch input only: an example input shape (tuple of ints) or tensors"
    )
    structured_pruning: bool | None = Field(
        default=None, description="PyTorch input only: force channel pruning on or off (None: as each profile says)"
    )
    # -- the release
    name: str | None = Field(default=None, description="model name (default: the model file stem)")
    version: str = Field(default="0.1.0", description="semantic version of this release")
    release_counter: int | None = Field(default=None, description="default: major*1e6 + minor*1e3 + patch")
    key: Path | SigningKey = Field(description="Ed25519 release private key, or its PEM file")
    out_dir: Path = Field(description="output folder for the bundles and report.json")
    created_at: datetime | None = Field(default=None, description="pins lineage.created_at (naive: taken as UTC)")
    created_by: str | None = Field(default=None, description="pins lineage.created_by")
    # -- overrides of the profiles' settings
    recipes: list[str] | None = Field(
        default=None, description="replace every profile's ladder with these built-in recipes"
    )
    gate_metric: Literal["accuracy", "fidelity"] | None = Field(
        default=None, description="override every profile's quality gate"
    )
    enforce_gates: bool = Field(
        default=True, description="False (demos and tests only): ship the last attempt even if it failed its gates"
    )
    gate_overrides: GateOverrides | None = Field(
        default=None,
        description="this model's gate thresholds (latency budget, accuracy tolerance, fidelity) over every profile's",
    )
    profile_gate_overrides: dict[str, GateOverrides] = Field(
        default_factory=dict,
        description="per profile id: thresholds over gate_overrides for that profile (other ids are ignored)",
    )
    output_kinds: dict[str, str] = Field(
        default_factory=dict,
        description="fidelity kind per output name (packager.fidelity.OUTPUT_KINDS); others are inferred",
    )
    mixed_precision_budget_s: float | None = Field(
        default=None, description="time budget (s) of each mixed-precision search, over every profile's"
    )
    latency: LatencySettings = Field(default_factory=LatencySettings, description="host latency measurement")
    measure_memory: bool = Field(default=True, description="measure each attempt's peak session memory")
    # -- how to run
    jobs: int = Field(default=1, description="profiles packaged in parallel")
    progress: bool = Field(default=False, description="progress bars on stderr")

    @field_validator("model", mode="before")
    @classmethod
    def _model_kind(cls, value: Any) -> Any:
        if isinstance(value, (str, os.PathLike)):
            return Path(value)
        if _is_torch_module(value):
            return value
        raise ValueError(f"model must be a model file path or a torch.nn.Module, not {type(value).__name__}")

    @field_validator("key", mode="before")
    @classmethod
    def _key_kind(cls, value: Any) -> Any:
        if isinstance(value, (str, os.PathLike)):
            return Path(value)
        if isinstance(value, SigningKey):
            return value
        raise ValueError(f"key must be a SigningKey or the path of a PEM private key, not {type(value).__name__}")

    @field_validator("profiles")
    @classmethod
    def _profile_ids(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("no hardware profile given")
        if len(set(value)) != len(value):
            raise ValueError("a hardware profile is given twice")
        return value

    @field_validator("version")
    @classmethod
    def _semver(cls, value: str) -> str:
        if not re.fullmatch(SEMVER_PATTERN, value):
            raise ValueError(f"invalid version {value!r}: expected a semantic version such as 1.2.0")
        return value

    @field_validator("release_counter")
    @classmethod
    def _counter_range(cls, value: int | None) -> int | None:
        if value is not None and not 1 <= value <= MAX_RELEASE_COUNTER:
            raise ValueError(f"invalid release counter {value}: must be between 1 and 2**53")
        return value

    @field_validator("created_at")
    @classmethod
    def _aware(cls, value: datetime | None) -> datetime | None:
        return value.replace(tzinfo=UTC) if value is not None and value.tzinfo is None else value

    @field_validator("recipes")
    @classmethod
    def _recipes_given(cls, value: list[str] | None) -> list[str] | None:
        if value is not None and not value:
            raise ValueError("the recipe override is empty")
        return value

    @field_validator("gate_metric", mode="before")
    @classmethod
    def _gate_metric(cls, value: Any) -> Any:
        if value is not None and value not in GATE_METRICS:
            raise ValueError(f"gate_metric must be accuracy or fidelity, not {value!r}")
        return value

    @field_validator("gate_overrides", mode="before")
    @classmethod
    def _gate_overrides(cls, value: Any) -> Any:
        return _as_overrides(value, "gate_overrides")

    @field_validator("profile_gate_overrides", mode="before")
    @classmethod
    def _profile_gate_overrides(cls, value: Any) -> Any:
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise ValueError(f"profile_gate_overrides must map profile ids to thresholds, not {type(value).__name__}")
        checked = {str(pid): _as_overrides(v, f"gate_overrides of profile {pid}") for pid, v in value.items()}
        return {pid: v for pid, v in checked.items() if v is not None}

    @field_validator("output_kinds")
    @classmethod
    def _output_kinds(cls, value: dict[str, str]) -> dict[str, str]:
        from packager.fidelity import OUTPUT_KINDS

        for name, kind in value.items():
            if kind not in OUTPUT_KINDS:
                raise ValueError(f"output {name}: unknown output kind {kind!r} (known: {', '.join(OUTPUT_KINDS)})")
        return value

    @field_validator("mixed_precision_budget_s")
    @classmethod
    def _budget(cls, value: float | None) -> float | None:
        if value is not None and not 0 < value <= 86400:
            raise ValueError(f"mixed_precision_budget_s must be above 0 and at most 86400 seconds, not {value}")
        return value

    @field_validator("jobs")
    @classmethod
    def _jobs(cls, value: int) -> int:
        if value < 1:
            raise ValueError("jobs must be at least 1")
        return value

    @model_validator(mode="after")
    def _name(self) -> PackageRequest:
        if self.name is None and self.model_path is None:
            raise ValueError("a name is required when packaging an nn.Module")
        name = self.model_name
        if not re.fullmatch(NAME_PATTERN, name):
            raise ValueError(f"invalid model name {name!r}: use letters, digits, '.', '_' or '-' (at most 64)")
        return self

    # Defined after every other validator: pydantic runs it outermost, so it sees all their errors.
    @model_validator(mode="wrap")
    @classmethod
    def _one_line_error(cls, data: Any, handler: ModelWrapValidatorHandler[PackageRequest]) -> PackageRequest:
        try:
            return handler(data)
        except ValidationError as exc:
            raise _request_error(exc) from None

    @property
    def model_path(self) -> Path | None:
        """The model file, or ``None`` for an in-memory ``nn.Module``."""
        return self.model if isinstance(self.model, Path) else None

    @property
    def is_torch_input(self) -> bool:
        """PyTorch input (a TorchScript or ExportedProgram file, or an ``nn.Module``): exported to ONNX first."""
        path = self.model_path
        return path is None or path.suffix.lower() in TORCHSCRIPT_SUFFIXES + EXPORTED_PROGRAM_SUFFIXES

    @property
    def model_name(self) -> str:
        """``name``, else the model file stem with anything but letters, digits, ``_.-`` made ``-``."""
        if self.name is not None:
            return self.name
        assert self.model_path is not None  # checked on construction
        return re.sub(r"[^A-Za-z0-9_.-]", "-", self.model_path.stem).strip("-.") or "model"

    def gates_for(self, profile_id: str) -> GateOverrides | None:
        """This model's thresholds for ``profile_id``: ``gate_overrides`` with the profile's own entry over it."""
        values = self.gate_overrides.given() if self.gate_overrides is not None else {}
        own = self.profile_gate_overrides.get(profile_id)
        values.update(own.given() if own is not None else {})
        return GateOverrides(**values) if values else None

    @property
    def counter(self) -> int:
        """``release_counter``, else the default derived from ``version``."""
        return self.release_counter if self.release_counter is not None else release_counter_from_version(self.version)


def _request_error(exc: ValidationError) -> RequestError:
    """The first error of ``exc`` as one line; our own checks' messages are kept as they are written.

    A location is the field name plus any list index (pydantic's union branch tags are left out);
    ``(+N more)`` counts the other fields at fault.
    """
    errors = exc.errors()
    err = errors[0]
    loc = err.get("loc", ())
    field = str(loc[0]) if loc else None
    where = ".".join([str(loc[0]), *(str(p) for p in loc[1:] if isinstance(p, int))]) if loc else "package request"
    others = len({e.get("loc", ())[:1] for e in errors} - {loc[:1]})
    more = f" (+{others} more)" if others else ""
    if err.get("type") == "value_error":
        message = str(err.get("msg", "invalid")).removeprefix("Value error, ")
    else:
        message = f"{where}: {err.get('msg', 'invalid')}"
    return RequestError(message + more, field)


def _as_overrides(value: Any, label: str) -> GateOverrides | None:
    """``value`` (a mapping or a :class:`GateOverrides`) checked; ``None`` when it sets nothing.

    Raises ``ValueError`` naming the threshold (pydantic's own message would name only the field).
    """
    if value is None or isinstance(value, GateOverrides):
        overrides = value
    elif isinstance(value, dict):
        try:
            overrides = GateOverrides.model_validate(value)
        except ValidationError as exc:
            raise ValueError(f"{label}: {gate_override_error(exc)}") from None
    else:
        raise ValueError(f"{label} must be a mapping of thresholds, not {type(value).__name__}")
    return overrides if overrides is not None and overrides.given() else None


def gate_override_error(exc: ValidationError) -> str:
    """``<threshold>: <what is wrong>`` for the first error of validating a :class:`GateOverrides`."""
    err = exc.errors()[0]
    loc = ".".join(str(p) for p in err.get("loc", ())) or "gate overrides"
    if err.get("type") == "extra_forbidden":
        known = ", ".join(GateOverrides.model_fields)
        return f"{loc}: unknown threshold (known: {known})"
    return f"{loc}: {str(err.get('msg', 'invalid')).lower()}"
