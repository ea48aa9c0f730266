"""The --faults language: parsing, every rejection, and the deterministic choice of devices."""

from __future__ import annotations

import pytest

from edgeota.fleet.faults import FaultKind, FaultSpecError, assign_faults, parse_faults

DEVICES = [f"dev-{i:04d}" for i in range(20)]


def test_parse_full_spec_with_defaults_and_overrides() -> None:
    faults = parse_faults(
        "network_cut:10%:after=5,duration=20s; offline:3 ; kill_mid_update:dev-0007+dev-0008:step=trial;drift:all"
    )
    assert [f.kind for f in faults] == [
        FaultKind.NETWORK_CUT,
        FaultKind.OFFLINE,
        FaultKind.KILL_MID_UPDATE,
        FaultKind.DRIFT,
    ]
    assert faults[0].target.share == pytest.approx(0.1)
    assert faults[0].num("after") == 5.0 and faults[0].num("duration") == 20.0
    assert faults[1].target.count == 3 and faults[1].num("duration") == 60.0  # default
    assert faults[2].target.device_ids == ("dev-0007", "dev-0008") and faults[2].text("step") == "trial"
    assert faults[3].target.everyone and faults[3].num("shift") == 2.0


@pytest.mark.parametrize("spec", [None, "", " ; ;"])
def test_empty_spec_means_no_faults(spec: str | None) -> None:
    assert parse_faults(spec) == []


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("meteor:10%", "unknown kind 'meteor'"),
        ("network_cut", "expected KIND:TARGET"),
        ("network_cut:", "expected KIND:TARGET"),
        ("network_cut:150%", "between 0% and 100%"),
        ("network_cut:x%", "not a percentage"),
        ("network_cut:a/b", "not a device id"),
        ("network_cut:2:speed=3", "unknown parameter 'speed'"),
        ("network_cut:2:after", "not key=value"),
        ("network_cut:2:after=soon", "not a number"),
        ("network_cut:2:after=-1", "must not be negative"),
        ("drift:2:shift=nan", "not a finite number"),
    ],
)
def test_bad_specs_are_rejected_with_the_term(spec: str, message: str) -> None:
    with pytest.raises(FaultSpecError, match=message):
        parse_faults(spec)


def test_assignment_is_deterministic_and_sized() -> None:
    faults = parse_faults("network_cut:10%;offline:3;drift:0%")
    first = assign_faults(faults, DEVICES, seed=7)
    again = assign_faults(faults, list(reversed(DEVICES)), seed=7)
    assert first == again
    cut = [d for d, fs in first.items() if any(f.kind == FaultKind.NETWORK_CUT for f in fs)]
    off = [d for d, fs in first.items() if any(f.kind == FaultKind.OFFLINE for f in fs)]
    drift = [d for d, fs in first.items() if any(f.kind == FaultKind.DRIFT for f in fs)]
    assert len(cut) == 2 and len(off) == 3 and drift == []
    other_seed = assign_faults(faults, DEVICES, seed=8)
    assert other_seed != first  # a different seed draws other devices


def test_small_share_still_hits_one_device_and_count_is_capped() -> None:
    got = assign_faults(parse_faults("offline:1%;drift:500"), DEVICES[:5])
    assert sum(1 for fs in got.values() for f in fs if f.kind == FaultKind.OFFLINE) == 1
    assert sum(1 for fs in got.values() for f in fs if f.kind == FaultKind.DRIFT) == 5


def test_named_devices_must_exist() -> None:
    assert list(assign_faults(parse_faults("kill_mid_update:dev-0003"), DEVICES)) == ["dev-0003"]
    with pytest.raises(FaultSpecError, match="unknown device 'dev-9999'"):
        assign_faults(parse_faults("kill_mid_update:dev-9999"), DEVICES)
