"""The typed packaging request: defaults it derives, every rejection as one-line RequestError, CLI wording."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError
from typer.testing import CliRunner

from edgeota.cli import _register_components, app
from edgeota_contract.errors import EdgeotaError
from edgeota_contract.signing import SigningKey
from packager.cli import _in_option_terms
from packager.evaluate import LatencySettings
from packager.examples.digits import DigitsExample
from packager.request import PackageRequest, RequestError

KEY = SigningKey.generate()


def _request(**changes: Any) -> PackageRequest:
    fields: dict[str, Any] = {
        "model": Path("models/digits.onnx"),
        "profiles": ["x86-avx2"],
        "calibration": Path("calib.npz"),
        "key": KEY,
        "out_dir": Path("dist"),
        "version": "1.2.3",
    }
    fields.update(changes)
    return PackageRequest(**fields)


def test_defaults_and_derived_values() -> None:
    request = _request(model="models/my model v2.onnx", calibration="calib.npz", key="keys/release.pem")
    assert request.model == Path("models/my model v2.onnx") and request.model_path == request.model
    assert request.calibration == Path("calib.npz") and request.key == Path("keys/release.pem")
    assert request.model_name == "my-model-v2" and request.name is None
    assert request.counter == 1_002_003 and request.release_counter is None
    assert request.latency == LatencySettings() and request.enforce_gates and request.jobs == 1
    assert not request.is_torch_input and request.eval_data is None and request.recipes is None
    named = _request(name="digits", release_counter=7, model="m.pt2")
    assert named.model_name == "digits" and named.counter == 7 and named.is_torch_input


def test_created_at_naive_is_utc_and_aware_is_kept() -> None:
    naive = _request(created_at=datetime(2026, 1, 2, 3, 4, 5)).created_at
    assert naive == datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    cet = timezone(timedelta(hours=1))
    assert _request(created_at=datetime(2026, 1, 2, tzinfo=cet)).created_at == datetime(2026, 1, 2, tzinfo=cet)


def test_request_is_immutable() -> None:
    request = _request()
    with pytest.raises(ValidationError):
        request.version = "2.0.0"  # type: ignore[misc]


@pytest.mark.parametrize(
    ("changes", "field", "message"),
    [
        ({"version": "one"}, "version", "invalid version 'one': expected a semantic version such as 1.2.0"),
        ({"version": "1.0.0\n"}, "version", "invalid version '1.0.0\\n'"),
        ({"name": "../evil"}, None, "invalid model name '../evil': use letters, digits"),
        ({"model": Path("m" * 70 + ".onnx")}, None, "invalid model name 'mmmm"),
        ({"release_counter": 0}, "release_counter", "invalid release counter 0: must be between 1 and 2**53"),
        ({"release_counter": 2**53 + 1}, "release_counter", "invalid release counter"),
        ({"jobs": 0}, "jobs", "jobs must be at least 1"),
        ({"gate_metric": "speed"}, "gate_metric", "gate_metric must be accuracy or fidelity, not 'speed'"),
        ({"recipes": []}, "recipes", "the recipe override is empty"),
        ({"profiles": []}, "profiles", "no hardware profile given"),
        ({"profiles": ["rpi4", "rpi4"]}, "profiles", "a hardware profile is given twice"),
        ({"model": 42}, "model", "model must be a model file path or a torch.nn.Module, not int"),
        ({"jobs": "many"}, "jobs", "jobs: Input should be a valid integer"),
        ({"key": 3.5}, "key", "key must be a SigningKey or the path of a PEM private key, not float"),
        ({"profiles": ["rpi4", 5]}, "profiles", "profiles.1: Input should be a valid string"),
        ({"compression": "zstd"}, "compression", "compression: Extra inputs are not permitted"),
    ],
)
def test_each_rejection_is_one_request_error(changes: dict[str, Any], field: str | None, message: str) -> None:
    with pytest.raises(RequestError) as info:
        _request(**changes)
    assert isinstance(info.value, EdgeotaError)
    assert info.value.field == field and str(info.value).startswith(message), str(info.value)
    assert "\n" not in str(info.value)


def test_missing_fields_and_several_errors_name_the_first_and_count_the_rest() -> None:
    with pytest.raises(RequestError, match=r"^calibration: Field required \(\+2 more\)$") as info:
        PackageRequest(model="m.onnx", profiles=["x86-avx2"])  # type: ignore[call-arg]
    assert info.value.field == "calibration"


def test_an_nn_module_needs_a_name() -> None:
    torch = pytest.importorskip("torch")
    module = torch.nn.Linear(4, 2)
    with pytest.raises(RequestError, match=r"^a name is required when packaging an nn\.Module$"):
        _request(model=module)
    request = _request(model=module, name="linear")
    assert request.model is module and request.model_path is None and request.is_torch_input


def test_cli_names_its_options_in_request_errors() -> None:
    assert _in_option_terms("gate_metric must be accuracy or fidelity, not 'x'", "gate_metric") == (
        "--gate must be accuracy or fidelity, not 'x'"
    )
    assert (
        _in_option_terms("jobs: Input should be a valid integer", "jobs") == "--jobs: Input should be a valid integer"
    )
    assert _in_option_terms("invalid version 'one'", "version") == "invalid version 'one'"
    assert _in_option_terms("a name is required", None) == "a name is required"


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--gate", "speed"], "error: --gate must be accuracy or fidelity, not 'speed'"),
        (["--example-shape", "1,x"], "error: --example-shape must be comma-separated integers, not '1,x'"),
        (["--name", "../evil"], "error: invalid model name '../evil'"),
        (["--release-counter", "0"], "error: invalid release counter 0"),
    ],
)
def test_cli_request_errors_are_one_line(
    mlp: DigitsExample, release_key: tuple[Path, Path], tmp_path: Path, extra: list[str], message: str
) -> None:
    _register_components()
    out = tmp_path / "out"
    args = ["package", str(mlp.model_path), "-p", "x86-avx2", "--calibration", str(mlp.calibration_path)]
    args += ["--key", str(release_key[0]), "--out", str(out), "--no-progress", *extra]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    assert result.stderr.strip().splitlines() == [result.stderr.strip()] and result.stderr.startswith(message)
    assert "Traceback" not in result.output and not out.exists()
