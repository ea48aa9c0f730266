"""The TUF check inside the agent's update path (in-process agent, real HTTP): a provisioned TUF root makes
every assignment pass the repository before any byte of the bundle is fetched."""

from __future__ import annotations

import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest

from device_agent.agent import Agent
from device_agent.serving.runtime import SessionCache
from device_agent.settings import AgentConfig
from edgeota_contract.provisioning import DeviceProvisioning
from edgeota_contract.states import ReasonCode
from ota_server.tuf_repo import bundle_custom
from tests.agent.agent_tuf_helpers import TufSite, make_site, past
from tests.agent.bundles import make_bundle
from tests.agent.conftest import PROFILE, BundleRef, Keys, assignment, signed, write_config
from tests.agent.http_server import BundleServer

HAPPY = ["downloading", "downloaded", "verifying", "installing", "trial", "committed"]


@pytest.fixture
def site(tmp_path: Path, open_server: BundleServer) -> TufSite:
    return make_site(tmp_path, open_server, root_keys=1, threshold=1)


def bundle(tmp_path: Path, keys: Keys, server: BundleServer, version: str, seed: int = 0) -> BundleRef:
    out = tmp_path / "bundles" / f"{version}.bundle.tar"
    out.parent.mkdir(exist_ok=True)
    path, sha = make_bundle(out, keys.release, version=version, seed=seed)
    url = f"/api/v1/bundles/{sha}"
    server.add(url, path.read_bytes())
    return BundleRef(path, sha, version, path.stat().st_size, url)


def as_target(site: TufSite, ref: BundleRef, counter: int) -> None:
    site.repo.add_bundle(ref.sha256, ref.size, bundle_custom("digits", ref.version, PROFILE, counter))
    site.publish()


@pytest.fixture
def agent(tmp_path: Path, keys: Keys, site: TufSite) -> Iterator[Agent]:
    path = write_config(tmp_path / "dev", keys, site.server.url)
    data = tomllib.loads(path.read_text())
    data["trust"]["tuf_root"] = site.trusted_root().decode()
    path.write_text(DeviceProvisioning.model_validate(data).to_toml())
    a = Agent(AgentConfig.load(path), session_cache=SessionCache(), connect=False)
    a.start()
    yield a
    a.stop()


def outcome(agent: Agent, deployment_id: str) -> list[dict[str, object]]:
    return [r for r in agent.state.outbox if r["deployment_id"] == deployment_id]


def fetched(server: BundleServer, ref: BundleRef) -> bool:
    return any(r["path"] == ref.url for r in server.requests)


def test_install_passes_the_repository_and_refusals_keep_the_old_model(
    tmp_path: Path, keys: Keys, site: TufSite, agent: Agent
) -> None:
    v1 = bundle(tmp_path, keys, site.server, "1.0.0")
    as_target(site, v1, 1_000_000)
    agent.handle_command(signed(assignment(v1, deployment_id="dep-1"), keys.server))
    assert agent.wait_idle(30)
    assert [r["state"] for r in outcome(agent, "dep-1")] == HAPPY
    assert any(r["path"] == "/tuf/timestamp.json" for r in site.server.requests)

    # a validly signed bundle and assignment, but the repository never listed the bundle
    v2 = bundle(tmp_path, keys, site.server, "1.1.0", seed=3)
    agent.handle_command(signed(assignment(v2, deployment_id="dep-2"), keys.server))
    assert agent.wait_idle(30)
    last = outcome(agent, "dep-2")[-1]
    assert (last["state"], last["reason"]) == ("failed", ReasonCode.NOT_IN_REPOSITORY)
    assert not fetched(site.server, v2)  # refused before download

    # listed, but the repository's timestamp has expired (nobody re-signed it)
    site.repo.add_bundles([(v2.sha256, v2.size, bundle_custom("digits", "1.1.0", PROFILE, 1_001_000))], now=past(2))
    site.publish()
    agent.handle_command(signed(assignment(v2, deployment_id="dep-3"), keys.server))
    assert agent.wait_idle(30)
    last = outcome(agent, "dep-3")[-1]
    assert (last["state"], last["reason"]) == ("failed", ReasonCode.REPOSITORY_METADATA_EXPIRED)
    assert not fetched(site.server, v2)
    active = agent.state.active()
    assert active is not None and active.version == "1.0.0"
    assert agent.runtime.current is not None and agent.runtime.current.manifest.version == "1.0.0"


def test_without_a_provisioned_root_the_check_is_skipped_and_logged_once(
    tmp_path: Path, keys: Keys, caplog: pytest.LogCaptureFixture
) -> None:
    from device_agent.update.tuf_client import verify_in_repository

    # nothing listens at this URL: a skipped check must not even try to connect
    config = AgentConfig.load(write_config(tmp_path / "old", keys, "http://127.0.0.1:9", device_id="pre-tuf-dev"))
    assert config.provisioning.trust.tuf_root is None
    ref = BundleRef(tmp_path / "x", "ab" * 32, "1.0.0", 10, "/x")
    with caplog.at_level("INFO", logger="device_agent.update.tuf"):
        verify_in_repository(config, assignment(ref, device_id="pre-tuf-dev"), lambda s: None)
        verify_in_repository(config, assignment(ref, device_id="pre-tuf-dev"), lambda s: None)
    assert [r.getMessage() for r in caplog.records].count("tuf_check_skipped") == 1
    assert not (config.settings.state_dir / "tuf").exists()
