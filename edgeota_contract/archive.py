"""A strict reader and a writer for the bundle archive format, a small subset of POSIX ustar.

Bundles arrive from the network before anything about them is proven, so they are never handed
to :mod:`tarfile`, whose header parsing is far more permissive and, in some Python versions,
super-linear in crafted headers (CVE-2024-6232). The format read here is exactly what
:func:`write_archive` writes:

* 512-byte ustar headers (magic ``ustar\\0``, version ``00``) with valid octal fields and checksum;
* regular files only (type ``0``), with flat names (``[A-Za-z0-9][A-Za-z0-9_.-]*``, at most
  :data:`MAX_NAME_LENGTH` characters), each name once;
* names longer than the 100 bytes of a ustar name field carried by one pax extended header
  (type ``x``) of at most :data:`MAX_PAX_BYTES` holding a single ``path`` record, right before
  its file's header (what ``tarfile``'s PAX writer emits for such a name); no other extension;
* at most :data:`MAX_MEMBERS` members and :data:`MAX_ARCHIVE_BYTES` in all;
* the end-of-archive marker (two zero blocks), then at most one record of zero padding.

Guarantees: every byte is looked at once (time linear in the archive size), memory is bounded by
the reader's constants and the limits the caller passes, never by what a header claims, and every
refusal is a :class:`~edgeota_contract.errors.BundleError` with a specific reason code:
``unsafe_archive`` for links, devices, extensions, unsafe or repeated names and exceeded caps;
``bundle_invalid`` for corrupt or truncated structure.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import IO

from edgeota_contract.errors import BundleError
from edgeota_contract.states import ReasonCode

BLOCK_SIZE = 512
RECORD_SIZE = 20 * BLOCK_SIZE
"""Writers pad the archive to a multiple of this; the reader allows at most this much padding."""
MAX_MEMBERS = 64
MAX_NAME_LENGTH = 128
MAX_PAX_BYTES = BLOCK_SIZE
MAX_ARCHIVE_BYTES = 16 << 30
CHUNK_SIZE = 1 << 20

_USTAR_NAME_BYTES = 100
_MAGIC = b"ustar\x00"
_VERSION = b"00"
_REGULAR = b"0"
_PAX = b"x"
_FLAT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
_OCTAL_FIELD = re.compile(rb" *([0-7]+)[ \x00]*")
_PAX_RECORD = re.compile(rb"([1-9][0-9]{0,2}) path=([^\x00\n]*)\n")
_PAX_HEADER_NAME = "././@PaxHeader"

# What each refused type flag is, for a one-line message; anything unlisted is "type <flag>".
_KINDS = {
    b"1": "hard link",
    b"2": "symbolic link",
    b"3": "character device",
    b"4": "block device",
    b"5": "directory",
    b"6": "fifo",
    b"7": "contiguous file",
    b"g": "pax global header",
    b"x": "pax extended header",
    b"L": "GNU long name header",
    b"K": "GNU long link header",
    b"S": "GNU sparse file",
    b"\x00": "old-style (pre-POSIX) entry",
}
_LINKS = (b"1", b"2")


@dataclass(frozen=True)
class Member:
    """One regular file of an archive: its flat name, size in bytes and position (0-based)."""

    name: str
    size: int
    index: int


def _invalid(message: str) -> BundleError:
    return BundleError(message, ReasonCode.BUNDLE_INVALID)


def _unsafe(message: str) -> BundleError:
    return BundleError(message, ReasonCode.UNSAFE_ARCHIVE)


def check_member_name(name: str) -> None:
    """Refuse any archive member name that is not one flat, portable file name.

    Raises:
        BundleError: ``unsafe_archive``, naming what is wrong (absolute, ``..``, a folder, too long,
            other characters).
    """
    if name.startswith(("/", "\\")):
        raise _unsafe(f"archive entry {name!r} is an absolute path")
    if ".." in re.split(r"[/\\]", name):
        raise _unsafe(f"archive entry {name!r} refers to a parent folder")
    if "/" in name or "\\" in name:
        raise _unsafe(f"archive entry {name!r} is inside a folder")
    if len(name) > MAX_NAME_LENGTH:
        raise _unsafe(f"archive entry name is {len(name)} characters, over {MAX_NAME_LENGTH}")
    if not _FLAT_NAME.fullmatch(name):
        raise _unsafe(f"archive entry {name!r} is not a flat file name")


def _octal(header: bytes, start: int, length: int, field: str) -> int:
    raw = header[start : start + length]
    match = _OCTAL_FIELD.fullmatch(raw)
    if match is None:
        raise _invalid(f"archive header field {field} is not an octal number: {raw!r}")
    return int(match.group(1), 8)


def _text(header: bytes, start: int, length: int, field: str) -> str:
    raw = header[start : start + length]
    value, _, pad = raw.partition(b"\x00")
    if pad.strip(b"\x00"):
        raise _invalid(f"archive header field {field} has bytes after its terminator")
    try:
        return value.decode("ascii")
    except UnicodeDecodeError:
        raise _unsafe(f"archive header field {field} is not ASCII") from None


def _checksum(header: bytes) -> int:
    # The checksum field itself counts as eight spaces.
    return sum(header[:148]) + 8 * 0x20 + sum(header[156:])


class ArchiveReader:
    """Reads a bundle archive front to back, refusing anything outside the strict format.

    ``next_member`` returns each regular file in turn; its data may then be read with
    :meth:`read_data` or :meth:`iter_data` (unread data is skipped by the next ``next_member``).
    When ``next_member`` returns ``None`` the end of the archive has been checked through to the
    end of the file, and :attr:`sha256` / :attr:`size` cover every byte of it.

    Raises (from every method): :class:`BundleError` as described in the module docstring.
    """

    def __init__(
        self,
        fh: IO[bytes],
        *,
        max_members: int = MAX_MEMBERS,
        max_archive_bytes: int = MAX_ARCHIVE_BYTES,
    ) -> None:
        self._fh = fh
        self._max_members = max_members
        self._max_bytes = max_archive_bytes
        self._digest = hashlib.sha256()
        self._count = 0
        self._members = 0
        self._names: set[str] = set()
        self._current: Member | None = None
        self._left = 0  # unread data bytes of the current member
        self._pad = 0  # padding after the current member's data
        self._ended = False

    @property
    def sha256(self) -> str:
        """Hex sha256 of the bytes consumed so far (the whole file once the end was reached)."""
        return self._digest.hexdigest()

    @property
    def size(self) -> int:
        """Number of bytes consumed so far."""
        return self._count

    def _read(self, n: int, what: str) -> bytes:
        """Exactly ``n`` bytes (``n`` is always bounded by a constant or a checked size)."""
        parts: list[bytes] = []
        want = n
        while want > 0:
            part = self._fh.read(want)
            if not part:
                raise _invalid(f"archive is truncated in {what}")
            parts.append(part)
            want -= len(part)
        data = parts[0] if len(parts) == 1 else b"".join(parts)
        self._digest.update(data)
        self._count += n
        return data

    def _skip(self, n: int, what: str) -> None:
        while n > 0:
            step = min(n, CHUNK_SIZE)
            self._read(step, what)
            n -= step

    def next_member(self) -> Member | None:
        """The next regular file, or ``None`` after a well-formed end of archive."""
        if self._ended:
            return None
        if self._current is not None:
            self._skip(self._left + self._pad, f"the data of {self._current.name}")
            self._current = None
        header = self._read(BLOCK_SIZE, "a member header")
        if header == bytes(BLOCK_SIZE):
            self._finish()
            return None
        kind, name, size = self._parse_header(header)
        if kind == _PAX:
            name = self._read_pax(size)
            header = self._read(BLOCK_SIZE, "the header after a pax header")
            kind, short_name, size = self._parse_header(header)
            if kind == _PAX:
                raise _unsafe("archive has two pax extended headers in a row")
            if kind != _REGULAR or short_name != name[:_USTAR_NAME_BYTES]:
                raise _unsafe(f"pax extended header for {name!r} is not followed by that regular file")
        return self._start(name, size)

    def _parse_header(self, header: bytes) -> tuple[bytes, str, int]:
        stored = _octal(header, 148, 8, "chksum")
        if stored != _checksum(header):
            raise _invalid(f"archive header checksum is {stored:o}, the header sums to {_checksum(header):o}")
        if header[257:263] != _MAGIC or header[263:265] != _VERSION:
            raise _invalid(f"archive header is not POSIX ustar (magic {header[257:265]!r})")
        kind = header[156:157]
        name = _text(header, 0, _USTAR_NAME_BYTES, "name")
        if kind not in (_REGULAR, _PAX):
            what = _KINDS.get(kind, f"entry of type {kind!r}")
            if kind in _LINKS:
                raise _unsafe(f"archive entry {name!r} is a {what} (to {_text(header, 157, 100, 'linkname')!r})")
            raise _unsafe(f"archive entry {name!r} is a {what}")
        if header[345:500].strip(b"\x00"):
            raise _unsafe(f"archive entry {name!r} has a path prefix (a folder)")
        for start, field in ((100, "mode"), (108, "uid"), (116, "gid"), (136, "mtime")):
            _octal(header, start, 8 if start < 136 else 12, field)
        size = _octal(header, 124, 12, "size")
        if self._count + size > self._max_bytes:
            raise _unsafe(f"archive entry {name!r} of {size} bytes would take the archive over {self._max_bytes}")
        return kind, name, size

    def _read_pax(self, size: int) -> str:
        if size > MAX_PAX_BYTES:
            raise _unsafe(f"pax extended header of {size} bytes, over the {MAX_PAX_BYTES} byte limit")
        blocks = -(-size // BLOCK_SIZE) * BLOCK_SIZE
        data = self._read(blocks, "a pax extended header")[:size]
        match = _PAX_RECORD.fullmatch(data)
        if match is None or int(match.group(1)) != size:
            key = data.partition(b" ")[2].partition(b"=")[0][:40]
            raise _unsafe(f"pax extended header is not a single path record (key {key!r})")
        try:
            return match.group(2).decode("ascii")
        except UnicodeDecodeError:
            raise _unsafe("pax path record is not ASCII") from None

    def _start(self, name: str, size: int) -> Member:
        check_member_name(name)
        if name in self._names:
            raise _unsafe(f"archive holds {name!r} twice")
        if self._members >= self._max_members:
            raise _unsafe(f"archive has more than {self._max_members} members")
        self._names.add(name)
        self._current = Member(name=name, size=size, index=self._members)
        self._members += 1
        self._left = size
        self._pad = -size % BLOCK_SIZE
        return self._current

    def _finish(self) -> None:
        if self._read(BLOCK_SIZE, "the end-of-archive marker") != bytes(BLOCK_SIZE):
            raise _invalid("archive has a zero block that is not an end-of-archive marker")
        # Zero padding to the end of the record, no more: read one byte past what is allowed.
        rest = b""
        while len(rest) <= RECORD_SIZE and (part := self._fh.read(RECORD_SIZE + 1 - len(rest))):
            rest += part
        self._digest.update(rest)
        self._count += len(rest)
        if len(rest) > RECORD_SIZE or rest.strip(b"\x00") or len(rest) % BLOCK_SIZE:
            raise _invalid("archive has data after its end-of-archive marker")
        self._ended = True

    def read_data(self, limit: int) -> bytes:
        """All data of the current member, refused before reading if it is over ``limit`` bytes.

        Raises:
            BundleError: ``bundle_invalid`` when over ``limit`` or truncated.
        """
        member = self._require_current()
        if member.size > limit:
            raise _invalid(f"{member.name} is {member.size} bytes, over the {limit} byte limit")
        data = self._read(self._left, f"the data of {member.name}")
        self._left = 0
        return data

    def iter_data(self) -> Iterator[bytes]:
        """The current member's data in chunks of at most :data:`CHUNK_SIZE` bytes."""
        member = self._require_current()
        while self._left > 0:
            step = min(self._left, CHUNK_SIZE)
            chunk = self._read(step, f"the data of {member.name}")
            self._left -= step
            yield chunk

    def _require_current(self) -> Member:
        if self._current is None:
            raise RuntimeError("no current archive member")  # a programming error, not a bad archive
        return self._current


