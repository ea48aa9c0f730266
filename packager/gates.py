"""The gates a candidate must pass for a profile. Plain functions over measured figures."""

from __future__ import annotations

from dataclasses import dataclass

from packager.data import Dataset
from packager.errors import DataError
from packager.profiles import HardwareProfile
from packager.recipes import RecipeSpec

# Task measures (packager.fidelity): metric key, gate name, threshold field of the profile's accuracy, label.
TASK_GATES = (
    ("mask_iou", "fidelity_mask_iou", "min_mask_iou", "mask IoU"),
    ("box_iou", "fidelity_box_iou", "min_box_iou", "matched-box IoU"),
    ("score_agreement", "fidelity_score_agreement", "min_score_agreement", "box score agreement"),
    ("embedding_cosine", "fidelity_embedding_cosine", "min_cosine", "embedding cosine"),
)
QUALITY_GATES = frozenset(
    {"accuracy", "fidelity_top1", "fidelity_cosine", "fidelity_sqnr", "finite_outputs"} | {g[1] for g in TASK_GATES}
)
SIZE_HEADROOM_BYTES = 65536  # room for the card, reference stats and test vectors beside the model


@dataclass
class GateResult:
    name: str
    ok: bool
    value: float | None
    threshold: float | None
    detail: str = ""


def evaluate_gates(
    profile: HardwareProfile,
    recipe: RecipeSpec,
    m: dict[str, float],
    problems: list[str],
    base_acc: float | None,
    gate_metric: str,
) -> list[GateResult]:
    """Every gate of one attempt: op support, :func:`quality_gates`, size, latency, speed-up, memory."""
    gates: list[GateResult] = []
    gates.append(
        GateResult(
            "op_support",
            not problems,
            float(len(problems)),
            0.0,
            "; ".join(problems[:3]) + (f" (+{len(problems) - 3} more)" if len(problems) > 3 else "")
            if problems
            else "all ops, shapes and opset supported",
        )
    )
    gates += quality_gates(profile, m, base_acc, gate_metric)
    size = m["model_bytes"]
    gates.append(
        GateResult(
            "size",
            size + SIZE_HEADROOM_BYTES <= profile.max_bundle_bytes,
            size,
            float(profile.max_bundle_bytes),
            f"model {int(size)} bytes (+64 KiB for the other bundle files) vs max {profile.max_bundle_bytes}",
        )
    )
    est = m["est_device_latency_p95_ms"]
    gates.append(
        GateResult(
            "latency",
            est <= profile.latency.budget_ms,
            est,
            profile.latency.budget_ms,
            f"host p95 {m['host_latency_p95_ms']:.3f} ms x {profile.latency.host_scale:g} = {est:.3f} ms vs "
            f"budget {profile.latency.budget_ms:g} ms",
        )
    )
    min_speedup = profile.latency.min_speedup_vs_fp32
    if min_speedup is not None and recipe.precision != "fp32" and "host_speedup_vs_fp32" in m:
        sp = m["host_speedup_vs_fp32"]
        gates.append(
            GateResult("speedup_vs_fp32", sp >= min_speedup, sp, min_speedup, f"host p50 speed-up {sp:.2f}x vs fp32")
        )
    if "session_memory_bytes" in m:
        mem = m["session_memory_bytes"]
        gates.append(
            GateResult(
                "memory",
                mem <= profile.ram_budget_bytes,
                mem,
                float(profile.ram_budget_bytes),
                f"session memory ~{mem / 2**20:.1f} MiB vs budget {profile.ram_budget_bytes / 2**20:.0f} MiB",
            )
        )
    return gates


def quality_gates(
    profile: HardwareProfile, m: dict[str, float], base_acc: float | None, gate_metric: str
) -> list[GateResult]:
    """The quality gates alone (finite outputs; labelled accuracy, or the fidelity gates) over measured figures.

    Fidelity: top-1 agreement when measured; each task measure present in ``m`` (:data:`TASK_GATES`);
    cosine and SQNR unless ``m["tensor_outputs"]`` says no output is judged as a raw tensor.
    """
    acc = profile.accuracy
    gates: list[GateResult] = []
    nonfinite = m.get("nonfinite_rows", 0.0)
    gates.append(
        GateResult("finite_outputs", nonfinite == 0, nonfinite, 0.0, f"{int(nonfinite)} rows with NaN/Inf outputs")
    )
    if gate_metric == "accuracy" and base_acc is not None and "accuracy" in m:
        drop = base_acc - m["accuracy"]
        gates.append(
            GateResult(
                "accuracy",
                drop <= acc.max_accuracy_drop + 1e-12,
                m["accuracy"],
                base_acc - acc.max_accuracy_drop,
                f"accuracy {m['accuracy']:.4f} vs fp32 {base_acc:.4f} (drop {drop * 100:.2f} points, "
                f"allowed {acc.max_accuracy_drop * 100:.2f})",
            )
        )
    else:
        if "top1_agreement" in m:
            v = m["top1_agreement"]
            gates.append(
                GateResult(
                    "fidelity_top1",
                    v >= acc.min_top1_agreement,
                    v,
                    acc.min_top1_agreement,
                    f"top-1 agreement {v:.4f}",
                )
            )
        for key, gate, field, label in TASK_GATES:
            if key in m:
                v, threshold = m[key], float(getattr(acc, field))
                gates.append(GateResult(gate, bool(v >= threshold), v, threshold, f"{label} {v:.4f}"))
        if m.get("tensor_outputs", 1.0) > 0:
            cos, sq = m.get("cosine_mean", float("nan")), m.get("sqnr_db", float("nan"))
            gates.append(
                GateResult(
                    "fidelity_cosine", bool(cos >= acc.min_cosine), cos, acc.min_cosine, f"mean cosine {cos:.5f}"
                )
            )
            gates.append(
                GateResult("fidelity_sqnr", bool(sq >= acc.min_sqnr_db), sq, acc.min_sqnr_db, f"SQNR {sq:.1f} dB")
            )
    return gates


def resolve_gate_metric(profile: HardwareProfile, eval_data: Dataset, override: str | None) -> str:
    """``accuracy`` or ``fidelity`` for this profile; a labelled gate without labels is an error."""
    wanted = override or profile.accuracy.metric
    has_labels = eval_data.labels is not None
    if wanted == "accuracy" and not has_labels:
        raise DataError(
            f"profile {profile.id} gates on labelled accuracy but the {eval_data.role} data has no 'labels' array"
        )
    if wanted == "auto":
        return "accuracy" if has_labels else "fidelity"
    return wanted
