"""Response bodies of the sample, dataset-export and telemetry endpoints, as pydantic models.

Part of :mod:`ota_server.api.responses` (which re-exports every model listed in its ``__all__``), under the
same rules: pydantic and the contract only (no FastAPI, no SQLAlchemy), field names and shapes are part of
the API, times stay ISO 8601 strings as the server formats them, models ignore fields they do not declare
unless stated otherwise.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class SampleRecord(BaseModel):
    """One stored raw-input sample; ``download_url`` is relative to the server."""

    id: str
    model_name: str
    version: str
    hardware_profile: str
    device_id: str
    sha256: str
    size: int
    received_at: str
    download_url: str


class SampleList(BaseModel):
    """``GET /api/v1/samples``: ``count`` is the number matching before paging."""

    count: int
    samples: list[SampleRecord]


class DatasetFile(BaseModel):
    """One Parquet partition of a dataset export (``path`` relative to the export folder)."""

    path: str
    release_id: str
    cohort: str | None
    sha256: str
    size: int
    rows: int
    streams: dict[str, dict[str, int]]


class DatasetManifest(BaseModel):
    """``_manifest.json`` of ``POST /api/v1/datasets/export`` (format ``edgeota-dataset/1``): the files in digest
    order, ``digest.value`` = sha256 over their bytes concatenated in that order, the Parquet schema, the time
    window, trigger, parent release, the drift report passed in, and counts per stream."""

    model_config = ConfigDict(
        extra="allow", protected_namespaces=(), validate_by_name=True, validate_by_alias=True, serialize_by_alias=True
    )

    format: str
    created_at: str
    model_name: str
    filters: dict[str, Any]
    time_window: dict[str, str | None]
    trigger: str
    parent_release: dict[str, Any] | None
    drift_report: dict[str, Any] | None
    partitioning: dict[str, Any]
    files: list[DatasetFile]
    digest: dict[str, str]
    schema_: list[dict[str, Any]] = Field(alias="schema")
    inputs: dict[str, Any]
    counts: dict[str, Any]


class DriftFeature(BaseModel):
    """The drift verdict on one input feature (``feature`` null: the whole input) over ``n`` (= ``values``) values.

    ``level`` (= ``label``): stable, watch, drift, or insufficient below ``min_values``; ``psi`` is null only
    without any observed value.
    """

    input: str
    feature: int | None
    psi: float | None
    label: str
    level: str
    p_value: float | None = None
    p_adjusted: float | None = Field(default=None, description="Benjamini-Hochberg adjusted over the features")
    js_distance: float | None = None
    n: int
    values: int
    note: str = ""


class DriftSummary(BaseModel):
    reference: bool = Field(description="whether the bundle has reference statistics to compare with")
    max_psi: float | None
    label: str | None = Field(description="overall level: stable, watch, drift or insufficient (= level)")
    level: str | None = None
    summary: str = ""
    min_values: int | None = None
    features: list[DriftFeature]


class OutputDrift(BaseModel):
    """Prediction drift: each output's class and confidence histograms against the reference's."""

    reference: bool
    level: str | None
    summary: str
    outputs: list[dict[str, Any]]


class Attribution(BaseModel):
    """Version attribution: requests whose bundle sha names a stored bundle (``coverage`` goal: 1.0)."""

    requests: int
    attributed_requests: int
    coverage: float | None


class OutputClasses(BaseModel):
    class_counts: list[int]
    class_share: list[float]


class ShadowAgreement(BaseModel):
    candidate_version: str
    candidate_bundle_sha256: str
    compared: int
    top1_agree: int
    agreement: float | None


class TelemetryGroup(BaseModel):
    """Telemetry of one release on one hardware profile; quantiles past the last edge read ``">5000.0"``."""

    model_name: str
    version: str
    hardware_profile: str
    bundle_sha256: list[str]
    devices: int
    windows: int
    requests: int
    errors: int
    error_rate: float | None
    latency_ms: dict[str, float | str | None]
    latency_counts: list[int]
    drift: DriftSummary
    output_drift: OutputDrift | None = None
    outputs: dict[str, OutputClasses]
    shadow: list[ShadowAgreement]
    spool_dropped: int
    attribution: Attribution | None = None


class TelemetryFilters(BaseModel):
    model_name: str | None
    version: str | None
    profile: str | None
    since: str | None
    until: str | None
    cohort: dict[str, str] | None


class TelemetrySummary(BaseModel):
    """``GET /api/v1/telemetry/summary``: one group per (model, version, hardware profile)."""

    filters: TelemetryFilters
    source: str = Field(default="windows", description="aggregates or windows: what the summary read")
    attribution: Attribution | None = None
    groups: list[TelemetryGroup]
