"""Alert rules as typed configuration: a TOML or JSON file the server settings point to.

The file names delivery targets once (``[webhooks.NAME]``, ``[commands.NAME]``) and lists rules
(``[[rules]]``) that refer to them by name in ``deliver``. :func:`load_rules` validates everything at load
(unknown keys, ranges, durations, target names, secrets present in the environment or a file) and raises
one :class:`ContractError` whose message is one line naming the file and the field. Fields a rule leaves
out take the per-kind defaults in :data:`KIND_DEFAULTS` (``docs/alerts.md`` gives their reasoning).

Secrets never live in the rules file: a webhook names an environment variable (``secret_env``) or a file
(``secret_file``) holding its HMAC key, read once at load.
"""

from __future__ import annotations

import json
import os
import re
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_validator

from edgeota_contract.errors import ContractError
from edgeota_contract.manifest import NAME_PATTERN, SEMVER_PATTERN

Kind = Literal["drift", "accuracy", "estimated_accuracy", "latency_p95", "error_rate"]
Severity = Literal["info", "warning", "critical"]
KINDS: tuple[Kind, ...] = ("drift", "accuracy", "estimated_accuracy", "latency_p95", "error_rate")
MIN_SECRET_BYTES = 16
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*$")
_UNITS = {"": 1.0, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}

KIND_DEFAULTS: dict[Kind, dict[str, float]] = {
    # threshold: drift = the smallest PSI that counts (the drift rule's effect floor); error_rate = share of
    # failed requests above which it fires; latency_p95 = milliseconds; accuracy kinds = share below which it fires.
    # min_count: drift = values per histogram; error_rate and latency_p95 = requests; accuracy = labelled
    # predictions; estimated_accuracy = predictions with a confidence.
    "drift": {"threshold": 0.1, "min_count": 200, "window": 3600.0},
    "error_rate": {"threshold": 0.05, "min_count": 500, "window": 900.0},
    "latency_p95": {"threshold": 500.0, "min_count": 500, "window": 900.0},
    "accuracy": {"threshold": 0.8, "min_count": 100, "window": 86400.0},
    "estimated_accuracy": {"threshold": 0.8, "min_count": 500, "window": 3600.0},
}


def parse_duration(value: Any) -> float:
    """Seconds from a number or a string like ``90``, ``30s``, ``15m``, ``1h``, ``1d``. Raises ValueError."""
    if isinstance(value, bool):
        raise ValueError("a duration is a number of seconds or a string like 15m")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str) and (m := _DURATION.match(value)):
        seconds = float(m.group(1)) * _UNITS[m.group(2)]
    else:
        raise ValueError(f"bad duration {value!r}: use seconds or a string like 30s, 15m, 1h, 1d")
    if seconds < 0:
        raise ValueError("a duration must not be negative")
    return seconds


