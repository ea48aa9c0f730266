"""The strict bundle archive reader: crafted archives, built byte by byte, refused with their specific reason.

Archives here are made by hand (not by the code under test) so that each one breaks exactly one rule.
Bounds on time and memory are safety bounds against pathological input (seconds of work, megabytes
of memory), not performance figures.
"""

from __future__ import annotations

import io
import tarfile
import time
import tracemalloc
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import pytest

from edgeota_contract.archive import MAX_MEMBERS, ArchiveReader, write_archive
from edgeota_contract.bundle import MAX_PAYLOAD_FILES, create_bundle, read_manifest, sha256_file, verify_bundle
from edgeota_contract.errors import BundleError, ContractError
from edgeota_contract.manifest import BundleManifest, FileEntry, Lineage
from edgeota_contract.signing import SigningKey, TrustedKeys
from edgeota_contract.states import ReasonCode

PAYLOAD = {
    "model.onnx": b"\x08\x07" + b"m" * 3000,
    "reference_stats.json": b'{"schema_version":1,"sample_count":0,"features":[]}',
    "test_vectors.npz": b"vectors",
    "model_card.md": b"# card\n",
}
LONG_NAME = "extra-" + "n" * 110 + ".bin"  # 120 characters: over a ustar name field, within the manifest's limit
EMPTY_SHA = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
# Generous safety bounds: the old tarfile path took seconds to hours and hundreds of MB on such input.
MAX_SECONDS = 1.0
MAX_PEAK_BYTES = 10 << 20


