"""The device token and TLS: no token in clear to another machine; certificates verified for HTTP and MQTT.

- The agent refuses a plain-http server URL on another host unless ``allow_insecure_http`` is set, and
  its one HTTP client refuses to send a token that way (the server sees no request at all).
- https: a server certificate from another CA, or for another host name, is refused before a request
  (and so the token) is sent; one from the trusted CA for the right host is accepted.
- MQTT over TLS: the agent does not connect to a broker whose certificate is from another CA or for
  another host name, and does connect to the right one.

Certificates come from a test CA made here with ``cryptography``.
"""

from __future__ import annotations

import getpass
import ipaddress
import socket
import ssl
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from device_agent.agent import Agent
from device_agent.settings import AgentConfig
from device_agent.transport.http import FetchError, open_url
from device_agent.transport.poll import fetch_commands
from device_agent.update.download import DownloadError, DownloadPolicy, download
from edgeota_contract.errors import ContractError
from edgeota_contract.provisioning import DeviceProvisioning
from tests.agent.conftest import TOKEN, Keys, write_config

# ------------------------------------------------------------------ a test CA


@dataclass(frozen=True)
class Ca:
    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate

    @classmethod
    def make(cls, name: str) -> Ca:
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = datetime.now(UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(minutes=5))
            .not_valid_after(now + timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    key_cert_sign=True,
                    crl_sign=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .sign(key, hashes.SHA256())
        )
        return cls(key, cert)

    def write(self, folder: Path) -> Path:
        path = folder / f"ca-{self.cert.serial_number}.pem"
        path.write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))
        return path

    def issue(self, folder: Path, name: str, *, ip: str | None = None, dns: str | None = None) -> tuple[Path, Path]:
        """A server certificate for ``ip`` and/or ``dns``; returns (cert chain file, key file)."""
        key = ec.generate_private_key(ec.SECP256R1())
        names: list[x509.GeneralName] = []
        if ip:
            names.append(x509.IPAddress(ipaddress.ip_address(ip)))
        if dns:
            names.append(x509.DNSName(dns))
        now = datetime.now(UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, dns or ip or name)]))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(minutes=5))
            .not_valid_after(now + timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .sign(self.key, hashes.SHA256())
        )
        cert_path, key_path = folder / f"{name}.crt", folder / f"{name}.key"
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_path.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
        return cert_path, key_path


@dataclass(frozen=True)
class Certs:
    ca_file: Path
    good: tuple[Path, Path]
    wrong_ca: tuple[Path, Path]
    wrong_host: tuple[Path, Path]


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    folder = tmp_path_factory.mktemp("certs")
    trusted, stranger = Ca.make("edgeota test CA"), Ca.make("someone else's CA")
    return Certs(
        ca_file=trusted.write(folder),
        good=trusted.issue(folder, "good", ip="127.0.0.1", dns="localhost"),
        wrong_ca=stranger.issue(folder, "wrong-ca", ip="127.0.0.1", dns="localhost"),
        wrong_host=trusted.issue(folder, "wrong-host", dns="ota.other.example"),
    )


# ------------------------------------------------------------------ recording HTTP(S) servers


class Recorder:
    """A threaded HTTP server answering 200 with a small JSON body, recording each request's headers."""

    def __init__(self, host: str, tls: tuple[Path, Path] | None = None) -> None:
        self.requests: list[dict[str, str]] = []
        owner = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                owner.requests.append({k.lower(): v for k, v in self.headers.items()})
                body = b'{"commands": []}'
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        class Quiet(ThreadingHTTPServer):
            def handle_error(self, request: Any, client_address: Any) -> None:
                pass  # refused handshakes are what these tests provoke

        self.server = Quiet((host, 0), Handler)
        if tls is not None:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.load_cert_chain(str(tls[0]), str(tls[1]))
            self.server.socket = ctx.wrap_socket(self.server.socket, server_side=True, do_handshake_on_connect=False)
        self.port = int(self.server.server_address[1])
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _non_loopback_address() -> str:
    """An address of this machine that is not loopback (the route out; no packet is sent)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.connect(("192.0.2.1", 9))
        address = str(sock.getsockname()[0])
    if ipaddress.ip_address(address).is_loopback:
        pytest.fail("the test needs a network interface other than loopback")
    return address


@pytest.fixture
def lan_server() -> Iterator[tuple[Recorder, str]]:
    """A plain-http server reachable at this machine's non-loopback address."""
    address = _non_loopback_address()
    rec = Recorder("0.0.0.0")
    yield rec, f"http://{address}:{rec.port}"
    rec.close()


# ------------------------------------------------------------------ plain http


