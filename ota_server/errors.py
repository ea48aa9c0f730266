"""The server's domain errors: what services raise, in the domain's words, never in HTTP's.

Services and the rollout package raise these (or any other :class:`EdgeotaError`); the API's one
exception handler (:mod:`ota_server.core.problems`) maps each class to a status and renders RFC 9457
problem details. The CLI and the client print ``str(err)``. Each class is a kind of failure, not a
place: add a subclass only when callers need to tell it apart.
"""

from __future__ import annotations

from edgeota_contract.errors import EdgeotaError
from edgeota_contract.states import ReasonCode


class ServerError(EdgeotaError):
    """Base of the server's domain errors. Maps to 400 unless a subclass says otherwise."""


class InvalidRequest(ServerError):
    """The request is well formed but its content cannot be acted on (a bad value, time, selector...). 422."""

    default_reason = ReasonCode.MALFORMED_MESSAGE


class MalformedInput(ServerError):
    """The input cannot be read at all (not the expected format). 400."""

    default_reason = ReasonCode.MALFORMED_MESSAGE


class NotFound(ServerError):
    """The named release, rollout, device, bundle or sample does not exist. 404."""


class Conflict(ServerError):
    """The request contradicts the current state: a duplicate, a transition the state forbids. 409."""


class TooLarge(ServerError):
    """A body or a value passes a configured limit. 413."""


class Unauthenticated(ServerError):
    """No credentials, or credentials that match no token. 401."""


class PermissionDenied(ServerError):
    """The caller's role may not do this. 403."""


class RateLimited(ServerError):
    """Too many requests from this caller; try again after ``retry_after`` seconds (when known). 429."""

    def __init__(self, message: str, retry_after: int | None = None, reason: ReasonCode | None = None) -> None:
        super().__init__(message, reason)
        self.retry_after = retry_after
