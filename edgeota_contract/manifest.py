"""The bundle manifest: what a bundle holds, where it came from, and what it is for.

The manifest is signed (as canonical JSON) by a release key. Every other file in the bundle
is named in it with its size and sha256, so verifying the manifest signature and then each
file's digest proves the whole bundle.
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from edgeota_contract.errors import ContractError
from edgeota_contract.signing import canonical_json
from edgeota_contract.states import ReasonCode

MANIFEST_SCHEMA_VERSION = 1

# Fixed names of the files inside a bundle archive.
MANIFEST_FILE = "manifest.json"
SIGNATURE_FILE = "manifest.sig"
MODEL_FILE = "model.onnx"
REFERENCE_STATS_FILE = "reference_stats.json"
TEST_VECTORS_FILE = "test_vectors.npz"
MODEL_CARD_FILE = "model_card.md"
REQUIRED_FILES = (MODEL_FILE, REFERENCE_STATS_FILE, TEST_VECTORS_FILE, MODEL_CARD_FILE)

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
SEMVER_PATTERN = r"^(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)(?:-[0-9A-Za-z.-]+)?(?:\+[0-9A-Za-z.-]+)?$"
SHA256_PATTERN = r"^[0-9a-f]{64}$"
_FILE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


def release_counter_from_version(version: str) -> int:
    """Default release counter for a semantic version: major*1e6 + minor*1e3 + patch.

    Monotone in the version as long as minor and patch stay below 1000; pass an explicit
    counter otherwise.
    """
    match = re.match(SEMVER_PATTERN, version)
    if not match:
        raise ContractError(f"not a semantic version: {version!r}", ReasonCode.MANIFEST_INVALID)
    major, minor, patch = (int(g) for g in match.groups()[:3])
    if minor >= 1000 or patch >= 1000:
        raise ContractError("minor/patch >= 1000: give the release counter explicitly", ReasonCode.MANIFEST_INVALID)
    return major * 1_000_000 + minor * 1_000 + patch


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class FileEntry(_Strict):
    """One file in the bundle, besides the manifest and its signature."""

    name: str
    size: int = Field(ge=0)
    sha256: str = Field(pattern=SHA256_PATTERN)

    @field_validator("name")
    @classmethod
    def _safe_name(cls, value: str) -> str:
        # Flat names only: no folders, no '..', nothing absolute.
        if not _FILE_NAME.match(value) or value in (MANIFEST_FILE, SIGNATURE_FILE):
            raise ValueError(f"unsafe or reserved file name {value!r}")
        return value


class TensorSpec(_Strict):
    """An input or output of the model. ``None`` or a string in ``shape`` is a dynamic dimension."""

    name: str = Field(min_length=1, max_length=256)
    dtype: str = Field(min_length=1, max_length=32, description="ONNX element type name, e.g. float32")
    shape: list[int | str | None]


class PassRecord(_Strict):
    """One optimisation pass that produced the model, with its configuration (Olive style)."""

    name: str
    config: dict[str, Any] = Field(default_factory=dict)


class Lineage(_Strict):
    source_model_sha256: str = Field(pattern=SHA256_PATTERN)
    calibration_data_sha256: str | None = Field(default=None, pattern=SHA256_PATTERN)
    eval_data_sha256: str | None = Field(default=None, pattern=SHA256_PATTERN)
    packager_version: str
    code_commit: str | None = None
    created_at: datetime
    created_by: str


class GateOverrides(_Strict):
    """Per-model gate thresholds that replaced the hardware profile's for this bundle (all optional).

    ``latency_budget_ms`` is the device budget (it also becomes the ``latency_budget_ms`` metric the
    agent checks on the device); the others are the quality thresholds of the profile's
    ``accuracy`` section. A field left ``None`` kept the profile's value.
    """

    latency_budget_ms: float | None = Field(default=None, gt=0, allow_inf_nan=False)
    max_accuracy_drop: float | None = Field(default=None, ge=0, le=1, allow_inf_nan=False)
    min_top1_agreement: float | None = Field(default=None, ge=0, le=1, allow_inf_nan=False)
    min_cosine: float | None = Field(default=None, ge=-1, le=1, allow_inf_nan=False)
    min_sqnr_db: float | None = Field(default=None, allow_inf_nan=False)
    # Task-aware fidelity (added for issue 19): score maps/masks, detections, their score threshold.
    min_mask_iou: float | None = Field(default=None, ge=0, le=1, allow_inf_nan=False)
    min_box_iou: float | None = Field(default=None, ge=0, le=1, allow_inf_nan=False)
    min_score_agreement: float | None = Field(default=None, ge=0, le=1, allow_inf_nan=False)
    score_threshold: float | None = Field(default=None, ge=0, le=1, allow_inf_nan=False)

    def given(self) -> dict[str, float]:
        """The thresholds that were set, by field name (empty: nothing overridden)."""
        return {k: v for k, v in self.model_dump().items() if v is not None}


TASK_GATE_FIELDS = ("min_mask_iou", "min_box_iou", "min_score_agreement", "score_threshold")


class BundleManifest(_Strict):
    """The signed description of one bundle: one model, one version, one hardware profile."""

    schema_version: Literal[1] = 1
    model_name: str = Field(pattern=NAME_PATTERN)
    version: str = Field(pattern=SEMVER_PATTERN)
    release_counter: int = Field(ge=1, le=2**53)
    hardware_profile: str = Field(pattern=NAME_PATTERN)
    files: list[FileEntry]
    inputs: list[TensorSpec] = Field(min_length=1)
    outputs: list[TensorSpec] = Field(min_length=1)
    opset: int = Field(ge=1, le=100)
    execution_provider: str = Field(min_length=1, max_length=64)
    recipe: str = Field(min_length=1, max_length=128, description="name of the recipe that was chosen")
    passes: list[PassRecord] = Field(default_factory=list)
    metrics: dict[str, float] = Field(default_factory=dict)
    lineage: Lineage
    signing_key_id: str = Field(pattern=r"^[0-9a-f]{16}$")
    gate_overrides: GateOverrides | None = Field(
        default=None, description="per-model gate thresholds used instead of the profile's (absent: none)"
    )

    @model_validator(mode="after")
    def _files_complete(self) -> BundleManifest:
        names = [f.name for f in self.files]
        if len(names) != len(set(names)):
            raise ValueError("duplicate file names in manifest")
        missing = [n for n in REQUIRED_FILES if n not in names]
        if missing:
            raise ValueError(f"manifest lacks required files: {', '.join(missing)}")
        return self

    def file(self, name: str) -> FileEntry:
        for entry in self.files:
            if entry.name == name:
                return entry
        raise KeyError(name)

    def canonical_bytes(self) -> bytes:
        """The exact bytes a release key signs.

        ``gate_overrides`` is left out when it is ``None``, so a manifest without overrides is
        byte for byte what it was before the field existed (and older readers accept it).
        """
        data = self.model_dump(mode="json")
        if self.gate_overrides is None:
            del data["gate_overrides"]
        else:  # thresholds added later are left out when unset: older readers refuse unknown keys
            for key in TASK_GATE_FIELDS:
                if data["gate_overrides"].get(key) is None:
                    data["gate_overrides"].pop(key, None)
        return canonical_json(data)

    @classmethod
    def parse(cls, data: bytes | str) -> BundleManifest:
        """Parse manifest JSON; raises :class:`ContractError` (``manifest_invalid``) on any defect."""
        try:
            return cls.model_validate_json(data)
        except ValidationError as exc:
            raise ContractError(f"invalid manifest: {_first_error(exc)}", ReasonCode.MANIFEST_INVALID) from exc


def _first_error(exc: ValidationError) -> str:
    err = exc.errors()[0]
    loc = ".".join(str(p) for p in err.get("loc", ())) or "(root)"
    more = f" (+{exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
    return f"{loc}: {err.get('msg', 'invalid')}{more}"


# test_vectors.npz keys: "in.<input name>" holds an input batch, "out.<output name>" what the
# bundled model returned for it on the packaging host.
TEST_VECTOR_INPUT_PREFIX = "in."
TEST_VECTOR_OUTPUT_PREFIX = "out."
# Well-known metric keys the agent reads from the manifest.
METRIC_SMOKE_ATOL = "smoke_atol"
"""Absolute tolerance for the on-device smoke test (outputs vs test vectors)."""
METRIC_SMOKE_RTOL = "smoke_rtol"
METRIC_LATENCY_BUDGET_MS = "latency_budget_ms"
"""The hardware profile's per-inference latency budget, copied in by the packager."""
