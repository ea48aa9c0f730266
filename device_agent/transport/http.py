"""The agent's one HTTP client (stdlib ``http.client``): bundle downloads, sample uploads, command polls
and TUF metadata all go through :func:`open_url`.

Rules :func:`open_url` enforces, whoever calls it:

- Redirects (301, 302, 303, 307, 308) are followed up to :data:`MAX_REDIRECTS` hops, never from
  https to http, never to a scheme other than http(s). A GET or HEAD follows every kind; another
  method follows only 307 and 308 (same method, same body), and gets a 301-303 answer back as it is
  (an upload is never silently turned into a GET).
- The device token goes only to the origin (scheme, host, port) of the URL it was given for: a CDN
  or object store that the server redirects to never sees it. Callers decide whether the first URL
  may have the token at all (:func:`resolve_url`: only the server's own origin).
- The device token never travels in clear to another machine: over plain ``http`` it goes only to a
  loopback host (``localhost``, ``127.0.0.0/8``, ``::1``) unless the caller passes
  ``allow_insecure_http`` (the agent's setting of that name); otherwise the request is refused
  before anything is sent (:func:`check_token_transport`).
- https certificates are verified against the system's trust store (``SSL_CERT_FILE`` names another
  bundle), host name included; there is no switch to turn that off.
- One socket timeout bounds every connect and every read; nothing retries here (callers own their
  retry policies).
"""

from __future__ import annotations

import http.client
import ipaddress
from types import TracebackType
from urllib.parse import urljoin, urlsplit

from edgeota_contract.errors import EdgeotaError
from edgeota_contract.states import ReasonCode

MAX_REDIRECTS = 5
REDIRECTS = frozenset({301, 302, 303, 307, 308})
USER_AGENT = "edgeota-agent"
Origin = tuple[str, str | None, int | None]


class FetchError(EdgeotaError):
    """A request the fetcher will not make or follow, or an answer it will not read.

    Reasons: ``download_failed`` (a refused or broken redirect, too many redirects, a body past the
    caller's limit), ``assignment_invalid`` (:func:`resolve_url`: a URL that is not http(s)).
    """

    default_reason = ReasonCode.DOWNLOAD_FAILED


def origin(url: str) -> Origin:
    """``(scheme, host, port)`` of ``url``: where a token may go."""
    split = urlsplit(url)
    return split.scheme, split.hostname, split.port


def is_loopback(host: str | None) -> bool:
    """Whether ``host`` names this machine only (``localhost`` or a loopback address)."""
    if not host:
        return False
    if host.lower().rstrip(".") == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_token_transport(url: str, allow_insecure_http: bool = False) -> None:
    """Refuse to send the device token to ``url`` over plain http to a host that is not loopback.

    Raises:
        FetchError: ``download_failed``, naming the URL and the setting that would allow it.
    """
    split = urlsplit(url)
    if split.scheme == "http" and not allow_insecure_http and not is_loopback(split.hostname):
        raise FetchError(
            f"refusing to send the device token over plain http to {split.hostname}: use an https server URL,"
            " or set [agent] allow_insecure_http = true on a trusted network"
        )


def resolve_url(server_url: str, target: str) -> tuple[str, bool]:
    """The absolute URL for ``target`` (a path on the server, or a full URL) and whether the device
    token may be sent to it (only when it has the server's origin).

    Raises:
        FetchError: ``assignment_invalid`` for a URL that is not http(s).
    """
    url = urljoin(server_url.rstrip("/") + "/", target.lstrip("/")) if target.startswith("/") else target
    if urlsplit(url).scheme not in ("http", "https"):
        raise FetchError(f"unsupported URL {target!r}", ReasonCode.ASSIGNMENT_INVALID)
    return url, origin(server_url) == origin(url)


