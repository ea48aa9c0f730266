"""python-tuf's network seam (``tuf.ngclient.FetcherInterface``) over the agent's one HTTP client.

ngclient fetches every metadata file through a fetcher; this one uses
:func:`device_agent.transport.http.open_url`, so TUF metadata follows the same redirect rules as
bundles and samples (at most five hops, never from https to http). No token is sent: TUF metadata
is public, and its trust comes from its signatures. ngclient bounds every file's length itself.
Imported only when an update checks the repository (python-tuf is not loaded by an idle agent).
"""

from __future__ import annotations

from collections.abc import Iterator

from tuf.api import exceptions
from tuf.ngclient.fetcher import FetcherInterface

from device_agent.transport.http import Response, open_url

CHUNK = 64 * 1024


class AgentFetcher(FetcherInterface):
    """Fetches TUF metadata with :func:`~device_agent.transport.http.open_url`.

    Raises (from ``fetch``, as ngclient expects): ``DownloadHTTPError`` for any answer but 200 (ngclient
    reads 403 and 404 on the next root version as "no newer root"), ``SlowRetrievalError`` when the socket
    timed out, ``DownloadError`` for anything else (connection refused, a refused redirect).
    """

    def __init__(self, timeout_seconds: float = 30.0) -> None:
        self.timeout_seconds = timeout_seconds

    def _fetch(self, url: str) -> Iterator[bytes]:
        try:
            resp = open_url(url, timeout=self.timeout_seconds)
        except TimeoutError as exc:
            raise exceptions.SlowRetrievalError(f"no answer from {url} within {self.timeout_seconds}s") from exc
        if resp.status != 200:
            resp.close()
            raise exceptions.DownloadHTTPError(f"HTTP {resp.status} for {url}", resp.status)
        return self._chunks(resp)

    def _chunks(self, resp: Response) -> Iterator[bytes]:
        try:
            while chunk := resp.read1(CHUNK):
                yield chunk
        except TimeoutError as exc:
            raise exceptions.SlowRetrievalError(f"stalled reading {resp.url}") from exc
        finally:
            resp.close()
