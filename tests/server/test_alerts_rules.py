"""Alert rules without a database: config validation (every rejection path), pure evaluation, de-duplication,
cooldown and resolve decisions, HMAC signing and verification."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest

from edgeota_contract.errors import ContractError
from edgeota_contract.telemetry import LATENCY_EDGES_MS
from ota_server.alerts import signing
from ota_server.alerts.config import AlertRule, load_rules, parse_duration, parse_rules
from ota_server.alerts.evaluate import GroupData, evaluate_rule, fingerprint
from ota_server.alerts.lifecycle import Fire, OpenAlert, Refresh, Resolve, Suppress, decide
from ota_server.drift import feature_key
from ota_server.rollout.telemetry_gates import TelemetryTotals

SECRET = "s" * 32
ENV = {"HOOK_SECRET": SECRET}
EDGES = [-1.5, -0.5, 0.0, 0.5, 1.5]
NOW = datetime(2026, 3, 1, 12, tzinfo=UTC)
SCOPE = ("digits", "1.0.0", "x86", "north")


def _hist(values: np.ndarray) -> list[int]:
    idx = np.searchsorted(np.asarray(EDGES), values, side="right")
    return [int(c) for c in np.bincount(idx, minlength=len(EDGES) + 1)]


def _rules(**rule: object) -> dict[str, object]:
    base: dict[str, object] = {"name": "r1", "kind": "error_rate", "model": "digits", "deliver": ["hook"]}
    base.update(rule)
    return {"webhooks": {"hook": {"url": "http://127.0.0.1:9/x", "secret_env": "HOOK_SECRET"}}, "rules": [base]}


def _rule(**fields: object) -> AlertRule:
    return parse_rules(_rules(**fields), environ=ENV).rules[0]


# ---------------------------------------------------------------- configuration


def test_a_valid_toml_file_loads_with_kind_defaults(tmp_path: Path) -> None:
    path = tmp_path / "alerts.toml"
    path.write_text(
        """
[webhooks.oncall]
url = "https://hooks.example/edgeota"
secret_env = "HOOK_SECRET"
max_attempts = 3

[commands.retrain]
argv = ["/usr/bin/true", "--from-alert"]
timeout_seconds = "10m"

[[rules]]
name = "digits-drift"
kind = "drift"
model = "digits"
cohort = "north"
window = "2h"
cooldown = "15m"
export = true
deliver = ["oncall", "retrain"]

