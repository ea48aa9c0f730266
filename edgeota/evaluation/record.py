"""The evaluation record: what was compared, on which data, under which thresholds, and the verdict.

The CLI builds it (:func:`edgeota.evaluation.runner.evaluate`), prints it and uploads it
(``POST /api/v1/evaluations``); the server checks it and recomputes ``verdict`` from ``metrics`` and
``thresholds`` with :func:`edgeota.evaluation.blessing.decide`. Pure data (pydantic, strict).
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, field_validator

from edgeota.evaluation.blessing import SliceMetrics, Thresholds, Verdict, _Strict
from edgeota_contract.manifest import NAME_PATTERN, SEMVER_PATTERN, SHA256_PATTERN

RELEASE_ID_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"


class ReleaseRef(_Strict):
    """A release as evaluated: its id, version, and the sha256 of each profile's bundle that ran."""

    release_id: str = Field(pattern=RELEASE_ID_PATTERN)
    version: str = Field(pattern=SEMVER_PATTERN)
    bundles: dict[str, str] = Field(
        min_length=1, max_length=256, description="hardware profile -> bundle sha256 (the bundles that ran)"
    )

    @field_validator("bundles")
    @classmethod
    def _bundles(cls, value: dict[str, str]) -> dict[str, str]:
        for profile, sha in value.items():
            if not re.match(NAME_PATTERN, profile) or not re.match(SHA256_PATTERN, sha):
                raise ValueError(f"bad bundle entry {profile!r}: {sha!r}")
        return value


class DatasetRef(_Strict):
    """The exported dataset the models ran on, by its manifest's content digest, and what was skipped.

    ``rows``: every row of the selected profiles; ``labelled_rows`` were evaluated; ``unlabelled_rows`` had no
    label (skipped); ``unusable_rows`` had a label but lacked an input (skipped); ``label_sources``: labelled rows per ``label_source``.
    """

    digest: str = Field(pattern=SHA256_PATTERN)
    model_name: str = Field(pattern=NAME_PATTERN)
    created_at: str | None = Field(default=None, max_length=64)
    trigger: str | None = Field(default=None, max_length=128)
    rows: int = Field(ge=0, le=10**12)
    labelled_rows: int = Field(ge=0, le=10**12)
    unlabelled_rows: int = Field(ge=0, le=10**12)
    unusable_rows: int = Field(default=0, ge=0, le=10**12, description="labelled rows missing an input (skipped)")
    label_sources: dict[str, int] = Field(default_factory=dict, max_length=64)


class EvaluationRecord(_Strict):
    """One evaluation of ``candidate`` against ``baseline`` on ``dataset`` (upload body and CLI output).

    ``verdict`` is what the evaluator computed; the server recomputes it and refuses a record whose verdict
    does not follow from its ``metrics`` and ``thresholds``.
    """

    format: Literal["edgeota-evaluation/1"] = "edgeota-evaluation/1"  # RECORD_FORMAT
    model_name: str = Field(pattern=NAME_PATTERN)
    candidate: ReleaseRef
    baseline: ReleaseRef
    dataset: DatasetRef
    thresholds: Thresholds
    metrics: list[SliceMetrics] = Field(min_length=1, max_length=10_000)
    verdict: Verdict | None = None
    evaluated_at: str = Field(max_length=64, description="ISO 8601, when the models ran")
