"""Bundle writing and verification: every rejection path the agent and server rely on."""

from __future__ import annotations

import io
import tarfile
from datetime import UTC, datetime
from pathlib import Path

import pytest

from edgeota_contract.bundle import create_bundle, read_manifest, sha256_file, verify_bundle
from edgeota_contract.errors import BundleError, SignatureError
from edgeota_contract.manifest import Lineage
from edgeota_contract.signing import SigningKey, TrustedKeys
from edgeota_contract.states import ReasonCode

PAYLOAD = {
    "model.onnx": b"\x08\x07" + b"m" * 5000,
    "reference_stats.json": b'{"schema_version":1,"sample_count":0,"features":[]}',
    "test_vectors.npz": b"vectors",
    "model_card.md": b"# card\n",
}


def _fields(profile: str = "x86_64-avx2", counter: int = 1_000_000) -> dict[str, object]:
    return dict(
        model_name="digits",
        version="1.0.0",
        release_counter=counter,
        hardware_profile=profile,
        inputs=[{"name": "x", "dtype": "float32", "shape": [None, 64]}],
        outputs=[{"name": "y", "dtype": "float32", "shape": [None, 10]}],
        opset=17,
        execution_provider="CPUExecutionProvider",
        recipe="int8-static-qdq",
        lineage=Lineage(
            source_model_sha256="a" * 64,
            packager_version="0.1.0",
            created_at=datetime(2026, 1, 1, tzinfo=UTC),
            created_by="test",
        ),
    )


@pytest.fixture
def key() -> SigningKey:
    return SigningKey.generate()


@pytest.fixture
def bundle(tmp_path: Path, key: SigningKey) -> Path:
    path = tmp_path / "b.tar"
    create_bundle(path, PAYLOAD, key, **_fields())
    return path


def _rewrite(
    src: Path, dst: Path, mutate: dict[str, bytes] | None = None, extra: list[tarfile.TarInfo] | None = None
) -> Path:
    """Copy a bundle member by member, replacing some contents and appending raw entries."""
    with tarfile.open(src) as tin, tarfile.open(dst, "w", format=tarfile.PAX_FORMAT) as tout:
        for member in tin.getmembers():
            data = tin.extractfile(member).read()  # type: ignore[union-attr]
            if mutate and member.name in mutate:
                data = mutate[member.name]
                member.size = len(data)
            tout.addfile(member, io.BytesIO(data))
        for info in extra or []:
            tout.addfile(info, io.BytesIO(b"x" * info.size) if info.isreg() else None)
    return dst


def test_roundtrip_verifies_and_extracts(tmp_path: Path, bundle: Path, key: SigningKey) -> None:
    result = verify_bundle(
        bundle, TrustedKeys([key.public_key]), expected_profile="x86_64-avx2", extract_to=tmp_path / "x"
    )
    assert result.archive_sha256 == sha256_file(bundle)
    assert result.archive_size == bundle.stat().st_size
    assert {p.name: p.read_bytes() for p in (tmp_path / "x").iterdir()} == PAYLOAD


def test_reproducible_archive(tmp_path: Path, key: SigningKey) -> None:
    a, b = tmp_path / "a.tar", tmp_path / "b.tar"
    create_bundle(a, PAYLOAD, key, **_fields())
    create_bundle(b, PAYLOAD, key, **_fields())
    assert a.read_bytes() == b.read_bytes()  # Ed25519 is deterministic, tar headers fixed


@pytest.mark.parametrize("same_length", [True, False])
def test_tampered_model_rejected_and_nothing_left(
    tmp_path: Path, bundle: Path, key: SigningKey, same_length: bool
) -> None:
    model = PAYLOAD["model.onnx"]
    bad = model[:-1] + b"X" if same_length else model + b"extra"
    tampered = _rewrite(bundle, tmp_path / "t.tar", {"model.onnx": bad})
    with pytest.raises(BundleError) as err:
        verify_bundle(tampered, TrustedKeys([key.public_key]), extract_to=tmp_path / "x")
    assert err.value.reason == (ReasonCode.DIGEST_MISMATCH if same_length else ReasonCode.SIZE_MISMATCH)
    assert not (tmp_path / "x").exists()


def test_tampered_manifest_rejected(tmp_path: Path, bundle: Path, key: SigningKey) -> None:
    manifest, _ = read_manifest(bundle)
    forged = manifest.model_copy(update={"hardware_profile": "rpi4"}).canonical_bytes()
    tampered = _rewrite(bundle, tmp_path / "t.tar", {"manifest.json": forged})
    with pytest.raises(SignatureError) as err:
        verify_bundle(tampered, TrustedKeys([key.public_key]))
    assert err.value.reason == ReasonCode.SIGNATURE_INVALID


