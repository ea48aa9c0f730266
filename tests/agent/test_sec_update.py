"""Update-path defences, each with a test that fails when the defence is taken out:

- the downloaded archive's sha256 is checked against the signed assignment before anything parses it;
- an assignment for another hardware profile is refused before a byte is downloaded;
- the committed release counter survives a restart of the agent process (an older, validly signed
  release is refused by the restarted agent).
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import device_agent.update.steps as steps_module
import edgeota_contract.bundle as bundle_module
from device_agent.agent import Agent
from device_agent.serving.runtime import SessionCache
from device_agent.settings import AgentConfig
from device_agent.store import read_state
from device_agent.update.download import DownloadError, DownloadPolicy, download
from edgeota_contract.states import DeploymentState, ReasonCode
from tests.agent.conftest import TOKEN, BundleRef, Keys, assignment, signed, write_config
from tests.agent.http_server import BundleServer


@pytest.fixture
def agent(tmp_path: Path, keys: Keys, server: BundleServer) -> Iterator[Agent]:
    with Agent(
        AgentConfig.load(write_config(tmp_path / "dev", keys, server.url)), connect=False, session_cache=SessionCache()
    ) as running:
        yield running


def _last(agent: Agent, deployment_id: str) -> dict[str, Any]:
    return [r for r in agent.state.outbox if r["deployment_id"] == deployment_id][-1]


def _pathological_tar(size: int) -> bytes:
    """A tar of exactly ``size`` bytes whose first header is a PAX extension the size of the archive."""
    pax = tarfile.TarInfo("././@PaxHeader")
    body = b"x" * (size - 3 * 512)
    pax.type = tarfile.XHDTYPE
    pax.size = len(body)
    out = io.BytesIO()
    out.write(pax.tobuf(format=tarfile.USTAR_FORMAT))
    out.write(body)
    return out.getvalue()[:size].ljust(size, b"\0")


@pytest.mark.parametrize("case", ["one_byte_flipped", "crafted_archive"])
def test_a_tampered_archive_is_refused_before_anything_parses_it(
    case: str,
    agent: Agent,
    keys: Keys,
    server: BundleServer,
    publish_bundle: Callable[..., BundleRef],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Same size as assigned, other bytes: refused on the signed digest; the archive reader never runs."""
    parsed: list[str] = []

    class NoReading:
        def __init__(self, *_a: Any, **_k: Any) -> None:
            parsed.append("ArchiveReader")
            raise AssertionError("the archive was parsed before its digest was checked")

    def no_verify(*_a: Any, **_k: Any) -> Any:
        parsed.append("verify_bundle")
        raise AssertionError("verify_bundle ran before the digest was checked")

    bundle = publish_bundle("1.0.0")
    served = server.files[bundle.url]
    if case == "one_byte_flipped":
        data = bytearray(served.data)
        data[700] ^= 0xFF  # inside the manifest, where a parser would look first
        served.data = bytes(data)
    else:
        served.data = _pathological_tar(bundle.size)
    assert len(served.data) == bundle.size
    monkeypatch.setattr(steps_module, "verify_bundle", no_verify)
    monkeypatch.setattr(bundle_module, "ArchiveReader", NoReading)
    agent.handle_command(signed(assignment(bundle), keys.server))
    assert agent.wait_idle(30)
    report = _last(agent, "dep-1")
    assert (report["state"], report["reason"]) == (DeploymentState.FAILED, ReasonCode.DIGEST_MISMATCH), report
    assert parsed == []
    assert any(r["path"] == bundle.url for r in server.requests)  # it was downloaded, then refused
    assert list((agent.state_dir / "download").iterdir()) == []
    assert agent.state.active() is None and agent.runtime.current is None


def test_an_assignment_for_another_profile_is_refused_before_any_download(
    agent: Agent, keys: Keys, server: BundleServer, publish_bundle: Callable[..., BundleRef]
) -> None:
    bundle = publish_bundle("1.0.0", profile="arm64-pi4")
    agent.handle_command(signed(assignment(bundle, hardware_profile="arm64-pi4"), keys.server))
    assert agent.wait_idle(30)
    report = _last(agent, "dep-1")
    assert (report["state"], report["reason"]) == (DeploymentState.FAILED, ReasonCode.WRONG_PROFILE), report
    assert server.requests == []  # not one byte fetched
    assert agent.state.active() is None


def _apply(config: Path, command: Path) -> subprocess.CompletedProcess[str]:
    """``edgeota agent apply``: a real agent process that acts on one command and exits."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEOTA_AGENT_")}
    args = [sys.executable, "-m", "edgeota.cli", "agent", "apply", "--config", str(config), "--timeout", "60"]
    return subprocess.run([*args, str(command)], env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.integration
def test_the_committed_release_counter_survives_an_agent_restart(
    tmp_path: Path, keys: Keys, server: BundleServer, publish_bundle: Callable[..., BundleRef]
) -> None:
    config = write_config(tmp_path, keys, server.url)
    older, newer = publish_bundle("1.0.0"), publish_bundle("1.1.0", seed=4)
    first = tmp_path / "newer.json"
    first.write_bytes(signed(assignment(newer, deployment_id="dep-new"), keys.server))
    done = _apply(config, first)
    assert done.returncode == 0, done.stderr[-2000:]
    on_disk = json.loads((tmp_path / "state" / "state.json").read_text())
    assert on_disk["committed_counters"] == {"digits": newer_counter(newer)}
    # A new process: everything it knows about the committed release comes from the state folder.
    second = tmp_path / "older.json"
    second.write_bytes(signed(assignment(older, deployment_id="dep-old"), keys.server))
    fetched = len(server.requests)
    refused = _apply(config, second)
    assert refused.returncode == 0, refused.stderr[-2000:]
    state = read_state(tmp_path / "state")
    final = state.finished_by_id("dep-old")
    assert final is not None and (final.state, final.reason) == (
        DeploymentState.FAILED,
        ReasonCode.RELEASE_COUNTER_ROLLBACK,
    ), final
    active = state.active()
    assert active is not None and active.version == "1.1.0"
    assert len(server.requests) == fetched  # refused before the download


def newer_counter(bundle: BundleRef) -> int:
    from edgeota_contract.manifest import release_counter_from_version

    return release_counter_from_version(bundle.version)


def test_the_download_hashes_as_it_writes_and_refuses_other_bytes(
    tmp_path: Path, server: BundleServer, publish_bundle: Callable[..., BundleRef]
) -> None:
    bundle = publish_bundle("1.0.0")
    url = f"{server.url}{bundle.url}"
    policy = DownloadPolicy(retries=0)
    part = tmp_path / "b.part"
    # A resumed download: the digest covers the part already on disk plus what arrives.
    part.write_bytes(bundle.path.read_bytes()[: bundle.size // 2])
    assert download(url, part, bundle.size, token=TOKEN, policy=policy, expected_sha256=bundle.sha256) == bundle.sha256
    assert server.requests[-1]["range"] == f"bytes={bundle.size // 2}-"
    # The same bytes against another signed digest: refused and removed.
    part.unlink()
    with pytest.raises(DownloadError) as refused:
        download(url, part, bundle.size, token=TOKEN, policy=policy, expected_sha256="0" * 64)
    assert refused.value.reason == ReasonCode.DIGEST_MISMATCH
    assert not part.exists()
