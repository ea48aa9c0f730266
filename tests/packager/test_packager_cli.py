"""The real CLI: package, bundle verify/inspect, and every bad input as one clear line and no bundle."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner, Result

from edgeota.cli import _register_components, app
from edgeota_contract.signing import write_keypair
from packager.examples.digits import DigitsExample

_register_components()
runner = CliRunner()


def _package(
    example: DigitsExample,
    key: Path,
    out: Path,
    *extra: str,
    model: Path | None = None,
    calibration: Path | None = None,
) -> Result:
    args = [
        "package",
        str(model or example.model_path),
        "--profile",
        "x86-avx2",
        "--calibration",
        str(calibration or example.calibration_path),
        "--key",
        str(key),
        "--out",
        str(out),
        "--name",
        "digits",
        "--version",
        "1.0.0",
        "--no-progress",
        *extra,
    ]
    return runner.invoke(app, args)


def _assert_one_line_error(result: Result, fragment: str, out: Path) -> None:
    assert result.exit_code == 2, (result.exit_code, result.output)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert fragment in lines[0], lines[0]
    assert "Traceback" not in result.output
    assert not list(out.glob("*.bundle.tar")) if out.exists() else True
    assert not list(out.glob(".*")) if out.exists() else True


def test_package_verify_inspect(mlp: DigitsExample, release_key: tuple[Path, Path], tmp_path: Path) -> None:
    priv, pub = release_key
    out = tmp_path / "out"
    result = _package(mlp, priv, out, "--eval", str(mlp.eval_path), "--release-counter", "7")
    assert result.exit_code == 0, result.output
    bundle = out / "digits-1.0.0-x86-avx2.bundle.tar"
    assert bundle.is_file() and (out / "report.json").is_file()
    ok = runner.invoke(app, ["bundle", "verify", str(bundle), "--trusted-key", str(pub), "--profile", "x86-avx2"])
    assert ok.exit_code == 0 and ok.stdout.startswith("OK digits-1.0.0-x86-avx2.bundle.tar")
    wrong_profile = runner.invoke(
        app, ["bundle", "verify", str(bundle), "--trusted-key", str(pub), "--profile", "rpi4"]
    )
    assert wrong_profile.exit_code == 2 and "rpi4" in wrong_profile.stderr
    _, other_pub = write_keypair(tmp_path / "other.pem")
    untrusted = runner.invoke(app, ["bundle", "verify", str(bundle), "--trusted-key", str(other_pub)])
    assert untrusted.exit_code == 2 and untrusted.stderr.startswith("error: signed by untrusted key")
    rollback = runner.invoke(
        app, ["bundle", "verify", str(bundle), "--trusted-key", str(pub), "--min-release-counter", "8"]
    )
    assert rollback.exit_code == 2
    inspected = runner.invoke(app, ["bundle", "inspect", str(bundle)], terminal_width=200)
    assert inspected.exit_code == 0
    assert "UNVERIFIED" in inspected.stdout and "model.onnx" in inspected.stdout and "smoke_atol" in inspected.stdout
    as_json = json.loads(runner.invoke(app, ["bundle", "inspect", str(bundle), "--json"]).stdout)
    assert as_json["verified"] is False and as_json["manifest"]["release_counter"] == 7
    garbage = tmp_path / "garbage.bundle.tar"
    garbage.write_bytes(b"not a tar")
    bad = runner.invoke(app, ["bundle", "inspect", str(garbage)])
    assert bad.exit_code == 2 and bad.stderr.startswith("error: ")


def test_gate_failure_exits_1(mlp: DigitsExample, release_key: tuple[Path, Path], tmp_path: Path, make_profile) -> None:  # type: ignore[no-untyped-def]
    folder = make_profile("x86-avx2", max_bundle_bytes=1000)
    out = tmp_path / "out"
    result = _package(mlp, release_key[0], out, "--profiles-dir", str(folder))
    assert result.exit_code == 1
    assert "error: profile x86-avx2: no recipe passed every gate" in result.stderr
    assert not list(out.glob("*.bundle.tar"))
    assert json.loads((out / "report.json").read_text())["ok"] is False


def test_bad_onnx(mlp: DigitsExample, release_key: tuple[Path, Path], tmp_path: Path) -> None:
    data = mlp.model_path.read_bytes()
    truncated, corrupt = tmp_path / "truncated.onnx", tmp_path / "corrupt.onnx"
    truncated.write_bytes(data[: len(data) - 700])
    corrupt.write_bytes(bytes(b ^ 0x5A for b in data[:400]) + data[400:])
    for model in (truncated, corrupt, tmp_path / "missing.onnx"):
        out = tmp_path / f"out-{model.stem}"
        result = _package(mlp, release_key[0], out, model=model)
        _assert_one_line_error(result, str(model), out)


def test_unknown_and_broken_profiles(
    mlp: DigitsExample, release_key: tuple[Path, Path], tmp_path: Path, make_profile
) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "out"
    result = runner.invoke(
        app,
        [
            "package",
            str(mlp.model_path),
            "--profile",
            "pdp-11",
            "--calibration",
            str(mlp.calibration_path),
            "--key",
            str(release_key[0]),
            "--out",
            str(out),
        ],
    )
    _assert_one_line_error(result, "unknown hardware profile 'pdp-11'", out)
    folder = make_profile("x86-avx2", latency={"budget_ms": "fast"})
    result = _package(mlp, release_key[0], out, "--profiles-dir", str(folder))
    _assert_one_line_error(result, "breaks the schema: latency.budget_ms", out)


def test_calibration_mismatch(mlp: DigitsExample, release_key: tuple[Path, Path], tmp_path: Path) -> None:
    x = np.load(mlp.calibration_path)["input"]
    wrong_name, wrong_shape = tmp_path / "names.npz", tmp_path / "shape.npz"
    np.savez(wrong_name, pixels=x)
    np.savez(wrong_shape, input=x[:, :60])
    out = tmp_path / "out"
    _assert_one_line_error(_package(mlp, release_key[0], out, calibration=wrong_name), "lacks model input 'input'", out)
    _assert_one_line_error(
        _package(mlp, release_key[0], out, calibration=wrong_shape),
        "has shape (200, 60) but the model expects [N, 64]",
        out,
    )
    not_npz = tmp_path / "calib.npz"
    not_npz.write_text("hello")
    _assert_one_line_error(_package(mlp, release_key[0], out, calibration=not_npz), "not a readable .npz", out)


def test_missing_labels_for_a_labelled_gate(
    mlp: DigitsExample, release_key: tuple[Path, Path], tmp_path: Path, make_profile
) -> None:  # type: ignore[no-untyped-def]
    unlabeled = tmp_path / "eval.npz"
    np.savez(unlabeled, input=np.load(mlp.eval_path)["input"])
    out = tmp_path / "out"
    result = _package(mlp, release_key[0], out, "--eval", str(unlabeled), "--gate", "accuracy")
    _assert_one_line_error(result, "gates on labelled accuracy but the evaluation data has no 'labels'", out)
    folder = make_profile("x86-avx2", accuracy={"metric": "accuracy"})
    result = _package(mlp, release_key[0], out, "--eval", str(unlabeled), "--profiles-dir", str(folder))
    _assert_one_line_error(result, "gates on labelled accuracy", out)


@pytest.mark.parametrize("kind", ["missing", "garbage", "public"])
def test_bad_key(mlp: DigitsExample, release_key: tuple[Path, Path], tmp_path: Path, kind: str) -> None:
    key = {"missing": tmp_path / "nokey.pem", "garbage": tmp_path / "junk.pem", "public": release_key[1]}[kind]
    if kind == "garbage":
        key.write_text("-----BEGIN PRIVATE KEY-----\nnope\n-----END PRIVATE KEY-----\n")
    out = tmp_path / "out"
    fragment = {
        "missing": "cannot read key file",
        "garbage": "is not a PEM private key",
        "public": "is not a PEM private key",
    }
    _assert_one_line_error(_package(mlp, key, out), fragment[kind], out)


def test_bad_name_and_version(mlp: DigitsExample, release_key: tuple[Path, Path], tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = runner.invoke(
        app,
        [
            "package",
            str(mlp.model_path),
            "-p",
            "x86-avx2",
            "--calibration",
            str(mlp.calibration_path),
            "--key",
            str(release_key[0]),
            "--out",
            str(out),
            "--version",
            "one",
        ],
    )
    _assert_one_line_error(result, "invalid version 'one'", out)
