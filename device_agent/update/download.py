"""Resumable, bounded bundle download over HTTP(S) with the stdlib only.

Guarantees of :func:`download`: the ``.part`` file never holds more than ``expected_size``
bytes; an interrupted download resumes with ``Range`` (the ``.part`` file survives a crash);
retryable faults (connection drops, 5xx, stalls) are retried with exponential backoff and full
jitter; on a final failure the ``.part`` file is removed. Memory use is one chunk. Redirects
(301, 302, 303, 307, 308) are followed up to ``MAX_REDIRECTS`` hops, never from https to http;
the device token goes only to the origin it was given for (a CDN or object store that the server
redirects to never sees it). The bundle's authenticity never rests on the transport: the archive
is verified against the release key afterwards.
"""

from __future__ import annotations

import http.client
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urljoin, urlsplit

from edgeota_contract.errors import EdgeotaError
from edgeota_contract.states import ReasonCode

CHUNK = 64 * 1024
MAX_REDIRECTS = 5
_REDIRECTS = frozenset({301, 302, 303, 307, 308})


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


def resolve_url(server_url: str, bundle_url: str) -> tuple[str, bool]:
    """The absolute URL and whether the device token may be sent to it (same origin as the server only)."""
    url = urljoin(server_url.rstrip("/") + "/", bundle_url.lstrip("/")) if bundle_url.startswith("/") else bundle_url
    if urlsplit(url).scheme not in ("http", "https"):
        raise DownloadError(f"unsupported bundle URL {bundle_url!r}", ReasonCode.ASSIGNMENT_INVALID)
    return url, _origin(server_url) == _origin(url)


def _origin(url: str) -> tuple[str, str | None, int | None]:
    split = urlsplit(url)
    return split.scheme, split.hostname, split.port


def follow_redirect(current: str, location: str) -> str:
    """The absolute target of a redirect from ``current`` to ``location``.

    Raises:
        DownloadError: ``download_failed`` for a target that is not http(s), or a downgrade from https to http.
    """
    target = urljoin(current, location)
    scheme = urlsplit(target).scheme
    if scheme not in ("http", "https"):
        raise DownloadError(f"redirect to unsupported URL {location!r}", ReasonCode.DOWNLOAD_FAILED)
    if urlsplit(current).scheme == "https" and scheme == "http":
        raise DownloadError(f"redirect from https to http refused: {target}", ReasonCode.DOWNLOAD_FAILED)
    return target


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
) -> None:
    """Fetch ``url`` into ``part`` until it holds exactly ``expected_size`` bytes.

    Raises:
        DownloadError: ``download_too_large`` (server sends more than ``expected_size``),
            ``download_timeout`` (stalled or over the deadline after all retries),
            ``download_failed`` (HTTP error or connection faults after all retries),
            ``disk_full`` (no space left while writing).
    """
    rng = rng or random.Random()
    last: Exception | None = None
    reason = ReasonCode.DOWNLOAD_FAILED
    try:
        for attempt in range(policy.retries + 1):
            if attempt:
                sleep(backoff_delay(attempt - 1, policy, rng))
            try:
                _attempt(url, part, expected_size, token, policy, sleep, on_progress)
                return
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
) -> None:
    have = part.stat().st_size if part.exists() else 0
    if have > expected:
        part.unlink()
        have = 0
    if have == expected:
        return
    origin, deadline = _origin(url), time.monotonic() + policy.timeout_seconds  # one deadline for every hop
    for _ in range(MAX_REDIRECTS + 1):
        # the token only ever goes back to the origin it was given for
        hop_token = token if _origin(url) == origin else None
        location = _fetch(url, part, have, expected, hop_token, deadline, policy, sleep, on_progress)
        if location is None:
            return
        url = follow_redirect(url, location)
    raise DownloadError(f"more than {MAX_REDIRECTS} redirects, last to {url}", ReasonCode.DOWNLOAD_FAILED)


def _fetch(
    url: str,
    part: Path,
    have: int,
    expected: int,
    token: str | None,
    deadline: float,
    policy: DownloadPolicy,
    sleep: Callable[[float], None],
    on_progress: Callable[[int], None] | None,
) -> str | None:
    """One request for the bytes from ``have`` on; returns the Location of a redirect, else None when done."""
    split = urlsplit(url)
    conn_cls = http.client.HTTPSConnection if split.scheme == "https" else http.client.HTTPConnection
    conn = conn_cls(split.hostname or "", split.port, timeout=policy.stall_seconds)
    headers = {"Range": f"bytes={have}-", "Accept-Encoding": "identity"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    try:
        path = split.path + (f"?{split.query}" if split.query else "")
        conn.request("GET", path or "/", headers=headers)
        resp = conn.getresponse()
        if resp.status in _REDIRECTS:
            location = resp.getheader("Location")
            if not location:
                raise DownloadError(f"HTTP {resp.status} without a Location from {url}", ReasonCode.DOWNLOAD_FAILED)
            return location
        if resp.status == 416:
            part.unlink(missing_ok=True)
            raise _Retryable("server refused the range; restarting from zero")
        if resp.status == 200:
            have = 0  # server ignored the range: start over
        elif resp.status == 206 and not _range_starts_at(resp.getheader("Content-Range"), have):
            part.unlink(missing_ok=True)
            raise _Retryable(f"server answered another range than bytes={have}-")
        elif resp.status != 206:
            if resp.status >= 500 or resp.status in (408, 429):
                raise _Retryable(f"HTTP {resp.status}")
            raise DownloadError(f"HTTP {resp.status} {resp.reason} for {url}", ReasonCode.DOWNLOAD_FAILED)
        length = resp.getheader("Content-Length")
        if length is not None and length.isdigit() and have + int(length) > expected:
            raise DownloadError(
                f"server announces {have + int(length)} bytes, the assignment allows {expected}",
                ReasonCode.DOWNLOAD_TOO_LARGE,
            )
        _stream(resp, part, have, expected, deadline, policy, sleep, on_progress)
        return None
    except TimeoutError as exc:
        raise _Retryable(f"stalled or too slow: {exc or 'timeout'}") from exc
    finally:
        conn.close()


def _range_starts_at(content_range: str | None, offset: int) -> bool:
    """Whether ``Content-Range: bytes a-b/n`` starts at ``offset`` (a missing header is taken on trust)."""
    if content_range is None:
        return True
    unit, _, spec = content_range.partition(" ")
    start = spec.split("-", 1)[0]
    return unit == "bytes" and start.isdigit() and int(start) == offset


def _stream(
    resp: http.client.HTTPResponse,
    part: Path,
    have: int,
    expected: int,
    deadline: float,
    policy: DownloadPolicy,
    sleep: Callable[[float], None],
    on_progress: Callable[[int], None] | None,
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
