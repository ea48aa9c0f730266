"""Hardware profiles: the shipped set validates; schema breaks and unknown ids are one-line errors."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from edgeota.cli import _register_components, app
from packager.errors import ProfileError
from packager.profiles import default_profiles_dir, list_profile_ids, load_profile, load_profiles

EXPECTED = {"rpi4", "rpi5", "jetson-orin-nano", "x86-avx512-vnni", "x86-avx2", "qcom-qnn-npu", "imx8mp-npu"}


def test_shipped_profiles_validate() -> None:
    ids = set(list_profile_ids())
    assert ids >= EXPECTED
    for pid in ids:
        p = load_profile(pid)
        assert p.id == pid
        assert p.ladder, pid
        assert all(r.precision in p.allowed_precisions for r in p.ladder)
        assert p.latency.budget_ms > 0 and p.max_bundle_bytes > 0 and p.ram_budget_bytes > 0
        assert p.opset.min <= p.opset.max


def test_npu_profiles_constrain_shapes_and_control_flow() -> None:
    qnn = load_profile("qcom-qnn-npu")
    assert qnn.shapes.static_only and not qnn.ops.allow_control_flow
    assert {r.precision for r in qnn.ladder} <= {"uint8", "uint16"}
    assert all(r.quantization.format == "qdq" for r in qnn.ladder)
    assert qnn.primary_ep.name == "QNNExecutionProvider"


def test_unknown_profile(tmp_path: Path) -> None:
    with pytest.raises(ProfileError, match="unknown hardware profile 'nope'"):
        load_profile("nope")
    with pytest.raises(ProfileError, match="invalid profile id"):
        load_profile("../etc/passwd")
    with pytest.raises(ProfileError, match="given twice"):
        load_profiles(["rpi4", "rpi4"])


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"latency__budget_ms": -1}, "latency.budget_ms"),
        ({"colour": "red"}, "colour: Extra inputs are not permitted"),
        ({"recipes": ["int8-qdq", "magic"]}, "unknown recipe 'magic'"),
        ({"recipes": ["fp16"]}, "precision fp16, not in allowed_precisions"),
        ({"opset": {"min": 20, "max": 13}}, "opset.min 20 is above opset.max 13"),
        ({"id": "other"}, "differs from the file name"),
    ],
)
def test_schema_breaks_are_one_line_errors(make_profile, changes: dict[str, object], message: str) -> None:  # type: ignore[no-untyped-def]
    folder = make_profile("broken", **changes)
    with pytest.raises(ProfileError) as info:
        load_profile("broken", folder)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_invalid_yaml(tmp_path: Path) -> None:
    (tmp_path / "bad.yaml").write_text("name: [unclosed\n")
    with pytest.raises(ProfileError, match="not valid YAML"):
        load_profile("bad", tmp_path)
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    with pytest.raises(ProfileError, match="expected a mapping"):
        load_profile("list", tmp_path)


def test_cli_profiles_list_and_show() -> None:
    _register_components()
    runner = CliRunner()
    result = runner.invoke(app, ["profiles", "list", "--json"])
    assert result.exit_code == 0, result.output
    assert {p["id"] for p in __import__("json").loads(result.stdout)} >= EXPECTED
    result = runner.invoke(app, ["profiles", "show", "rpi5"])
    assert result.exit_code == 0
    assert "Cortex-A76" in result.stdout and "int8-qdq" in result.stdout
    result = runner.invoke(app, ["profiles", "show", "nope"])
    assert result.exit_code == 2
    assert result.stderr.startswith("error: unknown hardware profile 'nope'")


def test_default_dir_is_the_repository_folder() -> None:
    assert default_profiles_dir().name == "hardware_profiles"
