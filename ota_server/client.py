"""The typed REST client of the OTA server, for the CLI, the fleet simulator, the benchmarks and scripts.

Each method calls one endpoint and returns its response model (:mod:`ota_server.api.responses`). Every
refusal and every connection failure raises :class:`ApiClientError`, which carries the HTTP status (None
when the server could not be reached) and the server's problem ``detail``. The module imports httpx,
pydantic, pydantic-settings, the contract and the response models only: no FastAPI, no SQLAlchemy, so it
runs where the server is not installed.

Rollout plans are in :mod:`ota_server.client_plans`, the check of a dataset export in
:mod:`ota_server.client_datasets`, the evaluations, telemetry, accuracy, feedback and alerts calls in
:mod:`ota_server.client_monitoring` (mixed in), the error in :mod:`ota_server.client_errors` (re-exported here).

A model keeps what the server sent: ``model.model_dump(mode="json", exclude_unset=True)`` gives back the
answer's fields (fields a model does not declare are kept only by the rollout models).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import httpx
from pydantic import BaseModel, TypeAdapter, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

from edgeota_contract.states import RolloutState
from ota_server.api.responses import (
    AuditEntry,
    BundleRecord,
    DatasetManifest,
    DeviceCommands,
    DeviceDecommissioned,
    DeviceDetail,
    DeviceProvisioned,
    DeviceSummary,
    Health,
    ReleaseRecord,
    RolloutCreated,
    RolloutDryRun,
    RolloutStatus,
    SampleList,
    TokenCreated,
)
from ota_server.client_datasets import export_into
from ota_server.client_errors import ApiClientError
from ota_server.client_monitoring import MonitoringCalls
from ota_server.client_monitoring import query_params as _params
from ota_server.client_plans import RolloutPlan

__all__ = ["ApiClient", "ApiClientError", "ClientSettings", "as_json"]  # ApiClientError: re-exported

T = TypeVar("T")
RETRIES_ON_503 = 3
"""Times a request is sent again after a 503 with Retry-After (the server rolled it back whole)."""


class ClientSettings(BaseSettings):
    """``EDGEOTA_URL``, ``EDGEOTA_TOKEN`` and ``EDGEOTA_TIMEOUT``; command-line options override them."""

    model_config = SettingsConfigDict(env_prefix="EDGEOTA_", extra="ignore")

    url: str = "http://127.0.0.1:8080"
    token: str | None = None
    timeout: float = 30.0


_ADAPTERS: dict[Any, TypeAdapter[Any]] = {}


def _adapter(kind: type[T]) -> TypeAdapter[T]:
    """A validator per answer type, built once (building one costs far more than using it)."""
    adapter = _ADAPTERS.get(kind)
    if adapter is None:
        adapter = _ADAPTERS[kind] = TypeAdapter(kind)
    return adapter


class ApiClient(MonitoringCalls):
    """``ApiClient(settings)`` or ``ApiClient.connect(url, token)``; close it (or use ``with``) when done.

    ``http`` replaces the HTTP client (tests pass an in-process one); the token is sent with every request.
    Evaluations, telemetry, accuracy, feedback and alerts calls come from :class:`MonitoringCalls`.
    """

    def __init__(self, settings: ClientSettings | None = None, http: httpx.Client | None = None) -> None:
        settings = settings or ClientSettings()
        self.url = settings.url.rstrip("/")
        self._auth = {"Authorization": f"Bearer {settings.token}"} if settings.token else {}
        self._http = http or httpx.Client(base_url=self.url, timeout=settings.timeout)

    @classmethod
    def connect(cls, url: str, token: str | None, timeout: float = 60.0) -> ApiClient:
        return cls(ClientSettings(url=url, token=token, timeout=timeout))

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> ApiClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ transport

    def request(self, method: str, path: str, **kwargs: Any) -> Any:
        """One call; the decoded JSON answer (None when empty). Raises ApiClientError on 4xx/5xx or no answer."""
        headers = {**self._auth, **kwargs.pop("headers", {})}
        for attempt in range(RETRIES_ON_503 + 1):
            try:
                resp = self._http.request(method, path, headers=headers, **kwargs)
            except httpx.HTTPError as exc:
                raise ApiClientError(f"cannot reach {self.url}: {exc}") from exc
            # 503 with Retry-After: the server rolled the request back whole (a database lock conflict).
            if resp.status_code != 503 or "retry-after" not in resp.headers or attempt == RETRIES_ON_503:
                break
            time.sleep(min(5.0, float(resp.headers["retry-after"]) if resp.headers["retry-after"].isdigit() else 1.0))
        if resp.status_code >= 400:
            problem: dict[str, Any] = {}
            detail = resp.text[:200]
            with contextlib.suppress(ValueError):
                body = resp.json()
                if isinstance(body, dict):
                    problem = body
                    detail = str(body.get("detail") or body.get("title") or detail)
            raise ApiClientError(f"{method} {path} -> {resp.status_code}: {detail}", resp.status_code, detail, problem)
        return resp.json() if resp.content else None

    def _typed(self, kind: type[T], method: str, path: str, **kwargs: Any) -> T:
        data = self.request(method, path, **kwargs)
        try:
            result: T = _adapter(kind).validate_python(data)
        except ValidationError as exc:
            raise ApiClientError(f"{method} {path}: unexpected answer: {exc}") from exc
        return result

    # ------------------------------------------------------------------ server

    def health(self) -> Health:
        return self._typed(Health, "GET", "/healthz")

    def metrics(self) -> dict[str, int]:
        return self._typed(dict[str, int], "GET", "/api/v1/metrics")

    def create_token(self, role: str, name: str = "token") -> TokenCreated:
        """A new API token (admin only); its plaintext is in the answer only."""
        return self._typed(TokenCreated, "POST", "/api/v1/tokens", json={"role": role, "name": name})

    def audit(
        self,
        *,
        actor: str | None = None,
        action: str | None = None,
        entity_type: str | None = None,
        entity_id: str | None = None,
        since: str | None = None,
        until: str | None = None,
        limit: int = 100,
        offset: int = 0,
    ) -> list[AuditEntry]:
        params = _params(
            actor=actor,
            action=action,
            entity_type=entity_type,
            entity_id=entity_id,
            since=since,
            until=until,
            limit=limit,
            offset=offset,
        )
        return self._typed(list[AuditEntry], "GET", "/api/v1/audit", params=params)

    # ------------------------------------------------------------------ releases

    def upload(self, path: Path) -> BundleRecord:
        """``POST /api/v1/bundles`` with the archive as the raw body (streamed); the bundle's record."""
        with open(path, "rb") as fh:
            return self._typed(
                BundleRecord,
                "POST",
                "/api/v1/bundles",
                content=fh,
                headers={"Content-Type": "application/octet-stream"},
            )

    def releases(self, model_name: str | None = None, limit: int = 100, offset: int = 0) -> list[ReleaseRecord]:
        params = _params(model_name=model_name, limit=limit, offset=offset)
        return self._typed(list[ReleaseRecord], "GET", "/api/v1/releases", params=params)

    def release(self, release_id: str) -> ReleaseRecord:
        return self._typed(ReleaseRecord, "GET", f"/api/v1/releases/{release_id}")

    def download_bundle(self, sha256: str, dest: Path) -> None:
        """``GET /api/v1/artifacts/{sha256}`` into ``dest`` (unverified: check it with ``verify_bundle``)."""
        self._download("GET", f"/api/v1/artifacts/{sha256}", dest)

    # ------------------------------------------------------------------ devices

    def provision(
        self, hardware_profile: str, labels: Mapping[str, str] | None = None, device_id: str | None = None
    ) -> DeviceProvisioned:
        """Register a device; the answer holds its one-time credentials and ``agent.toml``."""
        body: dict[str, Any] = {"hardware_profile": hardware_profile, "labels": dict(labels or {})}
        if device_id:
            body["device_id"] = device_id
        return self._typed(DeviceProvisioned, "POST", "/api/v1/devices", json=body)

    def devices(
        self,
        labels: str | None = None,
        limit: int = 1000,
        online: bool | None = None,
        profile: str | None = None,
        offset: int = 0,
        include_decommissioned: bool = False,
    ) -> list[DeviceSummary]:
        """``GET /api/v1/devices`` (``labels``: a selector ``k=v,...``; ``online`` filters on presence;
        decommissioned devices only with ``include_decommissioned``)."""
        params = _params(label=labels, limit=limit, online=online, profile=profile, offset=offset)
        if include_decommissioned:
            params["all"] = "true"
        return self._typed(list[DeviceSummary], "GET", "/api/v1/devices", params=params)

    def device(self, device_id: str) -> DeviceDetail:
        return self._typed(DeviceDetail, "GET", f"/api/v1/devices/{device_id}")

    def decommission_device(self, device_id: str, reason: str = "") -> DeviceDecommissioned:
        """Revoke the device's credentials and take it out of every open rollout (operator role)."""
        return self._typed(
            DeviceDecommissioned, "POST", f"/api/v1/devices/{device_id}/decommission", json={"reason": reason}
        )

    def device_commands(self, device_id: str) -> DeviceCommands:
        """The device's open signed commands (only with that device's own token)."""
        return self._typed(DeviceCommands, "GET", f"/api/v1/devices/{device_id}/commands")

    # ------------------------------------------------------------------ rollouts

    def create_rollout(
        self, release_id: str, plan: RolloutPlan | Mapping[str, Any], start: bool = False
    ) -> RolloutCreated:
        """A rollout of ``release_id``: a draft, or running at once with ``start``.

        ``plan`` is a :class:`RolloutPlan` or any other ``POST /api/v1/rollouts`` body (its ``release_id`` is
        replaced; ``dry_run`` is refused here: see :meth:`dry_run_rollout`).
        """
        body = self._rollout_body(release_id, plan)
        if body.get("dry_run"):
            raise ApiClientError("create_rollout: use dry_run_rollout for a dry run")
        if start:
            body["start"] = True
        return self._typed(RolloutCreated, "POST", "/api/v1/rollouts", json=body)

    def dry_run_rollout(self, release_id: str, plan: RolloutPlan | Mapping[str, Any]) -> RolloutDryRun:
        """Which devices each stage of ``plan`` would take; nothing is stored."""
        body = {**self._rollout_body(release_id, plan), "dry_run": True}
        return self._typed(RolloutDryRun, "POST", "/api/v1/rollouts", json=body)

    @staticmethod
    def _rollout_body(release_id: str, plan: RolloutPlan | Mapping[str, Any]) -> dict[str, Any]:
        if isinstance(plan, RolloutPlan):
            return plan.body(release_id)
        return {**plan, "release_id": release_id}

    def command(
        self,
        rollout_id: str,
        command: str,
        reason: str = "",
        revert: bool = False,
        override_blessing: str | None = None,
    ) -> RolloutStatus:
        """``POST /api/v1/rollouts/{id}/{command}``: start, pause, resume, abort (``revert``), rollback, approve,
        retry_failed. ``override_blessing`` (start only): the reason to start a release that is not blessed."""
        body: dict[str, Any] = {"reason": reason}
        if revert:
            body["revert"] = True
        if override_blessing is not None:
            body["override_blessing"] = override_blessing
        return self._typed(RolloutStatus, "POST", f"/api/v1/rollouts/{rollout_id}/{command}", json=body)

    def start_rollout(self, rollout_id: str) -> RolloutStatus:
        return self.command(rollout_id, "start")

    def rollout(self, rollout_id: str, deployments: bool = True) -> RolloutStatus:
        """``GET /api/v1/rollouts/{id}``; ``deployments=False`` leaves out the per-device rows (what a watcher of a
        large fleet should poll, since the full answer grows with the fleet)."""
        params = None if deployments else {"deployments": "false"}
        return self._typed(RolloutStatus, "GET", f"/api/v1/rollouts/{rollout_id}", params=params)

    def rollouts(
        self, state: str | None = None, limit: int = 100, offset: int = 0, model: str | None = None
    ) -> list[RolloutStatus]:
        """``GET /api/v1/rollouts``: newest first, optionally of one ``state`` and one ``model``."""
        params = _params(state=state, limit=limit, offset=offset, model=model)
        return self._typed(list[RolloutStatus], "GET", "/api/v1/rollouts", params=params)

    def wait_rollout(
        self,
        rollout_id: str,
        timeout: float,
        on_poll: Callable[[RolloutStatus], None] | None = None,
        interval: float = 0.5,
        deployments: bool = True,
    ) -> RolloutStatus:
        """Poll until the rollout reaches a terminal state; returns its last status.

        Raises:
            ApiClientError: not terminal within ``timeout`` seconds (``status`` None), or a poll failed.
        """
        deadline = time.monotonic() + timeout
        while True:
            status = self.rollout(rollout_id, deployments=deployments)
            if on_poll is not None:
                on_poll(status)
            if RolloutState(status.state).terminal:
                return status
            if time.monotonic() > deadline:
                raise ApiClientError(
                    f"rollout {rollout_id} still {status.state} after {timeout:.0f}s (counts {status.counts})"
                )
            time.sleep(interval)

    # ------------------------------------------------------------------ samples and datasets

    def samples(
        self,
        model_name: str | None = None,
        version: str | None = None,
        profile: str | None = None,
        device_id: str | None = None,
        limit: int = 1000,
        offset: int = 0,
    ) -> SampleList:
        params = _params(
            model_name=model_name, version=version, profile=profile, device_id=device_id, limit=limit, offset=offset
        )
        return self._typed(SampleList, "GET", "/api/v1/samples", params=params)

    def export_dataset(
        self,
        out: Path,
        model_name: str,
        *,
        version: str | None = None,
        profile: str | None = None,
        since: str | None = None,
        until: str | None = None,
        cohort_label: str | None = None,
        trigger: str = "manual",
        parent_release: str | None = None,
        drift_report: Mapping[str, Any] | None = None,
    ) -> DatasetManifest:
        """``POST /api/v1/datasets/export``: write the Parquet dataset and ``_manifest.json`` into ``out`` (a folder
        that does not exist yet, or is empty); returns the manifest, after
        :func:`~ota_server.client_datasets.verify_dataset` passed.

        The answer is downloaded and checked beside ``out`` first, so ``out`` holds a whole, verified export or
        nothing. Raises ApiClientError: refused, unreachable, ``out`` not empty, or an archive that is not a
        verified dataset (a member outside the layout, a digest that does not match).
        """
        body: dict[str, Any] = {"model_name": model_name, "trigger": trigger}
        optional = {
            "version": version,
            "profile": profile,
            "since": since,
            "until": until,
            "cohort_label": cohort_label,
            "parent_release": parent_release,
            "drift_report": dict(drift_report) if drift_report is not None else None,
        }
        body.update({k: v for k, v in optional.items() if v is not None})
        return export_into(out, lambda archive: self._download("POST", "/api/v1/datasets/export", archive, json=body))

    def _download(self, method: str, path: str, dest: Path, **kwargs: Any) -> None:
        """Stream one answer's body into ``dest``. Raises ApiClientError as :meth:`request`."""
        try:
            with self._http.stream(method, path, headers=self._auth, **kwargs) as resp:
                if resp.status_code >= 400:
                    resp.read()
                    detail = resp.text[:200]
                    with contextlib.suppress(ValueError):
                        detail = str(resp.json().get("detail") or detail)
                    raise ApiClientError(f"{method} {path} -> {resp.status_code}: {detail}", resp.status_code, detail)
                with open(dest, "wb") as fh:
                    for chunk in resp.iter_bytes():
                        fh.write(chunk)
        except httpx.HTTPError as exc:
            raise ApiClientError(f"cannot reach {self.url}: {exc}") from exc


def as_json(model: BaseModel | Sequence[BaseModel]) -> Any:
    """What the server sent, as plain JSON data (for printing or storing a model or a list of them)."""
    if isinstance(model, BaseModel):
        return model.model_dump(mode="json", exclude_unset=True)
    return [m.model_dump(mode="json", exclude_unset=True) for m in model]