def _fields() -> dict[str, object]:
    return dict(
        model_name="digits",
        version="1.0.0",
        release_counter=1_000_000,
        hardware_profile="x86_64-avx2",
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


# -- a tar writer for tests, independent of the one under test ---------------------------------


def header(
    name: bytes,
    size: int,
    kind: bytes = b"0",
    *,
    linkname: bytes = b"",
    magic: bytes = b"ustar\x0000",
    prefix: bytes = b"",
    size_field: bytes | None = None,
    checksum_delta: int = 0,
) -> bytes:
    """One 512-byte ustar header with a correct checksum (plus ``checksum_delta``)."""
    h = bytearray(512)
    h[0:100] = name[:100].ljust(100, b"\0")
    h[100:108] = b"0000644\0"
    h[108:116] = b"0000000\0"
    h[116:124] = b"0000000\0"
    h[124:136] = size_field if size_field is not None else b"%011o\0" % size
    h[136:148] = b"00000000000\0"
    h[148:156] = b" " * 8
    h[156:157] = kind
    h[157:257] = linkname.ljust(100, b"\0")
    h[257:265] = magic
    h[345:500] = prefix.ljust(155, b"\0")
    h[148:156] = b"%06o\0 " % (sum(h) + checksum_delta)
    return bytes(h)


def member(name: bytes, data: bytes, kind: bytes = b"0", **kw: object) -> bytes:
    return header(name, len(data), kind, **kw) + data + bytes(-len(data) % 512)  # type: ignore[arg-type]


END = bytes(1024)


def members_of(archive: bytes) -> tuple[list[bytes], int]:
    """Split a well-formed archive into its member byte runs and the offset of its end marker."""
    runs, off = [], 0
    while archive[off : off + 512] != bytes(512):
        size = int(archive[off + 124 : off + 135], 8)
        step = 512 + size + (-size % 512)
        runs.append(archive[off : off + step])
        off += step
    return runs, off


def pax_digits(size: int) -> bytes:
    """A pax header of ``size`` bytes of digits: the shape tarfile 3.11.7 scans in quadratic time."""
    return member(b"././@PaxHeader", b"1" * size, b"x")


@pytest.fixture
def key() -> SigningKey:
    return SigningKey.generate()


@pytest.fixture
def trusted(key: SigningKey) -> TrustedKeys:
    return TrustedKeys([key.public_key])


@pytest.fixture
def good(tmp_path: Path, key: SigningKey) -> bytes:
    path = tmp_path / "good.tar"
    create_bundle(path, PAYLOAD, key, **_fields())
    return path.read_bytes()


@pytest.fixture
def signed_head(good: bytes) -> bytes:
    """manifest.json and manifest.sig of a good bundle: what follows them is only trusted via the manifest."""
    runs, _ = members_of(good)
    return runs[0] + runs[1]


@pytest.fixture
def body(good: bytes) -> bytes:
    """Every member of a good bundle, without the end-of-archive marker."""
    return good[: members_of(good)[1]]


def refused(tmp_path: Path, trusted: TrustedKeys, archive: bytes, reason: ReasonCode, match: str) -> tuple[float, int]:
    """Verify ``archive``, unpacking it: must refuse with ``reason`` and a message matching ``match``.

    Returns the wall time and tracemalloc peak of the verification.
    """
    path = tmp_path / "crafted.tar"
    path.write_bytes(archive)
    dest = tmp_path / "slot"
    tracemalloc.start()
    start = time.perf_counter()
    try:
        with pytest.raises(BundleError, match=match) as err:
            verify_bundle(path, trusted, extract_to=dest)
        elapsed = time.perf_counter() - start
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert err.value.reason == reason, err.value
    assert "\n" not in str(err.value)
    assert not dest.exists()
    return elapsed, peak


# -- huge and pathological headers -------------------------------------------------------------


@pytest.mark.parametrize("size", [128 * 1024, 8 * 1024 * 1024], ids=["128KB", "8MB"])
@pytest.mark.parametrize("where", ["first", "after_signature"])
def test_huge_pax_header_refused_in_bounded_time_and_memory(
    tmp_path: Path, trusted: TrustedKeys, signed_head: bytes, size: int, where: str
) -> None:
    crafted = pax_digits(size) + member(b"model.onnx", PAYLOAD["model.onnx"]) + END
    if where == "after_signature":
        crafted = signed_head + crafted
    elapsed, peak = refused(tmp_path, trusted, crafted, ReasonCode.UNSAFE_ARCHIVE, "pax extended header of")
    assert elapsed < MAX_SECONDS and peak < MAX_PEAK_BYTES, (elapsed, peak)
    if where == "first":
        with pytest.raises(BundleError, match="pax extended header of") as err:
            read_manifest(tmp_path / "crafted.tar")
        assert err.value.reason == ReasonCode.UNSAFE_ARCHIVE
    else:  # read_manifest reads the first two members only
        assert read_manifest(tmp_path / "crafted.tar")[1] is not None


@pytest.mark.parametrize(
    ("kind", "data", "match"),
    [
        (b"x", b"27 linkpath=/etc/passwdxxx\n", "not a single path record"),
        (b"x", b"19 path=model.onnx\n17 size=99999999\n", "not a single path record"),
        (b"x", b"99 path=model.onnx\n", "not a single path record"),  # length disagrees with the record
        (b"g", b"19 path=model.onnx\n", "pax global header"),
        (b"L", b"model.onnx\0", "GNU long name header"),
        (b"K", b"/etc/passwd\0", "GNU long link header"),
        (b"S", b"", "GNU sparse file"),
    ],
    ids=["pax-linkpath", "pax-size", "pax-bad-length", "pax-global", "gnu-longname", "gnu-longlink", "gnu-sparse"],
)
def test_header_extensions_refused(
    tmp_path: Path, trusted: TrustedKeys, signed_head: bytes, kind: bytes, data: bytes, match: str
) -> None:
    crafted = signed_head + member(b"ext", data, kind) + member(b"model.onnx", PAYLOAD["model.onnx"]) + END
    refused(tmp_path, trusted, crafted, ReasonCode.UNSAFE_ARCHIVE, match)


@pytest.mark.parametrize(
    ("after_pax", "match"),
    [
        (member(b"././@PaxHeader", b"19 path=model.onnx\n", b"x"), "two pax extended headers in a row"),
        (member(b"model.onnx", b"", b"2", linkname=b"/etc/passwd"), "symbolic link"),
        (member(b"other.bin", b"abc"), "is not followed by that regular file"),
    ],
    ids=["pax-pax", "pax-symlink", "pax-name-disagrees"],
)
def test_pax_path_header_binds_only_its_own_regular_file(
    tmp_path: Path, trusted: TrustedKeys, signed_head: bytes, after_pax: bytes, match: str
) -> None:
    crafted = signed_head + member(b"././@PaxHeader", b"19 path=model.onnx\n", b"x") + after_pax + END
    refused(tmp_path, trusted, crafted, ReasonCode.UNSAFE_ARCHIVE, match)


def test_pax_path_to_a_parent_folder_refused(tmp_path: Path, trusted: TrustedKeys, signed_head: bytes) -> None:
    crafted = signed_head + member(b"././@PaxHeader", b"16 path=../evil\n", b"x") + member(b"../evil", b"x") + END
    refused(tmp_path, trusted, crafted, ReasonCode.UNSAFE_ARCHIVE, "parent folder")


def test_ten_thousand_members_refused_at_the_cap(tmp_path: Path, key: SigningKey, trusted: TrustedKeys) -> None:
    # Even a validly signed manifest listing more files than the cap does not make the reader walk 10,000 headers.
    names = [f"f{i:05d}" for i in range(10_000)]
    files = [FileEntry(name=n, size=0, sha256=EMPTY_SHA) for n in [*names[:100], *PAYLOAD]]
    manifest = BundleManifest(files=files, signing_key_id=key.key_id, **_fields())  # type: ignore[arg-type]
    manifest_bytes = manifest.canonical_bytes()
    sig = key.sign(manifest_bytes).model_dump_json().encode()
    crafted = member(b"manifest.json", manifest_bytes) + member(b"manifest.sig", sig)
    crafted += b"".join(header(n.encode(), 0) for n in names) + END
    elapsed, peak = refused(tmp_path, trusted, crafted, ReasonCode.UNSAFE_ARCHIVE, f"more than {MAX_MEMBERS} members")
    assert elapsed < MAX_SECONDS and peak < MAX_PEAK_BYTES, (elapsed, peak)


def test_reader_caps_members_of_any_archive() -> None:
    crafted = b"".join(header(b"f%05d" % i, 0) for i in range(10_000)) + END
    reader = ArchiveReader(io.BytesIO(crafted))
    with pytest.raises(BundleError, match="more than 64 members") as err:
        while reader.next_member() is not None:
            pass
    assert err.value.reason == ReasonCode.UNSAFE_ARCHIVE
    assert reader.size == (MAX_MEMBERS + 1) * 512  # stopped at the first header over the cap


def test_create_bundle_refuses_more_files_than_the_reader_takes(tmp_path: Path, key: SigningKey) -> None:
    payload = {**PAYLOAD, **{f"extra{i:03d}": b"" for i in range(MAX_PAYLOAD_FILES - len(PAYLOAD) + 1)}}
    with pytest.raises(ContractError, match="at most 62 files") as err:
        create_bundle(tmp_path / "many.tar", payload, key, **_fields())
    assert err.value.reason == ReasonCode.MANIFEST_INVALID
    assert not list(tmp_path.iterdir())


# -- entry types and names ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("entry", "match"),
    [
        (member(b"link", b"", b"2", linkname=b"/etc/passwd"), "is a symbolic link"),
        (member(b"model.onnx", b"", b"2", linkname=b"/etc/passwd"), "is a symbolic link"),
        (member(b"hard", b"", b"1", linkname=b"manifest.json"), "is a hard link"),
        (member(b"dev", b"", b"3"), "is a character device"),
        (member(b"blk", b"", b"4"), "is a block device"),
        (member(b"fifo", b"", b"6"), "is a fifo"),
        (member(b"dir", b"", b"5"), "is a directory"),
        (member(b"old", b"abc", b"\0"), "old-style"),
        (member(b"../evil", b"abc"), "parent folder"),
        (member(b"..", b""), "parent folder"),
        (member(b"/etc/evil", b"abc"), "absolute path"),
        (member(b"sub/file", b"abc"), "inside a folder"),
        (member(b"sub\\file", b"abc"), "inside a folder"),
        (member(b"evil", b"abc", prefix=b"/etc"), "path prefix"),
        (member(b".hidden", b"abc"), "not a flat file name"),
        (member(b"caf\xc3\xa9", b"abc"), "not ASCII"),
        (member(b"model.onnx", PAYLOAD["model.onnx"]) * 2, "twice"),
        (member(b"manifest.json", b"{}"), "twice"),
    ],
    ids=[
        "symlink",
        "symlink-named-as-listed-file",
        "hardlink",
        "chardev",
        "blockdev",
        "fifo",
        "directory",
        "old-regular",
        "dotdot",
        "dotdot-bare",
        "absolute",
        "folder",
        "backslash",
        "ustar-prefix",
        "hidden",
        "non-ascii",
        "duplicate",
        "second-manifest",
    ],
)
def test_unsafe_entries_refused_with_unsafe_archive(
    tmp_path: Path, trusted: TrustedKeys, signed_head: bytes, entry: bytes, match: str
) -> None:
    crafted = signed_head + entry + END
    refused(tmp_path, trusted, crafted, ReasonCode.UNSAFE_ARCHIVE, match)
    assert not (tmp_path / "evil").exists()


