"""One exception hierarchy for everything edgeota raises on purpose.

Every error carries a :class:`~edgeota_contract.states.ReasonCode`, so that what a device
reports, what the server stores and what the CLI prints name the same cause.
"""

from __future__ import annotations

from edgeota_contract.states import ReasonCode


class EdgeotaError(Exception):
    """Base of every deliberate edgeota error. ``str(err)`` is a one-line message for humans."""

    default_reason: ReasonCode = ReasonCode.INTERNAL_ERROR

    def __init__(self, message: str, reason: ReasonCode | None = None) -> None:
        super().__init__(message)
        self.reason: ReasonCode = reason or self.default_reason


class ContractError(EdgeotaError):
    """A message, manifest or topic does not follow the contract (bad schema, bad value)."""

    default_reason = ReasonCode.MALFORMED_MESSAGE


class SignatureError(EdgeotaError):
    """A signature is missing, made by an untrusted key, or does not match the signed bytes."""

    default_reason = ReasonCode.SIGNATURE_INVALID


class BundleError(EdgeotaError):
    """A bundle archive is corrupt, unsafe, or disagrees with its signed manifest."""

    default_reason = ReasonCode.BUNDLE_INVALID


class AssignmentError(EdgeotaError):
    """A server command may not be acted on: wrong device, expired, replayed, or a downgrade."""

    default_reason = ReasonCode.ASSIGNMENT_INVALID
