"""HMAC-SHA256 signatures of webhook deliveries, and their verification (standard library only).

A delivery carries ``X-Edgeota-Timestamp`` (Unix seconds, an integer) and ``X-Edgeota-Signature``
(``v1=<hex>``), where the hex is HMAC-SHA256 with the webhook's secret over ``timestamp + "." + body``
(the body's exact bytes). A receiver recomputes it, compares in constant time, and rejects a timestamp
further than its tolerance (default 300 s) from its own clock, so a captured delivery cannot be replayed
later; ``X-Edgeota-Delivery`` (unique per delivery, the same on its retries) lets it drop a replay inside
the tolerance too.
"""

from __future__ import annotations

import hashlib
import hmac

TIMESTAMP_HEADER = "X-Edgeota-Timestamp"
SIGNATURE_HEADER = "X-Edgeota-Signature"
DELIVERY_HEADER = "X-Edgeota-Delivery"
EVENT_HEADER = "X-Edgeota-Event"
SCHEME = "v1"
DEFAULT_TOLERANCE_SECONDS = 300


def sign(secret: bytes, timestamp: int, body: bytes) -> str:
    """The ``X-Edgeota-Signature`` value for ``body`` sent at ``timestamp`` (``v1=<64 hex>``)."""
    mac = hmac.new(secret, str(int(timestamp)).encode() + b"." + body, hashlib.sha256)
    return f"{SCHEME}={mac.hexdigest()}"


def verify(
    secret: bytes,
    timestamp: str | None,
    signature: str | None,
    body: bytes,
    now: float,
    tolerance: float = DEFAULT_TOLERANCE_SECONDS,
) -> str | None:
    """None when the delivery is authentic and fresh, else why not (one line).

    ``signature`` may hold several comma-separated ``v1=`` values (a sender rotating secrets); one match suffices.
    """
    if not timestamp or not signature:
        return "missing timestamp or signature header"
    try:
        ts = int(timestamp)
    except ValueError:
        return "timestamp is not an integer"
    if abs(now - ts) > tolerance:
        return f"timestamp {ts} is more than {tolerance:g} s from now"
    expected = sign(secret, ts, body)
    for candidate in signature.split(","):
        if hmac.compare_digest(candidate.strip().encode(), expected.encode()):
            return None
    return "signature does not match"
