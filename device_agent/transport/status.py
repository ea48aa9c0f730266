"""What a transport tells the agent about its connection, and how a second agent with this device id is recognised.

:class:`LinkStatus` is one snapshot of the link to the broker (connected, unreachable and why, refused, or
fighting another agent that uses the same device id). A transport that can report it implements
:class:`ObservableTransport`; the agent records each snapshot for ``edgeota agent status``.

:class:`TakeoverDetector` is the pure rule for "another agent uses my device id". A broker keeps one connection
per client id and closes the older one when a client connects with the same id, so two agents with one id take
the connection from each other at every reconnect. Evidence, either of:

- the broker says so: MQTT 5 DISCONNECT with reason 0x8E "session taken over" (Mosquitto sends it);
- MQTT 3.1.1 has no reason codes: :data:`SHORT_LIVED_LIMIT` connections in a row each closed by the broker within
  :data:`SHORT_LIVED_SECONDS` of being accepted.

Once detected the link waits :attr:`TakeoverDetector.backoff` seconds before reconnecting (doubling per detection
up to :data:`MAX_BACKOFF_SECONDS`) instead of taking the connection back within a second; a connection that then
lasts :data:`SHORT_LIVED_SECONDS` before the broker closes it (without "session taken over") resets the count and
the backoff, but not the record of the last detection (:attr:`TakeoverDetector.last_evidence`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, Protocol, runtime_checkable

LinkState = Literal["connecting", "connected", "unreachable", "refused", "disconnected", "duplicate"]

SESSION_TAKEN_OVER = 0x8E
"""MQTT 5 reason code: another client connected with this client id."""
SHORT_LIVED_SECONDS = 10.0
SHORT_LIVED_LIMIT = 3
FIRST_BACKOFF_SECONDS = 30.0
MAX_BACKOFF_SECONDS = 600.0


@dataclass(frozen=True)
class LinkStatus:
    """One snapshot of the broker link. ``reason``: why it is not connected (or the takeover evidence);
    ``failures``: connection attempts failed in a row; ``duplicate``: the last takeover evidence, if any."""

    state: LinkState
    reason: str = ""
    failures: int = 0
    duplicate: str = ""


StatusCallback = Callable[[LinkStatus], None]


@runtime_checkable
class ObservableTransport(Protocol):
    """A transport that reports its connection status (on its own thread, after every change)."""

    def observe(self, callback: StatusCallback) -> None: ...


class TakeoverDetector:
    """Recognises a second agent with the same client id from the broker's disconnects. Not thread-safe: one
    link's callbacks feed it in order. Times are monotonic seconds."""

    def __init__(self, device_id: str) -> None:
        self.device_id = device_id
        self.short_lived = 0
        self.backoff = 0.0
        """Seconds to wait before the next reconnect; 0 while no takeover is suspected."""
        self.last_evidence = ""
        self._connected_at: float | None = None

    def connected(self, now: float) -> None:
        """The broker accepted a connection."""
        self._connected_at = now

    def disconnected(self, now: float, reason_code: int | None, reason: str) -> str | None:
        """The broker closed an accepted connection (not our own goodbye). Returns the takeover evidence as a
        sentence when a second agent is now suspected, else None."""
        lived = None if self._connected_at is None else now - self._connected_at
        self._connected_at = None
        if reason_code == SESSION_TAKEN_OVER:
            evidence = f"the broker closed our connection because another client connected as {self.device_id}"
        elif lived is not None and lived < SHORT_LIVED_SECONDS:
            self.short_lived += 1
            if self.short_lived < SHORT_LIVED_LIMIT:
                return None
            evidence = (
                f"the broker closed {self.short_lived} connections in a row within {SHORT_LIVED_SECONDS:.0f} s of "
                f"accepting them (last: {reason})"
            )
        else:  # a connection that lasted: whatever happened before is over
            self.short_lived = 0
            self.backoff = 0.0
            return None
        self.backoff = min(MAX_BACKOFF_SECONDS, max(FIRST_BACKOFF_SECONDS, self.backoff * 2))
        self.last_evidence = (
            f"another agent seems to use device id {self.device_id}: {evidence}; each takes the connection from the "
            f"other. Stop the other one (or give it its own device id); reconnecting in {self.backoff:.0f} s"
        )
        return self.last_evidence