@pytest.mark.parametrize("kind", [b"1", b"2", b"3", b"6"])
def test_unsafe_first_entry_refused_before_anything_else(tmp_path: Path, trusted: TrustedKeys, kind: bytes) -> None:
    crafted = member(b"manifest.json", b"", kind, linkname=b"/etc/passwd") + END
    refused(tmp_path, trusted, crafted, ReasonCode.UNSAFE_ARCHIVE, "is a")
    with pytest.raises(BundleError) as err:
        read_manifest(tmp_path / "crafted.tar")
    assert err.value.reason == ReasonCode.UNSAFE_ARCHIVE


# -- corrupt structure -------------------------------------------------------------------------


def test_manifest_not_first_refused(tmp_path: Path, trusted: TrustedKeys, good: bytes) -> None:
    runs, _ = members_of(good)
    crafted = runs[2] + runs[0] + runs[1] + b"".join(runs[3:]) + END
    refused(tmp_path, trusted, crafted, ReasonCode.BUNDLE_INVALID, "does not start with manifest.json")
    with pytest.raises(BundleError, match=r"does not start with manifest\.json"):
        read_manifest(tmp_path / "crafted.tar")


@pytest.mark.parametrize(
    ("cut", "where"),
    [
        (lambda n: 100, "a member header"),
        (lambda n: 512 + 300, "the data of manifest.json"),
        (lambda n: 4 * 512 + 10, "a member header"),  # manifest.json takes 4 blocks
        (lambda n: n - 1, "the data of test_vectors.npz"),
        (lambda n: n, "a member header"),
        (lambda n: n + 512, "the end-of-archive marker"),
    ],
    ids=["in-first-header", "in-manifest-data", "in-signature-header", "in-last-data", "no-end", "half-end"],
)
def test_truncated_archive_refused(
    tmp_path: Path, trusted: TrustedKeys, body: bytes, cut: Callable[[int], int], where: str
) -> None:
    crafted = (body + END)[: cut(len(body))]
    refused(tmp_path, trusted, crafted, ReasonCode.BUNDLE_INVALID, f"truncated in {where}")


