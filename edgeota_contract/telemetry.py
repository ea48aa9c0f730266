"""Reference statistics (shipped in bundles) and telemetry summaries (sent by devices).

Histograms everywhere use one convention: for ascending ``edges`` of length n, ``counts``
has n+1 entries; value x falls in bucket ``bisect_right(edges, x)``, so bucket 0 is below
``edges[0]`` and bucket n is at or above ``edges[-1]``. numpy's
``searchsorted(edges, x, side="right")`` gives the same index. All summaries are additive,
so the server merges windows by adding counts.

Feature indexing (reference stats and device telemetry must agree): an input batch ``x`` of
shape ``[N, ...]`` is viewed as ``x.reshape(N, -1)`` (row-major over all non-batch axes; a 1-D
input is ``[N, 1]``); feature ``j`` is column ``j`` of that view. When the view has at most
``MAX_FEATURES_PER_INPUT`` columns each gets its own histogram, otherwise one histogram
(``feature=None``) covers every element.

Confidence of an output row ``[C]`` (``C >= 2``, floating point): its maximum when the row is
already a probability vector (all values in [0, 1] and the sum within 1e-3 of 1), else the
maximum of its softmax. The class of a row is its argmax.
"""

from __future__ import annotations

import math
import operator
from bisect import bisect_right
from collections.abc import Sequence
from itertools import islice
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

REFERENCE_STATS_SCHEMA_VERSION = 1

LATENCY_EDGES_MS: tuple[float, ...] = (
    0.05,
    0.1,
    0.2,
    0.5,
    1.0,
    2.0,
    5.0,
    10.0,
    20.0,
    50.0,
    100.0,
    200.0,
    500.0,
    1000.0,
    2000.0,
    5000.0,
)
CONFIDENCE_EDGES: tuple[float, ...] = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99)
MAX_FEATURES_PER_INPUT = 256
"""Inputs with more features than this are summarised as one histogram over all elements."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class _Histogram(_Strict):
    edges: list[float] = Field(min_length=1, max_length=256)
    counts: list[int]

    @model_validator(mode="after")
    def _shape(self) -> _Histogram:
        # C-level checks (map over operator.lt, min): the server validates 64 of these per telemetry window, and
        # generator expressions here were a fifth of its ingest CPU at 5,000 devices (fleet bench, session 4).
        edges, counts = self.edges, self.counts
        if len(counts) != len(edges) + 1:
            raise ValueError("counts must have len(edges)+1 entries")
        if not all(map(operator.lt, edges, islice(edges, 1, None))):
            raise ValueError("edges must be strictly ascending")
        if min(counts) < 0:
            raise ValueError("counts must be non-negative")
        return self


class FeatureReference(_Histogram):
    """Distribution of one input feature (``feature`` index on the last axis) or of a whole input."""

    input: str
    feature: int | None = None


class OutputReference(_Strict):
    output: str
    kind: Literal["classes", "values"]
    class_counts: list[int] | None = None
    confidence_counts: list[int] | None = Field(default=None, description="on CONFIDENCE_EDGES")
    value_edges: list[float] | None = None
    value_counts: list[int] | None = None


class ReferenceStats(_Strict):
    """``reference_stats.json`` in a bundle: what the model saw at packaging time."""

    schema_version: Literal[1] = 1
    sample_count: int = Field(ge=0)
    features: list[FeatureReference]
    outputs: list[OutputReference] = Field(default_factory=list)


class FeatureSummary(_Histogram):
    """One window's counts for one feature on the bundle's reference edges, plus moments."""

    input: str = Field(max_length=256)
    feature: int | None = None
    nan_count: int = Field(default=0, ge=0)
    min: float | None = None
    max: float | None = None
    sum: float = 0.0
    sum_sq: float = 0.0


class OutputSummary(_Strict):
    output: str = Field(max_length=256)
    class_counts: list[int] | None = Field(default=None, max_length=100_000)
    confidence_counts: list[int] | None = None
    nan_count: int = Field(default=0, ge=0)


class ShadowSummary(_Strict):
    candidate_version: str
    candidate_bundle_sha256: str
    compared: int = Field(ge=0)
    top1_agree: int = Field(ge=0)
    cosine_sum: float = 0.0
    candidate_errors: int = Field(default=0, ge=0)
    candidate_latency_counts: list[int] = Field(default_factory=list)


def bucket_index(edges: Sequence[float], value: float) -> int:
    return bisect_right(edges, value)


def merge_counts(a: Sequence[int], b: Sequence[int]) -> list[int]:
    if len(a) != len(b):
        raise ValueError("cannot merge histograms with different bucket counts")
    return [x + y for x, y in zip(a, b, strict=True)]


def psi(expected: Sequence[int], actual: Sequence[int], epsilon: float = 1e-4) -> float:
    """Population stability index between two histograms on the same buckets.

    Below 0.1 is stable, 0.1-0.25 worth watching, above 0.25 a real shift. Empty buckets get
    ``epsilon`` mass so the logarithm stays finite. Returns 0.0 when either side is empty.
    """
    if len(expected) != len(actual):
        raise ValueError("histograms differ in bucket count")
    total_e, total_a = sum(expected), sum(actual)
    if total_e == 0 or total_a == 0:
        return 0.0
    value = 0.0
    for e, a in zip(expected, actual, strict=True):
        pe = max(e / total_e, epsilon)
        pa = max(a / total_a, epsilon)
        value += (pa - pe) * math.log(pa / pe)
    return value


def histogram_quantile(edges: Sequence[float], counts: Sequence[int], q: float) -> float | None:
    """Upper edge of the bucket holding quantile ``q`` (a conservative estimate); None if empty."""
    total = sum(counts)
    if total == 0:
        return None
    target = q * total
    running = 0
    for i, c in enumerate(counts):
        running += c
        if running >= target and c > 0:
            return edges[i] if i < len(edges) else math.inf
    return math.inf