[[rules]]
name = "digits-latency"
kind = "latency_p95"
model = "digits"
threshold = 250
"""
    )
    rules = load_rules(path, environ=ENV)
    drift, latency = rules.rules
    assert (drift.effective_window, drift.cooldown, drift.effective_threshold) == (7200.0, 900.0, 0.1)
    assert drift.effective_min_count == 200 and drift.export and drift.deliver == ["oncall", "retrain"]
    assert latency.effective_threshold == 250 and latency.effective_window == 900.0 and latency.deliver == []
    assert rules.spec.commands["retrain"].timeout_seconds == 600.0
    assert rules.secret("oncall") == SECRET.encode()


def test_json_rules_and_a_secret_file(tmp_path: Path) -> None:
    (tmp_path / "hook.key").write_text("k" * 20 + "\n")
    data = _rules()
    data["webhooks"] = {"hook": {"url": "http://127.0.0.1:9/x", "secret_file": "hook.key"}}
    path = tmp_path / "alerts.json"
    path.write_text(json.dumps(data))
    assert load_rules(path, environ={}).secret("hook") == b"k" * 20  # relative to the rules file, stripped


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"kind": "cpu"}, "rules.0.kind: Input should be"),
        ({"threshold": 1.5}, "rules.0: the error_rate threshold is a share in [0, 1]"),
        ({"window": "5 parsecs"}, "rules.0.window: bad duration"),
        ({"window": 30}, "rules.0.window: Input should be greater than or equal to 60"),
        ({"deliver": ["pager"]}, "rule 'r1' delivers to unknown target 'pager'"),
        ({"per_feature": True}, "per_feature applies to drift rules only"),
        ({"model": "bad model"}, "rules.0.model: String should match pattern"),
        ({"severity": "page"}, "rules.0.severity: Input should be"),
        ({"colour": "red"}, "rules.0.colour: Extra inputs are not permitted"),
        ({"min_count": 0}, "rules.0.min_count: Input should be greater than or equal to 1"),
    ],
)
def test_bad_rules_are_refused_in_one_line(tmp_path: Path, change: dict[str, object], message: str) -> None:
    path = tmp_path / "alerts.json"
    path.write_text(json.dumps(_rules(**change)))
    with pytest.raises(ContractError) as err:
        load_rules(path, environ=ENV)
    text = str(err.value)
    assert "\n" not in text and text.startswith(f"invalid alert rules file {path}: ")
    assert message in text, text


def test_file_level_rejections(tmp_path: Path) -> None:
    def refused(content: str, environ: dict[str, str] | None = None, name: str = "a.toml") -> str:
        path = tmp_path / name
        path.write_text(content)
        with pytest.raises(ContractError) as err:
            load_rules(path, environ=ENV if environ is None else environ)
        assert "\n" not in str(err.value)
        return str(err.value)

    with pytest.raises(ContractError, match="cannot read alert rules file"):
        load_rules(tmp_path / "missing.toml")
    assert refused("[[rules]\nname=1").startswith(f"invalid alert rules file {tmp_path / 'a.toml'}: ")
    assert "Expecting" in refused("{", name="a.json")
    short = json.dumps(_rules())
    assert "missing or shorter than 16 bytes" in refused(short, environ={"HOOK_SECRET": "short"}, name="b.json")
    assert "missing or shorter than 16 bytes" in refused(short, environ={}, name="c.json")
    both = _rules()
    both["webhooks"] = {"hook": {"url": "http://h/x", "secret_env": "HOOK_SECRET", "secret_file": "k"}}
    assert "exactly one of secret_env and secret_file" in refused(json.dumps(both), name="d.json")
    nofile = _rules()
    nofile["webhooks"] = {"hook": {"url": "http://h/x", "secret_file": "absent.key"}}
    assert "cannot read secret_file" in refused(json.dumps(nofile), name="e.json")
    badurl = _rules()
    badurl["webhooks"] = {"hook": {"url": "ftp://h/x", "secret_env": "HOOK_SECRET"}}
    assert "webhooks.hook.url" in refused(json.dumps(badurl), name="f.json")
    twice = _rules()
    twice["rules"] = [*twice["rules"], *twice["rules"]]  # type: ignore[misc]
    assert "rule name 'r1' is used twice" in refused(json.dumps(twice), name="g.json")
    clash = _rules()
    clash["commands"] = {"hook": {"argv": ["/bin/true"]}}
    assert "'hook' is both a webhook and a command" in refused(json.dumps(clash), name="h.json")
    noargv = _rules()
    noargv["commands"] = {"run": {"argv": []}}
    assert "commands.run.argv" in refused(json.dumps(noargv), name="i.json")


def test_durations() -> None:
    assert [parse_duration(v) for v in (90, "30s", "15m", "1h", "1.5d", "45")] == [90, 30, 900, 3600, 129600, 45]
    for bad in ("1w", "-5m", True, "m", None):
        with pytest.raises(ValueError):
            parse_duration(bad)


# ---------------------------------------------------------------- evaluation


def _group(
    rng: np.random.Generator, n: int = 2000, shift: float = 0.0, errors: int = 0, slow: bool = False
) -> GroupData:
    ref = {feature_key("x", j): _hist(rng.normal(size=20_000)) for j in range(4)}
    x = rng.normal(size=(n, 4))
    x[:, 2] += shift
    latency = [0] * (len(LATENCY_EDGES_MS) + 1)
    latency[LATENCY_EDGES_MS.index(1000.0) if slow else 2] = n
    totals = TelemetryTotals(requests=n, errors=errors, latency_counts=latency)
    totals.features = {("x", j): _hist(x[:, j]) for j in range(4)}
    return GroupData(SCOPE, totals, ref, {})


def test_drift_fires_naming_the_feature_and_clears_on_reference_data() -> None:
    rng = np.random.default_rng(3)
    rule = _rule(kind="drift")
    (fired,) = evaluate_rule(rule, [_group(rng, shift=1.0)])
    assert fired.status == "firing" and fired.features == ("x[2]",) and "x[2]" in fired.summary
    assert fired.value is not None and fired.value > 0.1 and fired.fingerprint == fingerprint("r1", SCOPE)
    assert fired.details["drift_report"]["families"][0]["features"][0]["key"] == "x[2]"
    (calm,) = evaluate_rule(rule, [_group(rng)])
    assert calm.status == "clear" and calm.fingerprint == fired.fingerprint
    (few,) = evaluate_rule(rule, [_group(rng, n=50, shift=1.0)])
    assert few.status == "insufficient" and "50 of 200 values" in few.summary
    (noref,) = evaluate_rule(rule, [GroupData(SCOPE, TelemetryTotals(requests=10))])
    assert noref.status == "insufficient" and "reference" in noref.summary


def test_per_feature_drift_gives_one_fingerprint_per_feature() -> None:
    rng = np.random.default_rng(4)
    obs = evaluate_rule(_rule(kind="drift", per_feature=True), [_group(rng, shift=1.0)])
    firing = [o for o in obs if o.status == "firing"]
    assert [o.feature for o in firing] == ["x[2]"] and len(obs) == 4
    assert len({o.fingerprint for o in obs}) == 4 and firing[0].fingerprint == fingerprint("r1", SCOPE, "x[2]")
    assert all(o.status == "clear" for o in obs if o.feature != "x[2]")


def test_error_rate_latency_and_scope() -> None:
    rng = np.random.default_rng(5)
    bad = _group(rng, n=1000, errors=80, slow=True)
    (err,) = evaluate_rule(_rule(kind="error_rate", threshold=0.05), [bad])
    assert err.status == "firing" and err.value == pytest.approx(0.08)
    (ok,) = evaluate_rule(_rule(kind="error_rate", threshold=0.1), [bad])
    assert ok.status == "clear"
    (few,) = evaluate_rule(_rule(kind="error_rate", min_count=5000), [bad])
    assert few.status == "insufficient"
    (slow,) = evaluate_rule(_rule(kind="latency_p95", threshold=500), [bad])
    assert slow.status == "firing" and slow.value == 1000.0
    (fast,) = evaluate_rule(_rule(kind="latency_p95", threshold=500), [_group(rng, n=1000)])
    assert fast.status == "clear"
    assert evaluate_rule(_rule(kind="error_rate", cohort="south"), [bad]) == []
    assert evaluate_rule(_rule(kind="error_rate", model="other"), [bad]) == []
    assert len(evaluate_rule(_rule(kind="error_rate", version="1.0.0", profile="x86", cohort="north"), [bad])) == 1


@dataclass(frozen=True)
class Row:
    model_name: str = "digits"
    version: str = "1.0.0"
    hardware_profile: str = "x86"
    cohort: str = "north"
    labelled: int = 0
    accuracy: float | None = None
    estimated_accuracy: float | None = None
    estimate_requests: int = 0


def test_accuracy_and_estimated_accuracy() -> None:
    rows = [Row(labelled=300, accuracy=0.7, estimated_accuracy=0.9, estimate_requests=1000)]
    (real,) = evaluate_rule(_rule(kind="accuracy", threshold=0.8), (), rows)
    assert real.status == "firing" and real.value == 0.7 and "accuracy 70.0% under 80.0%" in real.summary
    (est,) = evaluate_rule(_rule(kind="estimated_accuracy", threshold=0.8), (), rows)
    assert est.status == "clear"
    (few,) = evaluate_rule(_rule(kind="accuracy"), (), [Row(labelled=20, accuracy=0.1)])
    assert few.status == "insufficient" and "20 of 100 labelled" in few.summary
    (none,) = evaluate_rule(_rule(kind="estimated_accuracy"), (), [Row(labelled=300, accuracy=0.9)])
    assert none.status == "insufficient"


# ---------------------------------------------------------------- lifecycle


def test_dedup_cooldown_and_resolve() -> None:
    rng = np.random.default_rng(6)
    rule = _rule(kind="drift", cooldown="30m")
    rules = {rule.name: rule}
    (firing,) = evaluate_rule(rule, [_group(rng, shift=1.0)])
    (clear,) = evaluate_rule(rule, [_group(rng)])
    (few,) = evaluate_rule(rule, [_group(rng, n=10)])
    fp = firing.fingerprint

    assert decide([firing], [], {}, rules, NOW) == [Fire(firing)]
    assert decide([firing], [OpenAlert("a1", fp, "r1")], {}, rules, NOW) == [Refresh("a1", firing)]
    assert decide([clear], [OpenAlert("a1", fp, "r1")], {}, rules, NOW) == [Resolve("a1", "condition cleared", clear)]
    assert decide([few], [OpenAlert("a1", fp, "r1")], {}, rules, NOW) == []  # too little data is no recovery
    assert decide([clear], [], {}, rules, NOW) == []
    recently = {fp: NOW - timedelta(minutes=10)}
    assert decide([firing], [], recently, rules, NOW) == [Suppress(firing, NOW + timedelta(minutes=20))]
    assert decide([firing], [], {fp: NOW - timedelta(minutes=31)}, rules, NOW) == [Fire(firing)]
    assert decide([firing, firing], [], {}, rules, NOW) == [Fire(firing)]  # one action per fingerprint
    gone = decide([], [OpenAlert("a2", "f" * 32, "removed-rule")], {}, rules, NOW)
    assert gone == [Resolve("a2", "rule removed-rule is no longer configured")]


# ---------------------------------------------------------------- signing


def test_hmac_signature_verifies_and_rejects_tampering_and_replay() -> None:
    secret, body, ts = b"k" * 32, b'{"alert":1}', 1_800_000_000
    sig = signing.sign(secret, ts, body)
    assert sig.startswith("v1=") and len(sig) == 3 + 64
    assert signing.verify(secret, str(ts), sig, body, now=ts + 10) is None
    assert signing.verify(secret, str(ts), f"v1={'0' * 64}, {sig}", body, now=ts) is None  # rotation: one matches
    assert signing.verify(secret, str(ts), sig, body + b" ", now=ts) == "signature does not match"
    assert signing.verify(b"x" * 32, str(ts), sig, body, now=ts) == "signature does not match"
    assert signing.verify(secret, str(ts + 1), sig, body, now=ts) == "signature does not match"
    assert "more than 300 s" in (signing.verify(secret, str(ts), sig, body, now=ts + 301) or "")
    assert signing.verify(secret, None, sig, body, now=ts) == "missing timestamp or signature header"
    assert signing.verify(secret, "soon", sig, body, now=ts) == "timestamp is not an integer"
