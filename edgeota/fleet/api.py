"""A small typed client for the OTA server's REST API, as the demo and the fleet benchmark use it.

Every method raises :class:`ServerApiError` (with the HTTP status and the server's problem detail)
on a non-success answer, and on a connection failure.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgeota_contract.errors import EdgeotaError
from edgeota_contract.states import ReasonCode, RolloutState


class ServerApiError(EdgeotaError):
    default_reason = ReasonCode.INTERNAL_ERROR

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class StagePlan:
    percent: float | None = None
    count: int | None = None
    soak_seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"soak_seconds": self.soak_seconds}
        if self.count is not None:
            out["count"] = self.count
        else:
            out["percent"] = self.percent if self.percent is not None else 100.0
        return out


@dataclass(frozen=True)
class RolloutPlan:
    stages: Sequence[StagePlan]
    max_failure_rate: float = 0.2
    min_count_for_failure_rate: int = 2
    device_timeout_seconds: float = 120.0
    on_failure: str = "rollback"
    labels: dict[str, str] = field(default_factory=dict)
    extra_gates: dict[str, Any] = field(default_factory=dict)  # any other gate fields: max_concurrent, telemetry gates

    def body(self, release_id: str) -> dict[str, Any]:
        return {
            "release_id": release_id,
            "selector": {"labels": dict(self.labels)},
            "stages": [s.to_json() for s in self.stages],
            "gates": {
                "max_failure_rate": self.max_failure_rate,
                "min_count_for_failure_rate": self.min_count_for_failure_rate,
                "device_timeout_seconds": self.device_timeout_seconds,
                **self.extra_gates,
            },
            "on_failure": self.on_failure,
        }


class ServerApi:
    """``ServerApi(url, token)``; close it (or use ``with``) to release the connection pool."""

    def __init__(self, base_url: str, token: str, timeout: float = 60.0) -> None:
        import httpx

        self.base_url = base_url.rstrip("/")
        self._http = httpx.Client(base_url=self.base_url, headers={"Authorization": f"Bearer {token}"}, timeout=timeout)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> ServerApi:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, method: str, path: str, expect: Sequence[int] = (200, 201), **kwargs: Any) -> Any:
        import httpx

        try:
            resp = self._http.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise ServerApiError(f"{method} {path}: {exc}") from exc
        if resp.status_code not in expect:
            detail = resp.text[:400]
            with contextlib.suppress(ValueError):
                detail = str(resp.json().get("detail", detail))
            raise ServerApiError(f"{method} {path}: HTTP {resp.status_code}: {detail}", resp.status_code)
        return resp.json() if resp.content else None

    def upload_bundle(self, path: Path) -> dict[str, Any]:
        """``POST /api/v1/bundles`` with the archive as the raw body; returns the bundle record."""
        with path.open("rb") as fh:
            result: dict[str, Any] = self._call(
                "POST", "/api/v1/bundles", content=fh, headers={"Content-Type": "application/octet-stream"}
            )
        return result

    def create_rollout(self, release_id: str, plan: RolloutPlan) -> dict[str, Any]:
        result: dict[str, Any] = self._call("POST", "/api/v1/rollouts", json=plan.body(release_id))
        return result

    def start_rollout(self, rollout_id: str) -> dict[str, Any]:
        result: dict[str, Any] = self._call("POST", f"/api/v1/rollouts/{rollout_id}/start")
        return result

    def command(self, rollout_id: str, command: str, reason: str = "") -> dict[str, Any]:
        """``POST /api/v1/rollouts/{id}/{command}`` (pause, resume, abort, rollback, approve)."""
        result: dict[str, Any] = self._call("POST", f"/api/v1/rollouts/{rollout_id}/{command}", json={"reason": reason})
        return result

    def rollout(self, rollout_id: str, deployments: bool = True) -> dict[str, Any]:
        """``GET /api/v1/rollouts/{id}``; ``deployments=False`` leaves out the per-device rows (state and counts
        only: what a watcher of a large fleet should poll, since the full answer grows with the fleet)."""
        params = None if deployments else {"deployments": "false"}
        result: dict[str, Any] = self._call("GET", f"/api/v1/rollouts/{rollout_id}", params=params)
        return result

    def device(self, device_id: str) -> dict[str, Any]:
        result: dict[str, Any] = self._call("GET", f"/api/v1/devices/{device_id}")
        return result

    def devices(self, labels: str | None = None, limit: int = 1000, online: bool | None = None) -> list[dict[str, Any]]:
        """``GET /api/v1/devices`` (label selector ``k=v,...``; ``online`` filters on presence)."""
        params: dict[str, Any] = {"limit": limit}
        if labels:
            params["label"] = labels
        if online is not None:
            params["online"] = "true" if online else "false"
        result: Any = self._call("GET", "/api/v1/devices", params=params)
        if isinstance(result, dict):  # a paginated envelope
            result = result.get("items", result.get("devices", []))
        devices: list[dict[str, Any]] = list(result)
        return devices

    def wait_rollout(
        self,
        rollout_id: str,
        timeout: float,
        on_poll: Callable[[dict[str, Any]], None] | None = None,
        interval: float = 0.5,
    ) -> dict[str, Any]:
        """Poll until the rollout reaches a terminal state; returns its last JSON.

        Raises:
            ServerApiError: not terminal within ``timeout`` seconds.
        """
        deadline = time.monotonic() + timeout
        while True:
            state = self.rollout(rollout_id)
            if on_poll is not None:
                on_poll(state)
            if RolloutState(state["state"]).terminal:
                return state
            if time.monotonic() > deadline:
                raise ServerApiError(
                    f"rollout {rollout_id} still {state['state']} after {timeout:.0f}s (counts {state.get('counts')})"
                )
            time.sleep(interval)
