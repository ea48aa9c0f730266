"""A server-side TUF repository (the real ota_server module) published over a real HTTP server, plus the
doctored metadata an attacker or a broken mirror would serve (tests only)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from securesystemslib.signer import CryptoSigner  # type: ignore[attr-defined]
from tuf.api.metadata import Metadata  # type: ignore[attr-defined]

from edgeota_contract.signing import load_private_key
from ota_server.tuf_repo import TufRepository
from tests.agent.http_server import BundleServer


@dataclass
class TufSite:
    """``repo`` on disk, mirrored at ``server.url + /tuf/`` by :meth:`publish` (or doctored by the test)."""

    repo: TufRepository
    server: BundleServer

    @property
    def url(self) -> str:
        return self.server.url + "/tuf/"

    def root_keys(self) -> list[Path]:
        return sorted(p for p in self.repo.keys_dir.glob("root-*.pem") if not p.name.endswith(".pub.pem"))

    def publish(self) -> None:
        """Serve exactly what the repository holds now."""
        for name in [p for p in self.server.files if p.startswith("/tuf/")]:
            del self.server.files[name]
        for path in self.repo.metadata_dir.glob("*.json"):
            self.server.add(f"/tuf/{path.name}", path.read_bytes())

    def served(self, name: str) -> bytes:
        return self.server.files[f"/tuf/{name}"].data

    def serve(self, name: str, data: bytes) -> None:
        self.server.add(f"/tuf/{name}", data)

    def trusted_root(self) -> bytes:
        return self.repo.read_metadata("1.root.json")


def resign(data: bytes, key_file: Path, *, version: int | None = None, **signed_fields: Any) -> bytes:
    """Metadata ``data`` with fields changed (``version`` and any attribute of ``signed``), signed by ``key_file``."""
    md = Metadata.from_bytes(data)
    if version is not None:
        md.signed.version = version
    for name, value in signed_fields.items():
        setattr(md.signed, name, value)
    md.sign(CryptoSigner(load_private_key(key_file).private_key))
    out: bytes = md.to_bytes()
    return out


def make_site(tmp_path: Path, server: BundleServer, *, root_keys: int = 3, threshold: int = 2) -> TufSite:
    repo = TufRepository(tmp_path / "tuf-repo")
    repo.initialize(root_keys=root_keys, threshold=threshold)
    site = TufSite(repo, server)
    site.publish()
    return site


def past(days: float) -> datetime:
    return datetime.now(UTC) - timedelta(days=days)
