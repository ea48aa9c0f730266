"""Names for the histograms drift is judged on, and the reference side read from a bundle's stats.

Input features and outputs share one key type so one report (and one summary line) can name either:
``x[12]`` is feature 12 of input ``x``, ``x`` a whole-input histogram, ``y:class`` the class
distribution of output ``y`` (argmax counts) and ``y:confidence`` its confidence histogram.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from edgeota_contract.telemetry import ReferenceStats

KeyKind = Literal["feature", "class", "confidence"]


@dataclass(frozen=True, order=True)
class DriftKey:
    """One histogram: an input feature (``index`` = feature, None for a whole input) or an output's classes or
    confidence (``index`` None)."""

    kind: KeyKind
    name: str
    index: int | None = None

    def __str__(self) -> str:
        if self.kind == "feature":
            return self.name if self.index is None else f"{self.name}[{self.index}]"
        return f"{self.name}:{self.kind}"


def feature_key(input_name: str, feature: int | None) -> DriftKey:
    """The key of feature ``feature`` of input ``input_name`` (None: the whole-input histogram)."""
    return DriftKey("feature", input_name, feature)


def class_key(output: str) -> DriftKey:
    return DriftKey("class", output)


def confidence_key(output: str) -> DriftKey:
    return DriftKey("confidence", output)


def reference_inputs(stats: ReferenceStats) -> dict[DriftKey, list[int]]:
    """Every input feature histogram of a bundle's reference stats, by key (counts: a sample)."""
    return {feature_key(f.input, f.feature): list(f.counts) for f in stats.features}


def reference_outputs(stats: ReferenceStats) -> dict[DriftKey, list[int]]:
    """The class and confidence histograms of every ``kind="classes"`` output (counts: a sample).

    Outputs of ``kind="values"`` are left out: devices do not summarise them on the reference edges.
    """
    out: dict[DriftKey, list[int]] = {}
    for o in stats.outputs:
        if o.kind != "classes":
            continue
        if o.class_counts is not None:
            out[class_key(o.output)] = list(o.class_counts)
        if o.confidence_counts is not None:
            out[confidence_key(o.output)] = list(o.confidence_counts)
    return out