Duration = Annotated[float, BeforeValidator(parse_duration)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class WebhookTarget(_Strict):
    """An HTTP endpoint receiving signed JSON (``docs/alerts.md``: headers and how to verify them)."""

    url: str = Field(pattern=r"^https?://[^\s]+$", max_length=2000)
    secret_env: str | None = Field(default=None, pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")
    secret_file: Path | None = None
    timeout_seconds: Duration = Field(default=5.0, gt=0, le=60)
    """One attempt's limit (connect and read)."""
    max_attempts: int = Field(default=4, ge=1, le=10)
    backoff_seconds: Duration = Field(default=1.0, ge=0, le=60)
    """Wait before the second attempt; doubled before each next one."""
    deadline_seconds: Duration = Field(default=30.0, gt=0, le=600)
    """All attempts of one sending together: no attempt starts after it."""
    retry_for: Duration = Field(default=3600.0, ge=0, le=7 * 86400)
    """A sending that failed for a reason that may pass (no answer, timeout, 408/425/429, 5xx) is tried again in
    later rounds, 1 to 15 minutes apart, until this long after the event; 0: never."""

    @model_validator(mode="after")
    def _one_secret(self) -> WebhookTarget:
        if (self.secret_env is None) == (self.secret_file is None):
            raise ValueError("give exactly one of secret_env and secret_file")
        return self


class CommandTarget(_Strict):
    """A program run without a shell: the alert JSON on stdin, ``EDGEOTA_ALERT_*`` variables in its environment."""

    argv: list[str] = Field(min_length=1, max_length=64)
    timeout_seconds: Duration = Field(default=300.0, gt=0, le=86400)
    max_attempts: int = Field(default=1, ge=1, le=10)
    """1 by default: a command need not be idempotent."""
    backoff_seconds: Duration = Field(default=5.0, ge=0, le=600)
    env: dict[str, str] = Field(default_factory=dict)
    """Extra variables for the command (the server's own environment is not passed on)."""

    @model_validator(mode="after")
    def _argv(self) -> CommandTarget:
        if not self.argv[0].strip() or any("\0" in a for a in self.argv):
            raise ValueError("argv[0] must name a program and no argument may hold NUL")
        return self


class AlertRule(_Strict):
    """One rule: what to judge (kind, scope), when it fires (threshold over a window, with enough data), how
    often it may fire (cooldown after a resolve), and where it is delivered."""

    name: str = Field(pattern=NAME_PATTERN)
    kind: Kind
    model: str = Field(pattern=NAME_PATTERN)
    version: str | None = Field(default=None, pattern=SEMVER_PATTERN)
    """One release; None: every version of ``model``, each judged apart."""
    profile: str | None = Field(default=None, pattern=NAME_PATTERN)
    """One hardware profile; None: each profile apart."""
    cohort: str | None = Field(default=None, max_length=128)
    """One cohort (the telemetry cohort label's value, "" for devices without it); None: each cohort apart."""
    threshold: float | None = Field(default=None, ge=0)
    window: Duration | None = Field(default=None, ge=60, le=30 * 86400)
    min_count: int | None = Field(default=None, ge=1)
    cooldown: Duration = Field(default=1800.0, le=30 * 86400)
    """After an alert resolves, the same fingerprint does not fire again for this long."""
    severity: Severity = "warning"
    deliver: list[str] = Field(default_factory=list, max_length=16)
    send_resolved: bool = True
    export: bool = False
    """On fire, export the scope's samples (``services/datasets.py``, trigger ``alert:<id>``) before delivering."""
    per_feature: bool = False
    """Drift only: one alert per drifting feature instead of one per release x profile x cohort."""

    @model_validator(mode="after")
    def _kind_specific(self) -> AlertRule:
        if self.kind in ("accuracy", "estimated_accuracy", "error_rate") and (self.threshold or 0.0) > 1:
            raise ValueError(f"the {self.kind} threshold is a share in [0, 1]")
        if self.per_feature and self.kind != "drift":
            raise ValueError("per_feature applies to drift rules only")
        return self

    @property
    def effective_threshold(self) -> float:
        return self.threshold if self.threshold is not None else KIND_DEFAULTS[self.kind]["threshold"]

    @property
    def effective_window(self) -> float:
        return self.window if self.window is not None else KIND_DEFAULTS[self.kind]["window"]

    @property
    def effective_min_count(self) -> int:
        return self.min_count if self.min_count is not None else int(KIND_DEFAULTS[self.kind]["min_count"])


class RulesFile(_Strict):
    """The whole file. Target names are unique across webhooks and commands."""

    webhooks: dict[str, WebhookTarget] = Field(default_factory=dict)
    commands: dict[str, CommandTarget] = Field(default_factory=dict)
    rules: list[AlertRule] = Field(default_factory=list, max_length=1000)

    @model_validator(mode="after")
    def _names(self) -> RulesFile:
        for name in [*self.webhooks, *self.commands]:
            if not re.match(NAME_PATTERN, name):
                raise ValueError(f"target name {name!r} must match {NAME_PATTERN}")
        both = set(self.webhooks) & set(self.commands)
        if both:
            raise ValueError(f"target {sorted(both)[0]!r} is both a webhook and a command")
        seen: set[str] = set()
        for rule in self.rules:
            if rule.name in seen:
                raise ValueError(f"rule name {rule.name!r} is used twice")
            seen.add(rule.name)
            for target in rule.deliver:
                if target not in self.webhooks and target not in self.commands:
                    raise ValueError(f"rule {rule.name!r} delivers to unknown target {target!r}")
        return self


class AlertRules:
    """A loaded, validated rules file with its webhook secrets resolved (never printed or stored)."""

    def __init__(self, spec: RulesFile, secrets: dict[str, bytes], source: str = "") -> None:
        self.spec = spec
        self.secrets = secrets
        self.source = source
        self.by_name = {r.name: r for r in spec.rules}

    @property
    def rules(self) -> list[AlertRule]:
        return self.spec.rules

    def secret(self, webhook: str) -> bytes:
        return self.secrets[webhook]


def _read_secret(name: str, target: WebhookTarget, base: Path, environ: dict[str, str]) -> bytes:
    if target.secret_env is not None:
        value = environ.get(target.secret_env, "").encode()
        where = f"environment variable {target.secret_env}"
    else:
        assert target.secret_file is not None
        path = target.secret_file if target.secret_file.is_absolute() else base / target.secret_file
        try:
            value = path.read_bytes().strip()
        except OSError as exc:
            raise ValueError(f"webhooks.{name}: cannot read secret_file {path}: {exc.strerror}") from exc
        where = f"secret_file {path}"
    if len(value) < MIN_SECRET_BYTES:
        raise ValueError(f"webhooks.{name}: the secret in {where} is missing or shorter than {MIN_SECRET_BYTES} bytes")
    return value


def parse_rules(data: Any, base: Path | None = None, environ: dict[str, str] | None = None) -> AlertRules:
    """Validate already-decoded rules data. Raises ValueError with a one-line message (``where: what``)."""
    try:
        spec = RulesFile.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = ".".join(str(p) for p in err.get("loc", ()))
        msg = str(err["msg"]).removeprefix("Value error, ")
        raise ValueError(f"{loc}: {msg}" if loc else msg) from None
    env = dict(os.environ) if environ is None else environ
    secrets = {name: _read_secret(name, t, base or Path("."), env) for name, t in spec.webhooks.items()}
    return AlertRules(spec, secrets)


def load_rules(path: Path, environ: dict[str, str] | None = None) -> AlertRules:
    """Read and validate ``path`` (``.json`` is JSON, anything else TOML).

    Raises:
        ContractError: one line, ``invalid alert rules file PATH: FIELD: PROBLEM`` (missing or unreadable file,
            bad syntax, a value out of range, an unknown target, a missing or short secret).
    """
    try:
        text = path.read_text(encoding="utf-8")
        data = json.loads(text) if path.suffix.lower() == ".json" else tomllib.loads(text)
        rules = parse_rules(data, path.parent, environ)
    except OSError as exc:
        raise ContractError(f"cannot read alert rules file {path}: {exc.strerror or exc}") from None
    except (ValueError, tomllib.TOMLDecodeError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ContractError(f"invalid alert rules file {path}: {first}") from None
    rules.source = str(path)
    return rules
