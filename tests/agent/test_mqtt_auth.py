"""The agent under the production broker setup: per-device password and the contract's ACL patterns."""

from __future__ import annotations

import getpass
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from device_agent.agent import Agent
from device_agent.settings import AgentConfig
from edgeota_contract.provisioning import DeviceProvisioning
from edgeota_contract.topics import mosquitto_acl_patterns
from tests.agent.conftest import BundleRef, Keys, assignment, signed, write_config
from tests.agent.http_server import BundleServer

pytestmark = pytest.mark.integration


class AdminRecorder:
    """An admin client (full ACL) recording one device's topics."""

    def __init__(self, port: int, device_id: str) -> None:
        self.device_id = device_id
        self.messages: list[tuple[str, bytes]] = []
        self.client = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id="admin")
        self.client.username_pw_set("admin", "admin-pw")
        self.client.on_message = lambda c, u, m: self.messages.append((m.topic, m.payload))
        self.client.connect("127.0.0.1", port)
        self.client.subscribe(f"edgeota/v1/devices/{device_id}/#", qos=1)
        self.client.loop_start()
        time.sleep(0.3)

    def states(self) -> list[str]:
        import json

        return [json.loads(p)["state"] for t, p in self.messages if t.endswith("/status")]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def _broker(tmp_path: Path, private_mosquitto: Any, device_id: str) -> Any:
    pwfile = tmp_path / "passwd"
    pwfile.write_text("")
    for user, pw in ((device_id, "device-pw"), ("admin", "admin-pw")):
        subprocess.run(["mosquitto_passwd", "-b", str(pwfile), user, pw], check=True, capture_output=True)
    acl = tmp_path / "acl"
    acl.write_text("user admin\ntopic readwrite #\n\n" + "\n".join(mosquitto_acl_patterns()) + "\n")
    # run as ourselves: as root Mosquitto would switch users and lose access to the test's files
    extra = ["allow_anonymous false", f"password_file {pwfile}", f"acl_file {acl}", f"user {getpass.getuser()}"]
    return private_mosquitto(extra)


def _config(tmp_path: Path, keys: Keys, server: BundleServer, port: int, device_id: str, password: str) -> Path:
    path = write_config(tmp_path / "dev", keys, server.url, device_id=device_id, mqtt_port=port)
    prov = DeviceProvisioning.load(path)
    prov.mqtt.password = password
    path.write_text(prov.to_toml())
    return path


def test_agent_works_under_password_and_acl(
    tmp_path: Path, keys: Keys, server: BundleServer, private_mosquitto: Any, publish_bundle: Callable[..., BundleRef]
) -> None:
    device_id = "acl-dev-1"
    broker = _broker(tmp_path, private_mosquitto, device_id)
    rec = AdminRecorder(broker.port, device_id)
    try:
        with Agent(AgentConfig.load(_config(tmp_path, keys, server, broker.port, device_id, "device-pw"))) as agent:
            assert agent.transport is not None and agent.transport.wait_connected(15)
            rec.client.publish(
                f"edgeota/v1/devices/{device_id}/cmd",
                signed(assignment(publish_bundle("1.0.0"), device_id=device_id), keys.server),
                qos=1,
            )
            deadline = time.monotonic() + 30
            while "committed" not in rec.states() and time.monotonic() < deadline:
                time.sleep(0.05)
            assert rec.states()[-1] == "committed", rec.states()
            assert any(t.endswith("/checkin") for t, _ in rec.messages)
    finally:
        rec.close()


def test_wrong_password_is_refused(tmp_path: Path, keys: Keys, server: BundleServer, private_mosquitto: Any) -> None:
    device_id = "acl-dev-2"
    broker = _broker(tmp_path, private_mosquitto, device_id)
    cfg = AgentConfig.load(_config(tmp_path, keys, server, broker.port, device_id, "wrong"))
    with Agent(cfg) as agent:
        assert agent.transport is not None
        assert not agent.transport.wait_connected(2.0)


def _tls_files(folder: Path) -> tuple[Path, Path, Path]:
    """A throwaway CA and a server certificate for 127.0.0.1 (PEM files: ca, cert, key)."""
    import datetime as dt
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "edgeota test ca")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=1))
        .not_valid_after(now + dt.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=1))
        .not_valid_after(now + dt.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    paths = folder / "ca.pem", folder / "server.pem", folder / "server.key"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return paths


def test_tls_with_the_provisioned_ca(tmp_path: Path, keys: Keys, server: BundleServer, private_mosquitto: Any) -> None:
    ca, cert, key = _tls_files(tmp_path)
    broker = private_mosquitto(
        ["allow_anonymous true", f"cafile {ca}", f"certfile {cert}", f"keyfile {key}", f"user {getpass.getuser()}"]
    )
    path = write_config(tmp_path / "dev", keys, server.url, device_id="tls-dev", mqtt_port=broker.port)
    prov = DeviceProvisioning.load(path)
    prov.mqtt.tls = True
    prov.mqtt.ca_file = str(ca)
    path.write_text(prov.to_toml())
    with Agent(AgentConfig.load(path)) as agent:
        assert agent.transport is not None and agent.transport.wait_connected(15)
    # without TLS the same listener refuses the agent
    prov.mqtt.tls = False
    path.write_text(prov.to_toml())
    with Agent(AgentConfig.load(path)) as plain:
        assert plain.transport is not None and not plain.transport.wait_connected(2.0)
