"""silero-vad (the real models shipped in the ``silero-vad`` wheel): unlabelled fidelity gates,
recurrent state batched on axis 1, a shared scalar input, and a control-flow model that a
no-control-flow profile refuses cleanly while others package it."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import FAST

from edgeota_contract.bundle import verify_bundle
from edgeota_contract.signing import SigningKey, TrustedKeys
from edgeota_contract.telemetry import ReferenceStats
from packager.api import package_model
from packager.data import check_dataset, load_dataset
from packager.errors import DataError
from packager.examples.silero import SileroExample, build_silero_example, synthetic_audio
from packager.onnx_utils import io_specs
from packager.request import PackageRequest

pytest.importorskip("silero_vad", reason="the silero-vad wheel is not installed (pip install --no-deps silero-vad)")


@pytest.fixture(scope="module")
def static_vad(tmp_path_factory: pytest.TempPathFactory) -> SileroExample:
    return build_silero_example(tmp_path_factory.mktemp("vad-static"), "static", calibration_chunks=96, eval_chunks=150)


@pytest.fixture(scope="module")
def cf_vad(tmp_path_factory: pytest.TempPathFactory) -> SileroExample:
    return build_silero_example(
        tmp_path_factory.mktemp("vad-cf"), "control_flow", calibration_chunks=48, eval_chunks=64
    )


def _members(path: Path) -> dict[str, bytes]:
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}  # type: ignore[union-attr]


def _package(example: SileroExample, out: Path, key: SigningKey, profiles: list[str], **kw):  # type: ignore[no-untyped-def]
    return package_model(
        PackageRequest(
            model=example.model_path,
            profiles=profiles,
            calibration=example.calibration_path,
            eval_data=example.eval_path,
            key=key,
            out_dir=out,
            name="silero-vad",
            version="1.0.0",
            latency=FAST,
            measure_memory=False,
            **kw,
        )
    )


def test_synthetic_audio_is_deterministic_and_bounded() -> None:
    a, b = synthetic_audio(1.0, seed=3), synthetic_audio(1.0, seed=3)
    assert a.dtype == np.float32 and a.shape == (16_000,)
    assert np.array_equal(a, b) and not np.array_equal(a, synthetic_audio(1.0, seed=4))
    assert np.abs(a).max() <= 1.0 and a.std() > 0.01


def test_sample_axes_and_shared_inputs(cf_vad: SileroExample) -> None:
    specs = io_specs(onnx.load(str(cf_vad.model_path)))
    data = load_dataset(cf_vad.calibration_path, specs)
    assert data.count == 48 and data.axes == {"state": 1} and set(data.shared) == {"sr"}
    feed = data.feed(0, 5)
    assert feed["input"].shape == (5, 576) and feed["state"].shape == (2, 5, 128) and feed["sr"].shape == ()
    raw = np.load(cf_vad.calibration_path)
    assert np.array_equal(feed["state"], raw["state"][:, :5])  # the round trip keeps the model's layout
    # a state whose sample axis cannot be matched, and a non-scalar for a scalar input, are one-line errors
    with pytest.raises(DataError, match=r"no axis of 'state' \(2, 47, 128\) holds the 48 samples of 'input'"):
        check_dataset({"input": raw["input"], "state": raw["state"][:, :47], "sr": raw["sr"]}, specs)
    with pytest.raises(DataError, match="input 'sr' is a scalar in the model"):
        check_dataset({"input": raw["input"], "state": raw["state"], "sr": np.full(48, 16000)}, specs)


def test_static_variant_gates_on_fidelity_and_bundles(static_vad: SileroExample, tmp_path: Path) -> None:
    key = SigningKey.generate()
    recipes = ["int8-qdq", "int8-qdq-wops-p999", "fp32"]
    report = _package(static_vad, tmp_path / "out", key, ["rpi4"], recipes=recipes)
    result = report.results["rpi4"]
    assert report.ok and result.ok, result.error
    assert result.gate_metric == "fidelity"
    plain, wops = result.attempts[0], result.attempts[-1]
    # quantizing every op (Pow/Sqrt of the STFT magnitude included) is not faithful, and is rejected for it
    assert plain.recipe == "int8-qdq" and not plain.passed_gates and "fidelity" in (plain.reason or "")
    assert wops.recipe == "int8-qdq-wops-p999" and wops.accepted and result.recipe == wops.label
    names = {g.name for g in wops.gates}
    assert {"fidelity_top1", "fidelity_cosine", "fidelity_sqnr"} <= names and "accuracy" not in names
    # weight-only-ops int8 keeps the VAD faithful: no quality gate fails, a quarter-ish of the fp32 bytes
    assert all(g.ok for g in wops.gates if g.name.startswith("fidelity")), wops.reason
    assert wops.metrics["cosine_mean"] >= 0.99 and wops.metrics["model_bytes"] < 0.3 * result.baseline["model_bytes"]
    assert result.bundle_path is not None
    verify_bundle(result.bundle_path, TrustedKeys([key.public_key]), expected_profile="rpi4")
    files = _members(result.bundle_path)
    vectors = np.load(io.BytesIO(files["test_vectors.npz"]))
    assert vectors["in.input"].shape == (1, 576) and vectors["in.state"].shape == (2, 1, 128)
    session = ort.InferenceSession(files["model.onnx"], providers=["CPUExecutionProvider"])
    prob, state = session.run(["output", "stateN"], {"input": vectors["in.input"], "state": vectors["in.state"]})
    np.testing.assert_allclose(prob, vectors["out.output"], atol=1e-6)
    np.testing.assert_allclose(state, vectors["out.stateN"], atol=1e-6)
    stats = ReferenceStats.model_validate(json.loads(files["reference_stats.json"]))
    state_refs = [f for f in stats.features if f.input == "state"]
    assert len(state_refs) == 1 and state_refs[0].feature is None  # layout-independent whole-input histogram


def test_control_flow_variant_refused_by_qnn_packaged_elsewhere(cf_vad: SileroExample, tmp_path: Path) -> None:
    key = SigningKey.generate()
    refused = _package(cf_vad, tmp_path / "qnn", key, ["qcom-qnn-npu"])
    qnn = refused.results["qcom-qnn-npu"]
    assert not refused.ok and not qnn.ok and qnn.attempts == [] and qnn.bundle_path is None
    assert qnn.error is not None and "control flow (If)" in qnn.error and "qcom-qnn-npu forbids" in qnn.error
    assert not list((tmp_path / "qnn").glob("*.bundle.tar"))

    report = _package(cf_vad, tmp_path / "x86", key, ["x86-avx2"], recipes=["int8-qdq", "fp32"])
    result = report.results["x86-avx2"]
    assert report.ok and result.ok and result.recipe == "fp32", result.error
    int8 = result.attempts[0]
    assert not int8.passed_gates and "nothing to quantize" in (int8.reason or "")
    assert result.bundle_path is not None
    files = _members(result.bundle_path)
    # onnxslim grows this model by 1 MB (constants folded per If branch): the packager keeps its input, so the
    # fp32 bundle is the source plus a few hundred bytes of shape-inference annotations
    assert len(files["model.onnx"]) <= cf_vad.model_path.stat().st_size * 1.001
    vectors = np.load(io.BytesIO(files["test_vectors.npz"]))
    assert vectors["in.sr"].shape == () and int(vectors["in.sr"]) == 16000
    assert vectors["in.state"].shape == (2, 4, 128) and vectors["out.stateN"].shape == (2, 4, 128)
    session = ort.InferenceSession(files["model.onnx"], providers=["CPUExecutionProvider"])
    feed = {k.removeprefix("in."): vectors[k] for k in vectors.files if k.startswith("in.")}
    np.testing.assert_allclose(session.run(["output"], feed)[0], vectors["out.output"], atol=1e-5)
