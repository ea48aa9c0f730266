"""Bundle contents per the contract: manifest, lineage, reference stats, test vectors, reproducibility."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import onnxruntime as ort
from conftest import FAST

from edgeota_contract.bundle import verify_bundle
from edgeota_contract.signing import SigningKey, TrustedKeys
from edgeota_contract.telemetry import CONFIDENCE_EDGES, ReferenceStats
from edgeota_contract.version import __version__
from packager.api import package_model
from packager.examples.digits import DigitsExample
from packager.request import PackageRequest
from packager.stats import confidences, feature_view


def _members(path: Path) -> dict[str, bytes]:
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}  # type: ignore[union-attr]


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _build(example: DigitsExample, out: Path, key: SigningKey, profile: str, **kw):  # type: ignore[no-untyped-def]
    report = package_model(
        PackageRequest(
            model=example.model_path,
            profiles=[profile],
            calibration=example.calibration_path,
            eval_data=example.eval_path,
            key=key,
            out_dir=out,
            name="digits",
            version="2.3.4",
            latency=FAST,
            **kw,
        )
    )
    result = report.results[profile]
    assert result.ok, result.error
    return result


def test_manifest_and_files(mlp: DigitsExample, tmp_path: Path, signing_key: SigningKey) -> None:
    result = _build(mlp, tmp_path, signing_key, "rpi4", created_by="tester")
    verified = verify_bundle(result.bundle_path, TrustedKeys([signing_key.public_key]), expected_profile="rpi4")
    m = verified.manifest
    assert verified.archive_sha256 == result.bundle_sha256
    assert (m.model_name, m.version, m.release_counter, m.hardware_profile) == ("digits", "2.3.4", 2_003_004, "rpi4")
    assert m.recipe == result.recipe and m.execution_provider == "CPUExecutionProvider"
    assert m.lineage.source_model_sha256 == _sha(mlp.model_path)
    assert m.lineage.calibration_data_sha256 == _sha(mlp.calibration_path)
    assert m.lineage.eval_data_sha256 == _sha(mlp.eval_path)
    assert m.lineage.packager_version == __version__ and m.lineage.created_by == "tester"
    names = [p.name for p in m.passes]
    assert names[:3] == ["load_onnx", "shape_inference", "simplify"] and names[-1] == "op_support_check"
    assert {"smoke_atol", "smoke_rtol", "latency_budget_ms"} <= set(m.metrics)
    assert m.metrics["latency_budget_ms"] == 50.0
    assert "accuracy" in m.metrics and "fp32_accuracy" in m.metrics
    assert m.inputs[0].name == "input" and m.inputs[0].shape[1] == 64
    card = _members(result.bundle_path)["model_card.md"].decode()
    for heading in ("## Intended use", "## Recipe", "## Metrics", "## Lineage", "## Limits"):
        assert heading in card


def test_test_vectors_match_the_bundled_model(cnn: DigitsExample, tmp_path: Path, signing_key: SigningKey) -> None:
    result = _build(cnn, tmp_path, signing_key, "qcom-qnn-npu")
    files = _members(result.bundle_path)
    manifest = json.loads(files["manifest.json"])
    assert manifest["inputs"][0]["shape"] == [1, 1, 8, 8]  # static shapes for the NPU
    vectors = np.load(io.BytesIO(files["test_vectors.npz"]))
    assert sorted(vectors.files) == ["in.input", "out.logits"]
    sess = ort.InferenceSession(files["model.onnx"], providers=["CPUExecutionProvider"])
    out = sess.run(None, {"input": vectors["in.input"]})[0]
    np.testing.assert_allclose(out, vectors["out.logits"], atol=manifest["metrics"]["smoke_atol"], rtol=1e-3)


def test_reference_stats(cnn: DigitsExample, tmp_path: Path, signing_key: SigningKey) -> None:
    result = _build(cnn, tmp_path, signing_key, "x86-avx2")
    stats = ReferenceStats.model_validate_json(_members(result.bundle_path)["reference_stats.json"])
    calib = np.load(cnn.calibration_path)["input"]
    assert stats.sample_count == len(calib) == 200
    assert [f.feature for f in stats.features] == list(range(64))  # [N,1,8,8] -> 64 row-major features
    view = feature_view(calib)
    for feat in stats.features:
        assert sum(feat.counts) == len(calib)
        expected = np.bincount(
            np.searchsorted(feat.edges, view[:, feat.feature], side="right"), minlength=len(feat.edges) + 1
        )
        assert feat.counts == expected.tolist()
    (out,) = stats.outputs
    assert out.kind == "classes" and len(out.class_counts or []) == 10 and sum(out.class_counts or []) == 200
    assert len(out.confidence_counts or []) == len(CONFIDENCE_EDGES) + 1


def test_confidence_rule() -> None:
    probs = np.array([[0.1, 0.9], [0.5, 0.5]])
    logits = np.array([[0.0, 0.0], [2.0, 0.0]])
    np.testing.assert_allclose(confidences(probs), [0.9, 0.5])
    np.testing.assert_allclose(confidences(logits), [0.5, 1 / (1 + np.exp(-2.0))])


def test_reproducible_apart_from_time_and_signature(mlp: DigitsExample, tmp_path: Path, make_profile) -> None:  # type: ignore[no-untyped-def]
    # A profile without latency-dependent choices, so the ladder picks the same recipe every time.
    folder = make_profile(
        "repro", latency={"budget_ms": 1000, "host_scale": 1.0}, ram_budget_bytes=2**34, selection="first"
    )
    a = _build(
        mlp,
        tmp_path / "a",
        SigningKey.generate(),
        "repro",
        profiles_dir=folder,
        created_at=datetime(2026, 1, 1, tzinfo=UTC),
        created_by="ci",
    )
    b = _build(
        mlp,
        tmp_path / "b",
        SigningKey.generate(),
        "repro",
        profiles_dir=folder,
        created_at=datetime(2026, 2, 2, tzinfo=UTC),
        created_by="ci",
    )
    fa, fb = _members(a.bundle_path), _members(b.bundle_path)
    assert fa["model.onnx"] == fb["model.onnx"]
    for name in ("model_card.md", "reference_stats.json", "test_vectors.npz"):
        assert fa[name] == fb[name], name
    ma, mb = json.loads(fa["manifest.json"]), json.loads(fb["manifest.json"])
    for m in (ma, mb):
        m["lineage"].pop("created_at")
        m.pop("signing_key_id")
    assert ma == mb
    # same key and same time: the whole archive is byte-identical
    key = SigningKey.generate()
    when = datetime(2026, 3, 3, tzinfo=UTC)
    c = _build(mlp, tmp_path / "c", key, "repro", profiles_dir=folder, created_at=when, created_by="ci")
    d = _build(mlp, tmp_path / "d", key, "repro", profiles_dir=folder, created_at=when, created_by="ci")
    assert c.bundle_sha256 == d.bundle_sha256
