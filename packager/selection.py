"""What the ladder records and decides: attempts, outcomes, the choice among passing attempts, failures.

With a profile's ``selection: first`` the first attempt passing every gate is chosen. With
``selection: best`` every non-fp32 rung is tried and :func:`pick_best` chooses among those that
passed: the Pareto set on (quality, host speed-up vs fp32, model bytes), then the fastest within
:data:`SPEED_TOLERANCE` of the best speed-up (host timing noise), then the best quality, then
the smallest, then ladder order. fp32 rungs are only tried when no other rung passed.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import onnx

from edgeota_contract.manifest import PassRecord
from packager.errors import GateFailure
from packager.gates import GateResult
from packager.onnx_utils import CONTROL_FLOW_OPS, op_types
from packager.profiles import HardwareProfile

SPEED_TOLERANCE = 0.03  # speed-ups within 3% of the best are treated as equal (interleaved-timing noise)


@dataclass
class Attempt:
    recipe: str
    pruned: bool
    variant: str = ""  # e.g. "channels-25%" when run on a structurally pruned source
    accepted: bool = False  # chosen: passed every gate (and, with ``selection: best``, won the comparison)
    passed_gates: bool = False  # passed every gate, whether chosen or not
    reason: str | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    gates: list[GateResult] = field(default_factory=list)
    passes: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0
    search: dict[str, Any] | None = None  # a mixed-precision search: steps, nodes kept in float, full-int8 figures

    @property
    def label(self) -> str:
        label = f"{self.recipe}+pruned" if self.pruned else self.recipe
        return f"{label}+{self.variant}" if self.variant else label

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["label"] = self.label
        return data


@dataclass
class LadderOutcome:
    profile: str
    chosen: Attempt | None
    attempts: list[Attempt]
    baseline: dict[str, float]
    gate_metric: str
    model: onnx.ModelProto | None = None
    model_bytes: bytes | None = None
    pass_records: list[PassRecord] = field(default_factory=list)
    preprocessed: onnx.ModelProto | None = None
    gates_overridden: bool = False
    refused: str | None = None  # why no recipe was tried (the model breaks a constraint no recipe can fix)
    output_kinds: dict[str, str] = field(default_factory=dict)  # each output's fidelity kind (packager.fidelity)


def _quality(a: Attempt, gate_metric: str) -> float:
    m = a.metrics
    if gate_metric == "accuracy" and "accuracy" in m:
        return m["accuracy"]
    return m.get("sqnr_db", 0.0)


def _speed(a: Attempt) -> float:
    m = a.metrics
    if "host_speedup_vs_fp32" in m:
        return m["host_speedup_vs_fp32"]
    return 1.0 / max(m.get("host_latency_p50_ms", 1.0), 1e-9)


def pick_best(candidates: list[Attempt], gate_metric: str) -> tuple[int, str]:
    """Index of the attempt to ship among ``candidates`` (all passed every gate), and why (see module doc)."""
    if not candidates:
        raise ValueError("pick_best needs at least one candidate")
    keys = [(_quality(a, gate_metric), _speed(a), -a.metrics.get("model_bytes", 0.0)) for a in candidates]

    def dominated(i: int) -> bool:
        return any(
            all(o >= k for o, k in zip(other, keys[i], strict=True)) and other != keys[i]
            for j, other in enumerate(keys)
            if j != i
        )

    pareto = [i for i in range(len(candidates)) if not dominated(i)]
    fastest = max(keys[i][1] for i in pareto)
    near = [i for i in pareto if keys[i][1] >= fastest * (1 - SPEED_TOLERANCE)]
    best = max(near, key=lambda i: (keys[i][0], keys[i][2], -i))
    q_name = "accuracy" if gate_metric == "accuracy" else "SQNR"
    why = (
        f"chosen among {len(candidates)} passing attempts: Pareto-optimal on {q_name}, speed-up and size; "
        f"speed-up {keys[best][1]:.2f}x (fastest {fastest:.2f}x, {SPEED_TOLERANCE:.0%} tolerance), "
        f"{q_name} {keys[best][0]:.4g}, {int(-keys[best][2])} bytes"
    )
    return best, why


def unfixable_problem(model: onnx.ModelProto, profile: HardwareProfile) -> str | None:
    """A reason no recipe can make ``model`` fit ``profile``, or None.

    Today: control flow (``If``/``Loop``/``Scan``, subgraphs included) on a profile that forbids it.
    Quantization, fp16 and pruning never remove control flow, so the whole ladder would fail.
    """
    if profile.ops.allow_control_flow:
        return None
    found = sorted({op for dom, op in op_types(model) if op in CONTROL_FLOW_OPS and dom in ("", "ai.onnx")})
    if not found:
        return None
    return (
        f"the model uses control flow ({', '.join(found)}), which profile {profile.id} forbids "
        "(ops.allow_control_flow: false); no recipe removes it, so none was tried"
    )


def failure_message(outcome: LadderOutcome) -> str:
    if outcome.refused:
        return f"profile {outcome.profile}: {outcome.refused}"
    if not outcome.attempts:
        return f"profile {outcome.profile}: the ladder is empty"
    last = outcome.attempts[-1]
    return (
        f"profile {outcome.profile}: no recipe passed every gate after {len(outcome.attempts)} attempts "
        f"(last, {last.label}: {last.reason})"
    )


def raise_if_failed(outcome: LadderOutcome) -> None:
    if outcome.chosen is None:
        raise GateFailure(failure_message(outcome))
