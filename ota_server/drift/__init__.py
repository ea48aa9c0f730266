"""Drift verdicts on telemetry histograms: sample-size aware, corrected for many features, graded by effect.

Pure functions and frozen dataclasses over plain data (numpy and the contract only). Start with
:func:`evaluate_drift`; keys for a bundle's histograms come from :mod:`ota_server.drift.keys`.
"""

from __future__ import annotations

from ota_server.drift.evaluate import DriftConfig, DriftReport, FeatureDrift, Level, evaluate_drift
from ota_server.drift.keys import (
    DriftKey,
    class_key,
    confidence_key,
    feature_key,
    reference_inputs,
    reference_outputs,
)
from ota_server.drift.stats import benjamini_hochberg, chi2_sf, js_distance, psi

__all__ = [
    "DriftConfig",
    "DriftKey",
    "DriftReport",
    "FeatureDrift",
    "Level",
    "benjamini_hochberg",
    "chi2_sf",
    "class_key",
    "confidence_key",
    "evaluate_drift",
    "feature_key",
    "js_distance",
    "psi",
    "reference_inputs",
    "reference_outputs",
]
