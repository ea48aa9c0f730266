"""Key files, the `edgeota keys` command and the provisioning file."""

from __future__ import annotations

import stat
import subprocess
import sys
from pathlib import Path

import pytest

from edgeota_contract.errors import ContractError, SignatureError
from edgeota_contract.provisioning import DeviceProvisioning
from edgeota_contract.signing import SigningKey, TrustedKeys, load_private_key, load_public_key, write_keypair


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "edgeota.cli", *args], capture_output=True, text=True, timeout=60)


def test_keys_generate_cli_and_refuse_overwrite(tmp_path: Path) -> None:
    target = tmp_path / "keys" / "release.pem"
    done = _cli("keys", "generate", str(target))
    assert done.returncode == 0, done.stderr
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    key = load_private_key(target)
    assert load_public_key(tmp_path / "keys" / "release.pub.pem") == key.public_key
    assert key.key_id in done.stdout
    again = _cli("keys", "generate", str(target))
    assert again.returncode != 0
    assert again.stderr.startswith("error: refusing to overwrite")
    assert "Traceback" not in again.stderr


@pytest.mark.parametrize("content", [None, b"", b"-----BEGIN PRIVATE KEY-----\nnope\n-----END PRIVATE KEY-----\n"])
def test_unreadable_keys_give_clear_errors(tmp_path: Path, content: bytes | None) -> None:
    path = tmp_path / "k.pem"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(SignatureError):
        load_private_key(path)
    with pytest.raises(SignatureError):
        load_public_key(path)


def test_non_ed25519_key_refused(tmp_path: Path) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    other = ec.generate_private_key(ec.SECP256R1())
    path = tmp_path / "ec.pem"
    path.write_bytes(
        other.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    with pytest.raises(SignatureError, match="not an Ed25519"):
        load_private_key(path)


def test_trusted_keys_pem_roundtrip_and_revoke(tmp_path: Path) -> None:
    a, b = SigningKey.generate(), SigningKey.generate()
    trusted = TrustedKeys.from_pems(TrustedKeys([a.public_key, b.public_key]).to_pems())
    assert trusted.key_ids == sorted([a.key_id, b.key_id])
    trusted.revoke(a.key_id)
    assert trusted.get(a.key_id) is None and len(trusted) == 1
    _priv, pub = write_keypair(tmp_path / "s.pem", a)
    assert TrustedKeys.from_files([pub]).key_ids == [a.key_id]


def _provisioning() -> DeviceProvisioning:
    key = SigningKey.generate()
    pem = key.public_pem().decode()
    return DeviceProvisioning.model_validate(
        {
            "device": {"id": "dev-1", "hardware_profile": "x86-avx2"},
            "server": {"url": "http://127.0.0.1:8080", "token": "t" * 32},
            "mqtt": {"host": "127.0.0.1", "port": 1883, "username": "dev-1", "password": 'p"w\\d'},
            "trust": {"release_keys": [pem], "server_keys": [pem]},
            "agent": {"state_dir": "/var/lib/edgeota", "heartbeat_seconds": 30, "trial_requests": 50},
        }
    )


def test_provisioning_toml_roundtrip(tmp_path: Path) -> None:
    prov = _provisioning()
    path = tmp_path / "agent.toml"
    path.write_text(prov.to_toml())
    assert DeviceProvisioning.load(path) == prov


@pytest.mark.parametrize(
    "text",
    ["not = [toml", '[device]\nid = "a/b"\nhardware_profile = "x"\n', ""],
)
def test_bad_provisioning_files(tmp_path: Path, text: str) -> None:
    path = tmp_path / "agent.toml"
    path.write_text(text)
    with pytest.raises(ContractError):
        DeviceProvisioning.load(path)
    with pytest.raises(ContractError, match="cannot read"):
        DeviceProvisioning.load(tmp_path / "missing.toml")
