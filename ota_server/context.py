"""What the app, the engine and the MQTT bridge share: settings, database, store, keys, publisher."""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from edgeota_contract.signing import SigningKey, TrustedKeys
from ota_server.artifacts import ArtifactStore
from ota_server.core.config import Settings

if TYPE_CHECKING:
    from ota_server.tuf_repo import TufRepository


class Publisher(Protocol):
    """Sends a signed command payload to one device's cmd topic (QoS 1)."""

    def publish_command(self, device_id: str, payload: bytes) -> bool: ...


class NullPublisher:
    """Used when MQTT is disabled: commands stay in the database until a device checks in."""

    def publish_command(self, device_id: str, payload: bytes) -> bool:
        return False


@dataclass
class Metrics:
    """Thread-safe counters (ingest errors, messages, commands) exposed on /metrics-ish endpoints."""

    counts: Counter[str] = field(default_factory=Counter)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def inc(self, name: str, by: int = 1) -> None:
        with self.lock:
            self.counts[name] += by

    def snapshot(self) -> dict[str, int]:
        with self.lock:
            return dict(self.counts)


@dataclass
class RateLimiter:
    """Token buckets per device: one flooding device is throttled, the others are unaffected."""

    rate: float
    burst: int
    buckets: dict[str, tuple[float, float]] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def allow(self, key: str, now: float) -> bool:
        with self.lock:
            tokens, last = self.buckets.get(key, (float(self.burst), now))
            tokens = min(float(self.burst), tokens + (now - last) * self.rate)
            allowed = tokens >= 1.0
            self.buckets[key] = (tokens - 1.0 if allowed else tokens, now)
            if len(self.buckets) > 1_000_000:  # bound memory against id spraying
                self.buckets.clear()
            return allowed


@dataclass
class ServerContext:
    settings: Settings
    engine: Engine
    sessions: sessionmaker[Session]
    store: ArtifactStore
    server_key: SigningKey
    release_keys: TrustedKeys
    release_key_pems: list[str]
    publisher: Publisher = field(default_factory=NullPublisher)
    metrics: Metrics = field(default_factory=Metrics)
    limiter: RateLimiter | None = None
    core_metrics: Callable[[], dict[str, int]] | None = None
    tuf: TufRepository | None = None
    """The TUF repository (None when ``tuf_enabled`` is false)."""
    """In an API worker (``--workers``): the core process's counters (ingest, engine), to add to this one's."""

    def metrics_snapshot(self) -> dict[str, int]:
        """This process's counters plus, in an API worker, the core's (summed per name)."""
        counts = Counter(self.metrics.snapshot())
        if self.core_metrics is not None:
            counts.update(self.core_metrics())
        return dict(counts)

    def __post_init__(self) -> None:
        if self.limiter is None:
            self.limiter = RateLimiter(self.settings.ingest_rate_per_device, self.settings.ingest_burst_per_device)
