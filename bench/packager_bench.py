"""Packager benchmark: our chosen x86 recipe vs ONNX Runtime's quantizers with default arguments.

On the digits CNN (``packager.examples.digits``, labelled), in one run: fp32, ORT
``quantize_dynamic`` (defaults), ORT ``quantize_static`` (defaults, same 200 calibration
samples), and the bundle the packager chose for ``x86-avx2``. Figures: model size, accuracy on
the held-out set, host latency at batch 1 with one thread (best p50 of several interleaved
rounds), and the wall time of packaging the CNN for three profiles. Microsoft Olive is not run
here (see bench/README-packager.md). Goals are reported as met/missed, never asserted.
"""

from __future__ import annotations

import io
import json
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

GOALS = {
    "int8_size_ratio_max": 0.30,
    "accuracy_drop_points_max": 0.5,
    "speedup_vs_fp32_min": 1.8,
    "package_three_profiles_seconds_max": 60.0,
}


def _session(model: bytes) -> Any:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    return ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])


def _accuracy(model: bytes, x: np.ndarray, y: np.ndarray) -> float:
    out = _session(model).run(None, {"input": x})[0]
    return float((out.argmax(axis=1) == y).mean())


def _latency(models: dict[str, bytes], x1: np.ndarray, rounds: int, runs: int) -> dict[str, dict[str, float]]:
    """Best-of-rounds p50 (and the median of per-round p50s), rounds interleaved across models."""
    sessions = {k: _session(v) for k, v in models.items()}
    per_round: dict[str, list[float]] = {k: [] for k in models}
    for s in sessions.values():
        for _ in range(50):
            s.run(None, {"input": x1})
    for _ in range(rounds):
        for k, s in sessions.items():
            samples = []
            for _ in range(runs):
                t0 = time.perf_counter_ns()
                s.run(None, {"input": x1})
                samples.append((time.perf_counter_ns() - t0) / 1e6)
            per_round[k].append(float(np.percentile(samples, 50)))
    return {k: {"best_p50_ms": min(v), "median_p50_ms": float(np.median(v))} for k, v in per_round.items()}