def test_unknown_key_rejected(bundle: Path) -> None:
    with pytest.raises(SignatureError) as err:
        verify_bundle(bundle, TrustedKeys([SigningKey.generate().public_key]))
    assert err.value.reason == ReasonCode.UNKNOWN_KEY


def test_missing_signature_rejected(tmp_path: Path, bundle: Path, key: SigningKey) -> None:
    out = tmp_path / "nosig.tar"
    with tarfile.open(bundle) as tin, tarfile.open(out, "w") as tout:
        for member in tin.getmembers():
            if member.name != "manifest.sig":
                tout.addfile(member, tin.extractfile(member))
    with pytest.raises(SignatureError) as err:
        verify_bundle(out, TrustedKeys([key.public_key]))
    assert err.value.reason == ReasonCode.SIGNATURE_MISSING


def test_wrong_profile_and_downgrade(bundle: Path, key: SigningKey) -> None:
    trusted = TrustedKeys([key.public_key])
    with pytest.raises(BundleError) as err:
        verify_bundle(bundle, trusted, expected_profile="rpi4")
    assert err.value.reason == ReasonCode.WRONG_PROFILE
    with pytest.raises(BundleError) as err:
        verify_bundle(bundle, trusted, min_release_counter=2_000_000)
    assert err.value.reason == ReasonCode.RELEASE_COUNTER_ROLLBACK


@pytest.mark.parametrize(
    "entry",
    [
        ("../evil", tarfile.REGTYPE),
        ("/etc/evil", tarfile.REGTYPE),
        ("link", tarfile.SYMTYPE),
        ("hard", tarfile.LNKTYPE),
        ("dev", tarfile.CHRTYPE),
        ("sub/file", tarfile.REGTYPE),
    ],
)
def test_unsafe_entries_rejected(tmp_path: Path, bundle: Path, key: SigningKey, entry: tuple[str, bytes]) -> None:
    info = tarfile.TarInfo(entry[0])
    info.type = entry[1]
    info.size = 3 if entry[1] == tarfile.REGTYPE else 0
    info.linkname = "/etc/passwd"
    bad = _rewrite(bundle, tmp_path / "bad.tar", extra=[info])
    with pytest.raises(BundleError) as err:
        verify_bundle(bad, TrustedKeys([key.public_key]), extract_to=tmp_path / "x")
    # The specific reason: an unlisted-file refusal (bundle_invalid) must not stand in for the link/name checks.
    assert err.value.reason == ReasonCode.UNSAFE_ARCHIVE, err.value
    assert not (tmp_path / "x").exists()
    assert not (tmp_path / "evil").exists()


@pytest.mark.parametrize("cut", [10, 700, 3000])
def test_truncated_archive_rejected(tmp_path: Path, bundle: Path, key: SigningKey, cut: int) -> None:
    short = tmp_path / "short.tar"
    short.write_bytes(bundle.read_bytes()[:cut])
    with pytest.raises((BundleError, SignatureError)):
        verify_bundle(short, TrustedKeys([key.public_key]))


def test_not_a_tar(tmp_path: Path, key: SigningKey) -> None:
    junk = tmp_path / "junk.tar"
    junk.write_bytes(b"this is not a bundle" * 100)
    with pytest.raises(BundleError):
        verify_bundle(junk, TrustedKeys([key.public_key]))
    with pytest.raises(BundleError):
        read_manifest(junk)


def test_bundle_file_name_is_one_flat_name() -> None:
    from edgeota_contract.bundle import BUNDLE_SUFFIX, bundle_file_name

    assert bundle_file_name("digits", "1.2.0", "x86-avx2") == "digits-1.2.0-x86-avx2.bundle.tar"
    assert bundle_file_name("vad_v2.onnx", "1.0.0-rc.1+b7", "rpi4").endswith(BUNDLE_SUFFIX)


@pytest.mark.parametrize(
    ("name", "version", "profile", "part"),
    [
        ("../evil", "1.0.0", "rpi4", "model name"),
        (".hidden", "1.0.0", "rpi4", "model name"),
        ("digits\n", "1.0.0", "rpi4", "model name"),
        ("digits", "one", "rpi4", "version"),
        ("digits", "1.0.0/x", "rpi4", "version"),
        ("digits", "1.0.0", "a/b", "hardware profile"),
        ("digits", "1.0.0", "", "hardware profile"),
    ],
)
def test_bundle_file_name_refuses_parts_the_manifest_refuses(name: str, version: str, profile: str, part: str) -> None:
    from edgeota_contract.bundle import bundle_file_name
    from edgeota_contract.errors import ContractError

    with pytest.raises(ContractError, match=f"invalid {part} for a bundle file name") as info:
        bundle_file_name(name, version, profile)
    assert info.value.reason is ReasonCode.MANIFEST_INVALID
