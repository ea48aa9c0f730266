"""Unit tests of the retraining loop's checks (edgeota.demo_loop_steps), its failure report, and the simulator's
``set_drift``. Fakes stand in for the server here; tests/cli_and_fleet/test_demo.py runs the loop for real."""

from __future__ import annotations

import io
import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from rich.console import Console

from edgeota.demo_loop import LoopOptions, run_loop
from edgeota.demo_loop_steps import FAULT, SHIFTED, LoopStepError, features_in, wait_verdict
from edgeota.fleet.faults import FaultSpecError
from edgeota.fleet.load import Drift
from edgeota.fleet.provision import DevicePlan
from edgeota.fleet.simulator import FleetConfig, FleetSimulator, SimDevice
from tests.conftest import free_port

PROFILES = ("rpi4", "rpi5")


class FakeApi:
    """Answers ``telemetry_summary`` with the given level (and values per feature) for every profile."""

    def __init__(self, levels: dict[str, str], values: int = 250) -> None:
        self.levels, self.values, self.calls = levels, values, 0

    def telemetry_summary(self, **_: Any) -> Any:
        self.calls += 1
        feature = SimpleNamespace(values=self.values)
        return SimpleNamespace(
            groups=[
                SimpleNamespace(hardware_profile=p, drift=SimpleNamespace(level=level, features=[feature]))
                for p, level in self.levels.items()
            ]
        )


def test_features_in_keeps_only_the_named_indices() -> None:
    names = ["input[30]", "input[2]", "y:class", "input[16]", "input"]
    assert features_in(names, SHIFTED) == ["input[30]", "input[16]"]
    assert features_in(names, ()) == []


def test_the_fault_moves_only_a_band_of_pixels() -> None:
    assert FAULT.active and set(FAULT.features) == set(range(16, 32))


def test_wait_verdict_returns_when_every_profile_reads_it() -> None:
    api: Any = FakeApi({"rpi4": "stable", "rpi5": "stable"})
    assert wait_verdict(api, "1.1.0", PROFILES, "stable", timeout=5) == "stable"
    assert api.calls == 1


def test_wait_verdict_drift_on_one_profile_is_drift() -> None:
    api: Any = FakeApi({"rpi4": "stable", "rpi5": "drift"})
    assert wait_verdict(api, "1.1.0", PROFILES, "drift", timeout=5) == "drift"


@pytest.mark.parametrize(
    "levels",
    [
        {"rpi4": "stable", "rpi5": "watch"},  # watch is not stable
        {"rpi4": "stable", "rpi5": "insufficient"},  # a profile without a verdict is not stable
        {"rpi4": "stable"},  # a profile without telemetry at all
    ],
)
def test_wait_verdict_times_out_saying_what_it_saw(levels: dict[str, str]) -> None:
    api: Any = FakeApi(levels)
    with pytest.raises(LoopStepError, match=r"did not read stable within .*rpi4: stable \(n=250\)"):
        wait_verdict(api, "2.0.0", PROFILES, "stable", timeout=0.01)


def test_the_loop_reports_the_failed_step_and_writes_it_down(tmp_path: Path) -> None:
    # No server listens on the port: the first call fails, and the loop says so instead of raising.
    stack: Any = SimpleNamespace(server_url=f"http://127.0.0.1:{free_port()}", admin_token="t", workdir=tmp_path)
    say: Any = SimpleNamespace(n=0, total=10, step=lambda text: 0.0, done=lambda started, text: None)
    out = io.StringIO()
    assert run_loop(LoopOptions(PROFILES, quick=True), stack, say, Console(file=out, width=200)) is False
    assert "failed" in out.getvalue() and "the loop did not go as expected" in out.getvalue()
    record = json.loads((tmp_path / "loop" / "summary.json").read_text(encoding="utf-8"))
    assert record["ok"] is False and "cannot reach" in record["failed"]["error"]


def _sim(tmp_path: Path) -> FleetSimulator:
    config = FleetConfig(
        devices=2, profiles=PROFILES, server_url="http://127.0.0.1:1", admin_token="t", workdir=tmp_path
    )
    sim = FleetSimulator(config)
    for i, profile in enumerate(PROFILES):
        plan = DevicePlan(f"sim-{i:04d}", profile, {})
        sim.devices.append(SimDevice(plan, tmp_path / plan.device_id, tmp_path / "agent.toml", []))
    return sim


def test_set_drift_moves_only_the_named_devices(tmp_path: Path) -> None:
    sim = _sim(tmp_path)
    drift = Drift(1.5, features=(3,))
    assert sim.set_drift(drift, ["sim-0001"]) == ["sim-0001"]
    assert [d.drift for d in sim.devices] == [None, drift]
    assert sim.set_drift(None) == ["sim-0000", "sim-0001"]
    assert [d.drift for d in sim.devices] == [None, None]


def test_set_drift_refuses_an_unknown_device_and_changes_nothing(tmp_path: Path) -> None:
    sim = _sim(tmp_path)
    with pytest.raises(FaultSpecError, match="unknown device 'sim-0009'"):
        sim.set_drift(Drift(2.0), ["sim-0000", "sim-0009"])
    assert [d.drift for d in sim.devices] == [None, None]
