"""The server's TUF repository (python-tuf metadata): freshness, rollback, key rotation and thresholds.

An added layer beside the release-key and server-key signatures, never a replacement. Every bundle
the server accepts becomes a target ``bundles/<sha256>`` (length, sha256, and its model, version,
profile and release counter as ``custom``); devices refuse an assignment whose bundle is not such a
target of fresh, properly signed metadata (:mod:`device_agent.update.tuf_client`).

Layout under ``base`` (``Settings.resolved_tuf_dir``)::

    metadata/   served read-only at /tuf/: N.root.json, timestamp.json, N.snapshot.json, N.targets.json
    keys/       timestamp.pem, snapshot.pem, targets.pem (online, 0600); root-K.pem when generated here
    .lock       flock: one writer at a time across threads and processes (API workers, core, CLI)

Consistent snapshots: a new snapshot or targets version is a new file, and ``timestamp.json`` (replaced
atomically, last) names the snapshot version, so a client mid-refresh always reads one consistent set.

Guarantees: every write is atomic (temp file, fsync, rename); the online keys are re-read for each
signature, so a rotation by the CLI takes effect in a running server at once. Errors:
:class:`TufRepositoryError` (reason ``repository_metadata_invalid``) for a missing repository, too few
root keys to sign a rotation, or a key file that is not an Ed25519 private key.
"""

from __future__ import annotations

import fcntl
import os
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

# Both packages re-export these names without __all__, which mypy --strict does not see as an export.
from securesystemslib.signer import CryptoSigner, Signer, SSlibKey  # type: ignore[attr-defined]
from tuf.api.exceptions import UnsignedMetadataError
from tuf.api.metadata import Metadata, MetaFile, Root, Snapshot, TargetFile, Targets, Timestamp  # type: ignore[attr-defined]

from edgeota_contract.errors import EdgeotaError, SignatureError
from edgeota_contract.provisioning import tuf_target_path
from edgeota_contract.signing import SigningKey, load_private_key, write_keypair
from edgeota_contract.states import ReasonCode

ONLINE_ROLES = ("targets", "snapshot", "timestamp")
METADATA_NAME = re.compile(r"^(?:(?P<version>[1-9][0-9]{0,9})\.(?P<role>root|snapshot|targets)|timestamp)\.json$")
T = TypeVar("T", Root, Timestamp, Snapshot, Targets)


class TufRepositoryError(EdgeotaError):
    default_reason = ReasonCode.REPOSITORY_METADATA_INVALID


@dataclass(frozen=True)
class TufPolicy:
    """Lifetimes of the four roles. Online roles are re-signed once less than half their lifetime is left."""

    timestamp_expiry: timedelta = timedelta(days=1)
    snapshot_expiry: timedelta = timedelta(days=7)
    targets_expiry: timedelta = timedelta(days=7)
    root_expiry: timedelta = timedelta(days=365)

    def lifetime(self, role: str) -> timedelta:
        return {
            "timestamp": self.timestamp_expiry,
            "snapshot": self.snapshot_expiry,
            "targets": self.targets_expiry,
            "root": self.root_expiry,
        }[role]


@dataclass
class RotationResult:
    root_version: int
    root_keyids: list[str]
    root_threshold: int
    rotated_roles: list[str]
    new_key_files: list[Path] = field(default_factory=list)


def _now(now: datetime | None) -> datetime:
    return (now or datetime.now(UTC)).replace(microsecond=0)


def _signer(key: SigningKey) -> CryptoSigner:
    return CryptoSigner(key.private_key, SSlibKey.from_crypto(key.public_key))


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    fd = os.open(path.parent, os.O_RDONLY)
    try:  # the rename itself survives a power cut
        os.fsync(fd)
    finally:
        os.close(fd)


