"""The error of the REST client (:mod:`ota_server.client`): every refusal and every connection failure."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from edgeota_contract.errors import EdgeotaError
from edgeota_contract.states import ReasonCode


class ApiClientError(EdgeotaError):
    """The server refused a request, or could not be reached (``status`` None).

    ``str(err)`` reads ``<METHOD> <path> -> <status>: <detail>``; ``problem`` is the whole problem-details
    body when the server sent one.
    """

    default_reason = ReasonCode.INTERNAL_ERROR

    def __init__(
        self, message: str, status: int | None = None, detail: str = "", problem: Mapping[str, Any] | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.detail = detail or message
        self.problem: dict[str, Any] = dict(problem or {})
