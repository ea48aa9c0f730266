"""A simulated device for server tests: a plain paho client that follows the contract.

It verifies every command with the server key from its agent.toml, downloads the bundle over
HTTP with its device token (checking the digest), and answers with status reports. ``fail``
(``fail_versions``) makes installs of those versions fail (smoke test), as a bad model would.
"""

from __future__ import annotations

import hashlib
import queue
import threading
import uuid
from dataclasses import dataclass, field

import httpx
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from edgeota_contract.messages import (
    Ack,
    Assignment,
    CheckIn,
    Presence,
    RunningModel,
    StatusReport,
    verify_command,
)
from edgeota_contract.provisioning import DeviceProvisioning
from edgeota_contract.signing import TrustedKeys
from edgeota_contract.states import DeploymentState, ReasonCode
from edgeota_contract.topics import Channel, device_topic

STEPS = [
    DeploymentState.DOWNLOADING,
    DeploymentState.DOWNLOADED,
    DeploymentState.VERIFYING,
    DeploymentState.INSTALLING,
    DeploymentState.TRIAL,
]


@dataclass
class SimDevice:
    prov: DeviceProvisioning
    fail_versions: set[str] = field(default_factory=set)
    flaky_downloads: int = 0
    """This many install assignments fail with ``download_failed`` (a transient fault) before one succeeds."""
    models: dict[str, RunningModel] = field(default_factory=dict)
    assignments: list[Assignment] = field(default_factory=list)
    acked: set[str] = field(default_factory=set)
    rejected: int = 0
    finished: dict[str, DeploymentState] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.device_id = self.prov.device.id
        self.boot_id = uuid.uuid4().hex
        self.seq = 0
        self.keys = TrustedKeys.from_pems(self.prov.trust.server_keys)
        self.inbox: queue.Queue[bytes | None] = queue.Queue()
        self.lock = threading.Lock()
        self.client: mqtt.Client | None = None
        self.worker: threading.Thread | None = None
        self.connected = threading.Event()

    # ------------------------------------------------------------ connection
    def connect(self) -> None:
        c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=self.device_id, protocol=mqtt.MQTTv311)
        c.username_pw_set(self.prov.mqtt.username, self.prov.mqtt.password)
        c.will_set(
            device_topic(self.device_id, Channel.PRESENCE),
            Presence(online=False, boot_id=self.boot_id).model_dump_json(),
            qos=1,
            retain=True,
        )
        c.on_connect = self._on_connect
        c.on_message = lambda _c, _u, msg: self.inbox.put(bytes(msg.payload))
        c.connect(self.prov.mqtt.host, self.prov.mqtt.port, keepalive=30)
        self.client = c
        c.loop_start()
        self.worker = threading.Thread(target=self._work, daemon=True)
        self.worker.start()
        if not self.connected.wait(10):
            raise TimeoutError("simulated device could not connect")

    def disconnect(self) -> None:
        if self.client is not None:
            self.client.disconnect()
            self.client.loop_stop()
            self.client = None
        self.connected.clear()
        self.inbox.put(None)
        if self.worker is not None:
            self.worker.join(timeout=10)

    def _on_connect(self, c: mqtt.Client, _u: object, _f: object, rc: object, _p: object) -> None:
        if getattr(rc, "is_failure", False):
            return
        c.subscribe(device_topic(self.device_id, Channel.CMD), qos=1)
        self._publish(Channel.PRESENCE, Presence(online=True, boot_id=self.boot_id).model_dump_json(), retain=True)
        self.checkin()
        self.connected.set()

    # ------------------------------------------------------------ reports
    def _next_seq(self) -> int:
        with self.lock:
            self.seq += 1
            return self.seq

    def _publish(self, channel: Channel, payload: str, retain: bool = False) -> None:
        if self.client is not None:
            self.client.publish(device_topic(self.device_id, channel), payload, qos=1, retain=retain)

    def checkin(self) -> None:
        msg = CheckIn(
            boot_id=self.boot_id,
            seq=self._next_seq(),
            hardware_profile=self.prov.device.hardware_profile,
            agent_version="sim",
            models=list(self.models.values()),
        )
        self._publish(Channel.CHECKIN, msg.model_dump_json())

    def report(self, a: Assignment, state: DeploymentState, reason: ReasonCode = ReasonCode.OK) -> StatusReport:
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
        self._publish(Channel.STATUS, msg.model_dump_json())
        return msg

    # ------------------------------------------------------------ commands
    def _work(self) -> None:
        while True:
            payload = self.inbox.get()
            if payload is None:
                return
            try:
                cmd = verify_command(payload, self.keys, self.device_id)
            except Exception:
                self.rejected += 1
                continue
            if isinstance(cmd, Ack):
                self.acked.update(cmd.msg_ids)
            elif isinstance(cmd, Assignment):
                self._install(cmd)

    def _install(self, a: Assignment) -> None:
        self.assignments.append(a)
        done = self.finished.get(a.deployment_id)
        if done is not None:
            self.report(a, done)  # replayed deployment: re-report the final state
            return
        if self.flaky_downloads > 0 and a.mode == "install":
            self.flaky_downloads -= 1
            self.report(a, DeploymentState.DOWNLOADING)
            self.finished[a.deployment_id] = DeploymentState.FAILED
            self.report(a, DeploymentState.FAILED, ReasonCode.DOWNLOAD_FAILED)
            return
        url = a.bundle_url if a.bundle_url.startswith("http") else self.prov.server.url + a.bundle_url
        resp = httpx.get(url, headers={"Authorization": f"Bearer {self.prov.server.token}"}, timeout=10)
        if resp.status_code != 200 or hashlib.sha256(resp.content).hexdigest() != a.bundle_sha256:
            self.finished[a.deployment_id] = DeploymentState.FAILED
            self.report(a, DeploymentState.FAILED, ReasonCode.DOWNLOAD_FAILED)
            return
        for step in STEPS:
            self.report(a, step)
        if a.version in self.fail_versions and a.mode == "install":
            self.finished[a.deployment_id] = DeploymentState.ROLLED_BACK
            self.report(a, DeploymentState.ROLLED_BACK, ReasonCode.SMOKE_TEST_FAILED)
            return
        self.models[a.model_name] = RunningModel(
            model_name=a.model_name,
            version=a.version,
            bundle_sha256=a.bundle_sha256,
            release_counter=a.release_counter,
            slot="a",
        )
        self.finished[a.deployment_id] = DeploymentState.COMMITTED
        self.report(a, DeploymentState.COMMITTED)
