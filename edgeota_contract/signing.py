"""Ed25519 keys, key ids, canonical JSON and detached signatures.

Two kinds of key use this module: *release keys* (offline, held by release managers; they
sign bundle manifests) and *server keys* (online, held by the OTA server; they sign
per-device commands). A device trusts a fixed set of each, provisioned with it, so the
server alone can never make a device install a bundle that no release key signed.

Guarantees: :func:`verify_detached` returns only if the signature was made over exactly
those bytes by one of the trusted keys; otherwise it raises :class:`SignatureError`.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from pydantic import BaseModel, ConfigDict, Field

from edgeota_contract.errors import SignatureError
from edgeota_contract.states import ReasonCode

SIGNATURE_ALGORITHM = "ed25519"


def canonical_json(value: Any) -> bytes:
    """Deterministic JSON bytes: sorted keys, no insignificant space, UTF-8, no NaN.

    Signatures are always made over these bytes, so signer and verifier agree byte for byte.
    """
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode("utf-8")


def key_id_of(public_key: Ed25519PublicKey) -> str:
    """Stable id of a public key: the first 16 hex digits of sha256 over its raw 32 bytes."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


class DetachedSignature(BaseModel):
    """A signature stored beside what it signs (``manifest.sig`` in a bundle, ``sig`` in a command)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    alg: str = Field(default=SIGNATURE_ALGORITHM, pattern=f"^{SIGNATURE_ALGORITHM}$")
    key_id: str = Field(pattern=r"^[0-9a-f]{16}$")
    sig: str = Field(min_length=1, max_length=200, description="base64 of the 64-byte Ed25519 signature")


@dataclass(frozen=True)
class SigningKey:
    """A private Ed25519 key with its id."""

    private_key: Ed25519PrivateKey

    @property
    def public_key(self) -> Ed25519PublicKey:
        return self.private_key.public_key()

    @property
    def key_id(self) -> str:
        return key_id_of(self.public_key)

    def sign(self, data: bytes) -> DetachedSignature:
        raw = self.private_key.sign(data)
        return DetachedSignature(key_id=self.key_id, sig=base64.b64encode(raw).decode("ascii"))

    @classmethod
    def generate(cls) -> SigningKey:
        return cls(Ed25519PrivateKey.generate())

    def private_pem(self) -> bytes:
        return self.private_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )

    def public_pem(self) -> bytes:
        return public_pem(self.public_key)


def public_pem(public_key: Ed25519PublicKey) -> bytes:
    return public_key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


class TrustedKeys:
    """A set of public keys trusted for one purpose (release or server), looked up by key id."""

    def __init__(self, keys: Iterable[Ed25519PublicKey] = ()) -> None:
        self._keys: dict[str, Ed25519PublicKey] = {}
        for key in keys:
            self.add(key)

    def add(self, key: Ed25519PublicKey) -> str:
        kid = key_id_of(key)
        self._keys[kid] = key
        return kid

    def revoke(self, key_id: str) -> None:
        self._keys.pop(key_id, None)

    @property
    def key_ids(self) -> list[str]:
        return sorted(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def get(self, key_id: str) -> Ed25519PublicKey | None:
        return self._keys.get(key_id)

    def to_pems(self) -> list[str]:
        return [public_pem(self._keys[k]).decode("ascii") for k in self.key_ids]

    @classmethod
    def from_pems(cls, pems: Iterable[str | bytes]) -> TrustedKeys:
        return cls(load_public_key_pem(p if isinstance(p, bytes) else p.encode("ascii")) for p in pems)

    @classmethod
    def from_files(cls, paths: Iterable[str | os.PathLike[str]]) -> TrustedKeys:
        return cls(load_public_key(p) for p in paths)


def verify_detached(data: bytes, signature: DetachedSignature | None, trusted: TrustedKeys) -> str:
    """Check ``signature`` over ``data`` against ``trusted``; return the signing key id.

    Raises:
        SignatureError: with reason ``signature_missing``, ``unknown_key`` or ``signature_invalid``.
    """
    if signature is None:
        raise SignatureError("signature missing", ReasonCode.SIGNATURE_MISSING)
    key = trusted.get(signature.key_id)
    if key is None:
        raise SignatureError(f"signed by untrusted key {signature.key_id}", ReasonCode.UNKNOWN_KEY)
    try:
        raw = base64.b64decode(signature.sig, validate=True)
        key.verify(raw, data)
    except (InvalidSignature, ValueError) as exc:
        raise SignatureError(
            f"signature by key {signature.key_id} does not match the signed data", ReasonCode.SIGNATURE_INVALID
        ) from exc
    return signature.key_id


def load_private_key(path: str | os.PathLike[str]) -> SigningKey:
    """Load a PEM (PKCS#8) Ed25519 private key.

    Raises:
        SignatureError: the file is missing, unreadable or not an Ed25519 private key.
    """
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise SignatureError(f"cannot read key file {path}: {exc.strerror or exc}", ReasonCode.UNKNOWN_KEY) from exc
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise SignatureError(f"{path} is not a PEM private key", ReasonCode.UNKNOWN_KEY) from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise SignatureError(f"{path} is not an Ed25519 private key", ReasonCode.UNKNOWN_KEY)
    return SigningKey(key)


def load_public_key_pem(data: bytes) -> Ed25519PublicKey:
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError) as exc:
        raise SignatureError("not a PEM public key", ReasonCode.UNKNOWN_KEY) from exc
    if not isinstance(key, Ed25519PublicKey):
        raise SignatureError("not an Ed25519 public key", ReasonCode.UNKNOWN_KEY)
    return key


def load_public_key(path: str | os.PathLike[str]) -> Ed25519PublicKey:
    """Load a PEM Ed25519 public key (or take the public half of a private key file)."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise SignatureError(f"cannot read key file {path}: {exc.strerror or exc}", ReasonCode.UNKNOWN_KEY) from exc
    if b"PRIVATE KEY" in data:
        return load_private_key(path).public_key
    try:
        return load_public_key_pem(data)
    except SignatureError as exc:
        raise SignatureError(f"{path}: {exc}", ReasonCode.UNKNOWN_KEY) from exc


def write_keypair(private_path: str | os.PathLike[str], key: SigningKey | None = None) -> tuple[Path, Path]:
    """Write ``NAME.pem`` (0600) and ``NAME.pub.pem`` beside it, creating missing parent folders.

    All or nothing: when either file cannot be written, neither key file nor any folder this call
    created is left behind.

    Raises:
        SignatureError: either file already exists (a key is never overwritten), a parent is not a
            folder, or the files cannot be written; the message is one line.
    """
    key = key or SigningKey.generate()
    priv = Path(private_path)
    pub = priv.with_name(priv.name.removesuffix(".pem") + ".pub.pem")
    for path in (priv, pub):
        if path.is_dir():
            raise SignatureError(f"{path} is a folder, not a key file path", ReasonCode.UNKNOWN_KEY)
        if path.exists():
            raise SignatureError(f"refusing to overwrite existing key {path}", ReasonCode.UNKNOWN_KEY)
    created = _make_parents(priv.parent)
    written: list[Path] = []
    try:
        for path, data, mode in ((priv, key.private_pem(), 0o600), (pub, key.public_pem(), 0o644)):
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
            written.append(path)
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
    except OSError as exc:
        for path in written:
            path.unlink(missing_ok=True)
        for folder in reversed(created):
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise SignatureError(
            f"cannot write key file {exc.filename or priv}: {exc.strerror or exc}", ReasonCode.UNKNOWN_KEY
        ) from exc
    return priv, pub


def _make_parents(folder: Path) -> list[Path]:
    """Create ``folder`` and its missing parents; return those created, outermost first.

    Raises:
        SignatureError: a parent exists but is not a folder, or a folder cannot be created.
    """
    missing: list[Path] = []
    for parent in (folder, *folder.parents):
        if parent.is_dir():
            break
        if parent.exists():
            raise SignatureError(f"cannot create {folder}: {parent} is a file, not a folder", ReasonCode.UNKNOWN_KEY)
        missing.append(parent)
    created: list[Path] = []
    for parent in reversed(missing):
        try:
            parent.mkdir()
        except FileExistsError:
            continue  # made meanwhile by someone else: not ours to remove
        except OSError as exc:
            for done in reversed(created):
                with contextlib.suppress(OSError):
                    done.rmdir()
            raise SignatureError(
                f"cannot create folder {parent}: {exc.strerror or exc}", ReasonCode.UNKNOWN_KEY
            ) from exc
        created.append(parent)
    return created
