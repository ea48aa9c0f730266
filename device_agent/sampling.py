"""Randomized sampling of raw inputs for retraining, uploaded over HTTP.

Each request is kept with probability ``rate``, decided by a random draw alone, so the sample is
uniform over traffic and independent of the inputs, outputs and the model's confidence. The
request path only appends to a bounded in-memory queue; :meth:`InputSampler.persist` (called by
the agent's ticker) writes samples as ``.npz`` files into a bounded folder (oldest dropped), and
:meth:`InputSampler.upload` POSTs them to the server with the device token, deleting each file
only after a 2xx answer.
"""

from __future__ import annotations

import collections
import http.client
import io
import logging
import random
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from device_agent._lazy import lazy_module
from device_agent.fsutil import atomic_write
from device_agent.runtime import LoadedModel
from edgeota_contract.logs import log_event

if TYPE_CHECKING:
    import numpy as np
else:
    np = lazy_module("numpy")

log = logging.getLogger("device_agent.sampling")


class InputSampler:
    """A :class:`~device_agent.runtime.ModelRuntime` listener keeping a uniform random share of inputs."""

    def __init__(self, folder: Path, rate: float, max_files: int, rng: random.Random | None = None) -> None:
        self.folder = folder
        self.rate = rate
        self.max_files = max_files
        self.dropped = 0
        self._rng = rng or random.Random()
        self._lock = threading.Lock()
        self._io_lock = threading.Lock()
        self._queue: collections.deque[tuple[int, str, dict[str, np.ndarray]]] = collections.deque(maxlen=max_files)

    def __call__(self, model: LoadedModel, inputs: dict[str, Any], outputs: Any, latency_ns: int) -> None:
        if self.rate <= 0 or self._rng.random() >= self.rate:
            return
        arrays = {f"in.{k}": np.array(v) for k, v in inputs.items() if isinstance(v, np.ndarray)}
        tag = f"{model.manifest.model_name}-{model.manifest.version}-{model.bundle_sha256[:12]}"
        with self._lock:
            self._queue.append((time.time_ns(), tag, arrays))

    def persist(self) -> int:
        """Write queued samples to the folder (bounded: the oldest files go first); returns how many."""
        with self._lock:
            items = list(self._queue)
            self._queue.clear()
        if not items:
            return 0
        self.folder.mkdir(parents=True, exist_ok=True)
        for stamp, tag, arrays in items:
            buf = io.BytesIO()
            np.savez(buf, **arrays)  # type: ignore[arg-type]
            atomic_write(self.folder / f"{stamp}-{tag}.npz", buf.getvalue())
        files = sorted(self.folder.glob("*.npz"))
        for old in files[: max(0, len(files) - self.max_files)]:
            old.unlink(missing_ok=True)
            self.dropped += 1
        return len(items)

    def pending(self) -> list[Path]:
        return sorted(self.folder.glob("*.npz")) if self.folder.exists() else []

    def upload(self, url: str, token: str | None, timeout: float = 30.0, limit: int = 50) -> int:
        """POST up to ``limit`` sample files to ``url``; returns how many the server accepted.

        Stops at the first failure (the rest waits for the next call); never raises for network errors.
        """
        with self._io_lock:  # one uploader at a time, so no file is sent twice
            return self._upload(url, token, timeout, limit)

    def _upload(self, url: str, token: str | None, timeout: float, limit: int) -> int:
        split = urlsplit(url)
        sent = 0
        for path in self.pending()[:limit]:
            conn_cls = http.client.HTTPSConnection if split.scheme == "https" else http.client.HTTPConnection
            conn = conn_cls(split.hostname or "", split.port, timeout=timeout)
            headers = {"Content-Type": "application/octet-stream", "X-Edgeota-Sample": path.name}
            if token:
                headers["Authorization"] = f"Bearer {token}"
            try:
                conn.request("POST", split.path or "/", body=path.read_bytes(), headers=headers)
                status = conn.getresponse().status
            except (OSError, http.client.HTTPException) as exc:
                log_event(log, "sample_upload_failed", level=logging.WARNING, detail=str(exc))
                return sent
            finally:
                conn.close()
            if not 200 <= status < 300:
                log_event(log, "sample_upload_refused", level=logging.WARNING, status=status)
                return sent
            path.unlink(missing_ok=True)
            sent += 1
        return sent
