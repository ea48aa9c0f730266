"""Resumable, bounded bundle download over HTTP(S) with the stdlib only.

Guarantees of :func:`download`: the ``.part`` file never holds more than ``expected_size``
bytes; an interrupted download resumes with ``Range`` (the ``.part`` file survives a crash);
retryable faults (connection drops, 5xx, stalls) are retried with exponential backoff and full
jitter; on a final failure the ``.part`` file is removed. Memory use is one chunk. HTTP goes
through the agent's one fetcher (:func:`device_agent.transport.http.open_url`), so its redirect
rules hold here: at most five hops, never from https to http, the device token only to the origin
it was given for (a CDN or object store that the server redirects to never sees it); a refused
redirect is a final ``download_failed``. The bundle's authenticity never rests on the transport:
the archive is verified against the release key afterwards.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from device_agent.transport.http import FetchError, Response, open_url
from edgeota_contract.errors import EdgeotaError
from edgeota_contract.states import ReasonCode

if TYPE_CHECKING:
    from hashlib import _Hash as Hash

CHUNK = 64 * 1024


class DownloadError(EdgeotaError):
    default_reason = ReasonCode.DOWNLOAD_FAILED


class _Retryable(Exception):
    pass


@dataclass(frozen=True)
class DownloadPolicy:
    timeout_seconds: float = 600.0
    stall_seconds: float = 30.0
    retries: int = 5
    backoff_seconds: float = 1.0
    backoff_max_seconds: float = 60.0
    rate_limit_bps: int | None = None


def backoff_delay(attempt: int, policy: DownloadPolicy, rng: random.Random) -> float:
    """Full-jitter exponential backoff: uniform in [0, min(max, base * 2**attempt)]."""
    return rng.uniform(0, min(policy.backoff_max_seconds, policy.backoff_seconds * (2**attempt)))


def download(
    url: str,
    part: Path,
    expected_size: int,
    *,
    token: str | None,
    policy: DownloadPolicy,
    rng: random.Random | None = None,
    sleep: Callable[[float], None] = time.sleep,
    on_progress: Callable[[int], None] | None = None,
    allow_insecure_http: bool = False,
    expected_sha256: str | None = None,
) -> str:
    """Fetch ``url`` into ``part`` until it holds exactly ``expected_size`` bytes; return its sha256 (hex).

    The sha256 is computed over the bytes as they are written (a resumed download hashes the part it
    already has first), so no extra pass over the file is needed. With ``expected_sha256`` a complete
    file with another digest is refused and removed: nothing downstream ever opens it.
    ``token`` goes over plain http only to a loopback host unless ``allow_insecure_http``
    (:func:`device_agent.transport.http.check_token_transport`).

    Raises:
        DownloadError: ``download_too_large`` (server sends more than ``expected_size``),
            ``download_timeout`` (stalled or over the deadline after all retries),
            ``download_failed`` (HTTP error or connection faults after all retries),
            ``disk_full`` (no space left while writing),
            ``digest_mismatch`` (complete, but not the bytes ``expected_sha256`` names).
    """
    rng = rng or random.Random()
    last: Exception | None = None
    reason = ReasonCode.DOWNLOAD_FAILED
    try:
        for attempt in range(policy.retries + 1):
            if attempt:
                sleep(backoff_delay(attempt - 1, policy, rng))
            try:
                digest = _attempt(url, part, expected_size, token, policy, sleep, on_progress, allow_insecure_http)
                actual = digest.hexdigest()
                if expected_sha256 is not None and actual != expected_sha256:
                    raise DownloadError(
                        "downloaded archive does not match the assigned sha256", ReasonCode.DIGEST_MISMATCH
                    )
                return actual
            except _Retryable as exc:
                last = exc
                reason = ReasonCode.DOWNLOAD_TIMEOUT if isinstance(exc.__cause__, TimeoutError) else reason
            except TimeoutError as exc:
                last, reason = exc, ReasonCode.DOWNLOAD_TIMEOUT
            except (OSError, http.client.HTTPException) as exc:
                if isinstance(exc, OSError) and exc.errno == 28:  # ENOSPC
                    raise DownloadError("disk full while downloading", ReasonCode.DISK_FULL) from exc
                last, reason = exc, ReasonCode.DOWNLOAD_FAILED
        raise DownloadError(f"download failed after {policy.retries + 1} attempts: {last}", reason)
    except BaseException as exc:
        # A crash of the process keeps the part file for a Range resume; a decided failure does not.
        if isinstance(exc, EdgeotaError):
            part.unlink(missing_ok=True)
        raise


def _attempt(
    url: str,
    part: Path,
    expected: int,
    token: str | None,
    policy: DownloadPolicy,
    sleep: Callable[[float], None],
    on_progress: Callable[[int], None] | None,
    allow_insecure_http: bool,
) -> Hash:
    have = part.stat().st_size if part.exists() else 0
    if have > expected:
        part.unlink()
        have = 0
    digest = _prefix_digest(part, have)
    if have == expected:
        return digest
    deadline = time.monotonic() + policy.timeout_seconds  # one deadline for every hop
    headers = {"Range": f"bytes={have}-", "Accept-Encoding": "identity"}
    try:
        resp = open_url(
            url, token=token, headers=headers, timeout=policy.stall_seconds, allow_insecure_http=allow_insecure_http
        )
    except TimeoutError as exc:
        raise _Retryable(f"stalled or too slow: {exc or 'timeout'}") from exc
    except FetchError as exc:  # a refused redirect: decided, not retried
        raise DownloadError(str(exc), exc.reason) from exc
    with resp:
        return _receive(resp, part, have, expected, deadline, policy, sleep, on_progress, digest)


def _prefix_digest(part: Path, have: int) -> Hash:
    """The sha256 state after the first ``have`` bytes of ``part`` (read only when resuming)."""
    digest = hashlib.sha256()
    if have:
        with open(part, "rb") as fh:
            left = have
            while left and (chunk := fh.read(min(CHUNK, left))):
                digest.update(chunk)
                left -= len(chunk)
    return digest


def _receive(
    resp: Response,
    part: Path,
    have: int,
    expected: int,
    deadline: float,
    policy: DownloadPolicy,
    sleep: Callable[[float], None],
    on_progress: Callable[[int], None] | None,
    digest: Hash,
) -> Hash:
    """Check the answer to a request for the bytes from ``have`` on, then stream its body into ``part``;
    returns ``digest`` (the hash of the part so far) updated with what was written."""
    if resp.status == 416:
        part.unlink(missing_ok=True)
        raise _Retryable("server refused the range; restarting from zero")
    if resp.status == 200:
        have, digest = 0, hashlib.sha256()  # server ignored the range: start over
    elif resp.status == 206 and not _range_starts_at(resp.header("Content-Range"), have):
        part.unlink(missing_ok=True)
        raise _Retryable(f"server answered another range than bytes={have}-")
    elif resp.status != 206:
        if resp.status >= 500 or resp.status in (408, 429):
            raise _Retryable(f"HTTP {resp.status}")
        raise DownloadError(f"HTTP {resp.status} {resp.reason} for {resp.url}", ReasonCode.DOWNLOAD_FAILED)
    length = resp.header("Content-Length")
    if length is not None and length.isdigit() and have + int(length) > expected:
        raise DownloadError(
            f"server announces {have + int(length)} bytes, the assignment allows {expected}",
            ReasonCode.DOWNLOAD_TOO_LARGE,
        )
    try:
        _stream(resp, part, have, expected, deadline, policy, sleep, on_progress, digest)
    except TimeoutError as exc:
        raise _Retryable(f"stalled or too slow: {exc or 'timeout'}") from exc
    return digest


def _range_starts_at(content_range: str | None, offset: int) -> bool:
    """Whether ``Content-Range: bytes a-b/n`` starts at ``offset`` (a missing header is taken on trust)."""
    if content_range is None:
        return True
    unit, _, spec = content_range.partition(" ")
    start = spec.split("-", 1)[0]
    return unit == "bytes" and start.isdigit() and int(start) == offset


def _stream(
    resp: Response,
    part: Path,
    have: int,
    expected: int,
    deadline: float,
    policy: DownloadPolicy,
    sleep: Callable[[float], None],
    on_progress: Callable[[int], None] | None,
    digest: Hash,
) -> None:
    started, got = time.monotonic(), 0
    flags = os.O_WRONLY | os.O_CREAT | (os.O_APPEND if have else os.O_TRUNC)
    fd = os.open(part, flags, 0o600)
    with os.fdopen(fd, "ab" if have else "wb") as out:
        while True:
            chunk = resp.read1(CHUNK)
            if not chunk:
                break
            if have + len(chunk) > expected:
                raise DownloadError(
                    f"server sent more than the {expected} bytes assigned", ReasonCode.DOWNLOAD_TOO_LARGE
                )
            out.write(chunk)
            digest.update(chunk)
            out.flush()  # into the page cache: a killed process keeps what it got, for a Range resume
            have += len(chunk)
            got += len(chunk)
            if on_progress is not None:
                on_progress(have)
            now = time.monotonic()
            if now > deadline:
                out.flush()
                os.fsync(out.fileno())
                raise TimeoutError(f"download exceeded {policy.timeout_seconds:.1f}s")
            if policy.rate_limit_bps:
                ahead = got / policy.rate_limit_bps - (now - started)
                if ahead > 0:
                    sleep(ahead)
        out.flush()
        os.fsync(out.fileno())
    if have < expected:
        raise _Retryable(f"connection closed after {have} of {expected} bytes")
