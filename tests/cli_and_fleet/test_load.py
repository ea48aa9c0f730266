"""Synthetic inputs: shapes and dtypes follow the model, pools are resampled, drift moves the distribution."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from edgeota.fleet.load import Drift, InputSampler, natural_pools
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
    arrays: dict[str, Any] = {"in.input": pool, "out.logits": np.zeros((10, 2), np.float32)}
    np.savez(tmp_path / "test_vectors.npz", **arrays)
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
        counted: list[int] = np.bincount(np.searchsorted(edges, x, side="right"), minlength=len(edges) + 1).tolist()
        return counted

    assert psi(counts, hist(plain)) < 0.1
    assert psi(counts, hist(drifted)) > 0.25
    assert not Drift().active and Drift(scale=2).active


DIGITS_MLP = TensorSpec(name="input", dtype="float32", shape=["N", 64])


def test_digits_source_draws_varied_natural_rows() -> None:
    from edgeota.fleet.load import digits_pool

    sampler = InputSampler([DIGITS_MLP], pools=natural_pools([DIGITS_MLP], "digits"), seed=5)
    rows = sampler.sample(300)["input"]
    assert rows.shape == (300, 64) and rows.dtype == np.float32
    pool_rows = {r.tobytes() for r in digits_pool()}
    assert all(r.tobytes() in pool_rows for r in rows)
    assert len({r.tobytes() for r in rows}) > 200  # not a handful of test vectors resampled
    assert rows.min() >= 0.0 and rows.max() <= 1.0  # scaled as the example model was trained (pixel / 16)


def test_digits_source_takes_the_inputs_shape_or_leaves_the_input_to_the_bundle(tmp_path: Path) -> None:
    cnn = TensorSpec(name="image", dtype="float32", shape=["N", 1, 8, 8])
    pools = natural_pools([cnn, SPEC, TensorSpec(name="ids", dtype="int64", shape=["N", 64])], "digits")
    assert set(pools) == {"image"} and pools["image"].shape[1:] == (1, 8, 8)
    assert natural_pools([cnn], "test_vectors") == {}
    vectors = np.arange(40, dtype=np.float32).reshape(10, 4)
    arrays: dict[str, Any] = {"in.input": vectors}
    np.savez(tmp_path / "test_vectors.npz", **arrays)
    sampler = InputSampler.from_bundle_dir(tmp_path, [SPEC, cnn], seed=1, source="digits")
    batch = sampler.sample(20)
    assert {tuple(r) for r in batch["input"]} <= {tuple(r) for r in vectors}  # 4 values: not digits, the bundle's
    assert batch["image"].shape == (20, 1, 8, 8)


def test_bundle_pools_are_read_once_per_cache_key(tmp_path: Path) -> None:
    arrays: dict[str, Any] = {"in.input": np.ones((3, 4), np.float32)}
    np.savez(tmp_path / "test_vectors.npz", **arrays)
    first = InputSampler.from_bundle_dir(tmp_path, [SPEC], cache_key="sha-a")
    (tmp_path / "test_vectors.npz").unlink()  # a second device on the same bundle must not need the folder
    second = InputSampler.from_bundle_dir(tmp_path, [SPEC], cache_key="sha-a")
    assert second.sample(2)["input"].tolist() == [[1.0] * 4] * 2
    assert first._pools["input"] is second._pools["input"]  # shared, not copied per device
    assert InputSampler.from_bundle_dir(tmp_path, [SPEC], cache_key="sha-b")._pools == {}


def test_digits_inputs_reach_the_share_a_nan_release_fails_on(tmp_path: Path) -> None:
    """The reason for the digits source: the 'nan' release is NaN on about 30% of natural inputs."""
    import onnxruntime as ort

    from packager.examples.digits import build_digits_example, make_degraded_variant

    model = build_digits_example(tmp_path / "model", arch="mlp", seed=0, epochs=1)
    bad = tmp_path / "bad.onnx"
    make_degraded_variant(model.model_path, bad, kind="nan")
    session = ort.InferenceSession(str(bad), providers=["CPUExecutionProvider"])
    spec = TensorSpec(name=model.input_name, dtype="float32", shape=["N", 64])
    sampler = InputSampler([spec], pools=natural_pools([spec], "digits"), seed=0)
    outputs = session.run(None, sampler.sample(400))[0]
    nan_share = float(np.isnan(outputs).any(axis=1).mean())
    assert 0.15 < nan_share < 0.45
