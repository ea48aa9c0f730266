"""A small HTTP client for the CLI: one settings object (``--server``/``--token`` or env)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
from pydantic_settings import BaseSettings, SettingsConfigDict

from edgeota_contract.errors import EdgeotaError
from edgeota_contract.states import ReasonCode


class ClientSettings(BaseSettings):
    """``EDGEOTA_URL`` and ``EDGEOTA_TOKEN``; command-line options override them."""

    model_config = SettingsConfigDict(env_prefix="EDGEOTA_", extra="ignore")

    url: str = "http://127.0.0.1:8080"
    token: str | None = None
    timeout: float = 30.0


class ApiClientError(EdgeotaError):
    """The server refused a request (its problem-details ``detail`` is the message)."""

    default_reason = ReasonCode.INTERNAL_ERROR


class ApiClient:
    def __init__(self, settings: ClientSettings) -> None:
        headers = {"Authorization": f"Bearer {settings.token}"} if settings.token else {}
        self._http = httpx.Client(base_url=settings.url.rstrip("/"), headers=headers, timeout=settings.timeout)
        self.url = settings.url

    def close(self) -> None:
        self._http.close()

    def request(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            resp = self._http.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise ApiClientError(f"cannot reach {self.url}: {exc}") from exc
        if resp.status_code >= 400:
            try:
                body = resp.json()
                detail = body.get("detail") or body.get("title") or resp.text
            except ValueError:
                detail = resp.text[:200]
            raise ApiClientError(f"{method} {path} -> {resp.status_code}: {detail}")
        return resp.json() if resp.content else None

    def upload(self, path: Path) -> Any:
        with open(path, "rb") as fh:
            return self.request(
                "POST", "/api/v1/bundles", content=fh, headers={"Content-Type": "application/octet-stream"}
            )