def follow_redirect(current: str, location: str) -> str:
    """The absolute target of a redirect from ``current`` to ``location``.

    Raises:
        FetchError: a target that is not http(s), or a downgrade from https to http.
    """
    target = urljoin(current, location)
    scheme = urlsplit(target).scheme
    if scheme not in ("http", "https"):
        raise FetchError(f"redirect to unsupported URL {location!r}")
    if urlsplit(current).scheme == "https" and scheme == "http":
        raise FetchError(f"redirect from https to http refused: {target}")
    return target


class Response:
    """An open answer (after redirects). Read the body, then :meth:`close` (or use ``with``)."""

    def __init__(self, url: str, conn: http.client.HTTPConnection, raw: http.client.HTTPResponse) -> None:
        self.url = url
        self.status = raw.status
        self.reason = raw.reason
        self._conn = conn
        self.raw = raw

    def header(self, name: str) -> str | None:
        return self.raw.getheader(name)

    def read1(self, size: int) -> bytes:
        """Up to ``size`` bytes as soon as some arrived (b"" at the end)."""
        return self.raw.read1(size)

    def read_limited(self, limit: int) -> bytes:
        """The whole body, refusing one longer than ``limit`` bytes (memory stays bounded).

        Raises:
            FetchError: the body (announced or received) is longer than ``limit``.
        """
        length = self.header("Content-Length")
        if length is not None and length.isdigit() and int(length) > limit:
            raise FetchError(f"answer of {length} bytes from {self.url} exceeds {limit}")
        body = self.raw.read(limit + 1)
        if len(body) > limit:
            raise FetchError(f"answer from {self.url} exceeds {limit} bytes")
        return body

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> Response:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def open_url(
    url: str,
    *,
    method: str = "GET",
    token: str | None = None,
    headers: dict[str, str] | None = None,
    body: bytes | None = None,
    timeout: float = 30.0,
    allow_insecure_http: bool = False,
) -> Response:
    """Send ``method url`` and follow redirects by the module's rules; returns the final answer, open.

    ``token`` is sent as ``Authorization: Bearer`` to hops with the origin of ``url`` only, and over
    plain http only to a loopback host unless ``allow_insecure_http``.

    Raises:
        FetchError: a refused redirect, a redirect without a Location, more than :data:`MAX_REDIRECTS` hops,
            a URL that is not http(s), a token that would go over plain http to another machine.
        ssl.SSLCertVerificationError (an OSError): an https certificate that does not verify or is for another
            host.
        OSError, http.client.HTTPException: network faults (``TimeoutError`` when the socket timed out).
    """
    if urlsplit(url).scheme not in ("http", "https"):
        raise FetchError(f"unsupported URL {url!r}")
    first = origin(url)
    if token:
        check_token_transport(url, allow_insecure_http)
    for _ in range(MAX_REDIRECTS + 1):
        hop_headers = {"User-Agent": USER_AGENT, **(headers or {})}
        if token and origin(url) == first:
            hop_headers["Authorization"] = f"Bearer {token}"
        resp = _send(url, method, hop_headers, body, timeout)
        if resp.status not in REDIRECTS or (method not in ("GET", "HEAD") and resp.status not in (307, 308)):
            return resp
        location = resp.header("Location")
        resp.close()
        if not location:
            raise FetchError(f"HTTP {resp.status} without a Location from {url}")
        url = follow_redirect(url, location)
    raise FetchError(f"more than {MAX_REDIRECTS} redirects, last to {url}")


def _send(url: str, method: str, headers: dict[str, str], body: bytes | None, timeout: float) -> Response:
    split = urlsplit(url)
    conn_cls = http.client.HTTPSConnection if split.scheme == "https" else http.client.HTTPConnection
    conn = conn_cls(split.hostname or "", split.port, timeout=timeout)
    try:
        path = split.path + (f"?{split.query}" if split.query else "")
        conn.request(method, path or "/", body=body, headers=headers)
        return Response(url, conn, conn.getresponse())
    except BaseException:
        conn.close()
        raise
