"""The real-agent scale bench's own logic: what counts as committed on a device, the watcher over a fleet's state
files, the goals verdicts and appending to the list of runs (the long run itself is a benchmark, not a test)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from bench.scale_agents import CommitWatcher, append_run, committed_version, goals


def _state(version: str | None, deployment: dict[str, Any] | None = None) -> dict[str, Any]:
    slot = {"manifest": {"version": version, "model_name": "digits"}, "bundle_sha256": "0" * 64} if version else None
    return {"active_slot": "a" if version else None, "slots": {"a": slot, "b": None}, "deployment": deployment}


def _write(path: Path, state: dict[str, Any]) -> None:
    """Like the agent: a new file renamed over the old one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name("state.json.tmp")
    tmp.write_text(json.dumps(state), encoding="utf-8")
    os.replace(tmp, path)


def test_committed_version_only_without_a_deployment_in_progress() -> None:
    assert committed_version(_state("1.0.0")) == "1.0.0"
    assert committed_version(_state("1.0.0", deployment={"step": "trial"})) is None
    assert committed_version(_state(None)) is None
    assert committed_version({"active_slot": "b", "slots": {"a": None, "b": None}, "deployment": None}) is None
    assert committed_version({}) is None


def test_watcher_counts_devices_as_their_state_files_change(tmp_path: Path) -> None:
    files = [tmp_path / f"shard-{i % 2}" / f"b{i % 2}-{i}" / "state" / "state.json" for i in range(4)]
    for path in files:
        _write(path, _state("1.0.0"))
    watcher = CommitWatcher(tmp_path, "1.1.0", devices=4)
    assert watcher.count() == 0
    _write(files[0], _state("1.1.0", deployment={"step": "trial"}))  # serving it, not yet committed
    _write(files[1], _state("1.1.0"))
    assert watcher.count() == 1
    _write(files[0], _state("1.1.0"))
    _write(files[2], _state("1.1.0"))
    assert watcher.count() == 3
    (tmp_path / "shard-1" / "b1-3" / "state" / "state.json").write_text("{not json", encoding="utf-8")
    assert watcher.count() == 3  # a file caught mid-write by a foreign writer is skipped, not fatal


def test_watcher_thread_reports_when_all_committed_or_none(tmp_path: Path) -> None:
    path = tmp_path / "shard-0" / "b0-0" / "state" / "state.json"
    _write(path, _state("1.0.0"))
    assert CommitWatcher(tmp_path, "1.1.0", devices=1, interval=0.05).start().result(0.3) is None
    watcher = CommitWatcher(tmp_path, "1.1.0", devices=1, interval=0.05).start()
    _write(path, _state("1.1.0"))
    took = watcher.result(5.0)
    assert took is not None and 0 <= took < 5.0


@pytest.mark.parametrize(
    ("devices", "seconds", "verdict"),
    [(1000, 59.9, "met"), (1000, 60.1, "missed"), (1200, None, "not reached"), (200, 30.0, "n/a")],
)
def test_goals_for_real_agents(devices: int, seconds: float | None, verdict: str) -> None:
    entry = {"devices": devices, "seconds_to_all_committed": seconds}
    entry |= {"telemetry_sent": 10, "telemetry_stored": 10, "telemetry_doubled": 0}
    assert goals(entry)["real_agents_1000_committed_within_60s"].startswith(verdict)
    assert goals(entry)["telemetry_sent_equals_stored"] == "met"


def test_goals_telemetry_missed_on_loss_or_doubles_and_not_reached_without_a_count() -> None:
    base = {"devices": 50, "telemetry_sent": 10}
    assert goals(base | {"telemetry_stored": 9, "telemetry_doubled": 0})["telemetry_sent_equals_stored"] == "missed"
    assert goals(base | {"telemetry_stored": 10, "telemetry_doubled": 1})["telemetry_sent_equals_stored"] == "missed"
    assert goals({"devices": 50})["telemetry_sent_equals_stored"] == "not reached"


def test_append_run_keeps_existing_runs(tmp_path: Path) -> None:
    target = tmp_path / "scale.json"
    append_run(target, {"devices": 1, "emulated": True})
    append_run(target, {"devices": 2, "emulated": False})
    assert [r["devices"] for r in json.loads(target.read_text(encoding="utf-8"))] == [1, 2]
    old = tmp_path / "old.json"
    old.write_text(json.dumps({"runs": [{"devices": 3}]}), encoding="utf-8")
    assert [r["devices"] for r in append_run(old, {"devices": 4})] == [3, 4]
    bad = tmp_path / "bad.json"
    bad.write_text("7", encoding="utf-8")
    with pytest.raises(ValueError, match="not a JSON list of runs"):
        append_run(bad, {"devices": 5})
