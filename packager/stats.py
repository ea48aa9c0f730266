"""What a bundle ships about its data: ``reference_stats.json`` and ``test_vectors.npz``.

Reference statistics (``reference_stats.json``), computed from the calibration data:

- **Input features.** Each input array ``x`` of shape ``[N, d1, ..., dk]`` is viewed as
  ``x.reshape(N, F)`` with ``F = d1 * ... * dk`` (C / row-major order; an input with no
  non-batch dimension has ``F = 1``). If ``F <= 256`` there is one histogram per feature:
  ``feature = j`` is column ``j`` of that view, i.e. the flat row-major index into the non-batch
  dimensions (for a ``[N, 1, 8, 8]`` image, pixel (r, c) is feature ``8*r + c``). Otherwise one
  histogram over every element of the input has ``feature = null``. Inputs whose samples are
  not on axis 0 in the model (e.g. a recurrent state ``[2, N, 128]``) and shared scalar inputs
  always get one whole-input histogram, which does not depend on the layout.
- **Edges** are the distinct 10th..90th percentiles (step 10) of the calibration values of that
  feature (whole input: 5th..95th, step 5), rounded to 6 significant digits and de-duplicated;
  a constant feature gets the single edge at its value. Counts follow the contract convention
  (``numpy.searchsorted(edges, x, side="right")``, len(edges)+1 buckets); non-finite values are
  not counted.
- **Outputs**, computed with the bundled model on the calibration data: a float output of shape
  ``[N, C]`` with ``C >= 2`` is ``kind="classes"``: ``class_counts[c]`` counts rows whose argmax is
  ``c``; ``confidence_counts`` bins, on ``CONFIDENCE_EDGES``, each row's confidence, which is the
  row's max when the row already is a probability vector (all values in [0, 1] and summing to
  1 within 1e-3) and otherwise the max of ``softmax(row)``. Any other output is ``kind="values"``
  with a whole-output histogram like a large input.

Test vectors (``test_vectors.npz``): the first rows of the evaluation data (4 rows, or the
model's fixed batch), ``in.<input>``, and the bundled model's outputs for them on this host,
``out.<output>``. The ``.npz`` is deflate-compressed, with fixed zip timestamps so bundles are
reproducible, and bounded: a dynamic-batch model gets fewer rows (at least one) when the file
would exceed the larger of 1 MiB and a quarter of the model's bytes (:func:`max_test_vector_bytes`).
"""

from __future__ import annotations

import io
import zipfile
from typing import Any

import numpy as np

from edgeota_contract.manifest import TEST_VECTOR_INPUT_PREFIX, TEST_VECTOR_OUTPUT_PREFIX
from edgeota_contract.telemetry import (
    CONFIDENCE_EDGES,
    MAX_FEATURES_PER_INPUT,
    FeatureReference,
    OutputReference,
    ReferenceStats,
)
from packager.data import Dataset
from packager.evaluate import make_session, run_dataset, session_batch

TEST_VECTOR_ROWS = 4
# test_vectors.npz takes at most the larger of these beside the model (but always one row):
# a bundle of a model with large inputs must not be mostly test data.
TEST_VECTOR_MIN_CAP_BYTES = 1 << 20
TEST_VECTOR_MODEL_SHARE = 0.25
REFERENCE_MAX_SAMPLES = 10_000


# ---- reference statistics ----------------------------------------------------------------


def _edges(values: np.ndarray, percentiles: np.ndarray) -> list[float]:
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return [0.0]
    qs = np.percentile(finite, percentiles)
    edges = sorted({float(f"{q:.6g}") for q in qs})
    return edges


def _counts(values: np.ndarray, edges: list[float]) -> list[int]:
    finite = values[np.isfinite(values)]
    idx = np.searchsorted(np.asarray(edges, dtype=np.float64), finite.astype(np.float64), side="right")
    return [int(c) for c in np.bincount(idx, minlength=len(edges) + 1)]


def feature_view(x: np.ndarray) -> np.ndarray:
    """``x`` as ``[N, F]``: the feature indexing used by reference stats and device telemetry."""
    return x.reshape(len(x), -1) if x.ndim > 1 else x.reshape(len(x), 1)


def confidences(rows: np.ndarray) -> np.ndarray:
    """Per-row confidence of a ``[N, C]`` output (see the module doc for the rule)."""
    rows = rows.astype(np.float64)
    is_prob = (rows >= 0).all(axis=1) & (rows <= 1).all(axis=1) & (np.abs(rows.sum(axis=1) - 1) <= 1e-3)
    shifted = rows - rows.max(axis=1, keepdims=True)
    soft = np.exp(shifted)
    soft /= soft.sum(axis=1, keepdims=True)
    return np.asarray(np.where(is_prob, rows.max(axis=1), soft.max(axis=1)), dtype=np.float64)


