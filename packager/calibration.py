"""``calibration.json``: the bundled model's accuracy per confidence bin on the labelled evaluation data.

Histogram binning on the contract's ``CONFIDENCE_EDGES`` (:mod:`edgeota_contract.calibration` states the
rules the server's label-free estimate uses): for the model's first class output (float ``[N, C]``,
``C >= 2``), each evaluation row's confidence (:func:`packager.stats.confidences`) falls in one bin, and the
bin counts the row and whether its argmax equals the row's label. Rows with non-finite outputs are left out.
No labels, or no class output: no calibration (the bundle ships without the file, and the server shows no
estimate for it).
"""

from __future__ import annotations

import numpy as np

from edgeota_contract.calibration import ConfidenceCalibration, OutputCalibration
from edgeota_contract.telemetry import CONFIDENCE_EDGES
from packager.data import Dataset
from packager.evaluate import make_session, run_dataset
from packager.stats import confidences

CALIBRATION_MAX_SAMPLES = 50_000


def calibration_counts(rows: np.ndarray, labels: np.ndarray) -> tuple[list[int], list[int]]:
    """(rows, correct top-1 answers) per confidence bin of a ``[N, C]`` output against integer ``labels`` (pure)."""
    finite = np.isfinite(rows).all(axis=1)
    rows, labels = rows[finite].astype(np.float64), labels[finite]
    bins = len(CONFIDENCE_EDGES) + 1
    if len(rows) == 0:
        return [0] * bins, [0] * bins
    idx = np.searchsorted(np.asarray(CONFIDENCE_EDGES), confidences(rows), side="right")
    right = rows.argmax(axis=1) == labels
    counts = np.bincount(idx, minlength=bins)
    correct = np.bincount(idx[right], minlength=bins)
    return [int(c) for c in counts], [int(c) for c in correct]


def confidence_calibration(model_bytes: bytes, data: Dataset) -> ConfidenceCalibration | None:
    """The calibration of ``model_bytes`` on ``data`` (its first ``CALIBRATION_MAX_SAMPLES`` rows), or None
    without labels or without a class output. Raises :class:`PackagerError` when the model fails on the data."""
    if data.labels is None:
        return None
    sample = data.head(CALIBRATION_MAX_SAMPLES)
    assert sample.labels is not None
    session = make_session(model_bytes, 1)
    for spec, values in zip(session.get_outputs(), run_dataset(session, sample), strict=True):
        if values.ndim == 2 and values.shape[1] >= 2 and values.dtype.kind == "f":
            counts, correct = calibration_counts(values, sample.labels)
            out = OutputCalibration(output=spec.name, edges=list(CONFIDENCE_EDGES), counts=counts, correct=correct)
            return ConfidenceCalibration(data_role=data.role, data_sha256=data.sha256 or None, outputs=[out])
    return None
