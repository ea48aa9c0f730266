"""One emulated device: a real MQTT session speaking the exact device contract, without ONNX Runtime.

It verifies every command with the server key from its provisioning (signature, device id, expiry), downloads
an assigned bundle over HTTP with its device token and checks the sha256, reports the full status sequence
(downloading, downloaded, verifying, installing, trial, committed), checks in, and sends telemetry windows for
the model it runs. Device messages are re-sent until the server acknowledges them, as the agent does.
What it does not do: open the bundle, check its release signature, run the model or a trial window (an
emulated install always succeeds, unless its version is in ``fail_versions``).

Threads: paho callbacks arrive on the shared network loop; command handling and downloads run on the fleet's
workers (per device in order). State is guarded by one lock per device.
"""

from __future__ import annotations

import hashlib
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from device_agent.transport.outbox import next_send
from edgeota_contract.messages import (
    Ack,
    Assignment,
    CheckIn,
    CheckinRequest,
    Presence,
    RunningModel,
    StatusReport,
    TelemetryWindow,
    verify_command,
)
from edgeota_contract.provisioning import DeviceProvisioning
from edgeota_contract.signing import TrustedKeys
from edgeota_contract.states import DeploymentState, ReasonCode
from edgeota_contract.telemetry import LATENCY_EDGES_MS
from edgeota_contract.topics import Channel, device_topic

INSTALL_STEPS = (
    DeploymentState.DOWNLOADING,
    DeploymentState.DOWNLOADED,
    DeploymentState.VERIFYING,
    DeploymentState.INSTALLING,
    DeploymentState.TRIAL,
)
AGENT_VERSION = "emulator"


@dataclass(frozen=True)
class Unacked:
    """A sent device message the server has not acknowledged yet, and when it is due again."""

    topic: str
    payload: bytes
    last_sent: float
    due: float
    sends: int


@dataclass
class Counters:
    """What one device did (read by the fleet's snapshot; increments under the device's lock)."""

    commands: int = 0
    rejected: int = 0
    downloads: int = 0
    download_bytes: int = 0
    reused: int = 0
    """Installs that skipped the download: the archive was kept (the agent's ``bundle_reused``)."""
    committed: int = 0
    failed: int = 0
    telemetry_sent: int = 0
    resent: int = 0
    last_failure: str = ""
    """Why the last failed download failed (an HTTP status or an exception's name)."""


