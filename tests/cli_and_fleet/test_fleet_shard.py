"""The headless shard's configuration file, and the simulator's check of its input source."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from edgeota.fleet.shard import load_config, main
from edgeota.fleet.simulator import FleetConfig, FleetConfigError, FleetSimulator
from edgeota_contract.errors import EdgeotaError


def _write(tmp_path: Path, **extra: object) -> Path:
    data = {
        "devices": 3,
        "profiles": ["x86-avx2"],
        "server_url": "http://127.0.0.1:1",
        "admin_token": "t",
        "workdir": str(tmp_path / "fleet"),
        "status_file": str(tmp_path / "status.json"),
        **extra,
    }
    path = tmp_path / "shard.json"
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def test_shard_config_loads_with_the_digits_input_source(tmp_path: Path) -> None:
    config, status = load_config(_write(tmp_path, input_source="digits"))
    assert config.input_source == "digits" and config.workdir == tmp_path / "fleet"
    assert status == tmp_path / "status.json"
    assert load_config(_write(tmp_path))[0].input_source == "test_vectors"  # the default


@pytest.mark.parametrize("extra", [{"input_source": "webcam"}, {"no_such_field": 1}])
def test_shard_rejects_a_bad_configuration_with_one_line(
    tmp_path: Path, extra: dict[str, object], capsys: pytest.CaptureFixture[str]
) -> None:
    path = _write(tmp_path, **extra)
    with pytest.raises(EdgeotaError, match="bad shard configuration"):
        load_config(path)
    assert main([str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: bad shard configuration") and err.count("\n") == 1


def test_simulator_refuses_an_unknown_input_source(tmp_path: Path) -> None:
    config = FleetConfig(
        devices=1, profiles=["x86-avx2"], server_url="http://127.0.0.1:1", admin_token="t", workdir=tmp_path
    )
    FleetSimulator(config)  # the default is fine
    config.input_source = "webcam"  # type: ignore[assignment]
    with pytest.raises(FleetConfigError, match="unknown input source 'webcam'"):
        FleetSimulator(config)
