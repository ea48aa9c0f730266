"""A bundle is never much bigger than its model: test vectors are compressed and bounded.

The model takes 3x320x320 images (1.2 MB per float32 sample): four raw test vectors would be
4.9 MB beside a ~2.6 MB model. The device agent's own smoke test still runs on what is shipped.
"""

from __future__ import annotations

import io
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import onnx
from conftest import FAST
from onnx import TensorProto, helper, numpy_helper

from device_agent.serving.runtime import SessionCache, load_model
from device_agent.update.checks import smoke_test
from edgeota_contract.bundle import verify_bundle
from edgeota_contract.manifest import MODEL_FILE, TEST_VECTOR_INPUT_PREFIX, TEST_VECTORS_FILE
from edgeota_contract.signing import SigningKey, TrustedKeys
from packager.api import package_model
from packager.request import PackageRequest
from packager.stats import TEST_VECTOR_ROWS, max_test_vector_bytes, write_npz_reproducible

SIZE = 320
HIDDEN = 24_576  # dense layers of ~1.6 MB and ~1 MB of weights: a ~2.6 MB model


def _detector(path: Path) -> Path:
    """Conv -> Relu -> GlobalAveragePool -> Flatten -> MatMul -> Relu -> MatMul on [N, 3, 320, 320] images."""
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array((rng.standard_normal((16, 3, 3, 3)) * 0.2).astype(np.float32), "w"),
        numpy_helper.from_array(np.zeros(16, np.float32), "b"),
        numpy_helper.from_array((rng.standard_normal((16, HIDDEN)) * 0.2).astype(np.float32), "w1"),
        numpy_helper.from_array((rng.standard_normal((HIDDEN, 10)) * 0.01).astype(np.float32), "w2"),
    ]
    nodes = [
        helper.make_node("Conv", ["images", "w", "b"], ["c"], pads=[1, 1, 1, 1], strides=[4, 4]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("GlobalAveragePool", ["r"], ["g"]),
        helper.make_node("Flatten", ["g"], ["f"]),
        helper.make_node("MatMul", ["f", "w1"], ["h"]),
        helper.make_node("Relu", ["h"], ["hr"]),
        helper.make_node("MatMul", ["hr", "w2"], ["scores"]),
    ]
    graph = helper.make_graph(
        nodes,
        "detector",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["N", 3, SIZE, SIZE])],
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["N", 10])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)
    return path


def _images(path: Path, n: int = 6) -> Path:
    # Camera-like pixels: 8-bit values scaled to [0, 1] (which compress somewhat, as real images do).
    rng = np.random.default_rng(1)
    np.savez(path, images=(rng.integers(0, 256, (n, 3, SIZE, SIZE)) / 255).astype(np.float32))
    return path


def test_bundle_of_a_large_input_model_stays_near_the_model_size(tmp_path: Path) -> None:
    key = SigningKey.generate()
    report = package_model(
        PackageRequest(
            model=_detector(tmp_path / "detector.onnx"),
            profiles=["x86-avx2"],
            calibration=_images(tmp_path / "calib.npz"),
            key=key,
            out_dir=tmp_path / "out",
            recipes=["fp32"],
            gate_overrides={"latency_budget_ms": 60_000},
            latency=FAST,
            measure_memory=False,
        )
    )
    result = report.results["x86-avx2"]
    assert result.ok and result.bundle_path is not None, result.error
    with tarfile.open(result.bundle_path) as tar:
        sizes = {m.name: m.size for m in tar.getmembers()}
        vectors = tar.extractfile(TEST_VECTORS_FILE).read()  # type: ignore[union-attr]
    model_size = sizes[MODEL_FILE]
    cap = max_test_vector_bytes(model_size)
    assert cap == max(1 << 20, model_size // 4)
    assert sizes[TEST_VECTORS_FILE] <= cap, (sizes, cap)
    assert result.bundle_path.stat().st_size <= model_size + cap + 65536
    # Four raw vectors (what bundles held before) would not fit: the bound really bit.
    one_sample = 3 * SIZE * SIZE * 4
    assert TEST_VECTOR_ROWS * one_sample > cap
    with zipfile.ZipFile(io.BytesIO(vectors)) as zf:
        assert {i.compress_type for i in zf.infolist()} == {zipfile.ZIP_DEFLATED}
    arrays = np.load(io.BytesIO(vectors), allow_pickle=False)
    rows = arrays[TEST_VECTOR_INPUT_PREFIX + "images"].shape[0]
    assert 1 <= rows < TEST_VECTOR_ROWS

    # The agent reads the compressed vectors and its smoke test passes on them.
    slot = tmp_path / "slot"
    verified = verify_bundle(result.bundle_path, TrustedKeys([key.public_key]), extract_to=slot)
    loaded = load_model(slot, verified.manifest, verified.archive_sha256, "a", SessionCache())
    assert len(smoke_test(loaded)) == 3


def test_vectors_npz_is_reproducible_and_readable(tmp_path: Path) -> None:
    arrays = {"in.x": np.arange(4 * 64, dtype=np.float32).reshape(4, 64)}
    blob = write_npz_reproducible(arrays)
    assert blob == write_npz_reproducible(arrays)  # reproducible byte for byte
    assert np.array_equal(np.load(io.BytesIO(blob))["in.x"], arrays["in.x"])
    assert len(blob) < max_test_vector_bytes(0)