def _tamper(run: bytes, offset: int, value: bytes, *, fix_checksum: bool) -> bytes:
    h = bytearray(run[:512])
    h[offset : offset + len(value)] = value
    if fix_checksum:
        h[148:156] = b" " * 8
        h[148:156] = b"%06o\0 " % sum(h)
    return bytes(h) + run[512:]


@pytest.mark.parametrize(
    ("offset", "value", "fix", "match"),
    [
        (0, b"M", False, "checksum"),
        (148, b"0000000\0", False, "checksum"),
        (148, b"zz", False, "chksum is not an octal number"),
        (257, b"ustar  \0", True, "not POSIX ustar"),
        (257, b"\0" * 8, True, "not POSIX ustar"),
        (124, b"0000000x112\0", True, "size is not an octal number"),
        (124, b"\x80\0\0\0\0\0\0\0\0\0\x04\x4e", True, "size is not an octal number"),  # base-256
        (100, b"-000644\0", True, "mode is not an octal number"),
        (136, b"99999999999\0", True, "mtime is not an octal number"),
        (0, b"manifest.json\0junk", True, "name has bytes after its terminator"),
    ],
    ids=[
        "checksum-name",
        "checksum-field",
        "checksum-not-octal",
        "gnu-magic",
        "no-magic",
        "size-not-octal",
        "size-base256",
        "mode-signed",
        "mtime-not-octal",
        "name-junk",
    ],
)
def test_corrupt_headers_refused(
    tmp_path: Path, trusted: TrustedKeys, good: bytes, offset: int, value: bytes, fix: bool, match: str
) -> None:
    runs, _ = members_of(good)
    crafted = _tamper(runs[0], offset, value, fix_checksum=fix) + good[len(runs[0]) :]
    refused(tmp_path, trusted, crafted, ReasonCode.BUNDLE_INVALID, match)


def test_corrupt_header_of_a_later_member_refused(tmp_path: Path, trusted: TrustedKeys, good: bytes) -> None:
    runs, _ = members_of(good)
    at = len(runs[0]) + len(runs[1]) + len(runs[2])
    crafted = good[:at] + _tamper(runs[3], 1, b"X", fix_checksum=False) + good[at + len(runs[3]) :]
    refused(tmp_path, trusted, crafted, ReasonCode.BUNDLE_INVALID, "checksum")


def test_member_larger_than_the_manifest_says_refused_before_reading(
    tmp_path: Path, trusted: TrustedKeys, signed_head: bytes
) -> None:
    crafted = signed_head + member(b"model.onnx", PAYLOAD["model.onnx"] + b"more") + END
    refused(tmp_path, trusted, crafted, ReasonCode.SIZE_MISMATCH, "manifest says 3002")


