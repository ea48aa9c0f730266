"""The blessing loop with real parts: a real server process, the digits MLP packaged twice by the packager (the
serving 1.0.0 and a candidate 1.1.0 that is wrong on about 30% of inputs), a labelled export written as
``edgeota dataset export`` writes one, ``edgeota evaluate`` as a real process, and ``edgeota rollout create``
refused for the unblessed candidate, then allowed with an audited override (both databases).
"""

from __future__ import annotations

import json
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edgeota_contract.signing import SigningKey, write_keypair
from tests.conftest import Broker
from tests.evaluation.export_writer import write_export

from .conftest import ADMIN, Keys
from .procs import EDGEOTA, ServerProcess
from .test_server_process import publish

pytestmark = pytest.mark.integration
PROFILE = "x86-avx2"


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Release keys, the digits MLP (1.0.0) and its deliberately wrong copy (1.1.0), packaged for one profile."""
    from packager.api import package_model
    from packager.evaluate import LatencySettings
    from packager.examples.digits import build_digits_example, make_degraded_variant
    from packager.request import PackageRequest

    root = tmp_path_factory.mktemp("blessing")
    key = SigningKey.generate()
    _, pub = write_keypair(root / "keys" / "release.pem", key)
    example = build_digits_example(root / "model", arch="mlp", epochs=60)
    wrong = make_degraded_variant(example.model_path, root / "wrong.onnx", kind="wrong", share=0.3)
    bundles: dict[str, Path] = {}
    for version, model in (("1.0.0", example.model_path), ("1.1.0", wrong)):
        report = package_model(
            PackageRequest(
                model=model,
                profiles=[PROFILE],
                calibration=example.calibration_path,
                eval_data=example.eval_path,
                key=key,
                out_dir=root / f"dist-{version}",
                name="digits",
                version=version,
                recipes=["fp32"],
                latency=LatencySettings(warmup=2, rounds=2, runs_per_round=5),
                measure_memory=False,
                enforce_gates=False,
            )
        )
        result = report.results[PROFILE]
        assert result.bundle_path is not None, result
        bundles[version] = Path(result.bundle_path)
    data = np.load(example.eval_path)
    return {"keys": Keys(key, pub), "bundles": bundles, "images": data["input"], "labels": data["labels"]}


@pytest.fixture
def server(tmp_path: Path, db_url: str, built: dict[str, Any], mqtt_broker: Broker) -> Iterator[ServerProcess]:
    proc = ServerProcess(tmp_path, db_url, built["keys"], mqtt_broker)
    with proc.running():
        yield proc


def _edgeota(server: ServerProcess, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [EDGEOTA, *args, "--server", server.url, "--token", ADMIN],
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )


def test_an_unblessed_candidate_needs_an_audited_override(
    tmp_path: Path, server: ServerProcess, built: dict[str, Any]
) -> None:
    serving = publish(server, built["bundles"]["1.0.0"])["release_id"]
    candidate = publish(server, built["bundles"]["1.1.0"])["release_id"]
    for _ in range(2):
        body = {"device_id": f"dev-{uuid.uuid4().hex[:6]}", "hardware_profile": PROFILE, "labels": {"cohort": "north"}}
        server.api("POST", "/api/v1/devices", json=body)
    images, labels = built["images"], built["labels"]
    n = len(labels)
    write_export(
        tmp_path / "export",
        images,
        [None if i % 9 == 0 else int(labels[i]) for i in range(n)],  # feedback never came back for some
        cohorts=["north" if i % 2 else "south" for i in range(n)],
        profiles=[PROFILE] * n,
        release_id=serving,
    )
    key = str(built["keys"].release_pub)
    common = ["--baseline", serving, "--dataset", str(tmp_path / "export"), "--release-key", key]

    # Refusals first: each is one error line, exit 2, and stores nothing.
    out = _edgeota(server, "evaluate", "--candidate", "nosuchrelease", *common)
    assert out.returncode == 2 and out.stderr.strip().splitlines()[-1].startswith("error: GET /api/v1/releases/")
    out = _edgeota(server, "evaluate", "--candidate", candidate, *common, "--max-accuracy-drop", "2")
    assert out.returncode == 2 and "error: bad threshold max_accuracy_drop" in out.stderr
    assert server.api("GET", "/api/v1/evaluations") == []

    out = _edgeota(server, "evaluate", "--candidate", candidate, *common, "--output", "json")
    assert out.returncode == 1, out.stderr  # evaluated, not blessed
    record = json.loads(out.stdout)
    assert record["verdict"]["blessed"] is False
    unlabelled = len(range(0, n, 9))
    assert record["dataset"]["unlabelled_rows"] == unlabelled and record["metrics"][0]["rows"] == n - unlabelled
    assert {m["cohort"] for m in record["metrics"] if m["level"] == "cohort"} == {"north", "south"}
    stored = server.api("GET", f"/api/v1/evaluations?release={candidate}")
    assert [e["evaluation_id"] for e in stored] == [record["evaluation_id"]]
    assert stored[0]["record"]["verdict"] == record["verdict"]

    out = _edgeota(server, "evaluate", "--candidate", candidate, *common, "--no-upload")  # the table, kept local
    assert out.returncode == 1, out.stderr
    assert "NOT BLESSED (not uploaded)" in out.stdout and "failed: overall: accuracy dropped" in out.stdout
    assert len(server.api("GET", "/api/v1/evaluations")) == 1

    part = next((tmp_path / "export").rglob("*.parquet"))
    part.write_bytes(part.read_bytes()[:-1] + b"\0")  # the export no longer matches its digest
    out = _edgeota(server, "evaluate", "--candidate", candidate, *common)
    assert out.returncode == 2 and "does not match its sha256" in out.stderr

    create = ["rollout", "create", "--release", candidate, "--start"]
    out = _edgeota(server, *create)
    assert out.returncode == 2
    assert f"evaluation {record['evaluation_id']}" in out.stderr and "--override-blessing" in out.stderr
    assert server.api("GET", "/api/v1/rollouts") == []

    out = _edgeota(server, *create, "--override-blessing", "north cohort hotfix, accepted by the ML lead")
    assert out.returncode == 0, out.stderr
    rollout_id = out.stdout.strip()
    audit = server.api("GET", f"/api/v1/audit?action=rollout.blessing_override&entity_id={rollout_id}")
    assert [(a["actor"], a["reason"]) for a in audit] == [
        ("bootstrap-admin", "north cohort hotfix, accepted by the ML lead")
    ]
    status = _edgeota(server, "rollout", "status", rollout_id)
    assert status.returncode == 0, status.stderr
    assert "OVERRIDDEN" in status.stdout and "not_blessed" in status.stdout
