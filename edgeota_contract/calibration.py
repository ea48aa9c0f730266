"""``calibration.json`` in a bundle: how often the model was right at each confidence, on labelled evaluation data.

The packager writes it when its evaluation data has labels (histogram binning: per confidence bin, the
evaluation rows and how many of them the model's top-1 class got right). The server maps the confidence
histograms devices send (on :data:`~edgeota_contract.telemetry.CONFIDENCE_EDGES`, the same bins) through it
to estimate accuracy where no labels come back, in the spirit of NannyML's confidence-based performance
estimation (CBPE). A separate, optional file rather than a field of ``reference_stats.json``: agents parse
that file strictly (``extra="forbid"``), so a new field there would cost older agents their drift
telemetry, while a file they do not know is verified by its digest and otherwise ignored.

Rules shared by the packager and the server (pure functions here):

- The calibrated output is the model's first class output (manifest order: float, ``[N, C]``, ``C >= 2``);
  a row's class is its argmax and its confidence follows the contract's rule
  (:mod:`edgeota_contract.telemetry`).
- :func:`bin_accuracy` of bin ``b`` is ``(correct[b] + PRIOR_WEIGHT * m_b) / (counts[b] + PRIOR_WEIGHT)``,
  where ``m_b`` is the bin's mid confidence: a bin with few evaluation rows leans on the confidence itself
  (a calibrated model's accuracy), a bin with many on what was measured.
- :func:`expected_accuracy` is the mean of :func:`bin_accuracy` weighted by the observed counts per bin.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import pairwise
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from edgeota_contract.telemetry import CONFIDENCE_EDGES

CALIBRATION_FILE = "calibration.json"
CALIBRATION_SCHEMA_VERSION = 1
PRIOR_WEIGHT = 1.0
"""Pseudo-rows at the bin's mid confidence added to each bin (see the module docstring)."""


class OutputCalibration(BaseModel):
    """Per confidence bin (``edges`` as in the contract's histograms): evaluation rows and correct top-1 answers."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    output: str = Field(max_length=256)
    edges: list[float] = Field(min_length=1, max_length=256)
    counts: list[int]
    correct: list[int]

    @model_validator(mode="after")
    def _shape(self) -> OutputCalibration:
        n = len(self.edges) + 1
        if len(self.counts) != n or len(self.correct) != n:
            raise ValueError("counts and correct must have len(edges)+1 entries")
        if any(b <= a for a, b in pairwise(self.edges)):
            raise ValueError("edges must be strictly ascending")
        if any(c < 0 for c in self.counts) or any(
            not 0 <= k <= c for k, c in zip(self.correct, self.counts, strict=True)
        ):
            raise ValueError("need 0 <= correct <= counts in every bin")
        return self

    @property
    def sample_count(self) -> int:
        return sum(self.counts)

    @property
    def accuracy(self) -> float | None:
        """The measured top-1 accuracy on the evaluation rows (None without rows)."""
        total = self.sample_count
        return sum(self.correct) / total if total else None


class ConfidenceCalibration(BaseModel):
    """``calibration.json``: ``method`` is histogram binning on the evaluation data (``data_sha256`` its digest)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    schema_version: Literal[1] = 1
    method: Literal["histogram_binning"] = "histogram_binning"
    data_role: str = Field(default="evaluation", max_length=32, description="evaluation, or calibration when none")
    data_sha256: str | None = Field(default=None, max_length=64)
    outputs: list[OutputCalibration] = Field(default_factory=list, max_length=64)

    def for_output(self, name: str | None = None) -> OutputCalibration | None:
        """The calibration of output ``name`` (default: the first one, the model's first class output)."""
        if name is None:
            return self.outputs[0] if self.outputs else None
        return next((o for o in self.outputs if o.output == name), None)


def bin_midpoints(edges: Sequence[float]) -> list[float]:
    """The mid confidence of each bin: bin 0 is ``[0, edges[0])``, the last ``[edges[-1], 1]``."""
    bounds = [0.0, *edges, 1.0]
    return [(lo + hi) / 2 for lo, hi in pairwise(bounds)]


def bin_accuracy(cal: OutputCalibration, prior_weight: float = PRIOR_WEIGHT) -> list[float]:
    """The calibrated probability of a correct answer per confidence bin (see the module docstring)."""
    mids = bin_midpoints(cal.edges)
    return [
        (k + prior_weight * m) / (c + prior_weight) if c + prior_weight > 0 else m
        for k, c, m in zip(cal.correct, cal.counts, mids, strict=True)
    ]


def aligned(cal: OutputCalibration, observed_edges: Sequence[float] = CONFIDENCE_EDGES) -> bool:
    """Whether ``cal`` uses the bins the devices' confidence histograms use (else no estimate is made)."""
    return len(cal.edges) == len(observed_edges) and all(
        abs(a - b) <= 1e-12 for a, b in zip(cal.edges, observed_edges, strict=True)
    )


def expected_accuracy(cal: OutputCalibration, observed: Sequence[int]) -> tuple[float | None, int]:
    """(estimated accuracy, predictions it covers) for observed confidence counts on ``cal``'s bins.

    Returns (None, 0) when nothing was observed or the bin counts differ from the calibration's.
    """
    if len(observed) != len(cal.counts):
        return None, 0
    total = sum(observed)
    if total <= 0:
        return None, 0
    probs = bin_accuracy(cal)
    return sum(n * p for n, p in zip(observed, probs, strict=True)) / total, total
