"""Per-model gates: a model's own latency budget and quality thresholds over every profile's.

From the command line (`--latency-budget-ms`, `--max-accuracy-drop`, `--min-top1-agreement`,
`--min-cosine`, `--min-sqnr-db`) or a model config file (`--model-config`), recorded in the
manifest, the model card and the report.
"""

from __future__ import annotations

import json
import tarfile
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import FAST
from typer.testing import CliRunner, Result

from edgeota.cli import _register_components, app
from edgeota_contract.bundle import verify_bundle
from edgeota_contract.manifest import MODEL_CARD_FILE, GateOverrides
from edgeota_contract.signing import SigningKey, TrustedKeys
from packager.api import package_model
from packager.errors import PackagerError
from packager.examples.digits import DigitsExample
from packager.model_config import ModelConfig, load_model_config, merge_overrides, parse_model_config
from packager.profiles import load_profile, with_gate_overrides
from packager.request import PackageRequest, RequestError

_register_components()
runner = CliRunner()
BUNDLE = "digits-1.0.0-tight.bundle.tar"


@pytest.fixture
def tight(make_profile: Callable[..., Path]) -> Path:
    """A profile folder whose `tight` profile has a device budget no model can meet (0.000001 ms)."""
    return make_profile("tight", latency__budget_ms=1e-6)


def _package(mlp: DigitsExample, key: Path, out: Path, profiles_dir: Path, *extra: str) -> Result:
    args = [
        "package",
        str(mlp.model_path),
        "-p",
        "tight",
        "--profiles-dir",
        str(profiles_dir),
        "--calibration",
        str(mlp.calibration_path),
        "--key",
        str(key),
        "--out",
        str(out),
        "--name",
        "digits",
        "--version",
        "1.0.0",
        "--recipe",
        "fp32",
        "--no-progress",
        *extra,
    ]
    return runner.invoke(app, args)


def _card(bundle: Path) -> str:
    with tarfile.open(bundle) as tar:
        member = tar.extractfile(MODEL_CARD_FILE)
        assert member is not None
        return member.read().decode()


def test_latency_budget_override_ships_what_the_profile_refuses(
    mlp: DigitsExample, release_key: tuple[Path, Path], tmp_path: Path, tight: Path
) -> None:
    priv, pub = release_key
    refused = _package(mlp, priv, tmp_path / "a", tight)
    assert refused.exit_code == 1, refused.output
    assert "latency" in refused.stderr and "budget 1e-06 ms" in refused.stderr
    assert not (tmp_path / "a" / BUNDLE).exists()
    assert json.loads((tmp_path / "a" / "report.json").read_text())["results"]["tight"]["gate_overrides"] == {}

    out = tmp_path / "b"
    accepted = _package(mlp, priv, out, tight, "--latency-budget-ms", "60000")
    assert accepted.exit_code == 0, accepted.output
    assert "tight: this model's gate overrides: latency_budget_ms 60000" in accepted.stdout
    manifest = verify_bundle(out / BUNDLE, TrustedKeys.from_files([pub]), expected_profile="tight").manifest
    assert manifest.gate_overrides == GateOverrides(latency_budget_ms=60000)
    assert manifest.metrics["latency_budget_ms"] == 60000  # the budget the agent checks on the device
    report = json.loads((out / "report.json").read_text())
    assert report["results"]["tight"]["gate_overrides"] == {"latency_budget_ms": 60000}
    latency = next(g for g in report["results"]["tight"]["gates"] if g["name"] == "latency")
    assert latency["ok"] and latency["threshold"] == 60000
    assert "gate overrides (latency_budget_ms 60000)" in _card(out / BUNDLE)
    inspected = runner.invoke(app, ["bundle", "inspect", str(out / BUNDLE)], terminal_width=200)
    assert inspected.exit_code == 0
    shown = " ".join(inspected.stdout.split())  # rich folds long lines
    assert "gate overrides (this model's thresholds over the profile's): latency_budget_ms 60000" in shown


def test_model_config_file_and_options_win_over_it(
    mlp: DigitsExample, release_key: tuple[Path, Path], tmp_path: Path, tight: Path
) -> None:
    config = tmp_path / "model.yaml"
    config.write_text("gates:\n  latency_budget_ms: 60000\n  min_cosine: 0.5\n")
    out = tmp_path / "out"
    result = _package(mlp, release_key[0], out, tight, "--model-config", str(config), "--min-cosine", "0.9")
    assert result.exit_code == 0, result.output
    manifest = verify_bundle(out / BUNDLE, TrustedKeys.from_files([release_key[1]])).manifest
    assert manifest.gate_overrides == GateOverrides(latency_budget_ms=60000, min_cosine=0.9)