def test_the_token_is_not_sent_over_plain_http_to_another_host(lan_server: tuple[Recorder, str]) -> None:
    rec, url = lan_server
    with pytest.raises(FetchError, match="allow_insecure_http"):
        open_url(f"{url}/api/v1/artifacts/x", token=TOKEN, timeout=5)
    with pytest.raises(FetchError, match="plain http"):
        fetch_commands(f"{url}/api/v1/devices/dev-1/commands", TOKEN, 5)
    assert rec.requests == []  # refused before connecting
    # Without a token (public TUF metadata), or when the setting allows it, the request goes out.
    with open_url(f"{url}/tuf/1.root.json", timeout=5) as resp:
        assert resp.status == 200
    assert fetch_commands(f"{url}/api/v1/devices/dev-1/commands", TOKEN, 5, allow_insecure_http=True) == []
    assert [r.get("authorization") for r in rec.requests] == [None, f"Bearer {TOKEN}"]


def test_a_download_to_another_host_over_plain_http_is_refused(
    lan_server: tuple[Recorder, str], tmp_path: Path
) -> None:
    rec, url = lan_server
    part = tmp_path / "b.part"
    with pytest.raises(DownloadError, match="allow_insecure_http"):
        download(f"{url}/api/v1/artifacts/x", part, 16, token=TOKEN, policy=DownloadPolicy(retries=0))
    assert rec.requests == [] and not part.exists()


def test_loopback_plain_http_is_allowed() -> None:
    rec = Recorder("127.0.0.1")
    try:
        for host in ("127.0.0.1", "localhost"):
            with open_url(f"http://{host}:{rec.port}/x", token=TOKEN, timeout=5) as resp:
                assert resp.status == 200
        assert [r["authorization"] for r in rec.requests] == [f"Bearer {TOKEN}"] * 2
    finally:
        rec.close()


def _config_with_url(tmp_path: Path, keys: Keys, url: str, **agent: Any) -> Path:
    return write_config(tmp_path / f"dev-{len(list(tmp_path.iterdir()))}", keys, url, **agent)


def test_the_agent_refuses_a_plain_http_server_on_another_host_unless_allowed(tmp_path: Path, keys: Keys) -> None:
    with pytest.raises(ContractError, match="allow_insecure_http") as refused:
        AgentConfig.load(_config_with_url(tmp_path, keys, "http://ota.example:8080"))
    assert "ota.example" in str(refused.value)
    allowed = AgentConfig.load(_config_with_url(tmp_path, keys, "http://ota.example:8080", allow_insecure_http=True))
    assert allowed.settings.allow_insecure_http is True
    for url in ("https://ota.example", "http://127.0.0.1:8080", "http://localhost:8080", "http://[::1]:8080"):
        AgentConfig.load(_config_with_url(tmp_path, keys, url))


# ------------------------------------------------------------------ https


@pytest.mark.parametrize("case", ["good", "wrong_ca", "wrong_host"])
def test_https_certificates_are_verified(case: str, certs: Certs, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SSL_CERT_FILE", str(certs.ca_file))  # the device's trust store: the test CA only
    rec = Recorder("127.0.0.1", tls=getattr(certs, case))
    try:
        url = f"https://127.0.0.1:{rec.port}/api/v1/devices/dev-1/commands"
        if case == "good":
            assert fetch_commands(url, TOKEN, 5) == []
            assert [r["authorization"] for r in rec.requests] == [f"Bearer {TOKEN}"]
        else:
            with pytest.raises(ssl.SSLCertVerificationError) as refused:
                open_url(url, token=TOKEN, timeout=5)
            expected = "unable to get local issuer" if case == "wrong_ca" else "IP address mismatch"
            assert expected in str(refused.value)
            assert rec.requests == []  # the token never left the device
    finally:
        rec.close()


# ------------------------------------------------------------------ MQTT over TLS


def _tls_config(tmp_path: Path, keys: Keys, port: int, ca_file: Path, host: str = "127.0.0.1") -> Path:
    path = write_config(tmp_path / "dev", keys, "http://127.0.0.1:9", mqtt_port=port)
    prov = DeviceProvisioning.load(path)
    prov.mqtt.host = host
    prov.mqtt.tls = True
    prov.mqtt.ca_file = str(ca_file)
    path.write_text(prov.to_toml())
    return path


@pytest.mark.integration
@pytest.mark.parametrize("case", ["good", "wrong_ca", "wrong_host"])
def test_mqtt_tls_certificates_are_verified(
    case: str, certs: Certs, tmp_path: Path, keys: Keys, private_mosquitto: Any
) -> None:
    cert, key = getattr(certs, case)
    broker = private_mosquitto(
        [
            "allow_anonymous true",
            f"cafile {certs.ca_file}",
            f"certfile {cert}",
            f"keyfile {key}",
            f"user {getpass.getuser()}",  # as root Mosquitto would switch users and lose the test's key file
        ]
    )
    config = AgentConfig.load(_tls_config(tmp_path, keys, broker.port, certs.ca_file))
    with Agent(config) as agent:
        assert agent.transport is not None
        connected = agent.transport.wait_connected(10 if case == "good" else 3)
    assert connected is (case == "good")
