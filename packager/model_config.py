"""A model's own settings for ``edgeota package --model-config model.yaml``: today, its gate thresholds.

A latency budget or an accuracy tolerance belongs to the application as much as to the device
class, so one hardware profile can serve many models. The file (YAML, or JSON, which is YAML)::

    gates:                         # for every profile packaged
      latency_budget_ms: 40        # device budget, replaces the profile's latency.budget_ms
      max_accuracy_drop: 0.02      # labelled accuracy: allowed drop vs fp32 (0.02 = two points)
      min_top1_agreement: 0.97     # fidelity gates (no labels)
      min_cosine: 0.98
      min_sqnr_db: 15
      min_mask_iou: 0.9            # score maps / masks (task-aware fidelity, packager.fidelity)
    output_kinds:                  # how outputs are judged (others inferred from their shape)
      sigmoid_0.tmp_0: score_map
    profiles:                      # per profile id, over `gates` (ids not packaged are ignored)
      rpi4:
        gates:
          latency_budget_ms: 120

Every key is optional; unknown keys are errors. Command-line options (``--latency-budget-ms``...)
win over the file, key by key and for every profile (:func:`merge_overrides`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from edgeota_contract.manifest import GateOverrides
from packager.errors import PackagerError
from packager.fidelity import check_kind
from packager.profiles import PROFILE_ID_PATTERN
from packager.request import RequestError, gate_override_error

MODEL_CONFIG_KEYS = ("gates", "profiles", "output_kinds")


@dataclass(frozen=True)
class ModelConfig:
    """A parsed model config: thresholds for every profile, and per profile id over them."""

    gates: GateOverrides | None = None
    profiles: dict[str, GateOverrides] = field(default_factory=dict)
    output_kinds: dict[str, str] = field(default_factory=dict)  # output name -> packager.fidelity kind


def parse_model_config(data: Any, label: str = "model config") -> ModelConfig:
    """The checked content of a parsed model config file (an empty file sets nothing).

    Raises:
        PackagerError: not a mapping, an unknown key or profile id form, or a threshold out of range (one line).
    """
    if data is None:
        return ModelConfig()
    _keys(data, MODEL_CONFIG_KEYS, label)
    profiles = data.get("profiles") or {}
    if not isinstance(profiles, dict):
        raise PackagerError(f"{label}: 'profiles' must map profile ids to a 'gates' section")
    per_profile: dict[str, GateOverrides] = {}
    for pid, section in profiles.items():
        if not isinstance(pid, str) or not re.match(PROFILE_ID_PATTERN, pid):
            raise PackagerError(f"{label}: invalid profile id {pid!r} under 'profiles'")
        if section is None:
            continue
        _keys(section, ("gates",), f"{label}: profiles.{pid}")
        gates = _gates(section.get("gates"), f"{label}: profiles.{pid}.gates")
        if gates is not None:
            per_profile[pid] = gates
    kinds = data.get("output_kinds") or {}
    if not isinstance(kinds, dict):
        raise PackagerError(f"{label}: 'output_kinds' must map output names to kinds")
    checked: dict[str, str] = {
        str(name): check_kind(str(kind), f"{label}: output_kinds.{name}") for name, kind in kinds.items()
    }
    return ModelConfig(_gates(data.get("gates"), f"{label}: gates"), per_profile, checked)


def _keys(data: Any, known: tuple[str, ...], label: str) -> None:
    if not isinstance(data, dict):
        raise PackagerError(f"{label}: expected a mapping with {' or '.join(repr(k) for k in known)}")
    unknown = sorted(str(k) for k in data if k not in known)
    if unknown:
        raise PackagerError(f"{label}: unknown key {unknown[0]!r} (known: {', '.join(known)})")


def _gates(value: Any, label: str) -> GateOverrides | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise PackagerError(f"{label} must be a mapping of thresholds")
    try:
        overrides = GateOverrides.model_validate(value)
    except ValidationError as exc:
        raise PackagerError(f"{label}.{gate_override_error(exc)}") from None
    return overrides if overrides.given() else None


def load_model_config(path: Path) -> ModelConfig:
    """Read and check a model config file (see the module doc).

    Raises:
        PackagerError: the file is missing or unreadable, is not YAML, or breaks the schema (one line).
    """
    import yaml

    label = f"model config {path}"
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise PackagerError(f"{label} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise PackagerError(f"cannot read {label}: {getattr(exc, 'strerror', None) or exc}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        raise PackagerError(f"{label} is not valid YAML{where}") from None
    return parse_model_config(data, label)


def merge_overrides(base: GateOverrides | None, **given: float | None) -> GateOverrides | None:
    """``base`` with every threshold in ``given`` that is not ``None`` put over it (``None``: nothing set).

    Raises:
        RequestError: a threshold out of range or unknown; its ``field`` is the threshold's name.
    """
    values = base.given() if base is not None else {}
    values.update({k: v for k, v in given.items() if v is not None})
    try:
        overrides = GateOverrides.model_validate(values)
    except ValidationError as exc:
        loc = exc.errors()[0].get("loc", ())
        raise RequestError(gate_override_error(exc), str(loc[0]) if loc else None) from None
    return overrides if overrides.given() else None
