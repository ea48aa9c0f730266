"""Synthetic inputs: shapes and dtypes follow the model, pools are resampled, drift moves the distribution."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edgeota.fleet.load import Drift, InputSampler
from edgeota_contract.manifest import TensorSpec
from edgeota_contract.telemetry import FeatureReference, ReferenceStats, psi

SPEC = TensorSpec(name="input", dtype="float32", shape=["N", 4])


def test_uniform_fallback_follows_shape_and_dtype() -> None:
    sampler = InputSampler([SPEC, TensorSpec(name="ids", dtype="int64", shape=[None, 3])], seed=1)
    batch = sampler.sample(5)
    assert batch["input"].shape == (5, 4) and batch["input"].dtype == np.float32
    assert batch["ids"].shape == (5, 3) and batch["ids"].dtype == np.int64


def test_test_vectors_are_resampled(tmp_path: Path) -> None:
    pool = np.arange(40, dtype=np.float32).reshape(10, 4)
    np.savez(tmp_path / "test_vectors.npz", **{"in.input": pool, "out.logits": np.zeros((10, 2), np.float32)})
    sampler = InputSampler.from_bundle_dir(tmp_path, [SPEC], seed=3)
    rows = sampler.sample(50)["input"]
    assert rows.shape == (50, 4)
    pool_rows = {tuple(r) for r in pool}
    assert all(tuple(r) in pool_rows for r in rows)


def test_reference_histograms_and_drift_raise_psi() -> None:
    edges = [0.1 * i for i in range(1, 10)]
    counts = [0, 5, 10, 20, 30, 20, 10, 5, 0, 0]
    ref = ReferenceStats(
        sample_count=100,
        features=[FeatureReference(input="input", feature=f, edges=edges, counts=counts) for f in range(4)],
    )
    sampler = InputSampler([SPEC], reference=ref, seed=0)
    plain = sampler.sample(2000)["input"][:, 0]
    drifted = sampler.sample(2000, Drift(shift=2.0))["input"][:, 0]

    def hist(x: np.ndarray) -> list[int]:
        return np.bincount(np.searchsorted(edges, x, side="right"), minlength=len(edges) + 1).tolist()

    assert psi(counts, hist(plain)) < 0.1
    assert psi(counts, hist(drifted)) > 0.25
    assert not Drift().active and Drift(scale=2).active
