"""Drift verdicts: one evaluation of many histograms against their references.

:func:`evaluate_drift` is the one entry point for rollout gates, fleet review and alerts. Per histogram
(an input feature, a model output's class distribution or confidence histogram) it runs a chi-square
test that accounts for how many values were seen, reports PSI and Jensen-Shannon distance beside the
p-value, corrects the p-values for testing many histograms at once (Benjamini-Hochberg), and grades
each as ``stable``, ``watch`` or ``drift`` only when both the evidence and the effect are there; with
too few values it says ``insufficient`` instead of guessing. ``docs/telemetry.md`` gives the reasoning
behind every default.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from edgeota_contract.errors import ContractError
from ota_server.drift.stats import (
    PSI_EPSILON,
    ChiSquareResult,
    benjamini_hochberg,
    chi_square_goodness_of_fit,
    chi_square_two_sample,
    js_distance,
    psi,
)

Level = Literal["stable", "watch", "drift", "insufficient"]
LEVEL_ORDER: dict[Level, int] = {"drift": 0, "watch": 1, "stable": 2, "insufficient": 3}
"""Worst first: how results are sorted and which level an evaluation takes overall."""


@dataclass(frozen=True)
class DriftConfig:
    """The decision rule's knobs. Defaults suit the contract's histograms (~10 bins per input feature, 12
    confidence bins, one histogram per class output) and a few dozen histograms per evaluation.

    Raises:
        ValueError: on construction, when a value is out of range (see each field).
    """

    min_values: int = 200
    """Values (not requests) a histogram needs before any verdict; below it the verdict is ``insufficient``.
    A ``stable`` on fewer values would mostly mean "too little data to tell"; at 200 values (~10 bins) a PSI
    ~0.3 shift on one of 64 features is named at once in the digits bench. False-alarm control does not
    rest on it (the test and the correction do that); its cost is the wait. Must be >= 1."""

    alpha_drift: float = 0.001
    """Benjamini-Hochberg adjusted p-value below which a material effect is ``drift``. With no drift anywhere,
    an evaluation names any ``drift`` with probability at most about this; gates evaluate after every window
    and fail on the first ``drift``, so the per-evaluation rate must sit far below a 1% goal. In (0, 1)."""

    alpha_watch: float = 0.01
    """Adjusted p-value below which an effect of at least ``watch_min_psi`` is ``watch``. In [alpha_drift, 1)."""

    drift_min_psi: float = 0.1
    """Smallest PSI that is ``drift``: with thousands of values every tiny shift is significant, so a verdict
    also needs a material effect. 0.1 is where the usual PSI reading starts "worth acting on". >= 0."""

    watch_min_psi: float = 0.05
    """Smallest PSI that is ``watch`` (half the drift floor: small but real shifts are worth a look). In
    [0, drift_min_psi]."""

    min_expected: float = 5.0
    """Adjacent bins are merged until every expected count is at least this (Cochran's rule), so the
    chi-square distribution approximates the statistic's. Must be > 0."""

    reference_is_sample: bool = True
    """Integer reference counts are a sample (a bundle's reference stats come from a few hundred to 10,000
    calibration rows), so they are compared by a two-sample test that allows for their own noise. False
    treats them as exact probabilities (goodness of fit), which at large n reads the reference's noise as
    drift. Float references are always read as probabilities."""

    def __post_init__(self) -> None:
        if self.min_values < 1:
            raise ValueError("min_values must be at least 1")
        if not 0 < self.alpha_drift < 1 or not self.alpha_drift <= self.alpha_watch < 1:
            raise ValueError("need 0 < alpha_drift <= alpha_watch < 1")
        if not 0 <= self.watch_min_psi <= self.drift_min_psi:
            raise ValueError("need 0 <= watch_min_psi <= drift_min_psi")
        if not self.min_expected > 0:
            raise ValueError("min_expected must be positive")


@dataclass(frozen=True)
class FeatureDrift:
    """The verdict on one histogram. For ``insufficient`` the test fields are None."""

    key: Hashable
    level: Level
    n: int
    """Values observed (the histogram's total)."""
    min_values: int
    n_reference: int | None
    """Values in the reference when it is a sample (two-sample test); None for probabilities."""
    p_value: float | None = None
    p_adjusted: float | None = None
    """Benjamini-Hochberg adjusted over the histograms evaluated together."""
    statistic: float | None = None
    df: int | None = None
    """Degrees of freedom (bins after merging, minus one); 0 when one bin was left (p = 1)."""
    psi: float | None = None
    """PSI on the original bins with the contract's epsilon smoothing (what the old rule read)."""
    js_distance: float | None = None
    """Jensen-Shannon distance, base 2, in [0, 1], on the original bins."""
    note: str = ""
    """Why ``insufficient`` (few values, or an empty reference)."""

    @property
    def label(self) -> str:
        return str(self.key)

    def describe(self) -> str:
        """``x[12] (p_adj 3e-09, PSI 0.41, n=1,840)`` or ``x[12] (120 of 200 values)``."""
        if self.level == "insufficient":
            return f"{self.label} ({self.note})"
        return f"{self.label} (p_adj {_p(self.p_adjusted)}, PSI {self.psi:.2f}, n={self.n:,})"

    def as_json(self) -> dict[str, Any]:
        """Plain JSON-ready fields (``key`` as its string form)."""
        return {
            "key": self.label,
            "level": self.level,
            "n": self.n,
            "min_values": self.min_values,
            "n_reference": self.n_reference,
            "p_value": self.p_value,
            "p_adjusted": self.p_adjusted,
            "statistic": self.statistic,
            "df": self.df,
            "psi": self.psi,
            "js_distance": self.js_distance,
            "note": self.note,
        }


@dataclass(frozen=True)
class DriftReport:
    """One evaluation: per-histogram verdicts worst first, and the overall level (the worst one; ``insufficient``
    only when nothing could be evaluated)."""

    level: Level
    features: tuple[FeatureDrift, ...]
    config: DriftConfig = field(default_factory=DriftConfig)
    unmatched: int = 0
    """Observed histograms with no reference (not evaluated, not counted elsewhere)."""

    @property
    def evaluated(self) -> int:
        """Histograms that got a verdict (stable, watch or drift)."""
        return sum(1 for f in self.features if f.level != "insufficient")

    @property
    def insufficient(self) -> int:
        return sum(1 for f in self.features if f.level == "insufficient")

    def count(self, level: Level) -> int:
        return sum(1 for f in self.features if f.level == level)

    def of_level(self, level: Level) -> tuple[FeatureDrift, ...]:
        return tuple(f for f in self.features if f.level == level)

    @property
    def fewest_values(self) -> int | None:
        """The smallest n among histograms without a verdict (for "not evaluated (n of m values)"); None if none."""
        ns = [f.n for f in self.features if f.level == "insufficient"]
        return min(ns) if ns else None

    def summary(self, listed: int = 3) -> str:
        """One line for humans, e.g. ``drift on x[12] (p_adj 3e-09, PSI 0.41, n=1,840); 63 stable``."""
        parts: list[str] = []
        for level in ("drift", "watch"):
            hits = self.of_level(level)
            if hits:
                named = ", ".join(f.describe() for f in hits[:listed])
                more = f" and {len(hits) - listed} more" if len(hits) > listed else ""
                parts.append(f"{level} on {named}{more}")
        stable = self.count("stable")
        if stable:
            parts.append(f"{stable} stable")
        if self.insufficient:
            fewest = self.fewest_values
            parts.append(
                f"{self.insufficient} insufficient (fewest {fewest:,} of {self.config.min_values:,} values)"
                if fewest is not None
                else f"{self.insufficient} insufficient"
            )
        return "; ".join(parts) if parts else "nothing to evaluate"

    def as_json(self) -> dict[str, Any]:
        """Plain JSON-ready form (for the API, the audit log and alert payloads)."""
        return {
            "level": self.level,
            "summary": self.summary(),
            "evaluated": self.evaluated,
            "insufficient": self.insufficient,
            "unmatched": self.unmatched,
            "min_values": self.config.min_values,
            "features": [f.as_json() for f in self.features],
        }


def evaluate_drift(
    reference: Mapping[Any, Sequence[float] | Sequence[int]],
    observed: Mapping[Any, Sequence[int]],
    config: DriftConfig | None = None,
) -> DriftReport:
    """Judge every histogram in ``reference`` against the ``observed`` one under the same key.

    ``reference`` values are integer counts (a sample: two-sample test, unless
    ``config.reference_is_sample`` is False) or floats (probabilities, normalised here: goodness of fit).
    ``observed`` values are counts on the same bins; a key missing from ``observed`` has n = 0. Keys only
    in ``observed`` are skipped and counted in ``unmatched``. Histograms with fewer than
    ``config.min_values`` values, or an empty reference, are ``insufficient`` and leave the correction's
    family. The rest are tested; their p-values are Benjamini-Hochberg adjusted together; then

    - ``drift``: adjusted p < ``alpha_drift`` and PSI >= ``drift_min_psi``;
    - ``watch``: otherwise adjusted p < ``alpha_watch`` and PSI >= ``watch_min_psi``;
    - ``stable``: otherwise.

    Pass input features and outputs in separate calls to judge them as separate families (recommended:
    they answer different questions), or together for one family.

    Raises:
        ContractError: a histogram pair differs in bucket count, or holds negative or non-finite counts.
    """
    cfg = config or DriftConfig()
    pending: list[tuple[Any, ChiSquareResult, int, int | None, float, float]] = []
    results: list[FeatureDrift] = []
    for key, ref_values in reference.items():
        obs_values = observed.get(key)
        ref = np.asarray(ref_values, dtype=np.float64)
        obs = np.zeros_like(ref) if obs_values is None else np.asarray(obs_values, dtype=np.float64)
        if ref.ndim != 1 or ref.shape != obs.shape:
            raise ContractError(f"{key}: reference has {ref.size} buckets, observed {obs.size}")
        if not (np.all(np.isfinite(ref)) and np.all(np.isfinite(obs))) or ref.min() < 0 or obs.min() < 0:
            raise ContractError(f"{key}: histogram counts must be finite and non-negative")
        n = round(float(obs.sum()))
        as_sample = cfg.reference_is_sample and _integral(ref_values)
        n_ref = round(float(ref.sum())) if as_sample else None
        if ref.sum() <= 0:
            results.append(FeatureDrift(key, "insufficient", n, cfg.min_values, n_ref, note="empty reference"))
            continue
        if n < cfg.min_values:
            note = f"{n:,} of {cfg.min_values:,} values"
            results.append(FeatureDrift(key, "insufficient", n, cfg.min_values, n_ref, note=note))
            continue
        test = (
            chi_square_two_sample(ref, obs, cfg.min_expected)
            if as_sample
            else chi_square_goodness_of_fit(ref, obs, cfg.min_expected)
        )
        pending.append((key, test, n, n_ref, psi(ref, obs), js_distance(ref, obs)))
    adjusted = benjamini_hochberg([t.p_value for _, t, *_ in pending])
    for (key, test, n, n_ref, psi_value, js), p_adj in zip(pending, adjusted, strict=True):
        level = _grade(p_adj, psi_value, cfg)
        results.append(
            FeatureDrift(
                key, level, n, cfg.min_values, n_ref, test.p_value, p_adj, test.statistic, test.df, psi_value, js
            )
        )
    results.sort(key=_severity)
    unmatched = sum(1 for key in observed if key not in reference)
    if results and results[0].level != "insufficient":
        overall: Level = results[0].level
    else:
        overall = "insufficient"
    return DriftReport(overall, tuple(results), cfg, unmatched)


def _grade(p_adjusted: float, psi_value: float, cfg: DriftConfig) -> Level:
    if p_adjusted < cfg.alpha_drift and psi_value >= cfg.drift_min_psi:
        return "drift"
    if p_adjusted < cfg.alpha_watch and psi_value >= cfg.watch_min_psi:
        return "watch"
    return "stable"


def _severity(f: FeatureDrift) -> tuple[int, float, float, str]:
    p = f.p_adjusted if f.p_adjusted is not None else 2.0
    return (LEVEL_ORDER[f.level], p, -(f.psi or 0.0), f.label)


def _integral(values: Sequence[float] | Sequence[int]) -> bool:
    """True when every value is an integer type (Python or numpy), i.e. the reference is counts."""
    return all(isinstance(v, int | np.integer) and not isinstance(v, bool) for v in values)


def _p(value: float | None) -> str:
    if value is None:
        return "-"
    if value == 0:
        return "<1e-300"
    return f"{value:.0e}" if value < 0.001 else f"{value:.3f}"


__all__ = ["PSI_EPSILON", "DriftConfig", "DriftReport", "FeatureDrift", "Level", "evaluate_drift"]
