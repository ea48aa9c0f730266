"""The passes of one ladder attempt: a profile's constraints applied to one recipe.

Above both the passes (which know only their own configs) and the profile schema, so neither
depends on the other.
"""

from __future__ import annotations

from typing import Any

from edgeota_contract.manifest import PassRecord
from packager.passes.base import Pass
from packager.passes.check import OpSupportCheck, OpSupportConfig
from packager.passes.graph import Finalize, FinalizeConfig
from packager.passes.mixed import MixedPrecisionConfig, MixedPrecisionQuantize
from packager.passes.prune import MagnitudePrune, MagnitudePruneConfig
from packager.passes.quantize import DynamicQuantize, DynamicQuantizeConfig, StaticQuantize, StaticQuantizeConfig
from packager.passes.weights import ConvertFp16, Fp16Config, Int4WeightOnly, Int4WeightOnlyConfig
from packager.profiles import HardwareProfile
from packager.recipes import QuantizationSpec, RecipeSpec


def op_support_config(profile: HardwareProfile) -> OpSupportConfig:
    """The op-support check's settings for ``profile`` (opset range, shape and op constraints)."""
    return OpSupportConfig(
        profile=profile.id,
        opset_min=profile.opset.min,
        opset_max=profile.opset.max,
        static_only=profile.shapes.static_only,
        allow_control_flow=profile.ops.allow_control_flow,
        allow=profile.ops.allow,
        deny=profile.ops.deny,
        max_rank=profile.shapes.max_rank,
    )


def _static_config(q: QuantizationSpec, fixed: int | None, exclude_top_k: int = 0) -> StaticQuantizeConfig:
    """The static quantization step of ``q``; ``exclude_top_k`` only for the plain static pass (the mixed
    search decides for itself which nodes stay in float)."""
    return StaticQuantizeConfig(
        format=q.format,
        per_channel=q.per_channel,
        activation_type=q.activation_type,
        weight_type=q.weight_type,
        calibration=q.calibration,
        calibration_samples=q.calibration_samples,
        calibration_batch=fixed or 32,
        percentile=q.percentile,
        reduce_range=q.reduce_range,
        op_types=q.op_types,
        exclude_top_k=exclude_top_k,
        keep_float=q.keep_float or None,
    )


def recipe_passes(
    profile: HardwareProfile,
    recipe: RecipeSpec,
    pruned: bool,
    model_batch: int | None = None,
    gate_metric: str | None = None,
) -> list[Pass[Any]]:
    """The passes of one attempt: optional magnitude pruning, the recipe's quantization step, finalize, op check.

    ``model_batch`` is the model's own fixed batch (calibration feeds must match it). ``gate_metric``
    (the one in force) is recorded in a mixed-precision search's targets: it decides what the search gates on.
    """
    passes: list[Pass[Any]] = []
    if pruned:
        up = profile.pruning.unstructured
        passes.append(MagnitudePrune(MagnitudePruneConfig(sparsity=up.sparsity, min_params=up.min_params)))
    q = recipe.quantization
    fixed = profile.shapes.fixed_batch or (1 if profile.shapes.static_only else None) or model_batch
    if q.mode == "static" and q.mixed_precision:
        mp = profile.mixed_precision
        passes.append(
            MixedPrecisionQuantize(
                MixedPrecisionConfig(
                    static=_static_config(q, fixed),
                    budget_s=mp.budget_s,
                    max_float_nodes=mp.max_float_nodes,
                    float_type=mp.float_type,
                    targets={**profile.accuracy.model_dump(), **({"gate_metric": gate_metric} if gate_metric else {})},
                )
            )
        )
    elif q.mode == "static":
        passes.append(StaticQuantize(_static_config(q, fixed, q.exclude_top_k)))
    elif q.mode == "dynamic":
        passes.append(
            DynamicQuantize(
                DynamicQuantizeConfig(
                    weight_type=q.weight_type,
                    per_channel=q.per_channel,
                    reduce_range=q.reduce_range,
                    op_types=q.op_types,
                )
            )
        )
    elif q.mode == "fp16":
        passes.append(ConvertFp16(Fp16Config(keep_io_types=q.keep_io_types)))
    elif q.mode == "int4_weight_only":
        passes.append(Int4WeightOnly(Int4WeightOnlyConfig(block_size=q.int4_block_size)))
    passes.append(Finalize(FinalizeConfig()))
    passes.append(OpSupportCheck(op_support_config(profile)))
    return passes


def search_summary(
    extras: dict[str, Any],
    records: list[PassRecord],
    model_bytes: int,
    fp32_bytes: int,
    full_int8_bytes: int,
    full_int8_latency: dict[str, float],
) -> dict[str, Any]:
    """A mixed-precision search for the report: the pass's result and timings beside full int8 and fp32.

    ``full_int8_latency`` is the full-int8 model (step k = 0, finalized) timed interleaved with fp32
    (:func:`packager.evaluate.measure_latency`). ``metrics`` holds the figures that go beside the attempt's.
    """
    result: dict[str, Any] = next(
        (r.config.get("result", {}) for r in records if r.name == MixedPrecisionQuantize.name), {}
    )
    return {
        "float_nodes": result.get("float_nodes"),
        "int8_weight_share": result.get("int8_weight_share"),
        "full_int8_weight_share": result.get("full_int8_weight_share"),
        "model_bytes": model_bytes,
        "full_int8_model_bytes": full_int8_bytes,
        "fp32_model_bytes": fp32_bytes,
        "full_int8_latency_p50_ms": full_int8_latency["host_latency_p50_ms"],
        "fp32_latency_p50_ms_beside_full_int8": full_int8_latency.get("host_fp32_latency_p50_ms"),
        "steps": extras["steps"],
        "seconds": extras["seconds"],
        "budget_exhausted": extras["budget_exhausted"],
        "ranking": result.get("ranking", []),
        "metrics": {
            "float_nodes": float(len(result.get("float_nodes") or [])),
            "int8_weight_share": float(result.get("int8_weight_share", 0.0)),
            "full_int8_model_bytes": float(full_int8_bytes),
            "full_int8_latency_p50_ms": full_int8_latency["host_latency_p50_ms"],
        },
    }
