"""Inputs a new user gets wrong or exporters write oddly: one `error:` line and nothing written, or it just works.

A batch stored as the number -1 (or 0), a text file named `.npz`, calibration data with NaN or
infinity, and `--out` naming a file.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import FAST
from onnx import TensorProto, helper, numpy_helper
from typer.testing import CliRunner, Result

from edgeota.cli import _register_components, app
from edgeota_contract.bundle import verify_bundle
from edgeota_contract.signing import SigningKey, TrustedKeys
from packager.api import package_model
from packager.data import load_dataset
from packager.errors import DataError
from packager.onnx_utils import io_specs, load_onnx_file
from packager.request import PackageRequest

_register_components()
runner = CliRunner()


def _conv_model(path: Path, batch: int | str, size: int = 12) -> Path:
    """A small Conv -> Relu -> GlobalAveragePool -> Flatten classifier with batch dimension ``batch``."""
    rng = np.random.default_rng(0)
    weights = numpy_helper.from_array((rng.standard_normal((8, 3, 3, 3)) * 0.2).astype(np.float32), "w")
    bias = numpy_helper.from_array(np.zeros(8, np.float32), "b")
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 3, size, size])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 8])
    nodes = [
        helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("GlobalAveragePool", ["r"], ["g"]),
        helper.make_node("Flatten", ["g"], ["y"]),
    ]
    graph = helper.make_graph(nodes, "conv", [x], [y], [weights, bias])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)
    return path


def _images(path: Path, n: int = 24, size: int = 12) -> Path:
    rng = np.random.default_rng(1)
    np.savez(path, x=rng.random((n, 3, size, size), dtype=np.float32))
    return path


def _package_cli(model: Path, calibration: Path, key: Path, out: Path, *extra: str) -> Result:
    args = ["package", str(model), "-p", "x86-avx2", "--calibration", str(calibration), "--key", str(key)]
    return runner.invoke(app, [*args, "--out", str(out), "--no-progress", *extra])


def _assert_one_line_error(result: Result, fragment: str) -> None:
    assert result.exit_code == 2, (result.exit_code, result.output)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert fragment in lines[0], lines[0]
    assert "Traceback" not in result.output


@pytest.mark.parametrize("stored", [-1, 0])
def test_a_batch_stored_as_a_non_positive_number_is_dynamic(tmp_path: Path, stored: int) -> None:
    model_path = _conv_model(tmp_path / "m.onnx", stored)
    assert onnx.load(model_path).graph.input[0].type.tensor_type.shape.dim[0].dim_value == stored
    model, _ = load_onnx_file(model_path)
    assert io_specs(model, "input")[0].shape == (None, 3, 12, 12)
    assert io_specs(model, "output")[0].shape == (None, 8)
    key = SigningKey.generate()
    # A static int8 recipe: its calibration batch comes from the model's batch, which broke on -1.
    report = package_model(
        PackageRequest(
            model=model_path,
            profiles=["rpi4"],
            calibration=_images(tmp_path / "calib.npz"),
            key=key,
            out_dir=tmp_path / "out",
            recipes=["int8-qdq"],
            gate_metric="fidelity",
            latency=FAST,
            measure_memory=False,
        )
    )
    result = report.results["rpi4"]
    assert result.error is None or "internal error" not in result.error, result.error
    assert result.ok, result.error
    assert result.recipe is not None and result.recipe.startswith("int8-qdq")  # rpi4 may prune too
    manifest = verify_bundle(result.bundle_path, TrustedKeys([key.public_key])).manifest  # type: ignore[arg-type]
    assert manifest.inputs[0].shape[0] is None and manifest.inputs[0].shape[1:] == [3, 12, 12]


def test_a_fixed_batch_stays_fixed(tmp_path: Path) -> None:
    model, _ = load_onnx_file(_conv_model(tmp_path / "m.onnx", 2))
    assert io_specs(model, "input")[0].shape == (2, 3, 12, 12)


def test_a_text_file_named_npz_gets_a_clear_message(tmp_path: Path, release_key: tuple[Path, Path]) -> None:
    model = _conv_model(tmp_path / "m.onnx", "N")
    text = tmp_path / "calib.npz"
    text.write_text("x,y\n1,2\n")
    with pytest.raises(DataError, match=r"is not a readable \.npz file: not a zip archive .*numpy\.savez") as info:
        load_dataset(text, io_specs(onnx.load(model), "input"), "calibration")
    assert "pickle" not in str(info.value)
    out = tmp_path / "out"
    result = _package_cli(model, text, release_key[0], out)
    _assert_one_line_error(result, "is not a readable .npz file: not a zip archive of arrays")
    assert "pickle" not in result.stderr
    assert not out.exists()


@pytest.mark.parametrize(
    ("poison", "fragment"),
    [
        (lambda a: np.full_like(a, np.nan), "NaN or infinite values (every value"),
        (lambda a: _set(a, (3, 1, 2, 5), np.inf), "(1 of 10368 values, the first at index (3, 1, 2, 5))"),
        (lambda a: _set(a, (0, 0, 0, 0), np.nan), "the first at index (0, 0, 0, 0)"),
    ],
)
def test_calibration_data_that_is_not_finite_is_refused_before_any_recipe(
    tmp_path: Path, release_key: tuple[Path, Path], poison: Callable[[np.ndarray], np.ndarray], fragment: str
) -> None:
    model = _conv_model(tmp_path / "m.onnx", "N")
    good = np.load(_images(tmp_path / "good.npz"))["x"]
    bad = tmp_path / "bad.npz"
    np.savez(bad, x=poison(good.copy()))
    out = tmp_path / "out"
    result = _package_cli(model, bad, release_key[0], out)
    _assert_one_line_error(result, fragment)
    assert "input 'x'" in result.stderr and "calibration data bad.npz" in result.stderr
    assert not out.exists()  # refused before the output folder, any recipe or report


def test_evaluation_data_that_is_not_finite_is_refused(tmp_path: Path, release_key: tuple[Path, Path]) -> None:
    model = _conv_model(tmp_path / "m.onnx", "N")
    calib = _images(tmp_path / "calib.npz")
    evald = tmp_path / "eval.npz"
    arr = np.load(calib)["x"].copy()
    arr[5, 0, 0, 0] = -np.inf
    np.savez(evald, x=arr)
    result = _package_cli(model, calib, release_key[0], tmp_path / "out", "--eval", str(evald))
    _assert_one_line_error(result, "evaluation data eval.npz: input 'x' has NaN or infinite values")


def _set(arr: np.ndarray, index: tuple[int, ...], value: float) -> np.ndarray:
    arr[index] = value
    return arr


def test_out_naming_a_file_is_refused_before_any_work(tmp_path: Path, release_key: tuple[Path, Path]) -> None:
    model = _conv_model(tmp_path / "m.onnx", "N")
    calib = _images(tmp_path / "calib.npz")
    taken = tmp_path / "dist"
    taken.write_text("not a folder")
    result = _package_cli(model, calib, release_key[0], taken)
    _assert_one_line_error(result, f"output folder {taken} is a file, not a folder")
    assert taken.read_text() == "not a folder"
    under = taken / "sub"
    result = _package_cli(model, calib, release_key[0], under)
    _assert_one_line_error(result, f"output folder {under} is under {taken}, which is a file")
    # Before any work: even a missing model is not looked at yet.
    result = _package_cli(tmp_path / "missing.onnx", calib, release_key[0], taken)
    _assert_one_line_error(result, "is a file, not a folder")