def test_model_config_per_profile_section(
    mlp: DigitsExample, release_key: tuple[Path, Path], tmp_path: Path, make_profile: Callable[..., Path]
) -> None:
    make_profile("tight", latency__budget_ms=1e-6)
    folder = make_profile("other", latency__budget_ms=1e-6)
    config = tmp_path / "model.yaml"
    config.write_text(
        "gates:\n  min_cosine: 0.5\n"
        "profiles:\n  tight:\n    gates:\n      latency_budget_ms: 60000\n      min_cosine: 0.6\n"
        "  not-packaged:\n    gates:\n      latency_budget_ms: 1\n"
    )
    out = tmp_path / "out"
    result = _package(mlp, release_key[0], out, folder, "-p", "other", "--model-config", str(config))
    assert result.exit_code == 1, result.output  # `other` has no budget of its own in the file: refused
    assert "latency" in result.stderr
    report = json.loads((out / "report.json").read_text())["results"]
    assert report["tight"]["ok"] and not report["other"]["ok"]
    assert report["tight"]["gate_overrides"] == {"latency_budget_ms": 60000, "min_cosine": 0.6}
    assert report["other"]["gate_overrides"] == {"min_cosine": 0.5}
    manifest = verify_bundle(out / BUNDLE, TrustedKeys.from_files([release_key[1]])).manifest
    assert manifest.gate_overrides == GateOverrides(latency_budget_ms=60000, min_cosine=0.6)
    # An option wins over the profile's own entry too.
    again = _package(mlp, release_key[0], tmp_path / "b", folder, "--model-config", str(config), "--min-cosine", "0.9")
    assert again.exit_code == 0, again.output
    manifest = verify_bundle(tmp_path / "b" / BUNDLE, TrustedKeys.from_files([release_key[1]])).manifest
    assert manifest.gate_overrides == GateOverrides(latency_budget_ms=60000, min_cosine=0.9)


def test_quality_overrides_are_applied(
    mlp: DigitsExample, release_key: tuple[Path, Path], tmp_path: Path, tight: Path
) -> None:
    # fp32 against itself has an SQNR of 200 dB (exact): a 250 dB floor refuses it, the profile's 20 dB does not.
    refused = _package(
        mlp, release_key[0], tmp_path / "a", tight, "--gate", "fidelity", "--latency-budget-ms", "60000",
        "--min-sqnr-db", "250",
    )  # fmt: skip
    assert refused.exit_code == 1, refused.output
    assert "fidelity_sqnr" in refused.stderr
    report = json.loads((tmp_path / "a" / "report.json").read_text())
    sqnr = next(g for g in report["results"]["tight"]["gates"] if g["name"] == "fidelity_sqnr")
    assert sqnr["threshold"] == 250 and not sqnr["ok"]
    accepted = _package(
        mlp, release_key[0], tmp_path / "c", tight, "--gate", "fidelity", "--latency-budget-ms", "60000"
    )
    assert accepted.exit_code == 0, accepted.output
    # A labelled accuracy gate with a negative tolerance cannot exist: refused as one line, nothing written.
    bad = _package(mlp, release_key[0], tmp_path / "b", tight, "--max-accuracy-drop", "-0.1")
    assert bad.exit_code == 2 and bad.stderr.startswith("error: --max-accuracy-drop: input should be greater")
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "does not exist"),
        ("gates:\n  min_cosine: 0.9\n bad: [\n", "is not valid YAML (line 3)"),
        ("- 1\n", "expected a mapping with 'gates' or 'profiles'"),
        ("gate:\n  latency_budget_ms: 4\n", "unknown key 'gate' (known: gates, profiles, output_kinds)"),
        ("gates:\n  latency_ms: 4\n", "gates.latency_ms: unknown threshold (known: latency_budget_ms,"),
        ("gates:\n  min_cosine: 3\n", "gates.min_cosine: input should be less than or equal to 1"),
        ("gates: 5\n", "gates must be a mapping of thresholds"),
        ("profiles: [rpi4]\n", "'profiles' must map profile ids"),
        ("profiles:\n  ../x:\n    gates: {}\n", "invalid profile id '../x'"),
        ("profiles:\n  rpi4:\n    latency_budget_ms: 4\n", "profiles.rpi4: unknown key 'latency_budget_ms'"),
        (
            "profiles:\n  rpi4:\n    gates:\n      min_sqnr_db: .nan\n",
            "profiles.rpi4.gates.min_sqnr_db: input should be",
        ),
    ],
)
def test_bad_model_config_is_one_line_and_nothing_written(
    mlp: DigitsExample, release_key: tuple[Path, Path], tmp_path: Path, tight: Path, content: str | None, message: str
) -> None:
    config = tmp_path / "model.yaml"
    if content is not None:
        config.write_text(content)
    out = tmp_path / "out"
    result = _package(mlp, release_key[0], out, tight, "--model-config", str(config))
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: model config {config}"), result.stderr
    assert message in lines[0]
    assert not out.exists()


