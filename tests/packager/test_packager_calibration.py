"""``calibration.json``: per confidence bin, evaluation rows and correct answers of the bundled model."""

from __future__ import annotations

import tarfile
from pathlib import Path

import numpy as np
import onnxruntime as ort
from conftest import FAST

from edgeota_contract.calibration import CALIBRATION_FILE, ConfidenceCalibration, aligned, expected_accuracy
from edgeota_contract.signing import SigningKey
from edgeota_contract.telemetry import CONFIDENCE_EDGES
from packager.api import package_model
from packager.calibration import calibration_counts
from packager.examples.digits import DigitsExample
from packager.request import PackageRequest
from packager.stats import confidences


def test_counts_per_bin() -> None:
    rows = np.array([[0.05, 0.95], [0.95, 0.05], [0.45, 0.55], [0.3, 0.7], [np.nan, 1.0]])
    labels = np.array([1, 1, 1, 0, 1])
    counts, correct = calibration_counts(rows, labels)
    expected_counts = [0] * (len(CONFIDENCE_EDGES) + 1)
    expected_correct = list(expected_counts)
    for conf, right in ((0.95, 1), (0.95, 0), (0.55, 1), (0.7, 0)):  # the NaN row is left out
        b = int(np.searchsorted(CONFIDENCE_EDGES, conf, side="right"))
        expected_counts[b] += 1
        expected_correct[b] += right
    assert (counts, correct) == (expected_counts, expected_correct)
    assert calibration_counts(rows[4:], labels[4:]) == ([0] * len(counts), [0] * len(counts))


def _bundle(example: DigitsExample, out: Path, key: SigningKey, eval_labels: bool) -> dict[str, bytes]:
    eval_path = example.eval_path
    if not eval_labels:
        arrays = dict(np.load(example.eval_path))
        arrays.pop("labels")
        eval_path = out / "unlabelled.npz"
        np.savez(eval_path, **arrays)  # type: ignore[arg-type]
    report = package_model(
        PackageRequest(
            model=example.model_path,
            profiles=["x86-avx2"],
            calibration=example.calibration_path,
            eval_data=eval_path,
            key=key,
            out_dir=out / "bundles",
            name="digits",
            version="1.0.0",
            latency=FAST,
        )
    )
    result = report.results["x86-avx2"]
    assert result.ok, result.error
    with tarfile.open(result.bundle_path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}  # type: ignore[union-attr]


def test_bundle_ships_the_calibration_of_its_model(mlp: DigitsExample, tmp_path: Path, signing_key: SigningKey) -> None:
    files = _bundle(mlp, tmp_path, signing_key, eval_labels=True)
    cal = ConfidenceCalibration.model_validate_json(files[CALIBRATION_FILE])
    out = cal.for_output()
    assert out is not None and aligned(out) and cal.data_role == "evaluation"
    data = np.load(mlp.eval_path)
    sess = ort.InferenceSession(files["model.onnx"], providers=["CPUExecutionProvider"])
    logits = sess.run(None, {"input": data["input"].astype(np.float32)})[0]
    idx = np.searchsorted(CONFIDENCE_EDGES, confidences(logits), side="right")
    right = logits.argmax(axis=1) == data["labels"]
    assert out.counts == np.bincount(idx, minlength=len(CONFIDENCE_EDGES) + 1).tolist()
    assert out.correct == np.bincount(idx[right], minlength=len(CONFIDENCE_EDGES) + 1).tolist()
    assert out.accuracy == float(right.mean())
    # the estimate on the evaluation data's own confidences is close to its measured accuracy
    estimate, n = expected_accuracy(out, out.counts)
    assert n == len(logits) and estimate is not None and abs(estimate - right.mean()) < 0.02


def test_no_labels_no_calibration(mlp: DigitsExample, tmp_path: Path, signing_key: SigningKey) -> None:
    files = _bundle(mlp, tmp_path, signing_key, eval_labels=False)
    assert CALIBRATION_FILE not in files and "reference_stats.json" in files
