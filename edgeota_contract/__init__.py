"""The wire contract shared by the packager, the OTA server and the device agent.

Everything that crosses a process boundary is defined here and nowhere else: the bundle
manifest and archive layout, Ed25519 signing and verification, MQTT topics, message
schemas, and the names of the rollout and deployment states. The package depends only on
pydantic and cryptography so that the device agent can import it on a small device.
"""

from edgeota_contract.errors import (
    AssignmentError,
    BundleError,
    ContractError,
    EdgeotaError,
    SignatureError,
)
from edgeota_contract.states import DeploymentState, ReasonCode, RolloutState

CONTRACT_VERSION = 1
"""Bumped on any incompatible change of the manifest, topics or messages."""

__all__ = [
    "CONTRACT_VERSION",
    "AssignmentError",
    "BundleError",
    "ContractError",
    "DeploymentState",
    "EdgeotaError",
    "ReasonCode",
    "RolloutState",
    "SignatureError",
]