def _octal_field(value: int, length: int) -> bytes:
    return b"%0*o\x00" % (length - 1, value)


def _header(name: str, size: int, kind: bytes) -> bytes:
    """One ustar header, byte for byte as ``tarfile``'s PAX writer makes it for our fixed metadata."""
    mode = 0o644 if kind == _REGULAR else 0
    header = bytearray(BLOCK_SIZE)
    header[0:100] = name.encode("ascii")[:_USTAR_NAME_BYTES].ljust(100, b"\x00")
    header[100:108] = _octal_field(mode, 8)
    header[108:116] = _octal_field(0, 8)
    header[116:124] = _octal_field(0, 8)
    header[124:136] = _octal_field(size, 12)
    header[136:148] = _octal_field(0, 12)
    header[148:156] = b" " * 8
    header[156:157] = kind
    header[257:265] = _MAGIC + _VERSION
    header[148:156] = b"%06o\x00 " % sum(header)
    return bytes(header)


def _pax_record(name: str) -> bytes:
    body = f" path={name}\n".encode("ascii")
    length = len(body) + 1
    while len(str(length)) + len(body) != length:
        length += 1
    return str(length).encode("ascii") + body


def write_archive(fh: IO[bytes], members: Iterable[tuple[str, bytes]]) -> None:
    """Write ``members`` (name, data), in order, as an archive :class:`ArchiveReader` accepts.

    Every member gets mode 0644, owner 0:0 and time 0, so the same members give the same bytes;
    names longer than 100 bytes get a one-record pax header. The output is padded to a multiple of
    :data:`RECORD_SIZE`, as ``tarfile`` does.

    Raises:
        BundleError: a name is not a safe flat name, a name repeats, or there are too many members.
    """
    written = 0
    seen: set[str] = set()
    for name, data in members:
        check_member_name(name)
        if name in seen:
            raise _unsafe(f"archive holds {name!r} twice")
        seen.add(name)
        if len(seen) > MAX_MEMBERS:
            raise _unsafe(f"archive has more than {MAX_MEMBERS} members")
        if len(name) > _USTAR_NAME_BYTES:
            record = _pax_record(name)
            fh.write(_header(_PAX_HEADER_NAME, len(record), _PAX))
            fh.write(record + bytes(-len(record) % BLOCK_SIZE))
            written += BLOCK_SIZE + len(record) + (-len(record) % BLOCK_SIZE)
        fh.write(_header(name, len(data), _REGULAR))
        fh.write(data)
        fh.write(bytes(-len(data) % BLOCK_SIZE))
        written += BLOCK_SIZE + len(data) + (-len(data) % BLOCK_SIZE)
    written += 2 * BLOCK_SIZE
    fh.write(bytes(2 * BLOCK_SIZE + (-written % RECORD_SIZE)))
