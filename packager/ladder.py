"""The accuracy-aware recipe ladder of one hardware profile.

For each profile: pre-process the source model (pin shapes, convert opset, infer shapes,
simplify), measure the fp32 baseline, then try the profile's recipes in order. Each attempt
runs its passes, then the gates; the first attempt passing every gate is chosen. Every
attempt is recorded with its figures and, when rejected, why. Work shared between profiles
(pre-processing, quantized candidates, quality runs, latency runs) is cached per run.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from edgeota_contract.manifest import PassRecord
from packager.data import Dataset
from packager.errors import PackagerError
from packager.evaluate import (
    LatencySettings,
    make_session,
    measure_latency,
    measure_session_memory,
    quality_metrics,
    reference_accuracy,
    run_dataset,
)
from packager.fidelity import output_kinds
from packager.gates import QUALITY_GATES, evaluate_gates, quality_gates, resolve_gate_metric
from packager.onnx_utils import fixed_batch, io_specs, main_opset, name_nodes, serialize, sha256_bytes
from packager.passes.base import Pass, PassContext, PassFailed, Verdict
from packager.passes.graph import (
    ConvertOpset,
    ConvertOpsetConfig,
    Finalize,
    FinalizeConfig,
    FixShapes,
    FixShapesConfig,
    LoadOnnx,
    LoadOnnxConfig,
    ShapeInference,
    ShapeInferenceConfig,
    Simplify,
    SimplifyConfig,
)
from packager.pipeline import recipe_passes, search_summary
from packager.profiles import HardwareProfile
from packager.recipes import RecipeSpec
from packager.selection import (  # re-exported: callers import them from here
    Attempt,
    LadderOutcome,
    failure_message,
    pick_best,
    raise_if_failed,
    unfixable_problem,
)

EventFn = Callable[[str, str], None]


@dataclass
class RunOptions:
    """Knobs for one packaging run; the defaults suit real use, tests shrink them."""

    latency: LatencySettings = field(default_factory=LatencySettings)
    measure_memory: bool = True
    eval_batch: int = 64
    gate_metric: str | None = None  # override every profile's accuracy.metric
    enforce_gates: bool = True  # False: ship the last buildable attempt even when it failed gates (demos only)
    output_kinds: dict[str, str] = field(default_factory=dict)  # declared kinds by output name (packager.fidelity)
    work_dir: Path | None = None


@dataclass
class SourceModel:
    model: onnx.ModelProto
    sha256: str
    format: str  # onnx | torchscript | exported_program | nn_module
    extra_passes: list[PassRecord] = field(default_factory=list)  # e.g. torch export, structured pruning


class _Cache:
    def __init__(self) -> None:
        self._values: dict[str, Any] = {}
        self._locks: dict[str, threading.Lock] = {}
        self._guard = threading.Lock()

    def get(self, key: str, make: Callable[[], Any]) -> Any:
        with self._guard:
            lock = self._locks.setdefault(key, threading.Lock())
        with lock:
            if key not in self._values:
                self._values[key] = make()
            return self._values[key]


def _key(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


class LadderRunner:
    """Runs the ladder for any number of profiles over one source model and one data set pair."""

    def __init__(
        self,
        source: SourceModel,
        calibration: Dataset,
        eval_data: Dataset,
        options: RunOptions,
        on_event: EventFn | None = None,
        variant: str = "",
    ) -> None:
        self.variant = variant
        self.source = source
        self.calibration = calibration
        self.eval_data = eval_data
        self.options = options
        self.on_event = on_event or (lambda _p, _m: None)
        self.cache = _Cache()
        self._tmp = tempfile.TemporaryDirectory(prefix="edgeota-pack-", dir=options.work_dir)
        self.work_root = Path(self._tmp.name)
        self._counter = 0
        self._counter_lock = threading.Lock()
        self.model_batch = fixed_batch(source.model, calibration.axes)

    def close(self) -> None:
        self._tmp.cleanup()

    def _work_dir(self, label: str) -> Path:
        with self._counter_lock:
            self._counter += 1
            path = self.work_root / f"{self._counter:03d}-{label}"
        path.mkdir(parents=True)
        return path

    # ---- pre-processing -------------------------------------------------------------------
    def preprocess_passes(self, profile: HardwareProfile) -> list[Pass[Any]]:
        passes: list[Pass[Any]] = [
            LoadOnnx(LoadOnnxConfig(source_sha256=self.source.sha256, source_format=self.source.format))  # type: ignore[arg-type]
        ]
        inputs = io_specs(self.source.model, "input")
        batch = profile.shapes.fixed_batch or (1 if profile.shapes.static_only else None)
        axes = dict(self.calibration.axes)
        dynamic = any(
            len(s.shape) > axes.get(s.name, 0) and not isinstance(s.shape[axes.get(s.name, 0)], int) for s in inputs
        )
        if batch is not None and dynamic:
            passes.append(FixShapes(FixShapesConfig(batch=batch, axes=axes or None)))
        opset = main_opset(self.source.model)
        if not profile.opset.min <= opset <= profile.opset.max:
            target = min(max(opset, profile.opset.min), profile.opset.max)
            passes.append(ConvertOpset(ConvertOpsetConfig(target_opset=target)))
        passes.append(ShapeInference(ShapeInferenceConfig()))
        passes.append(Simplify(SimplifyConfig()))
        return passes

    def preprocess(self, profile: HardwareProfile) -> tuple[onnx.ModelProto, bytes, list[PassRecord]]:
        passes = self.preprocess_passes(profile)
        key = _key("pre", self.source.sha256, [p.config.model_dump(mode="json") for p in passes])

        def make() -> tuple[onnx.ModelProto, bytes, list[PassRecord]]:
            model = self.source.model
            ctx = PassContext(self._work_dir("pre"), self.calibration, lambda m: self.on_event(profile.id, m))
            for p in passes:
                self.on_event(profile.id, f"pass {p.name}")
                try:
                    model = p.run(model, ctx)
                except PassFailed as exc:
                    raise PackagerError(f"profile {profile.id}: pre-processing failed: {exc}") from exc
            model = name_nodes(model)  # stable names: quantizer exclusions and reports refer to them
            records = list(self.source.extra_passes) + [p.record() for p in passes]
            return model, serialize(model), records

        result: tuple[onnx.ModelProto, bytes, list[PassRecord]] = self.cache.get(key, make)
        return result

    # ---- evaluation -----------------------------------------------------------------------
    def outputs(self, model_bytes: bytes) -> list[np.ndarray]:
        key = _key("out", sha256_bytes(model_bytes))
        result: list[np.ndarray] = self.cache.get(
            key, lambda: run_dataset(make_session(model_bytes, 1), self.eval_data, self.options.eval_batch)
        )
        return result

    def latency(self, cand: bytes, ref: bytes, threads: int) -> dict[str, float]:
        key = _key("lat", sha256_bytes(cand), sha256_bytes(ref), threads)
        result: dict[str, float] = self.cache.get(
            key, lambda: measure_latency(cand, ref, self.eval_data, threads, self.options.latency)
        )
        return result

    def memory(self, model_bytes: bytes, threads: int) -> int:
        key = _key("mem", sha256_bytes(model_bytes), threads)
        result: int = self.cache.get(key, lambda: measure_session_memory(model_bytes, self.eval_data, threads))
        return result

    # ---- recipes --------------------------------------------------------------------------
    def output_kinds(self, model: onnx.ModelProto, reference: list[np.ndarray]) -> list[str]:
        """Every output's kind (declared in the options, else inferred), in output order."""
        names = [o.name for o in model.graph.output]
        kinds = output_kinds(names, reference, self.options.output_kinds)
        return [kinds[n] for n in names]

    def judge(
        self, profile: HardwareProfile, pre: onnx.ModelProto, pre_bytes: bytes, gate_metric: str
    ) -> Callable[[onnx.ModelProto], Verdict]:
        """The quality gates of ``profile`` as a function of a candidate model (for accuracy-aware passes)."""
        ref_outputs = self.outputs(pre_bytes)
        base_acc = reference_accuracy(ref_outputs, self.eval_data.labels)
        kinds = self.output_kinds(pre, ref_outputs)

        def verdict(model: onnx.ModelProto) -> Verdict:
            try:  # not cached: a search judges many candidates and keeps none of their outputs
                outputs = run_dataset(make_session(serialize(model), 1), self.eval_data, self.options.eval_batch)
            except PackagerError as exc:
                return Verdict(False, {}, f"does not run on the host: {exc}")
            m = quality_metrics(outputs, ref_outputs, self.eval_data.labels, kinds, profile.accuracy.score_threshold)
            gates = quality_gates(profile, m, base_acc, gate_metric)
            failed = [g for g in gates if not g.ok]
            figures = {g.name: float(g.value) for g in gates if g.value is not None and g.name != "finite_outputs"}
            return Verdict(not failed, figures, "; ".join(f"{g.name}: {g.detail}" for g in failed))

        return verdict

    def build_candidate(
        self,
        profile: HardwareProfile,
        recipe: RecipeSpec,
        pruned: bool,
        pre: onnx.ModelProto,
        pre_bytes: bytes,
        gate_metric: str | None = None,
    ) -> tuple[onnx.ModelProto, bytes, list[PassRecord], list[str], dict[str, Any]]:
        """Run one recipe's passes (cached per configuration); returns model, bytes, records, op problems, extras.

        ``extras`` holds run-dependent results of passes for the report (a mixed-precision search's timings).
        """
        passes = recipe_passes(profile, recipe, pruned, self.model_batch, gate_metric)
        key = _key("cand", sha256_bytes(pre_bytes), [(p.name, p.config.model_dump(mode="json")) for p in passes])

        def make() -> tuple[onnx.ModelProto, bytes, list[PassRecord], list[str], dict[str, Any]]:
            model = pre
            judge = self.judge(profile, pre, pre_bytes, gate_metric) if gate_metric is not None else None
            ctx = PassContext(
                self._work_dir(recipe.name), self.calibration, lambda m: self.on_event(profile.id, m), judge
            )
            extras: dict[str, Any] = {}
            for p in passes:
                self.on_event(profile.id, f"{recipe.name}: pass {p.name}")
                model = p.run(model, ctx)
                extras.update(getattr(p, "extras", {}))
            check = passes[-1]
            problems = list(check.notes.get("problems", []))
            return model, serialize(model), [p.record() for p in passes], problems, extras

        result: tuple[onnx.ModelProto, bytes, list[PassRecord], list[str], dict[str, Any]] = self.cache.get(key, make)
        return result

    # ---- the ladder -----------------------------------------------------------------------
    def run_profile(self, profile: HardwareProfile) -> LadderOutcome:
        gate_metric = resolve_gate_metric(profile, self.eval_data, self.options.gate_metric)
        self.on_event(profile.id, "pre-processing")
        pre, pre_bytes, pre_records = self.preprocess(profile)
        self.on_event(profile.id, "fp32 baseline")
        ref_outputs = self.outputs(pre_bytes)
        baseline: dict[str, float] = {"model_bytes": float(len(pre_bytes))}
        base_acc = reference_accuracy(ref_outputs, self.eval_data.labels)
        if base_acc is not None:
            baseline["accuracy"] = base_acc
        outcome = LadderOutcome(profile.id, None, [], baseline, gate_metric, preprocessed=pre)
        names = [o.name for o in pre.graph.output]
        outcome.output_kinds = dict(zip(names, self.output_kinds(pre, ref_outputs), strict=True))
        outcome.refused = unfixable_problem(pre, profile)
        if outcome.refused:
            self.on_event(profile.id, f"refused: {outcome.refused}")
            return outcome
        prune_on = profile.pruning.unstructured.enabled and profile.pruning.unstructured.sparsity > 0
        passing: list[tuple[Attempt, RecipeSpec]] = []
        for recipe in profile.ladder:
            if passing and recipe.precision == "fp32":
                break  # selection "best": the fp32 fallbacks only matter when nothing else passed
            variants = [True, False] if (prune_on and recipe.prune) else [False]
            for pruned in variants:
                attempt = self._attempt(profile, recipe, pruned, pre, pre_bytes, ref_outputs, base_acc, gate_metric)
                outcome.attempts.append(attempt)
                if attempt.passed_gates:
                    passing.append((attempt, recipe))
                    break  # a pruned attempt passed: its unpruned twin is not needed
                failed = {g.name for g in attempt.gates if not g.ok}
                if pruned and not (failed & QUALITY_GATES):
                    break  # pruning was not the problem: the unpruned twin would fail the same way
            if passing and profile.selection == "first":
                break
        if passing:
            index, why = pick_best([a for a, _ in passing], gate_metric) if len(passing) > 1 else (0, "")
            for i, (attempt, _recipe) in enumerate(passing):
                if i != index:
                    attempt.reason = f"passed every gate, not chosen ({passing[index][0].label} was: {why})"
            chosen, recipe = passing[index]
            chosen.accepted = True
            chosen.reason = why or None
            model, model_bytes, records, _, _ = self.build_candidate(
                profile, recipe, chosen.pruned, pre, pre_bytes, gate_metric
            )
            outcome.chosen = chosen
            outcome.model, outcome.model_bytes = model, model_bytes
            outcome.pass_records = pre_records + records
            baseline.update({k: v for k, v in chosen.metrics.items() if k.startswith("host_fp32_latency")})
            return outcome
        if not self.options.enforce_gates:
            self._override(profile, outcome, pre, pre_bytes, pre_records)
        return outcome

    def _override(
        self,
        profile: HardwareProfile,
        outcome: LadderOutcome,
        pre: onnx.ModelProto,
        pre_bytes: bytes,
        pre_records: list[PassRecord],
    ) -> None:
        """Gates off: take the last attempt that produced a model, and say so everywhere."""
        for attempt in reversed(outcome.attempts):
            if not attempt.passes:
                continue
            recipe = next(r for r in profile.ladder if r.name == attempt.recipe)
            model, model_bytes, records, _, _ = self.build_candidate(
                profile, recipe, attempt.pruned, pre, pre_bytes, outcome.gate_metric
            )
            outcome.chosen = attempt
            outcome.model, outcome.model_bytes = model, model_bytes
            outcome.pass_records = pre_records + records
            outcome.gates_overridden = True
            self.on_event(profile.id, f"GATES OVERRIDDEN: shipping {attempt.label} ({attempt.reason})")
            return

    def _attempt(
        self,
        profile: HardwareProfile,
        recipe: RecipeSpec,
        pruned: bool,
        pre: onnx.ModelProto,
        pre_bytes: bytes,
        ref_outputs: list[np.ndarray],
        base_acc: float | None,
        gate_metric: str,
    ) -> Attempt:
        attempt = Attempt(recipe.name, pruned, self.variant)
        started = time.perf_counter()
        self.on_event(profile.id, f"trying {attempt.label}")
        try:
            _model, model_bytes, records, problems, extras = self.build_candidate(
                profile, recipe, pruned, pre, pre_bytes, gate_metric
            )
        except PassFailed as exc:
            attempt.reason = str(exc)
            attempt.search = exc.details
            attempt.seconds = time.perf_counter() - started
            return attempt
        attempt.passes = [r.model_dump(mode="json") for r in records]
        try:
            outputs = self.outputs(model_bytes)
        except PackagerError as exc:
            attempt.reason = f"candidate does not run on the host: {exc}"
            attempt.seconds = time.perf_counter() - started
            return attempt
        kinds = self.output_kinds(pre, ref_outputs)
        metrics = quality_metrics(outputs, ref_outputs, self.eval_data.labels, kinds, profile.accuracy.score_threshold)
        metrics["model_bytes"] = float(len(model_bytes))
        self.on_event(profile.id, f"{attempt.label}: measuring latency")
        metrics.update(self.latency(model_bytes, pre_bytes, profile.latency.threads))
        if "full_int8_model" in extras:
            full = serialize(Finalize(FinalizeConfig()).run(extras["full_int8_model"], PassContext(self.work_root)))
            lat = self.latency(full, pre_bytes, profile.latency.threads)
            attempt.search = search_summary(extras, records, len(model_bytes), len(pre_bytes), len(full), lat)
            metrics.update(attempt.search["metrics"])
        metrics["est_device_latency_p95_ms"] = metrics["host_latency_p95_ms"] * profile.latency.host_scale
        if self.options.measure_memory:
            metrics["session_memory_bytes"] = float(self.memory(model_bytes, profile.latency.threads))
        attempt.metrics = metrics
        attempt.gates = evaluate_gates(profile, recipe, metrics, problems, base_acc, gate_metric)
        failed = [g for g in attempt.gates if not g.ok]
        attempt.passed_gates = not failed
        if failed:
            attempt.reason = "; ".join(f"{g.name}: {g.detail}" for g in failed)
        attempt.seconds = time.perf_counter() - started
        return attempt


__all__ = [
    "Attempt",
    "LadderOutcome",
    "LadderRunner",
    "RunOptions",
    "SourceModel",
    "failure_message",
    "fixed_batch",
    "raise_if_failed",
    "resolve_gate_metric",
    "unfixable_problem",
]
