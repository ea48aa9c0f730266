"""PyTorch input (TorchScript, ExportedProgram, nn.Module), structured pruning, and no torch for ONNX input."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import FAST

from edgeota_contract.bundle import read_manifest
from edgeota_contract.signing import SigningKey
from packager.api import package_model
from packager.examples.digits import DigitsExample, make_digits_cnn, train_digits_cnn
from packager.request import PackageRequest

torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def trained(cnn: DigitsExample):  # type: ignore[no-untyped-def]
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.data / 16.0).astype(np.float32)
    return train_digits_cnn(x[:1200], d.target[:1200].astype(np.int64), seed=0, epochs=4)


def _package(model, example: DigitsExample, out: Path, profiles: list[str], **kw):  # type: ignore[no-untyped-def]
    return package_model(
        PackageRequest(
            model=model,
            profiles=profiles,
            calibration=example.calibration_path,
            eval_data=example.eval_path,
            key=SigningKey.generate(),
            out_dir=out,
            name="digits-cnn",
            version="1.0.0",
            latency=FAST,
            measure_memory=False,
            **kw,
        )
    )


def test_onnx_input_never_imports_torch(mlp: DigitsExample, tmp_path: Path) -> None:
    code = f"""
import sys
from pathlib import Path
from edgeota_contract.signing import SigningKey
from packager.api import package_model
from packager.evaluate import LatencySettings
from packager.request import PackageRequest
report = package_model(PackageRequest(model=Path({str(mlp.model_path)!r}), profiles=["x86-avx2", "rpi4"],
    calibration=Path({str(mlp.calibration_path)!r}), key=SigningKey.generate(), out_dir=Path({str(tmp_path)!r}),
    name="digits", version="1.0.0", latency=LatencySettings(1, 1, 3)))
assert report.ok, report.to_json()
import edgeota.cli, packager.cli
print("torch" in sys.modules)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "False"


def test_torchscript_file(trained, cnn: DigitsExample, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "cnn.pt"
    torch.jit.trace(trained.eval(), torch.zeros(1, 1, 8, 8)).save(str(path))
    report = _package(path, cnn, tmp_path / "out", ["x86-avx2"])
    result = report.results["x86-avx2"]
    assert result.ok, result.error
    manifest, _ = read_manifest(result.bundle_path)
    assert manifest.passes[0].name == "torch_export" and manifest.passes[0].config["source_format"] == "torchscript"
    assert report.source["format"] == "torchscript"
    assert result.metrics["accuracy"] > 0.85


def test_exported_program_file(trained, cnn: DigitsExample, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "cnn.pt2"
    ep = torch.export.export(trained.eval(), (torch.zeros(1, 1, 8, 8),))
    torch.export.save(ep, str(path))
    report = _package(path, cnn, tmp_path / "out", ["rpi5"])
    assert report.results["rpi5"].ok, report.results["rpi5"].error
    assert report.source["format"] == "exported_program"


def test_nn_module_with_structured_pruning(trained, cnn: DigitsExample, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    # imx8mp-npu enables 25% channel pruning: the pruned network is tried first.
    report = _package(trained, cnn, tmp_path / "out", ["imx8mp-npu", "x86-avx2"], example_inputs=(1, 1, 8, 8))
    imx = report.results["imx8mp-npu"]
    assert imx.attempts[0].label.endswith("channels-25%")
    assert imx.ok, imx.error
    x86 = report.results["x86-avx2"]
    assert not any("channels" in a.label for a in x86.attempts)
    if "channels" in (imx.recipe or ""):
        manifest, _ = read_manifest(imx.bundle_path)
        pruning = next(p for p in manifest.passes if p.name == "prune_channels")
        assert pruning.config["result"]["params_after"] < pruning.config["result"]["params_before"]


def test_prune_channels_really_removes_channels() -> None:
    from packager.torch_input import prune_channels

    model = make_digits_cnn(0).eval()
    x = torch.randn(3, 1, 8, 8)
    pruned, summary = prune_channels(model, (x,), 0.5)
    assert pruned(x).shape == (3, 10)
    convs = [m for m in pruned.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [c.out_channels for c in convs] == [16, 32, 32]
    assert [c.in_channels for c in convs] == [1, 16, 32]
    linears = [m for m in pruned.modules() if isinstance(m, torch.nn.Linear)]
    assert [(lin.in_features, lin.out_features) for lin in linears] == [(32 * 16, 64), (64, 10)]
    assert summary["params_after"] < 0.5 * summary["params_before"]
    # the model itself is not modified
    assert [m.out_channels for m in model.modules() if isinstance(m, torch.nn.Conv2d)] == [32, 64, 64]


def test_unloadable_torch_file(cnn: DigitsExample, tmp_path: Path) -> None:
    from packager.errors import ModelInputError

    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"nope")
    with pytest.raises(ModelInputError, match="not a loadable TorchScript file"):
        _package(bad, cnn, tmp_path / "out", ["x86-avx2"])


def test_cli_packages_a_torchscript_file(trained, cnn: DigitsExample, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from typer.testing import CliRunner

    from edgeota.cli import _register_components, app
    from edgeota_contract.signing import write_keypair

    _register_components()
    priv, _ = write_keypair(tmp_path / "k.pem")
    path = tmp_path / "cnn.ts"
    torch.jit.trace(trained.eval(), torch.zeros(1, 1, 8, 8)).save(str(path))
    args = ["package", str(path), "-p", "rpi5", "--calibration", str(cnn.calibration_path), "--key", str(priv)]
    args += ["--out", str(tmp_path / "out"), "--example-shape", "1,1,8,8", "--no-progress"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert (tmp_path / "out" / "cnn-0.1.0-rpi5.bundle.tar").is_file()