def reference_stats(model_bytes: bytes, data: Dataset) -> ReferenceStats:
    sample = data.head(REFERENCE_MAX_SAMPLES)
    features: list[FeatureReference] = []
    for name in sorted(set(sample.inputs) | set(sample.shared)):
        if name in sample.shared:
            view = sample.shared[name].reshape(1, 1).astype(np.float64)
        else:
            view = feature_view(sample.inputs[name]).astype(np.float64)
        if view.shape[1] <= MAX_FEATURES_PER_INPUT and name not in sample.axes and name not in sample.shared:
            pct = np.arange(10, 100, 10)
            for j in range(view.shape[1]):
                edges = _edges(view[:, j], pct)
                features.append(FeatureReference(input=name, feature=j, edges=edges, counts=_counts(view[:, j], edges)))
        else:
            flat = view.ravel()
            edges = _edges(flat, np.arange(5, 100, 5))
            features.append(FeatureReference(input=name, feature=None, edges=edges, counts=_counts(flat, edges)))
    session = make_session(model_bytes, 1)
    outputs = run_dataset(session, sample)
    out_refs: list[OutputReference] = []
    for spec, values in zip(session.get_outputs(), outputs, strict=True):
        if values.ndim == 2 and values.shape[1] >= 2 and values.dtype.kind == "f":
            finite_rows = np.isfinite(values).all(axis=1)
            rows = values[finite_rows]
            classes = (
                np.bincount(rows.argmax(axis=1), minlength=values.shape[1]) if len(rows) else np.zeros(values.shape[1])
            )
            conf = (
                _counts(confidences(rows), list(CONFIDENCE_EDGES)) if len(rows) else [0] * (len(CONFIDENCE_EDGES) + 1)
            )
            out_refs.append(
                OutputReference(
                    output=spec.name,
                    kind="classes",
                    class_counts=[int(c) for c in classes],
                    confidence_counts=conf,
                )
            )
        else:
            flat = values.astype(np.float64).ravel()
            edges = _edges(flat, np.arange(5, 100, 5))
            out_refs.append(
                OutputReference(output=spec.name, kind="values", value_edges=edges, value_counts=_counts(flat, edges))
            )
    return ReferenceStats(sample_count=sample.count, features=features, outputs=out_refs)


# ---- test vectors ------------------------------------------------------------------------


def write_npz_reproducible(arrays: dict[str, np.ndarray]) -> bytes:
    """A compressed ``.npz`` (readable by ``numpy.load``) with fixed timestamps and sorted members."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=6) as zf:
        for key in sorted(arrays):
            info = zipfile.ZipInfo(f"{key}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.external_attr = 0o644 << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            member = io.BytesIO()
            np.lib.format.write_array(member, np.array(arrays[key], order="C"), allow_pickle=False)  # keeps 0-d
            zf.writestr(info, member.getvalue(), compresslevel=6)
    return buf.getvalue()


def max_test_vector_bytes(model_size: int) -> int:
    """The most bytes ``test_vectors.npz`` may take beside a model of ``model_size`` bytes."""
    return max(TEST_VECTOR_MIN_CAP_BYTES, int(model_size * TEST_VECTOR_MODEL_SHARE))


def test_vectors(model_bytes: bytes, data: Dataset) -> tuple[bytes, dict[str, np.ndarray]]:
    """``test_vectors.npz`` for the bundled model and the arrays in it (see the module doc).

    At most :data:`TEST_VECTOR_ROWS` rows, fewer when the compressed file would pass
    :func:`max_test_vector_bytes`; never fewer than one row (or the model's fixed batch), which the
    device's smoke test needs.
    """
    session = make_session(model_bytes, 1)
    fixed = session_batch(session, data)
    rows = fixed or TEST_VECTOR_ROWS
    cap = max_test_vector_bytes(len(model_bytes))
    while True:
        blob, arrays = _vectors_of(session, data, rows)
        if len(blob) <= cap or fixed or rows == 1:
            return blob, arrays
        rows = max(1, min(rows - 1, rows * cap // len(blob)))


def _vectors_of(session: Any, data: Dataset, rows: int) -> tuple[bytes, dict[str, np.ndarray]]:
    feed = data.feed(0, rows, pad_to=rows)  # fewer samples than rows: the last one repeats
    names = [o.name for o in session.get_outputs()]
    outs = session.run(names, feed)
    arrays = {TEST_VECTOR_INPUT_PREFIX + k: v for k, v in feed.items()}
    arrays.update({TEST_VECTOR_OUTPUT_PREFIX + n: np.asarray(o) for n, o in zip(names, outs, strict=True)})
    return write_npz_reproducible(arrays), arrays


def smoke_tolerances(precision: str, outputs: dict[str, np.ndarray]) -> tuple[float, float]:
    """(atol, rtol) for the device smoke test: tight for fp32, looser where kernels differ by device.

    Quantized kernels legitimately differ between CPUs (e.g. ARM dot-product vs x86 u8s8 paths)
    by a few quantization steps, so the absolute tolerance scales with the output range.
    """
    spans = [
        float(np.nanmax(v) - np.nanmin(v))
        for k, v in outputs.items()
        if k.startswith(TEST_VECTOR_OUTPUT_PREFIX) and v.size and v.dtype.kind == "f" and np.isfinite(v).any()
    ]
    span = max(spans, default=1.0)
    if precision == "fp32":
        return max(1e-4, 1e-5 * span), 1e-3
    if precision in ("fp16", "int4"):
        return max(1e-3, 5e-3 * span), 1e-2
    return max(1e-3, 0.05 * span), 0.05