def run(results_dir: Path, quick: bool = False) -> dict[str, Any]:
    from onnxruntime.quantization import CalibrationDataReader, quantize_dynamic, quantize_static

    from edgeota_contract.signing import SigningKey
    from packager.api import package_model
    from packager.examples.digits import build_digits_example

    results_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="edgeota-bench-") as tmp_name:
        tmp = Path(tmp_name)
        example = build_digits_example(tmp / "cnn", arch="cnn", epochs=4 if quick else None)
        calib = np.load(example.calibration_path)
        ev = np.load(example.eval_path)
        x_eval, y_eval = ev["input"], ev["labels"]
        fp32 = example.model_path.read_bytes()

        class Reader(CalibrationDataReader):  # type: ignore[misc]
            def __init__(self) -> None:
                self._rows = iter(calib["input"][i : i + 1] for i in range(len(calib["input"])))

            def get_next(self) -> dict[str, np.ndarray] | None:
                row = next(self._rows, None)
                return None if row is None else {"input": row}

        quantize_dynamic(str(example.model_path), str(tmp / "ort_dynamic.onnx"))
        quantize_static(str(example.model_path), str(tmp / "ort_static.onnx"), Reader())

        started = time.perf_counter()
        report = package_model(
            example.model_path,
            profiles=["x86-avx2", "rpi4", "qcom-qnn-npu"],
            calibration=example.calibration_path,
            eval_data=example.eval_path,
            key=SigningKey.generate(),
            out_dir=tmp / "dist",
            name="digits-cnn",
            version="1.0.0",
        )
        package_seconds = time.perf_counter() - started
        ours = report.results["x86-avx2"]
        if not ours.ok or ours.bundle_path is None:
            raise RuntimeError(f"packaging failed: {ours.error}")
        with tarfile.open(ours.bundle_path) as tar:
            member = tar.extractfile("model.onnx")
            assert member is not None
            ours_model = member.read()

        models = {
            "fp32": fp32,
            "ort_quantize_dynamic_defaults": (tmp / "ort_dynamic.onnx").read_bytes(),
            "ort_quantize_static_defaults": (tmp / "ort_static.onnx").read_bytes(),
            "edgeota_x86_avx2": ours_model,
        }
        latency = _latency(models, x_eval[:1], rounds=3 if quick else 9, runs=100 if quick else 400)
        base_acc = _accuracy(fp32, x_eval, y_eval)
        rows: dict[str, dict[str, Any]] = {}
        for name, model in models.items():
            acc = _accuracy(model, x_eval, y_eval)
            rows[name] = {
                "size_bytes": len(model),
                "size_ratio_vs_fp32": len(model) / len(fp32),
                "accuracy": acc,
                "accuracy_drop_points": (base_acc - acc) * 100,
                **latency[name],
                "speedup_vs_fp32": latency["fp32"]["best_p50_ms"] / latency[name]["best_p50_ms"],
            }
        ours_row = rows["edgeota_x86_avx2"]
        peer_names = ["ort_quantize_dynamic_defaults", "ort_quantize_static_defaults"]
        peers = [rows[n] for n in peer_names]
        goals = {
            "int8_size_ratio": _goal(ours_row["size_ratio_vs_fp32"], GOALS["int8_size_ratio_max"], "max"),
            "accuracy_drop_points": _goal(ours_row["accuracy_drop_points"], GOALS["accuracy_drop_points_max"], "max"),
            "speedup_vs_fp32": _goal(ours_row["speedup_vs_fp32"], GOALS["speedup_vs_fp32_min"], "min"),
            "package_three_profiles_seconds": _goal(
                package_seconds, GOALS["package_three_profiles_seconds_max"], "max"
            ),
            "ahead_of_ort_peers": {
                "met": all(not _dominated(ours_row, p) and ours_row["size_bytes"] <= p["size_bytes"] for p in peers),
                "per_peer": {name: _compare(ours_row, rows[name]) for name in peer_names},
                "note": "met = no ORT default peer is better on accuracy AND latency, and none is smaller (Olive not run)",
            },
        }
        result = {
            "model": "digits CNN (3 conv + 2 linear), input [1,1,8,8], eval 450 images",
            "chosen_recipe_x86_avx2": ours.recipe,
            "attempts_x86_avx2": [(a.label, a.accepted, a.reason) for a in ours.attempts],
            "package_three_profiles_seconds": package_seconds,
            "profiles": {p: {"ok": r.ok, "recipe": r.recipe} for p, r in report.results.items()},
            "latency_method": "batch 1, 1 intra-op thread, CPU EP; best p50 of interleaved rounds",
            "rows": rows,
            "goals": goals,
            "olive": "not run in this benchmark (needs olive-ai in a separate venv)",
            "host": report.host,
            "quick": quick,
        }
    (results_dir / "packager.json").write_text(json.dumps(result, indent=2, default=str))
    return result


def _dominated(ours: dict[str, Any], peer: dict[str, Any]) -> bool:
    """The peer is at least as good on accuracy and latency, and strictly better on one."""
    ge = peer["accuracy"] >= ours["accuracy"] and peer["best_p50_ms"] <= ours["best_p50_ms"]
    gt = peer["accuracy"] > ours["accuracy"] or peer["best_p50_ms"] < ours["best_p50_ms"]
    return bool(ge and gt)


def _compare(ours: dict[str, Any], peer: dict[str, Any]) -> dict[str, Any]:
    return {
        "accuracy_delta_points": (ours["accuracy"] - peer["accuracy"]) * 100,
        "latency_ratio_ours_over_peer": ours["best_p50_ms"] / peer["best_p50_ms"],
        "size_delta_bytes": ours["size_bytes"] - peer["size_bytes"],
        "ours_dominated_by_peer": _dominated(ours, peer),
    }


def _goal(value: float, threshold: float, kind: str) -> dict[str, Any]:
    met = value <= threshold if kind == "max" else value >= threshold
    return {"value": value, "threshold": threshold, "met": met}


if __name__ == "__main__":
    import sys

    out = run(Path(__file__).resolve().parent / "results", quick="--quick" in sys.argv)
    buf = io.StringIO()
    json.dump({k: out[k] for k in ("chosen_recipe_x86_avx2", "rows", "goals")}, buf, indent=2)
    print(buf.getvalue())
