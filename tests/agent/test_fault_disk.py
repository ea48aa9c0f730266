"""A disk that fills up in the middle of an update, on a real small file system (a tmpfs mounted by the test).

The agent's state folder lives on a 24 MiB tmpfs. The free-space check before the download passes; then,
as the named step starts, another writer fills the disk up to a little room (less than the bundle needs).
The step fails with ``disk_full`` (not a bundle fault), nothing half-written stays in the staging slot or
the download folder, the old model keeps serving, and once space is freed the same bundle installs.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from device_agent.agent import Agent
from device_agent.serving.runtime import SessionCache
from device_agent.settings import AgentConfig
from edgeota_contract.bundle import sha256_file
from edgeota_contract.states import DeploymentState, ReasonCode
from tests.agent.bundles import CLASSES, make_bundle, make_payload, sample_inputs
from tests.agent.conftest import PROFILE, BundleRef, Keys, assignment, signed, write_config
from tests.agent.http_server import BundleServer

pytestmark = pytest.mark.integration

DISK_BYTES = 24 << 20
CARD_BYTES = 6 << 20  # the big file of the second bundle
ROOM_LEFT = 1 << 20  # what the other writer leaves free: room for the state file, not for the bundle


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={DISK_BYTES},mode=0700", "tmpfs", str(mount)],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        pytest.fail(f"cannot mount a tmpfs (the test needs root): {done.stderr}")
    try:
        yield mount
    finally:
        if subprocess.run(["umount", str(mount)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(mount)], check=True)


def _big_bundle(tmp_path: Path, keys: Keys, server: BundleServer, version: str) -> BundleRef:
    """A valid bundle with a large model card, so unpacking it needs megabytes."""
    out = tmp_path / f"big-{version}.bundle.tar"
    payload = make_payload(seed=7)
    payload["model_card.md"] = b"# a long card\n" + b"x" * CARD_BYTES
    make_bundle(out, keys.release, version=version, profile=PROFILE, payload=payload)
    url = f"/api/v1/artifacts/big-{version}"
    server.add(url, out.read_bytes())
    return BundleRef(out, sha256_file(out), version, out.stat().st_size, url)


def _fill(disk: Path, leave: int) -> Path:
    """Another writer takes the disk's free space down to ``leave`` bytes."""
    filler = disk / "filler"
    free = os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize
    with open(filler, "ab") as fh, contextlib.suppress(OSError):
        fh.write(b"\0" * max(0, free - leave))
    return filler


@pytest.mark.parametrize("step", ["download", "verify_bundle"])
def test_a_disk_filling_up_during_the_update_fails_it_cleanly(
    step: str,
    small_disk: Path,
    tmp_path: Path,
    keys: Keys,
    server: BundleServer,
    publish_bundle: Callable[..., BundleRef],
) -> None:
    fills: list[Path] = []
    armed = [False]

    def other_writer(point: str) -> None:
        if point == step and armed[0] and not fills:
            fills.append(_fill(small_disk, ROOM_LEFT))

    config = AgentConfig.load(write_config(small_disk / "dev", keys, server.url))
    with Agent(config, connect=False, session_cache=SessionCache(), crash_hook=other_writer) as agent:
        agent.handle_command(signed(assignment(publish_bundle("1.0.0"), deployment_id="dep-1"), keys.server))
        assert agent.wait_idle(30)
        assert agent.state.finished_by_id("dep-1").state == DeploymentState.COMMITTED  # type: ignore[union-attr]
        armed[0] = True
        big = _big_bundle(tmp_path, keys, server, "1.1.0")
        agent.handle_command(signed(assignment(big, deployment_id="dep-2"), keys.server))
        assert agent.wait_idle(60)
        assert fills, "the step never started"
        final = agent.state.finished_by_id("dep-2")
        assert final is not None and (final.state, final.reason) == (DeploymentState.FAILED, ReasonCode.DISK_FULL), (
            final
        )
        # Nothing half-written is left: no staged slot, no download; the old model serves.
        inactive = agent.state.inactive_slot()
        assert agent.state.slots[inactive] is None
        assert not (agent.state_dir / "slots" / inactive).exists()
        kept = {f"{sha}.bundle" for sha in agent.state.committed_bundles}  # only the committed 1.0.0 is kept
        assert {p.name for p in (agent.state_dir / "download").iterdir()} == kept
        current = agent.runtime.current
        assert current is not None and current.manifest.version == "1.0.0"
        assert agent.predict({"x": sample_inputs()})["y"].shape == (4, CLASSES)
        # Space comes back: the same bundle installs.
        fills[0].unlink()
        agent.handle_command(signed(assignment(big, deployment_id="dep-3"), keys.server))
        assert agent.wait_idle(60)
        final = agent.state.finished_by_id("dep-3")
        assert final is not None and final.state == DeploymentState.COMMITTED, final
        assert agent.runtime.current is not None and agent.runtime.current.manifest.version == "1.1.0"