@pytest.mark.parametrize(
    ("tail", "match"),
    [
        (b"garbage", "data after its end-of-archive marker"),
        (bytes(20480), "data after its end-of-archive marker"),  # padding over one record
        (bytes(100), "data after its end-of-archive marker"),  # padding not in whole blocks
        (header(b"late.bin", 0), "data after its end-of-archive marker"),
    ],
    ids=["garbage", "long-padding", "odd-padding", "member-after-end"],
)
def test_trailing_data_refused(tmp_path: Path, trusted: TrustedKeys, good: bytes, tail: bytes, match: str) -> None:
    refused(tmp_path, trusted, good + tail, ReasonCode.BUNDLE_INVALID, match)


def test_half_end_marker_then_a_member_refused(tmp_path: Path, trusted: TrustedKeys, body: bytes) -> None:
    crafted = body + bytes(512) + member(b"late.bin", b"x") + END
    refused(tmp_path, trusted, crafted, ReasonCode.BUNDLE_INVALID, "not an end-of-archive marker")


@pytest.mark.parametrize(
    ("name", "reason", "match"),
    [
        (b"model.onnx", ReasonCode.SIZE_MISMATCH, "manifest says"),
        (b"manifest.json", ReasonCode.BUNDLE_INVALID, "over the 1048576 byte limit"),
    ],
)
def test_tar_bomb_declared_size_refused_without_reading(
    tmp_path: Path, trusted: TrustedKeys, signed_head: bytes, name: bytes, reason: ReasonCode, match: str
) -> None:
    # 8 GiB - 1 declared, a few bytes present: refused on the header alone.
    bomb = header(name, 0o77777777777) + b"\0" * 4096
    crafted = (signed_head + bomb) if name == b"model.onnx" else bomb
    elapsed, peak = refused(tmp_path, trusted, crafted, reason, match)
    assert elapsed < MAX_SECONDS and peak < MAX_PEAK_BYTES, (elapsed, peak)


def test_reader_caps_the_archive_size() -> None:
    crafted = member(b"a", b"x" * 2000) + member(b"b", b"x" * 2000) + END
    reader = ArchiveReader(io.BytesIO(crafted), max_archive_bytes=4000)
    assert reader.next_member() is not None
    with pytest.raises(BundleError, match="would take the archive over 4000") as err:
        reader.next_member()
    assert err.value.reason == ReasonCode.UNSAFE_ARCHIVE


def test_reader_limits_whole_member_reads() -> None:
    reader = ArchiveReader(io.BytesIO(member(b"a", b"x" * 2000) + END))
    assert reader.next_member() is not None
    with pytest.raises(BundleError, match="over the 1000 byte limit") as err:
        reader.read_data(1000)
    assert err.value.reason == ReasonCode.BUNDLE_INVALID
    assert reader.size == 512  # nothing of the data was read


# -- what create_bundle writes -----------------------------------------------------------------


def _tarfile_reference(members: list[tuple[str, bytes]]) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode, info.uid, info.gid = len(data), 0, 0o644, 0, 0
            info.uname = info.gname = ""
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


@pytest.mark.parametrize("names", [["manifest.json", "a.bin"], [LONG_NAME, "x" * 100, "y" * 101]])
def test_writer_bytes_match_tarfile_pax_writer(names: list[str]) -> None:
    # The same bytes as the bundles written before the strict reader, so their digests are unchanged.
    members = [(n, n.encode() * 3) for n in names]
    out = io.BytesIO()
    write_archive(out, members)
    assert out.getvalue() == _tarfile_reference(members)


def test_long_file_name_bundle_round_trips(tmp_path: Path, key: SigningKey, trusted: TrustedKeys) -> None:
    path = tmp_path / "long.tar"
    payload = {**PAYLOAD, LONG_NAME: b"long"}
    create_bundle(path, payload, key, **_fields())
    assert b"path=" + LONG_NAME.encode() in path.read_bytes()  # carried by a one-record pax header
    result = verify_bundle(path, trusted, extract_to=tmp_path / "x")
    assert result.archive_sha256 == sha256_file(path) and result.archive_size == path.stat().st_size
    assert {p.name: p.read_bytes() for p in (tmp_path / "x").iterdir()} == payload
    manifest, sig = read_manifest(path)
    assert manifest == result.manifest and sig is not None


@pytest.mark.parametrize(
    "writer",
    [_tarfile_reference, lambda m: _tarfile_reference(m)[: members_of(_tarfile_reference(m))[1] + 1024]],
    ids=["record-padded", "block-padded"],
)
def test_reader_accepts_tarfile_written_archives(writer: Callable[[list[tuple[str, bytes]]], bytes]) -> None:
    members = [("a.bin", b"a" * 700), (LONG_NAME, b"b" * 10)]
    reader = ArchiveReader(io.BytesIO(writer(members)))
    seen = []
    while (m := reader.next_member()) is not None:
        seen.append((m.name, reader.read_data(1000)))
    assert seen == members
