"""Dashboard test bench: a real ``edgeota server run`` on SQLite, simulated devices over the real Mosquitto,
headless Chromium, and screenshots of the pages as artifacts.

- ``dash``: the server process (tests/server/procs.py) with helpers to publish releases (bundles with reference
  statistics for drift), provision simulated devices (tests/server/simdevice.py: they follow the contract over
  MQTT and download bundles over HTTP, so they move rollouts as agents do), mint tokens per role, send telemetry
  windows with a chosen feature shifted, and sign a browser in.
- ``open_browser``: a factory of headless Chromium browsers (tests/web/browser.py), all closed at the end; when the
  test fails, each one's page is saved as ``failed-<test>-<n>.png`` beside the screenshots.
- ``shots``: :class:`tests.web.browser.Screenshots` for the session.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from selenium.webdriver import Chrome
from selenium.webdriver.remote.webdriver import WebDriver

from edgeota_contract.bundle import create_bundle
from edgeota_contract.messages import TelemetryWindow
from edgeota_contract.provisioning import DeviceProvisioning
from edgeota_contract.signing import SigningKey, write_keypair
from edgeota_contract.telemetry import LATENCY_EDGES_MS, FeatureReference, FeatureSummary, ReferenceStats
from edgeota_contract.topics import Channel, device_topic
from tests.conftest import Broker
from tests.server.conftest import ADMIN, Keys, bundle_fields
from tests.server.procs import ServerProcess
from tests.server.simdevice import SimDevice

from .browser import Screenshots, page_name, start_browser, wait_for

ADMIN_TOKEN = ADMIN  # the server's bootstrap admin token (signs in as "admin")
FEATURES = 4
EDGES = [-1.0, 0.0, 1.0]
REFERENCE = ReferenceStats(
    sample_count=4000,
    features=[FeatureReference(input="x", feature=f, edges=EDGES, counts=[1000] * 4) for f in range(FEATURES)],
)


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """Keep each phase's report on the item, so fixtures know at teardown whether the test failed."""
    report = yield
    setattr(item, f"rep_{report.when}", report)
    return report


@pytest.fixture(scope="session")
def shots() -> Screenshots:
    return Screenshots()


@pytest.fixture
def open_browser(request: pytest.FixtureRequest, shots: Screenshots) -> Iterator[Callable[[], Chrome]]:
    """``open_browser()`` -> a new headless Chromium; every one is closed after the test."""
    drivers: list[Chrome] = []

    def open_one() -> Chrome:
        driver = start_browser()
        drivers.append(driver)
        return driver

    yield open_one
    failed = getattr(request.node, "rep_call", None) is not None and request.node.rep_call.failed
    for n, driver in enumerate(drivers):
        try:
            if failed:
                driver.save_screenshot(str(shots.folder / f"failed-{request.node.name}-{n}.png"))
        finally:
            driver.quit()