class TufRepository:
    """One TUF repository on disk. Cheap to construct; every operation reads the current files."""

    def __init__(self, base: Path, policy: TufPolicy | None = None) -> None:
        self.base = base
        self.policy = policy or TufPolicy()
        self.metadata_dir = base / "metadata"
        self.keys_dir = base / "keys"

    # ------------------------------------------------------------------ reading

    def is_initialized(self) -> bool:
        return (self.metadata_dir / "1.root.json").is_file() and (self.metadata_dir / "timestamp.json").is_file()

    def read_metadata(self, filename: str) -> bytes:
        """The bytes of one served metadata file.

        Raises:
            ValueError: ``filename`` is not a metadata file name (nothing outside ``metadata/`` is reachable).
            FileNotFoundError: no such version.
        """
        if not METADATA_NAME.fullmatch(filename):
            raise ValueError(f"not a TUF metadata file name: {filename!r}")
        return (self.metadata_dir / filename).read_bytes()

    def root_version(self) -> int:
        versions = [
            int(m.group("version")) for p in self.metadata_dir.glob("*.root.json") if (m := METADATA_NAME.match(p.name))
        ]
        if not versions:
            raise TufRepositoryError(f"no TUF repository at {self.base}; run `edgeota server tuf init`")
        return max(versions)

    def root_json(self) -> str:
        """The newest root metadata as JSON text: the trust anchor a newly provisioned device receives."""
        return self.read_metadata(f"{self.root_version()}.root.json").decode("utf-8")

    def _load(self, filename: str, kind: type[T]) -> Metadata[T]:
        try:
            md = Metadata.from_bytes(self.read_metadata(filename))
        except FileNotFoundError as exc:
            raise TufRepositoryError(f"TUF metadata {filename} is missing in {self.metadata_dir}") from exc
        if not isinstance(md.signed, kind):
            raise TufRepositoryError(f"{filename} holds {md.signed.type} metadata")
        return md

    def _current(self) -> tuple[Metadata[Root], Metadata[Targets], Metadata[Snapshot], Metadata[Timestamp]]:
        root = self._load(f"{self.root_version()}.root.json", Root)
        timestamp = self._load("timestamp.json", Timestamp)
        snapshot = self._load(f"{timestamp.signed.snapshot_meta.version}.snapshot.json", Snapshot)
        targets = self._load(f"{snapshot.signed.meta['targets.json'].version}.targets.json", Targets)
        return root, targets, snapshot, timestamp

    def targets(self) -> dict[str, TargetFile]:
        """The current targets, by path."""
        return dict(self._current()[1].signed.targets)

    def status(self) -> dict[str, Any]:
        """Versions, expiries, key ids and thresholds of the four roles (for the CLI)."""
        root, targets, snapshot, timestamp = self._current()
        out: dict[str, Any] = {"targets_count": len(targets.signed.targets)}
        for md in (root, targets, snapshot, timestamp):
            role = root.signed.roles[md.signed.type]
            out[md.signed.type] = {
                "version": md.signed.version,
                "expires": md.signed.expires.isoformat(),
                "keyids": list(role.keyids),
                "threshold": role.threshold,
            }
        return out

    # ------------------------------------------------------------------ writing

    @contextmanager
    def _locked(self) -> Iterator[None]:
        self.base.mkdir(parents=True, exist_ok=True)
        with open(self.base / ".lock", "a+b") as fh:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh.fileno(), fcntl.LOCK_UN)

    def _online_key(self, role: str) -> SigningKey:
        try:
            return load_private_key(self.keys_dir / f"{role}.pem")
        except SignatureError as exc:
            raise TufRepositoryError(f"online {role} key: {exc}") from exc

    def _sign_write(self, md: Metadata[Any], filename: str, signers: Iterable[Signer]) -> None:
        md.signatures.clear()
        for signer in signers:
            md.sign(signer, append=True)
        _write_atomic(self.metadata_dir / filename, md.to_bytes())

    def _bump(self, md: Metadata[Any], now: datetime) -> None:
        md.signed.version += 1
        md.signed.expires = now + self.policy.lifetime(md.signed.type)

    def initialize(
        self, *, root_keys: int = 1, threshold: int = 1, root_key_dir: Path | None = None, now: datetime | None = None
    ) -> list[Path]:
        """Create keys and version 1 of every role; return the root private key files written.

        Root keys go to ``root_key_dir`` (default ``keys/``): move them offline after this.

        Raises:
            TufRepositoryError: already initialized, or ``threshold`` outside 1..``root_keys``.
        """
        if not 1 <= threshold <= root_keys:
            raise TufRepositoryError(f"root threshold {threshold} must be between 1 and the {root_keys} root keys")
        now = _now(now)
        with self._locked():
            if self.is_initialized():
                raise TufRepositoryError(f"a TUF repository already exists at {self.base}")
            self.metadata_dir.mkdir(parents=True, exist_ok=True)
            self.keys_dir.mkdir(parents=True, exist_ok=True)
            key_dir = root_key_dir or self.keys_dir
            root = Root(expires=now + self.policy.root_expiry, consistent_snapshot=True)
            root.roles["root"].threshold = threshold
            root_signers, written = [], []
            for _ in range(root_keys):
                key = SigningKey.generate()
                written.append(write_keypair(_free_name(key_dir, "root"), key)[0])
                root_signers.append(_signer(key))
                root.add_key(root_signers[-1].public_key, "root")
            for role in ONLINE_ROLES:
                path = self.keys_dir / f"{role}.pem"
                key = load_private_key(path) if path.exists() else SigningKey.generate()
                if not path.exists():
                    write_keypair(path, key)
                root.add_key(_signer(key).public_key, role)
            self._sign_write(Metadata(root), "1.root.json", root_signers)
            targets = Metadata(Targets(expires=now + self.policy.targets_expiry))
            self._sign_write(targets, "1.targets.json", [_signer(self._online_key("targets"))])
            snapshot = Metadata(Snapshot(expires=now + self.policy.snapshot_expiry))
            self._sign_write(snapshot, "1.snapshot.json", [_signer(self._online_key("snapshot"))])
            timestamp = Metadata(Timestamp(expires=now + self.policy.timestamp_expiry))
            self._sign_write(timestamp, "timestamp.json", [_signer(self._online_key("timestamp"))])
        return written

    def _publish(
        self,
        targets: Metadata[Targets],
        snapshot: Metadata[Snapshot],
        timestamp: Metadata[Timestamp],
        roles: set[str],
        now: datetime,
    ) -> None:
        """Write new versions of ``roles`` (a new targets implies a new snapshot; always a new timestamp)."""
        if "targets" in roles:
            self._bump(targets, now)
            self._sign_write(targets, f"{targets.signed.version}.targets.json", [_signer(self._online_key("targets"))])
            snapshot.signed.meta["targets.json"] = MetaFile(version=targets.signed.version)
            roles.add("snapshot")
        if "snapshot" in roles:
            self._bump(snapshot, now)
            name = f"{snapshot.signed.version}.snapshot.json"
            self._sign_write(snapshot, name, [_signer(self._online_key("snapshot"))])
            timestamp.signed.snapshot_meta = MetaFile(version=snapshot.signed.version)
        self._bump(timestamp, now)
        self._sign_write(timestamp, "timestamp.json", [_signer(self._online_key("timestamp"))])

    def add_bundles(self, bundles: Iterable[tuple[str, int, Mapping[str, Any]]], now: datetime | None = None) -> int:
        """Make each ``(sha256, size, custom)`` a target (one new targets version for all); return how many were new.

        Raises:
            TufRepositoryError: the repository is not initialized or a key is unusable.
        """
        now = _now(now)
        with self._locked():
            _root, targets, snapshot, timestamp = self._current()
            added = 0
            for sha256, size, custom in bundles:
                path = tuf_target_path(sha256)
                known = targets.signed.targets.get(path)
                if known is not None and known.length == size and known.hashes == {"sha256": sha256}:
                    continue
                targets.signed.targets[path] = TargetFile(size, {"sha256": sha256}, path, {"custom": dict(custom)})
                added += 1
            if added:
                self._publish(targets, snapshot, timestamp, {"targets"}, now)
            return added

    def add_bundle(self, sha256: str, size: int, custom: Mapping[str, Any] | None = None) -> bool:
        """Make one bundle a target; False when it already was one."""
        return self.add_bundles([(sha256, size, custom or {})]) > 0

    def refresh(self, now: datetime | None = None) -> list[str]:
        """Re-sign every online role with less than half its lifetime left; return the roles re-signed."""
        now = _now(now)
        with self._locked():
            _root, targets, snapshot, timestamp = self._current()
            due = {
                md.signed.type
                for md in (targets, snapshot, timestamp)
                if md.signed.expires - now < self.policy.lifetime(md.signed.type) / 2
            }
            if due:
                self._publish(targets, snapshot, timestamp, set(due), now)
            return sorted(due)

    def rotate(
        self,
        root_key_files: Sequence[Path],
        *,
        new_root_key_files: Sequence[Path] = (),
        generate_root_keys: int = 0,
        threshold: int | None = None,
        rotate_roles: Sequence[str] = (),
        new_key_dir: Path | None = None,
        now: datetime | None = None,
    ) -> RotationResult:
        """Write root version N+1 signed by a threshold of the current and of the new root keys.

        ``new_root_key_files`` / ``generate_root_keys`` replace the root keys (revoking the old ones);
        ``rotate_roles`` gives those online roles fresh keys (the old key is revoked: metadata it signs is
        refused by every client that has the new root) and re-signs them. Without either, the root is only
        re-signed with a new expiry.

        Raises:
            TufRepositoryError: too few current root keys given, an unknown role, or a bad threshold.
        """
        unknown = set(rotate_roles) - set(ONLINE_ROLES)
        if unknown:
            raise TufRepositoryError(f"cannot rotate {sorted(unknown)}: online roles are {list(ONLINE_ROLES)}")
        now = _now(now)
        try:
            old_keys = [load_private_key(p) for p in root_key_files]
            new_keys = [load_private_key(p) for p in new_root_key_files]
        except SignatureError as exc:
            raise TufRepositoryError(str(exc)) from exc
        with self._locked():
            root, targets, snapshot, timestamp = self._current()
            old_signers = [_signer(k) for k in old_keys]
            new_root = Metadata[Root].from_bytes(root.to_bytes())
            self._bump(new_root, now)
            written: list[Path] = []
            for _ in range(generate_root_keys):
                key = SigningKey.generate()
                written.append(write_keypair(_free_name(new_key_dir or self.keys_dir, "root"), key)[0])
                new_keys.append(key)
            new_signers = [_signer(k) for k in new_keys] if new_keys else old_signers
            if new_keys:
                for keyid in list(new_root.signed.roles["root"].keyids):
                    new_root.signed.revoke_key(keyid, "root")
                for signer in new_signers:
                    new_root.signed.add_key(signer.public_key, "root")
            role = new_root.signed.roles["root"]
            role.threshold = threshold or min(role.threshold, len(role.keyids))
            if not 1 <= role.threshold <= len(role.keyids):
                raise TufRepositoryError(f"root threshold {role.threshold} must be between 1 and {len(role.keyids)}")
            fresh: dict[str, SigningKey] = {}
            for name in rotate_roles:
                fresh[name] = SigningKey.generate()
                for keyid in list(new_root.signed.roles[name].keyids):
                    new_root.signed.revoke_key(keyid, name)
                new_root.signed.add_key(_signer(fresh[name]).public_key, name)
            signers = {s.public_key.keyid: s for s in [*old_signers, *new_signers]}
            new_root.signatures.clear()
            for signer in signers.values():
                new_root.sign(signer, append=True)
            try:  # the chain rule of the TUF client: the old root's threshold, then the new root's own
                root.signed.verify_delegate("root", new_root.signed_bytes, new_root.signatures)
                new_root.signed.verify_delegate("root", new_root.signed_bytes, new_root.signatures)
            except UnsignedMetadataError as exc:
                raise TufRepositoryError(f"the new root is not signed by enough root keys: {exc}") from exc
            # New online keys hit the disk before the root that names them; a crash in between leaves next-*.pem.
            for name, key in fresh.items():
                (self.keys_dir / f"next-{name}.pem").unlink(missing_ok=True)
                write_keypair(self.keys_dir / f"next-{name}.pem", key)
            _write_atomic(self.metadata_dir / f"{new_root.signed.version}.root.json", new_root.to_bytes())
            for name in fresh:
                current = self.keys_dir / f"{name}.pem"
                if current.exists():
                    os.replace(current, current.with_name(f"{name}.pem.revoked-v{new_root.signed.version}"))
                os.replace(self.keys_dir / f"next-{name}.pem", current)
                os.replace(self.keys_dir / f"next-{name}.pub.pem", self.keys_dir / f"{name}.pub.pem")
            self._publish(targets, snapshot, timestamp, set(rotate_roles), now)
            return RotationResult(
                root_version=new_root.signed.version,
                root_keyids=list(role.keyids),
                root_threshold=role.threshold,
                rotated_roles=sorted(rotate_roles),
                new_key_files=written,
            )


def _free_name(folder: Path, stem: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    i = 1
    while (folder / f"{stem}-{i}.pem").exists():
        i += 1
    return folder / f"{stem}-{i}.pem"


def bundle_custom(model_name: str, version: str, hardware_profile: str, release_counter: int) -> dict[str, Any]:
    """What a bundle target records besides length and hash (checked by the agent against its assignment)."""
    return {
        "model_name": model_name,
        "version": version,
        "hardware_profile": hardware_profile,
        "release_counter": release_counter,
    }