class EmulatedDevice:
    """See the module docstring. ``loop`` drives the MQTT socket; ``work(key, fn)`` runs ``fn`` off the loop."""

    download_delay: float = 0.0
    """Test-only hook: seconds an install waits after reporting ``downloading``, before it fetches the bundle
    (0: none). Set on a device to hold its installs in flight, e.g. to halt a rollout while they are on the way.
    The wait blocks the fleet worker that runs this device's commands: devices sharing a worker are held in turn."""

    def __init__(
        self,
        prov: DeviceProvisioning,
        http: httpx.Client,
        work: Callable[[str, Callable[[], None]], None],
        fail_versions: frozenset[str] = frozenset(),
        requests_per_window: int = 50,
        resend_seconds: float = 30.0,
        resend_max_seconds: float = 600.0,
    ) -> None:
        self.prov = prov
        self.device_id = prov.device.id
        self.profile = prov.device.hardware_profile
        self.keys = TrustedKeys.from_pems(prov.trust.server_keys)
        self.http = http
        self.work = work
        self.fail_versions = fail_versions
        self.requests_per_window = requests_per_window
        self.resend_seconds = resend_seconds
        self.resend_max_seconds = resend_max_seconds
        self.boot_id = uuid.uuid4().hex
        self.lock = threading.Lock()
        self.seq = 0
        self.models: dict[str, RunningModel] = {}
        self.finished: dict[str, DeploymentState] = {}  # deployment id -> final state (a replay re-reports it)
        self.kept: list[str] = []  # sha256 of the archives the agent keeps: the last two committed, latest last
        self.unacked: dict[str, Unacked] = {}
        self.counters = Counters()
        self.connected = threading.Event()
        self.window_start = datetime.now(UTC)
        self.client = self._make_client()

    # ------------------------------------------------------------------ MQTT

    def _make_client(self) -> mqtt.Client:
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=self.device_id, protocol=mqtt.MQTTv311, clean_session=False
        )
        if self.prov.mqtt.username:
            client.username_pw_set(self.prov.mqtt.username, self.prov.mqtt.password)
        client.will_set(
            device_topic(self.device_id, Channel.PRESENCE),
            Presence(online=False, boot_id=self.boot_id).model_dump_json(),
            qos=1,
            retain=True,
        )
        client.on_connect = self._on_connect
        client.on_disconnect = lambda *_a: self.connected.clear()
        client.on_message = self._on_message
        client.max_inflight_messages_set(50)
        client.max_queued_messages_set(0)
        client.connect_async(self.prov.mqtt.host, self.prov.mqtt.port, keepalive=60)
        return client

    def _on_connect(self, client: mqtt.Client, _u: Any, _f: Any, rc: Any, _p: Any) -> None:
        if getattr(rc, "is_failure", False):
            return
        client.subscribe(device_topic(self.device_id, Channel.CMD), qos=1)
        presence = Presence(online=True, boot_id=self.boot_id).model_dump_json().encode()
        client.publish(device_topic(self.device_id, Channel.PRESENCE), presence, qos=1, retain=True)
        self.connected.set()
        self.work(self.device_id, self.checkin)

    def _on_message(self, _c: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
        payload = bytes(msg.payload)
        self.work(self.device_id, lambda: self.handle_command(payload))

    def clear_presence(self) -> mqtt.MQTTMessageInfo:
        """Remove this device's retained presence from the broker (an emulator leaves nothing behind)."""
        return self.client.publish(device_topic(self.device_id, Channel.PRESENCE), b"", qos=1, retain=True)

    # ------------------------------------------------------------------ device messages

    def _next_seq(self) -> int:
        with self.lock:
            self.seq += 1
            return self.seq

    def _send(self, channel: Channel, msg: StatusReport | CheckIn | TelemetryWindow) -> None:
        topic = device_topic(self.device_id, channel)
        payload = msg.model_dump_json().encode()
        now = time.monotonic()
        with self.lock:
            due, sends = next_send(0, now, self.resend_seconds, self.resend_max_seconds)
            self.unacked[msg.msg_id] = Unacked(topic, payload, now, due, sends)
        self.client.publish(topic, payload, qos=1)

    def resend_due(self, older_than: float | None = None) -> int:
        """Re-send the unacknowledged messages that are due; returns how many.

        Default: on the agent's schedule (:func:`device_agent.transport.outbox.next_send`: ``resend_seconds``,
        doubled after each send up to ``resend_max_seconds``, jittered), so a lagging server is not flooded with
        copies faster than real agents would send them. ``older_than``: every message last sent at least that
        many seconds ago (the fleet's final drain).
        """
        now = time.monotonic()
        with self.lock:
            due = [
                (k, m)
                for k, m in self.unacked.items()
                if (now >= m.due if older_than is None else now - m.last_sent >= older_than)
            ]
            for key, m in due:
                next_due, sends = next_send(m.sends, now, self.resend_seconds, self.resend_max_seconds)
                self.unacked[key] = Unacked(m.topic, m.payload, now, next_due, sends)
            self.counters.resent += len(due)
        for _key, m in due:
            self.client.publish(m.topic, m.payload, qos=1)
        return len(due)

    def checkin(self) -> None:
        with self.lock:
            models = list(self.models.values())
        msg = CheckIn(
            boot_id=self.boot_id,
            seq=self._next_seq(),
            hardware_profile=self.profile,
            agent_version=AGENT_VERSION,
            models=models,
        )
        self._send(Channel.CHECKIN, msg)

    def report(self, a: Assignment, state: DeploymentState, reason: ReasonCode = ReasonCode.OK) -> None:
        msg = StatusReport(
            boot_id=self.boot_id,
            seq=self._next_seq(),
            deployment_id=a.deployment_id,
            assignment_id=a.assignment_id,
            state=state,
            reason=reason,
            model_name=a.model_name,
            version=a.version,
            bundle_sha256=a.bundle_sha256,
        )
        self._send(Channel.STATUS, msg)

    def send_telemetry(self) -> None:
        """One window per running model since the last one (nothing when no model runs)."""
        now = datetime.now(UTC)
        start, self.window_start = self.window_start, now
        with self.lock:
            models = list(self.models.values())
        for model in models:
            latency = [0] * (len(LATENCY_EDGES_MS) + 1)
            latency[2] = self.requests_per_window
            window = TelemetryWindow(
                boot_id=self.boot_id,
                seq=self._next_seq(),
                model_name=model.model_name,
                version=model.version,
                bundle_sha256=model.bundle_sha256,
                window_start=min(start, now - timedelta(milliseconds=1)),
                window_end=now,
                request_count=self.requests_per_window,
                error_count=0,
                latency_counts=latency,
            )
            self._send(Channel.TELEMETRY, window)
            with self.lock:
                self.counters.telemetry_sent += 1

    # ------------------------------------------------------------------ commands

    def handle_command(self, payload: bytes) -> None:
        try:
            cmd = verify_command(payload, self.keys, self.device_id)
        except Exception:
            with self.lock:
                self.counters.rejected += 1
            return
        with self.lock:
            self.counters.commands += 1
        if isinstance(cmd, Ack):
            with self.lock:
                for msg_id in cmd.msg_ids:
                    self.unacked.pop(msg_id, None)
        elif isinstance(cmd, Assignment) and cmd.mode != "shadow":
            self.install(cmd)
        elif isinstance(cmd, CheckinRequest):
            self.checkin()

    def install(self, a: Assignment) -> None:
        done = self.finished.get(a.deployment_id)
        if done is not None:  # a replayed assignment: report the final state again
            self.report(a, done)
            return
        self.report(a, DeploymentState.DOWNLOADING)
        if self.download_delay > 0:
            time.sleep(self.download_delay)  # the test-only in-flight window (see ``download_delay``)
        ok, size = self._download(a)
        if not ok:
            self._finish(a, DeploymentState.FAILED, ReasonCode.DIGEST_MISMATCH if size else ReasonCode.DOWNLOAD_FAILED)
            return
        for step in INSTALL_STEPS[1:]:
            self.report(a, step)
        if a.version in self.fail_versions and a.mode == "install":
            self._finish(a, DeploymentState.ROLLED_BACK, ReasonCode.SMOKE_TEST_FAILED)
            return
        running = RunningModel(
            model_name=a.model_name,
            version=a.version,
            bundle_sha256=a.bundle_sha256,
            release_counter=a.release_counter,
            slot="a",
        )
        with self.lock:
            self.models[a.model_name] = running
        self._finish(a, DeploymentState.COMMITTED)

    def _finish(self, a: Assignment, state: DeploymentState, reason: ReasonCode = ReasonCode.OK) -> None:
        self.finished[a.deployment_id] = state
        with self.lock:
            if state == DeploymentState.COMMITTED:
                self.counters.committed += 1
                self.kept = [*(s for s in self.kept if s != a.bundle_sha256), a.bundle_sha256][-2:]
            else:
                self.counters.failed += 1
        self.report(a, state, reason)

    def _download(self, a: Assignment) -> tuple[bool, int]:
        """GET the bundle (the device token only for the server's own origin) and check its sha256; an archive
        kept from one of the last two commits is reused without a request, as the agent does."""
        with self.lock:
            if a.bundle_sha256 in self.kept:
                self.counters.reused += 1
                return True, a.bundle_size
        server = self.prov.server.url.rstrip("/")
        url = a.bundle_url if a.bundle_url.startswith(("http://", "https://")) else server + a.bundle_url
        headers = {"Authorization": f"Bearer {self.prov.server.token}"} if url.startswith(server) else {}
        digest = hashlib.sha256()
        size = 0
        try:
            # httpx drops the Authorization header on a redirect to another origin (an object store).
            with self.http.stream("GET", url, headers=headers, follow_redirects=True) as resp:
                if resp.status_code != 200:
                    self._failed_because(f"http {resp.status_code}")
                    return False, 0
                for chunk in resp.iter_bytes(65536):
                    digest.update(chunk)
                    size += len(chunk)
        except httpx.HTTPError as exc:
            self._failed_because(type(exc).__name__)
            return False, 0
        with self.lock:
            self.counters.downloads += 1
            self.counters.download_bytes += size
        ok = digest.hexdigest() == a.bundle_sha256 and size == a.bundle_size
        if not ok:
            self._failed_because("digest mismatch")
        return ok, size

    def _failed_because(self, why: str) -> None:
        with self.lock:
            self.counters.last_failure = why
