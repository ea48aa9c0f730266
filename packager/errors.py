"""Errors the packager raises on purpose. Each prints as one line (``error: ...``) in the CLI."""

from __future__ import annotations

from edgeota_contract.errors import EdgeotaError
from edgeota_contract.states import ReasonCode


class PackagerError(EdgeotaError):
    """Bad input or a packaging step that cannot go on (corrupt model, bad data, bad profile...)."""

    default_reason = ReasonCode.BUNDLE_INVALID


class ProfileError(PackagerError):
    """Unknown hardware profile, or a profile file that breaks the schema."""


class ModelInputError(PackagerError):
    """The model file is missing, corrupt, truncated or not a model we can read."""


class DataError(PackagerError):
    """Calibration or evaluation data that does not match the model, or lacks needed labels."""


class GateFailure(PackagerError):
    """No recipe of a profile's ladder passed every gate."""

    default_reason = ReasonCode.GATE_FAILED
