"""The digits example builders and the degraded variants used by the demo."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort

from packager.examples.digits import DigitsExample, make_degraded_variant


def _run(path: Path, x: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return np.asarray(sess.run(None, {"input": x})[0])


def test_mlp_example(mlp: DigitsExample) -> None:
    calib, ev = np.load(mlp.calibration_path), np.load(mlp.eval_path)
    assert calib["input"].shape == (200, 64) and calib["labels"].shape == (200,)
    assert ev["input"].shape[1:] == (64,) and len(ev["labels"]) == len(ev["input"])
    out = _run(mlp.model_path, ev["input"])
    acc = float((out.argmax(1) == ev["labels"]).mean())
    assert acc == mlp.fp32_accuracy and acc > 0.9


def test_mlp_example_does_not_import_torch(tmp_path: Path) -> None:
    code = (
        "import sys; from pathlib import Path; from packager.examples.digits import build_digits_example; "
        f"build_digits_example(Path({str(tmp_path)!r}), arch='mlp', epochs=20); "
        "print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_cnn_example(cnn: DigitsExample) -> None:
    ev = np.load(cnn.eval_path)
    assert ev["input"].shape[1:] == (1, 8, 8)
    out = _run(cnn.model_path, ev["input"])
    assert out.shape == (len(ev["input"]), 10)
    assert abs(float((out.argmax(1) == ev["labels"]).mean()) - cnn.fp32_accuracy) < 0.01
    assert cnn.fp32_accuracy > 0.85


def test_degraded_variants(mlp: DigitsExample, tmp_path: Path) -> None:
    ev = np.load(mlp.eval_path)
    x, y = ev["input"], ev["labels"]
    base = _run(mlp.model_path, x)
    slow = _run(make_degraded_variant(mlp.model_path, tmp_path / "slow.onnx", kind="slow", slow_matmuls=4), x)
    np.testing.assert_allclose(slow, base, rtol=1e-5, atol=1e-5)
    wrong = _run(make_degraded_variant(mlp.model_path, tmp_path / "wrong.onnx", kind="wrong", share=0.3), x)
    changed = (wrong.argmax(1) != base.argmax(1)).mean()
    assert 0.15 < changed < 0.45
    assert (wrong.argmax(1) == y).mean() < mlp.fp32_accuracy - 0.1
    nan = _run(make_degraded_variant(mlp.model_path, tmp_path / "nan.onnx", kind="nan", share=0.3), x)
    nan_rows = np.isnan(nan).any(axis=1)
    assert 0.15 < nan_rows.mean() < 0.45
    np.testing.assert_array_equal(nan[~nan_rows], base[~nan_rows])
    # the selector is a function of the input: the same rows misbehave on every run
    again = _run(tmp_path / "nan.onnx", x)
    np.testing.assert_array_equal(np.isnan(again).any(axis=1), nan_rows)
