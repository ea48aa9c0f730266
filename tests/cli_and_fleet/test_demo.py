"""`edgeota demo --quick` end to end (real broker, server, packager and agents), Ctrl-C in the middle of it, and the
retraining loop (`--loop-only --approve`) with what it leaves behind checked independently."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import pytest

from .helpers import children_of, pid_running, wait_gone

DEMO = [sys.executable, "-m", "edgeota.cli", "demo", "--devices", "6", "--quick"]


def _env() -> dict[str, str]:
    return {**os.environ, "COLUMNS": "120", "TERM": "dumb"}


@pytest.mark.integration
@pytest.mark.timeout(240)
def test_quick_demo_runs_the_whole_story(tmp_path: Path) -> None:
    workdir = tmp_path / "demo"
    proc = subprocess.run(
        [*DEMO, "--workdir", str(workdir)], capture_output=True, text=True, timeout=220, env=_env(), check=False
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert "demo finished as expected" in out
    assert "completed" in out and "rolled_back (gate_failed)" in out
    assert "failure rate" in out  # the gate that fired is named
    assert "/docs" in out
    assert (workdir / "server" / "edgeota.db").is_file()
    assert len(list((workdir / "fleet").iterdir())) == 6


@pytest.mark.integration
@pytest.mark.timeout(330)
def test_quick_loop_brings_the_drifted_cohort_back_to_stable(tmp_path: Path) -> None:
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.dataset as ds

    from edgeota.fleet.load import digits_pool

    workdir = tmp_path / "loop"
    argv = [*DEMO[:4], "--quick", "--loop-only", "--approve", "--workdir", str(workdir)]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=310, env=_env(), check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "loop finished as expected" in out
    record = json.loads((workdir / "loop" / "summary.json").read_text(encoding="utf-8"))
    assert record["ok"] is True and "failed" not in record

    # The alert fired on north (not south) and named at least one of the pixels the fault shifted.
    shifted = set(record["shifted_features"])
    assert record["alerts"] and {a["scope"]["cohort"] for a in record["alerts"]} == {"north"}
    named = [f for a in record["alerts"] for f in a["features"]]
    indices = {int(m.group(1)) for f in named if (m := re.search(r"\[(\d+)\]$", f))}
    assert indices & shifted, named

    # The export exists with the alert as its trigger, pyarrow reads north's labelled rows served since the fault,
    # and the retrain script trained on exactly those rows, every one of them shifted as the fault shifts them.
    export = Path(record["export"]["path"])
    manifest = json.loads((export / "_manifest.json").read_text(encoding="utf-8"))
    assert manifest["trigger"] == f"alert:{record['alerts'][0]['id']}"
    dataset = ds.dataset(export, format="parquet", partitioning="hive")
    fault_at = datetime.fromisoformat(record["export"]["fault_at"])
    served = pa.scalar(fault_at, type=dataset.schema.field("time").type)
    table = dataset.to_table(filter=(ds.field("cohort") == "north") & (ds.field("time") >= served))
    labelled = table.num_rows - table.column("label").null_count
    assert labelled >= 300 and pc.all(pc.equal(table.column("label_source").drop_null(), "feedback")).as_py()
    assert record["retrain"]["labelled_rows"] == labelled == record["export"]["labelled_north_rows_since_fault"]
    assert Path(record["retrain"]["model_path"]).is_file()
    pixels = np.asarray(table.column("input_input").to_pylist(), dtype=np.float32)
    pool = digits_pool()
    assert (pixels[:, 31] > pool[:, 31].min()).all()  # pixel 31 is shifted up on every row (its pool minimum is 0)

    # Blessed on the second export, rolled out to north only, and north reads stable again on the new release.
    assert record["evaluation"]["blessed"] is True
    assert record["evaluation"]["overall"]["candidate_accuracy"] > record["evaluation"]["overall"]["baseline_accuracy"]
    rollout = record["rollout"]
    assert rollout["state"] == "completed" and rollout["selector"]["labels"]["cohort"] == "north"
    assert rollout["north_serving"] == {"2.0.0": 3} and rollout["south_serving"] == {"1.1.0": 3}
    assert record["verdicts"] == {
        "before the fault (1.1.0)": "stable",
        "under the fault (1.1.0)": "drift",
        "after the rollout (2.0.0)": "stable",
    }
    acc = {k: v["correct"] / v["labelled"] for k, v in record["accuracy"].items()}
    assert acc["after the rollout (2.0.0)"] > acc["under the fault (1.1.0)"]
    assert "approved by the demo" in out


def test_approve_without_the_loop_is_refused() -> None:
    proc = subprocess.run([*DEMO, "--approve"], capture_output=True, text=True, timeout=60, env=_env(), check=False)
    assert proc.returncode == 2
    assert "error: --approve grants the retraining loop's approval stage" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.integration
@pytest.mark.timeout(180)
def test_ctrl_c_mid_demo_leaves_nothing_behind(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [*DEMO, "--workdir", str(tmp_path / "demo")],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=_env(),
        start_new_session=True,
    )
    seen: list[str] = []
    children: list[int] = []
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            seen.append(line)
            if "[5/7]" in line:  # broker, server and the fleet are up; a rollout is under way
                break
        else:
            raise AssertionError("demo ended early:\n" + "".join(seen))
        children = children_of(proc.pid)
        assert len(children) >= 2  # the broker and the server
        time.sleep(1.0)
        proc.send_signal(signal.SIGINT)
        rest, _ = proc.communicate(timeout=60)
        assert proc.returncode == 130, "".join(seen) + rest
        assert "interrupted" in rest
        for pid in children:
            assert wait_gone(pid, 10), f"child {pid} outlived the demo"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for pid in children:
            if pid_running(pid):
                os.kill(pid, signal.SIGKILL)
