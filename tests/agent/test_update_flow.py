"""The update path in-process against a real HTTP server: happy path, dedupe and every refusal."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from device_agent.agent import Agent
from device_agent.serving.runtime import ModelError, NoModelError, SessionCache
from device_agent.settings import AgentConfig
from device_agent.update.machine import Step
from edgeota_contract.messages import Ack, ShadowStop
from edgeota_contract.signing import SigningKey
from edgeota_contract.states import DeploymentState, ReasonCode
from tests.agent.bundles import sample_inputs
from tests.agent.conftest import BundleRef, Keys, assignment, signed, write_config
from tests.agent.http_server import BundleServer

OK = DeploymentState.COMMITTED

HAPPY = ["downloading", "downloaded", "verifying", "installing", "trial", "committed"]


@pytest.fixture
def make_agent(tmp_path: Path, keys: Keys, server: BundleServer) -> Iterator[Callable[..., Agent]]:
    agents: list[Agent] = []
    cache = SessionCache()

    def make(free_space: Callable[[Path], int] | None = None, defer_update: Any = None, **agent_settings: Any) -> Agent:
        cfg = AgentConfig.load(write_config(tmp_path / "dev", keys, server.url, **agent_settings))
        kwargs: dict[str, Any] = {"session_cache": cache, "connect": False}
        if free_space is not None:
            kwargs["free_space"] = free_space
        if defer_update is not None:
            kwargs["defer_update"] = defer_update
        agent = Agent(cfg, **kwargs)
        agent.start()
        agents.append(agent)
        return agent

    yield make
    for agent in agents:
        agent.stop()


def states(agent: Agent, deployment_id: str = "dep-1") -> list[str]:
    return [r["state"] for r in agent.state.outbox if r["deployment_id"] == deployment_id]


def last(agent: Agent, deployment_id: str = "dep-1") -> dict[str, Any]:
    return [r for r in agent.state.outbox if r["deployment_id"] == deployment_id][-1]


def install(agent: Agent, keys: Keys, bundle: BundleRef, key: SigningKey | None = None, **kw: Any) -> None:
    agent.handle_command(signed(assignment(bundle, **kw), key or keys.server))
    assert agent.wait_idle(30)


def test_first_install_then_upgrade(
    make_agent: Callable[..., Agent], keys: Keys, publish_bundle: Callable[..., BundleRef], server: BundleServer
) -> None:
    agent = make_agent()
    with pytest.raises(NoModelError):
        agent.predict({"x": sample_inputs()})
    v1 = publish_bundle("1.0.0")
    install(agent, keys, v1)
    assert states(agent) == HAPPY
    assert agent.state.active() is not None and agent.state.active().version == "1.0.0"  # type: ignore[union-attr]
    assert agent.state.committed_counters == {"digits": 1_000_000}
    out = agent.predict({"x": sample_inputs()})
    assert out["y"].shape == (4, 10) and np.allclose(out["y"].sum(axis=1), 1, atol=1e-5)
    assert server.requests[-1]["authorization"] == "Bearer device-token-0123456789"
    first_slot = agent.state.active_slot
    v2 = publish_bundle("1.1.0", seed=3)
    install(agent, keys, v2, deployment_id="dep-2")
    assert states(agent, "dep-2") == HAPPY
    assert agent.state.active_slot != first_slot
    assert agent.runtime.current is not None and agent.runtime.current.manifest.version == "1.1.0"
    # both slots hold verified bundles; the download folder holds only the two kept archives
    assert all(agent.state.slots.values())
    assert {p.name for p in (agent.state_dir / "download").iterdir()} == {f"{v1.sha256}.bundle", f"{v2.sha256}.bundle"}


def test_finished_deployment_is_rereported_not_reinstalled(
    make_agent: Callable[..., Agent], keys: Keys, publish_bundle: Callable[..., BundleRef], server: BundleServer
) -> None:
    agent = make_agent()
    v1 = publish_bundle("1.0.0")
    install(agent, keys, v1)
    fetched = len(server.requests)
    # the server re-sends the same deployment with a fresh assignment id, nonce and signature
    install(agent, keys, v1)
    assert len(server.requests) == fetched
    assert states(agent) == [*HAPPY, "committed"]
    # an exact replay of a used command (same nonce) for a new deployment id is refused
    a = assignment(v1, deployment_id="dep-9")
    agent.handle_command(signed(a, keys.server))
    agent.wait_idle(10)
    agent.handle_command(signed(a.model_copy(update={"deployment_id": "dep-10"}), keys.server))
    assert last(agent, "dep-10")["reason"] == ReasonCode.ASSIGNMENT_REPLAYED


def test_ack_removes_reports(
    make_agent: Callable[..., Agent], keys: Keys, publish_bundle: Callable[..., BundleRef]
) -> None:
    agent = make_agent()
    install(agent, keys, publish_bundle("1.0.0"))
    ids = [r["msg_id"] for r in agent.state.outbox]
    now = datetime.now(UTC)
    ack = Ack(device_id="dev-1", msg_ids=ids[:2], issued_at=now, expires_at=now + timedelta(minutes=5))
    agent.handle_command(signed(ack, keys.server))
    assert [r["msg_id"] for r in agent.state.outbox] == ids[2:]
    # an ack signed by an unknown key changes nothing
    forged = ack.model_copy(update={"msg_ids": ids})
    agent.handle_command(signed(forged, SigningKey.generate()))
    assert [r["msg_id"] for r in agent.state.outbox] == ids[2:]
    assert agent.rejected_commands == 1


def doctor(archive: bytes, case: str) -> bytes:
    """Rewrite a bundle archive: flip a byte inside model.onnx, or add a symlink / '..' entry."""
    out = io.BytesIO()
    with (
        tarfile.open(fileobj=io.BytesIO(archive), mode="r:") as src,
        tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as dst,
    ):
        for member in src.getmembers():
            data = src.extractfile(member).read()  # type: ignore[union-attr]
            if case == "tampered_file_signed_digest" and member.name == "model.onnx":
                data = data[:-10] + bytes([data[-10] ^ 0xFF]) + data[-9:]
            dst.addfile(member, io.BytesIO(data))
            if member.name == "manifest.sig" and case != "tampered_file_signed_digest":
                evil = tarfile.TarInfo("model.onnx" if case == "symlink_entry" else "../escape.txt")
                if case == "symlink_entry":
                    evil.type = tarfile.SYMTYPE
                    evil.linkname = "/etc/passwd"
                    dst.addfile(evil)
                else:
                    evil.size = 4
                    dst.addfile(evil, io.BytesIO(b"evil"))
    return out.getvalue()


def _refused(
    agent: Agent, reason: ReasonCode, deployment_id: str = "dep-1", state: DeploymentState = DeploymentState.FAILED
) -> None:
    report = last(agent, deployment_id)
    assert report["state"] == state, report
    assert report["reason"] == reason, report


@pytest.mark.parametrize(
    ("case", "reason"),
    [
        ("wrong_release_key", ReasonCode.UNKNOWN_KEY),
        ("tampered", ReasonCode.DIGEST_MISMATCH),
        ("wrong_profile_assignment", ReasonCode.WRONG_PROFILE),
        ("wrong_profile_bundle", ReasonCode.WRONG_PROFILE),
        ("broken_model", ReasonCode.LOAD_FAILED),
        ("io_mismatch", ReasonCode.IO_SIGNATURE_MISMATCH),
        ("wrong_vectors", ReasonCode.SMOKE_TEST_FAILED),
        ("endless", ReasonCode.DOWNLOAD_TOO_LARGE),
        ("not_found", ReasonCode.DOWNLOAD_FAILED),
        ("manifest_disagrees", ReasonCode.MANIFEST_INVALID),
        ("tampered_file_signed_digest", ReasonCode.DIGEST_MISMATCH),
        ("symlink_entry", ReasonCode.UNSAFE_ARCHIVE),
        ("dotdot_entry", ReasonCode.UNSAFE_ARCHIVE),
    ],
)
def test_bad_update_refused_old_model_keeps_serving(
    case: str,
    reason: ReasonCode,
    make_agent: Callable[..., Agent],
    keys: Keys,
    publish_bundle: Callable[..., BundleRef],
    server: BundleServer,
) -> None:
    agent = make_agent()
    install(agent, keys, publish_bundle("1.0.0"), deployment_id="dep-0")
    before = agent.state.active_slot
    extra: dict[str, Any] = {}
    if case == "wrong_release_key":
        bad = publish_bundle("1.1.0", key=SigningKey.generate())
    elif case == "tampered":
        bad = publish_bundle("1.1.0")
        data = bytearray(server.files[bad.url].data)
        data[-2000] ^= 0xFF
        server.files[bad.url].data = bytes(data)
    elif case == "wrong_profile_assignment":
        bad = publish_bundle("1.1.0")
        extra["hardware_profile"] = "arm64-pi4"
    elif case == "wrong_profile_bundle":
        bad = publish_bundle("1.1.0", profile="arm64-pi4")
    elif case == "broken_model":
        bad = publish_bundle("1.1.0", variant="broken")
    elif case == "io_mismatch":
        bad = publish_bundle("1.1.0", inputs=[{"name": "pixels", "dtype": "float32", "shape": [None, 64]}])
    elif case == "wrong_vectors":
        bad = publish_bundle("1.1.0", variant="wrong_vectors")
    elif case == "endless":
        bad = publish_bundle("1.1.0", mode="endless")
    elif case == "not_found":
        bad = publish_bundle("1.1.0")
        extra["bundle_url"] = "/api/v1/artifacts/missing"
    elif case in ("tampered_file_signed_digest", "symlink_entry", "dotdot_entry"):
        # the server (or an attacker holding the server key) names the digest of a doctored archive
        bad = publish_bundle("1.1.0")
        data = doctor(server.files[bad.url].data, case)
        server.files[bad.url].data = data
        extra["bundle_sha256"] = hashlib.sha256(data).hexdigest()
        extra["bundle_size"] = len(data)
    else:
        bad = publish_bundle("1.1.0")
        extra["version"] = "1.2.0"
        extra["release_counter"] = 1_002_000
    install(agent, keys, bad, **extra)
    _refused(agent, reason)
    assert agent.state.active_slot == before
    assert agent.runtime.current is not None and agent.runtime.current.manifest.version == "1.0.0"
    assert agent.predict({"x": sample_inputs()})["y"].shape == (4, 10)
    inactive = agent.state.inactive_slot()
    assert agent.state.slots[inactive] is None
    assert not (agent.state_dir / "slots" / inactive).exists()
    kept = {f"{sha}.bundle" for sha in agent.state.committed_bundles}  # only the committed 1.0.0 is kept
    assert {p.name for p in (agent.state_dir / "download").iterdir()} == kept


def test_older_release_refused_unless_signed_rollback(
    make_agent: Callable[..., Agent], keys: Keys, publish_bundle: Callable[..., BundleRef]
) -> None:
    agent = make_agent()
    v1 = publish_bundle("1.0.0")
    install(agent, keys, publish_bundle("1.1.0"), deployment_id="dep-0")
    install(agent, keys, v1)
    _refused(agent, ReasonCode.RELEASE_COUNTER_ROLLBACK)
    install(agent, keys, v1, deployment_id="dep-2", mode="rollback")
    assert last(agent, "dep-2")["state"] == OK
    assert agent.state.committed_counters["digits"] == 1_000_000


def test_foreign_expired_and_unsigned_commands(
    make_agent: Callable[..., Agent], keys: Keys, publish_bundle: Callable[..., BundleRef], server: BundleServer
) -> None:
    agent = make_agent()
    v1 = publish_bundle("1.0.0")
    agent.handle_command(signed(assignment(v1, device_id="dev-2"), keys.server))
    agent.handle_command(signed(assignment(v1, deployment_id="dep-u"), SigningKey.generate()))
    agent.handle_command(b'{"not": "a command"}')
    past = datetime.now(UTC) - timedelta(hours=2)
    agent.handle_command(
        signed(
            assignment(v1, deployment_id="dep-x", issued_at=past, expires_at=past + timedelta(minutes=1)), keys.server
        )
    )
    assert agent.wait_idle(5)
    assert agent.rejected_commands == 4
    assert server.requests == []
    assert agent.state.active_slot is None
    # only the forged one naming a deployment of this device is reported; an expired one is a stale copy
    # (the server re-sends a fresh assignment after the next check-in)
    assert [(r["deployment_id"], r["reason"]) for r in agent.state.outbox] == [("dep-u", "unknown_key")]


def test_disk_full_refused_before_download(
    make_agent: Callable[..., Agent], keys: Keys, publish_bundle: Callable[..., BundleRef], server: BundleServer
) -> None:
    agent = make_agent(free_space=lambda _: 1000)
    install(agent, keys, publish_bundle("1.0.0"))
    _refused(agent, ReasonCode.DISK_FULL)
    assert server.requests == []


def test_trickling_server_times_out(
    make_agent: Callable[..., Agent], keys: Keys, publish_bundle: Callable[..., BundleRef]
) -> None:
    agent = make_agent(download_timeout_seconds=0.5, download_retries=1)
    install(agent, keys, publish_bundle("1.0.0", mode="trickle", serve_kwargs={"trickle_delay": 0.05}))
    _refused(agent, ReasonCode.DOWNLOAD_TIMEOUT)
    assert list((agent.state_dir / "download").iterdir()) == []


def test_dropped_connection_resumes_with_range(
    make_agent: Callable[..., Agent], keys: Keys, publish_bundle: Callable[..., BundleRef], server: BundleServer
) -> None:
    agent = make_agent()
    bundle = publish_bundle("1.0.0", mode="drop", serve_kwargs={"drop_after": 5000})
    install(agent, keys, bundle)
    assert last(agent)["state"] == OK
    ranges = [r.get("range") for r in server.requests]
    assert ranges == ["bytes=0-", "bytes=5000-"]


@pytest.mark.parametrize(
    ("variant", "metrics", "reason"),
    [
        ("ok", {"latency_budget_ms": 1e-6}, ReasonCode.LATENCY_OVER_BUDGET),  # over the profile budget
        ("slow", {}, ReasonCode.LATENCY_OVER_BUDGET),  # same outputs, far slower than the previous model
    ],
)
def test_slow_model_rolled_back_in_trial(
    variant: str,
    metrics: dict[str, float],
    reason: ReasonCode,
    make_agent: Callable[..., Agent],
    keys: Keys,
    publish_bundle: Callable[..., BundleRef],
) -> None:
    agent = make_agent(health_latency_slack_ms=0.0, health_latency_factor=3.0)
    install(agent, keys, publish_bundle("1.0.0"), deployment_id="dep-0")
    install(agent, keys, publish_bundle("1.1.0", variant=variant, metrics=metrics))
    _refused(agent, reason, state=DeploymentState.ROLLED_BACK)
    assert ("previous model" if variant == "slow" else "over the budget") in last(agent)["detail"]
    assert agent.runtime.current is not None and agent.runtime.current.manifest.version == "1.0.0"
    assert agent.state.committed_counters["digits"] == 1_000_000


@pytest.mark.parametrize(("case", "reason"), [("nan", ReasonCode.NAN_OUTPUT), ("errors", ReasonCode.ERROR_RATE)])
def test_unhealthy_live_traffic_in_trial_rolls_back(
    case: str,
    reason: ReasonCode,
    make_agent: Callable[..., Agent],
    keys: Keys,
    publish_bundle: Callable[..., BundleRef],
) -> None:
    first = make_agent()
    install(first, keys, publish_bundle("1.0.0"), deployment_id="dep-0")
    first.stop()
    agent = make_agent(trial_seconds=10.0)
    agent.handle_command(signed(assignment(publish_bundle("1.1.0", variant="log")), keys.server))
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:  # wait until the candidate serves, then send live traffic
        current = agent.runtime.current
        if current is not None and current.manifest.version == "1.1.0":
            break
        time.sleep(0.01)
    if case == "nan":  # negative inputs make Log return NaN
        agent.predict({"x": -sample_inputs()})
    else:  # requests the model cannot run
        for _ in range(12):
            with pytest.raises(ModelError):
                agent.predict({"x": np.zeros((2, 3), dtype=np.float32)})
    assert agent.wait_idle(20)
    _refused(agent, reason, state=DeploymentState.ROLLED_BACK)
    assert agent.runtime.current is not None and agent.runtime.current.manifest.version == "1.0.0"


def test_application_defers_switch_until_not_busy(
    make_agent: Callable[..., Agent], keys: Keys, publish_bundle: Callable[..., BundleRef]
) -> None:
    agent = make_agent()
    install(agent, keys, publish_bundle("1.0.0"), deployment_id="dep-0")
    agent.stop()
    serving_when_asked: list[str] = []

    def busy(a: Any) -> bool:
        current = again.runtime.current
        serving_when_asked.append(current.manifest.version if current else "-")
        return len(serving_when_asked) < 3

    again = make_agent(deferral_poll_seconds=0.05, defer_update=busy)
    install(again, keys, publish_bundle("1.1.0"))
    assert serving_when_asked == ["1.0.0", "1.0.0", "1.0.0"]
    assert last(again)["state"] == OK


def test_deferral_is_capped(
    make_agent: Callable[..., Agent], keys: Keys, publish_bundle: Callable[..., BundleRef]
) -> None:
    asked: list[int] = []
    agent = make_agent(
        deferral_poll_seconds=0.05, max_update_deferral_seconds=0.3, defer_update=lambda a: asked.append(1) is None
    )
    install(agent, keys, publish_bundle("1.0.0"))
    assert last(agent)["state"] == OK
    assert len(asked) > 1


def test_clean_shutdown_during_trial_is_not_a_crash(
    make_agent: Callable[..., Agent], keys: Keys, publish_bundle: Callable[..., BundleRef]
) -> None:
    agent = make_agent(trial_seconds=30.0, max_boot_attempts=1)
    agent.handle_command(signed(assignment(publish_bundle("1.0.0")), keys.server))
    for _ in range(2):
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            dep = agent.state.deployment
            if dep is not None and dep.step == Step.TRIAL:
                break
            time.sleep(0.02)
        agent.stop()
        assert agent.state.deployment is not None and agent.state.deployment.step == Step.TRIAL
        agent = make_agent(trial_seconds=30.0, max_boot_attempts=1)
    agent.stop()
    agent = make_agent(max_boot_attempts=1)
    assert agent.wait_idle(30)
    assert last(agent)["state"] == OK


def test_shadow_candidate_runs_beside_serving_model(
    make_agent: Callable[..., Agent], keys: Keys, publish_bundle: Callable[..., BundleRef]
) -> None:
    agent = make_agent()
    install(agent, keys, publish_bundle("1.0.0"), deployment_id="dep-0")
    serving_slot = agent.state.active_slot
    same = publish_bundle("1.1.0")  # same weights as 1.0.0: must agree everywhere
    install(agent, keys, same, deployment_id="dep-s", mode="shadow")
    assert states(agent, "dep-s") == ["downloading", "downloaded", "verifying", "installing", "committed"]
    assert agent.state.active_slot == serving_slot
    assert agent.runtime.current is not None and agent.runtime.current.manifest.version == "1.0.0"
    assert agent.shadow is not None and agent.shadow.version == "1.1.0"
    assert agent.checkin().models[0].shadow_version == "1.1.0"
    for _ in range(5):
        agent.predict({"x": sample_inputs(4)})
    agent.shadow.drain()
    summary = agent.shadow.take_summary()
    assert summary is not None and summary.compared == 20 and summary.top1_agree == 20
    assert abs(summary.cosine_sum - 20) < 1e-3
    # a different candidate disagrees somewhere; samples still counted per row
    install(agent, keys, publish_bundle("1.2.0", seed=9), deployment_id="dep-s2", mode="shadow")
    for _ in range(5):
        agent.predict({"x": sample_inputs(4, seed=3)})
    agent.shadow.drain()
    agent._roll_telemetry()  # the summary rides on the serving model's telemetry window
    assert agent.outbox.spool is not None
    windows = [json.loads(p) for _, p in agent.outbox.spool.oldest(100)]
    [window] = [w for w in windows if w["shadow"] is not None]
    other = window["shadow"]
    assert window["version"] == "1.0.0" and other["candidate_version"] == "1.2.0"
    assert other["compared"] == 20 and other["top1_agree"] < 20
    # shadow_stop ends it and removes the candidate's files
    now = datetime.now(UTC)
    stop = ShadowStop(device_id="dev-1", model_name="digits", issued_at=now, expires_at=now + timedelta(minutes=1))
    agent.handle_command(signed(stop, keys.server))
    assert agent.shadow is None and agent.state.shadow_deployment is None
    assert not (agent.state_dir / "slots" / "shadow").exists()
    assert agent.predict({"x": sample_inputs()})["y"].shape == (4, 10)


def test_full_spool_drops_oldest_and_reports_the_count(
    make_agent: Callable[..., Agent], keys: Keys, publish_bundle: Callable[..., BundleRef]
) -> None:
    agent = make_agent(spool_max_windows=2, telemetry_window_seconds=3600)
    install(agent, keys, publish_bundle("1.0.0"))
    for _ in range(4):  # offline: four windows, room for two
        agent.predict({"x": sample_inputs()})
        agent._roll_telemetry()
    windows = [json.loads(p) for _, p in agent.outbox.spool.oldest(10)]
    assert len(windows) == 2
    assert [w["seq"] for w in windows] == sorted(w["seq"] for w in windows)
    assert windows[-1]["spool_dropped"] == 1  # counted when the 4th window was built: the 3rd add dropped one
    assert agent.outbox.spool.dropped == 2
    assert {w["boot_id"] for w in windows} == {agent.boot_id}


def test_damaged_active_slot_is_never_loaded(
    make_agent: Callable[..., Agent], keys: Keys, publish_bundle: Callable[..., BundleRef]
) -> None:
    agent = make_agent()
    install(agent, keys, publish_bundle("1.0.0"), deployment_id="dep-0")
    install(agent, keys, publish_bundle("1.1.0", seed=4), deployment_id="dep-1")
    active = agent.state.active_slot
    agent.stop()
    # bit rot (or tampering) in the serving model while the agent was down
    model = agent.state_dir / "slots" / str(active) / "model.onnx"
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0xFF
    model.write_bytes(bytes(data))
    again = make_agent()
    assert again.state.active_slot != active  # the intact previous slot serves instead
    assert again.runtime.current is not None and again.runtime.current.manifest.version == "1.0.0"
    assert not (again.state_dir / "slots" / str(active)).exists()
    again.stop()
    # damage the remaining one too: nothing verified is left, so nothing is served
    other = again.state_dir / "slots" / str(again.state.active_slot) / "test_vectors.npz"
    other.write_bytes(b"garbage")
    last_one = make_agent()
    assert last_one.state.active_slot is None and last_one.runtime.current is None
    with pytest.raises(NoModelError):
        last_one.predict({"x": sample_inputs()})


def test_raw_input_samples_uploaded(
    make_agent: Callable[..., Agent], keys: Keys, publish_bundle: Callable[..., BundleRef], server: BundleServer
) -> None:
    agent = make_agent(sample_rate=1.0, sample_upload_path="/api/v1/devices/{device_id}/samples")
    install(agent, keys, publish_bundle("1.0.0"))
    batches = [sample_inputs(2, seed=i) for i in range(3)]
    for x in batches:
        agent.predict({"x": x})
    agent._retry()  # the retry tick: re-sends, then persists and uploads samples
    assert [path for path, _ in server.uploads] == ["/api/v1/devices/dev-1/samples"] * 3
    got = [np.load(io.BytesIO(body))["in.x"] for _, body in server.uploads]
    assert all(np.array_equal(g, x) for g, x in zip(got, batches, strict=True))
    assert agent.sampler.pending() == []  # deleted once the server accepted them


def test_sampling_off_by_default(
    make_agent: Callable[..., Agent], keys: Keys, publish_bundle: Callable[..., BundleRef], server: BundleServer
) -> None:
    agent = make_agent(sample_upload_path="/samples")
    install(agent, keys, publish_bundle("1.0.0"))
    agent.predict({"x": sample_inputs()})
    agent._retry()  # the retry tick: re-sends, then persists and uploads samples
    assert server.uploads == [] and agent.sampler.pending() == []


def test_sample_rate_is_a_uniform_draw_and_bounded(tmp_path: Path) -> None:
    import random

    from device_agent.telemetry.sampling import InputSampler

    model: Any = type(
        "M", (), {"manifest": type("F", (), {"model_name": "m", "version": "1.0.0"})(), "bundle_sha256": "0" * 64}
    )()
    sampler = InputSampler(tmp_path / "s", rate=0.25, max_files=10_000, rng=random.Random(7))
    for i in range(2000):  # the decision is one random draw per request, whatever the inputs and outputs are
        sampler(model, {"x": np.full((1, 2), i, dtype=np.float32)}, None, 0.1)
    assert 400 < len(sampler._queue) < 600
    small = InputSampler(tmp_path / "t", rate=1.0, max_files=5)
    for i in range(20):
        small(model, {"x": np.full((1, 2), i, dtype=np.float32)}, None, 0.1)
    assert small.persist() == 5 and len(small.pending()) == 5  # the newest five
    kept = sorted(int(np.load(p)["in.x"][0, 0]) for p in small.pending())
    assert kept == [15, 16, 17, 18, 19]


def test_deferral_budget_survives_a_restart(
    make_agent: Callable[..., Agent], keys: Keys, publish_bundle: Callable[..., BundleRef], tmp_path: Path
) -> None:
    """The deferral cap counts from the first deferral, persisted: restarting must not grant a fresh hour."""
    first = make_agent(deferral_poll_seconds=0.05, defer_update=lambda a: True)
    first.handle_command(signed(assignment(publish_bundle("1.0.0")), keys.server))
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        dep = first.state.deployment
        if dep is not None and dep.deferred_since is not None:
            break
        time.sleep(0.02)
    first.stop()  # mid-deferral
    state_file = tmp_path / "dev" / "state" / "state.json"
    state = json.loads(state_file.read_text())
    assert state["deployment"]["deferred_since"] is not None and state["deployment"]["step"] == "switch"
    # The device was off for two hours: the one-hour budget (the default) is spent, so the switch goes ahead
    # without asking again (before, the budget restarted with the process and the app could defer forever).
    state["deployment"]["deferred_since"] = (datetime.now(UTC) - timedelta(hours=2)).isoformat()
    state_file.write_text(json.dumps(state))
    asked: list[str] = []
    again = make_agent(deferral_poll_seconds=0.05, defer_update=lambda a: asked.append(a.deployment_id) is None)
    assert again.wait_idle(30)
    assert last(again)["state"] == OK and asked == []
    assert again.state.active() is not None and again.state.active().version == "1.0.0"  # type: ignore[union-attr]