def test_python_api_takes_overrides_in_the_request(mlp: DigitsExample, tmp_path: Path, tight: Path) -> None:
    key = SigningKey.generate()
    fields = {
        "model": mlp.model_path,
        "profiles": ["tight"],
        "profiles_dir": tight,
        "calibration": mlp.calibration_path,
        "key": key,
        "out_dir": tmp_path,
        "recipes": ["fp32"],
        "latency": FAST,
        "measure_memory": False,
    }
    report = package_model(
        PackageRequest(**fields, gate_overrides={"latency_budget_ms": 60000, "max_accuracy_drop": 0.05})
    )
    assert report.ok, report.results["tight"].error
    assert report.results["tight"].gate_overrides == {"latency_budget_ms": 60000, "max_accuracy_drop": 0.05}
    manifest = verify_bundle(report.results["tight"].bundle_path, TrustedKeys([key.public_key])).manifest  # type: ignore[arg-type]
    assert manifest.gate_overrides is not None and manifest.gate_overrides.max_accuracy_drop == 0.05
    with pytest.raises(RequestError, match="gate_overrides: min_cosine: input should be greater than or equal to -1"):
        PackageRequest(**fields, gate_overrides={"min_cosine": -2})


def test_with_gate_overrides_replaces_only_what_is_given() -> None:
    profile = load_profile("rpi4")
    assert with_gate_overrides(profile, None) is profile
    changed = with_gate_overrides(profile, GateOverrides(latency_budget_ms=12.5, min_sqnr_db=10))
    assert changed.latency.budget_ms == 12.5 and changed.accuracy.min_sqnr_db == 10
    assert changed.latency.host_scale == profile.latency.host_scale
    assert changed.accuracy.min_cosine == profile.accuracy.min_cosine
    assert changed.accuracy.max_accuracy_drop == profile.accuracy.max_accuracy_drop
    assert profile.latency.budget_ms == 50  # the loaded profile itself is untouched


def test_model_config_parsing(tmp_path: Path) -> None:
    assert parse_model_config(None) == ModelConfig()
    assert parse_model_config({"gates": {}, "profiles": {"rpi4": None, "rpi5": {"gates": {}}}}) == ModelConfig()
    parsed = parse_model_config(
        {"gates": {"min_top1_agreement": 0.9}, "profiles": {"rpi4": {"gates": {"min_cosine": 0}}}}
    )
    assert parsed == ModelConfig(GateOverrides(min_top1_agreement=0.9), {"rpi4": GateOverrides(min_cosine=0)})
    path = tmp_path / "m.json"
    path.write_text('{"gates": {"latency_budget_ms": 8}}')  # JSON is YAML
    assert load_model_config(path) == ModelConfig(GateOverrides(latency_budget_ms=8))
    request = PackageRequest(
        model="m.onnx",
        profiles=["rpi4", "rpi5"],
        calibration="c.npz",
        key="k.pem",
        out_dir="o",
        gate_overrides=parsed.gates,
        profile_gate_overrides=parsed.profiles,
    )
    assert request.gates_for("rpi4") == GateOverrides(min_top1_agreement=0.9, min_cosine=0)
    assert request.gates_for("rpi5") == GateOverrides(min_top1_agreement=0.9)
    assert merge_overrides(None) is None
    assert merge_overrides(GateOverrides(min_cosine=0.5), min_cosine=0.9, min_sqnr_db=None) == GateOverrides(
        min_cosine=0.9
    )
    with pytest.raises(RequestError) as info:
        merge_overrides(None, latency_budget_ms=0)
    assert info.value.field == "latency_budget_ms"
    with pytest.raises(PackagerError, match="unknown key"):
        parse_model_config({"name": "x"})