@dataclass
class Dash:
    """The server under test and what a test does around it (HTTP calls as the admin, through its REST API)."""

    server: ServerProcess
    work: Path
    keys: Keys
    sims: list[SimDevice] = field(default_factory=list)

    @property
    def url(self) -> str:
        return self.server.url

    def api(self, method: str, path: str, **kwargs: Any) -> Any:
        return self.server.api(method, path, **kwargs)

    def token(self, role: str) -> str:
        """A new API token of ``role`` (viewer, operator, release_manager, admin)."""
        out = self.api("POST", "/api/v1/tokens", json={"role": role, "name": f"{role}-{uuid.uuid4().hex[:6]}"})
        return str(out["token"])

    def publish(self, version: str, profile: str = "x86", model: str = "digits") -> str:
        """Upload a signed bundle of ``model`` ``version`` for ``profile`` (with :data:`REFERENCE`); its release id."""
        path = self.work / "bundles" / f"{model}-{version}-{profile}.bundle.tar"
        path.parent.mkdir(parents=True, exist_ok=True)
        payload = {
            "model.onnx": f"model {model} {version} {profile}".encode() * 50,
            "reference_stats.json": REFERENCE.model_dump_json().encode(),
            "test_vectors.npz": b"vectors",
            "model_card.md": f"# {model} {version}\n\nA model card for the dashboard tests.\n".encode(),
        }
        create_bundle(path, payload, self.keys.release, **bundle_fields(version, profile, model))
        out = self.api(
            "POST", "/api/v1/bundles", content=path.read_bytes(), headers={"Content-Type": "application/octet-stream"}
        )
        return str(out["release_id"])

    def devices(self, n: int, tag: str, profile: str = "x86", flaky_downloads: int = 0) -> list[SimDevice]:
        """Provision ``n`` devices labelled ``tag=<tag>`` as simulated devices (not connected yet); each fails its
        first ``flaky_downloads`` installs with ``download_failed`` (a transient fault an operator may retry)."""
        out = []
        for i in range(len(self.sims), len(self.sims) + n):
            body = {"device_id": f"{tag}-{profile}-{i}", "hardware_profile": profile, "labels": {"tag": tag}}
            toml = self.api("POST", "/api/v1/devices", json=body)["agent_toml"]
            path = self.work / f"{tag}-{profile}-{i}.toml"
            path.write_text(toml)
            sim = SimDevice(DeviceProvisioning.load(path), flaky_downloads=flaky_downloads)
            out.append(sim)
        self.server.sims.extend(out)  # disconnected by ServerProcess.running on the way out
        self.sims.extend(out)
        return out

    def rollout(self, release_id: str, tag: str, **plan: Any) -> str:
        body = {"release_id": release_id, "selector": {"labels": {"tag": tag}}, **plan}
        return str(self.api("POST", "/api/v1/rollouts", json=body)["rollout_id"])

    def status(self, rollout_id: str) -> dict[str, Any]:
        out: dict[str, Any] = self.api("GET", f"/api/v1/rollouts/{rollout_id}")
        return out

    def sign_in(self, driver: WebDriver, token: str) -> None:
        """Sign ``driver`` in through the login form; waits for the overview page."""
        driver.get(f"{self.url}/ui/login")
        driver.find_element("css selector", "#token").send_keys(token)
        driver.find_element("css selector", "#login-submit").click()
        wait_for(driver, lambda d: page_name(d) == "overview", 15, "the overview after sign-in")


def send_telemetry(
    sim: SimDevice,
    requests: int = 2000,
    shifted: int | None = None,
    end: datetime | None = None,
    model: str = "digits",
    latency_bucket: int = 3,
) -> None:
    """Publish one telemetry window ending at ``end`` (default now) for the bundle ``sim`` runs: every feature as
    :data:`REFERENCE` has it, except feature ``shifted`` (all its values in the top bin); every request's latency
    in bucket ``latency_bucket`` of ``LATENCY_EDGES_MS``."""
    running = sim.models[model]
    end = end or datetime.now(UTC)
    features = []
    for f in range(FEATURES):
        counts = [0, 0, 0, requests] if f == shifted else [requests // 4] * 4
        features.append(FeatureSummary(input="x", feature=f, edges=EDGES, counts=counts))
    latency = [0] * (len(LATENCY_EDGES_MS) + 1)
    latency[latency_bucket] = requests
    window = TelemetryWindow(
        boot_id=sim.boot_id,
        seq=sim._next_seq(),
        model_name=model,
        version=running.version,
        bundle_sha256=running.bundle_sha256,
        window_start=end - timedelta(minutes=1),
        window_end=end,
        request_count=requests,
        error_count=0,
        latency_counts=latency,
        features=features,
    )
    assert sim.client is not None, "connect the device first"
    info = sim.client.publish(device_topic(sim.device_id, Channel.TELEMETRY), window.model_dump_json(), qos=1)
    info.wait_for_publish(10)


@pytest.fixture
def dash(request: pytest.FixtureRequest, tmp_path: Path, mqtt_broker: Broker) -> Iterator[Dash]:
    """A real server process on a fresh SQLite database, connected to the shared Mosquitto; when the test fails,
    the end of the server's log is printed (pytest shows it under the failure)."""
    key = SigningKey.generate()
    _, pub = write_keypair(tmp_path / "keys" / "release.pem", key)
    keys = Keys(key, pub)
    server = ServerProcess(tmp_path, f"sqlite:///{tmp_path / 'server.db'}", keys, mqtt_broker)
    with server.running():
        yield Dash(server, tmp_path, keys)
    report = getattr(request.node, "rep_call", None)
    if report is not None and report.failed:
        print(f"--- end of {server.log}:\n{server.log.read_text(errors='replace')[-6000:]}")
