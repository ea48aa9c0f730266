"""The built-in recipe catalogue. A profile's ladder names these, or defines its own rungs.

Every recipe is a :class:`~packager.profiles.RecipeSpec`: a precision, one quantization step
and whether the profile's pruning settings apply. Names are stable: they appear in manifests.
"""

from __future__ import annotations

from typing import Any

from packager.errors import ProfileError
from packager.passes.base import Pass
from packager.passes.check import OpSupportCheck, op_support_config
from packager.passes.graph import Finalize, FinalizeConfig
from packager.passes.prune import MagnitudePrune, MagnitudePruneConfig
from packager.passes.quantize import (
    WEIGHT_OPS,
    DynamicQuantize,
    DynamicQuantizeConfig,
    StaticQuantize,
    StaticQuantizeConfig,
)
from packager.passes.weights import ConvertFp16, Fp16Config, Int4WeightOnly, Int4WeightOnlyConfig
from packager.profiles import HardwareProfile, QuantizationSpec, RecipeSpec

_Q = QuantizationSpec

BUILTIN_RECIPES: dict[str, RecipeSpec] = {
    r.name: r
    for r in [
        RecipeSpec(
            name="int8-qdq",
            precision="int8",
            quantization=_Q(mode="static", format="qdq", per_channel=True, calibration="minmax"),
            description="static int8 QDQ, per-channel symmetric int8 weights, uint8 activations, MinMax calibration",
        ),
        RecipeSpec(
            name="int8-qdq-pt",
            precision="int8",
            quantization=_Q(mode="static", format="qdq", per_channel=False, calibration="minmax"),
            description="static int8 QDQ, per-tensor int8 weights, uint8 activations (fastest u8s8 path on x86 here)",
        ),
        RecipeSpec(
            name="int8-qdq-pt-rr",
            precision="int8",
            quantization=_Q(mode="static", format="qdq", per_channel=False, reduce_range=True, calibration="minmax"),
            description="static int8 QDQ, per-tensor 7-bit weights (reduce_range: no u8s8 VPMADDUBSW saturation "
            "on AVX2 without VNNI), uint8 activations",
        ),
        RecipeSpec(
            name="int8-qdq-pt-rr-stem",
            precision="int8",
            quantization=_Q(
                mode="static",
                format="qdq",
                per_channel=False,
                reduce_range=True,
                calibration="minmax",
                keep_float=["first"],
            ),
            description="as int8-qdq-pt-rr, keeping the first weight-bearing node (the stem) in float: a stem with "
            "few input channels gains nothing from int8 GEMM kernels and loses the most accuracy",
        ),
        RecipeSpec(
            name="int8-qdq-exclude",
            precision="int8",
            quantization=_Q(mode="static", format="qdq", per_channel=True, calibration="minmax", exclude_top_k=2),
            description="as int8-qdq, keeping in float the 2 nodes with the worst activation SQNR (fp32 vs int8)",
        ),
        RecipeSpec(
            name="int8-qdq-entropy",
            precision="int8",
            quantization=_Q(mode="static", format="qdq", per_channel=True, calibration="entropy"),
            description="static int8 QDQ with entropy (KL) calibration",
        ),
        RecipeSpec(
            name="int8-qdq-percentile",
            precision="int8",
            quantization=_Q(mode="static", format="qdq", per_channel=True, calibration="percentile"),
            description="static int8 QDQ with 99.999th percentile calibration",
        ),
        RecipeSpec(
            name="int8-qdq-wops-p999",
            precision="int8",
            quantization=_Q(
                mode="static",
                format="qdq",
                per_channel=True,
                calibration="percentile",
                percentile=99.9,
                op_types=sorted(WEIGHT_OPS),
            ),
            description="static int8 QDQ of the weight-bearing ops only (Conv/MatMul/Gemm/LSTM/GRU), per-channel, "
            "99.9th percentile calibration; element-wise ops (Pow, Sqrt, Add...) stay float (audio front-ends)",
        ),
        RecipeSpec(
            name="int8-qoperator",
            precision="int8",
            quantization=_Q(mode="static", format="qoperator", per_channel=True, calibration="minmax"),
            description="static int8 QOperator (QLinearConv/QLinearMatMul...), per-channel, MinMax",
        ),
        RecipeSpec(
            name="int8-qdq-reduce-range",
            precision="int8",
            quantization=_Q(mode="static", format="qdq", per_channel=True, reduce_range=True),
            description="static int8 QDQ with 7-bit weights (for CPUs without dot-product/VNNI saturation-safe paths)",
        ),
        RecipeSpec(
            name="int8-dynamic",
            precision="int8",
            quantization=_Q(mode="dynamic", weight_type="int8", per_channel=False),
            description="dynamic int8: int8 weights, activations quantized at run time (no calibration)",
        ),
        RecipeSpec(
            name="u8-qdq",
            precision="uint8",
            quantization=_Q(
                mode="static", format="qdq", per_channel=False, activation_type="uint8", weight_type="uint8"
            ),
            description="static QDQ, uint8 activations and uint8 per-tensor weights (NPU style)",
        ),
        RecipeSpec(
            name="u8-qdq-exclude",
            precision="uint8",
            quantization=_Q(
                mode="static",
                format="qdq",
                per_channel=False,
                activation_type="uint8",
                weight_type="uint8",
                exclude_top_k=2,
            ),
            description="as u8-qdq, keeping the 2 worst nodes in float",
        ),
        RecipeSpec(
            name="a16w8-qdq",
            precision="uint16",
            quantization=_Q(
                mode="static", format="qdq", per_channel=False, activation_type="uint16", weight_type="uint8"
            ),
            description="static QDQ, uint16 activations and uint8 weights (QNN HTP a16w8)",
        ),
        RecipeSpec(
            name="int4-weight-only",
            precision="int4",
            quantization=_Q(mode="int4_weight_only", int4_block_size=32),
            description="block-wise int4 weights for MatMul/Gemm (DequantizeLinear, opset 21), fp32 compute",
        ),
        RecipeSpec(
            name="fp16",
            precision="fp16",
            quantization=_Q(mode="fp16"),
            description="fp16 weights and compute, fp32 graph inputs and outputs",
        ),
        RecipeSpec(
            name="fp32",
            precision="fp32",
            quantization=_Q(mode="none"),
            prune=False,
            description="the simplified fp32 model, unchanged numerics (the last resort)",
        ),
    ]
}


def resolve_recipe(entry: str | RecipeSpec) -> RecipeSpec:
    if isinstance(entry, RecipeSpec):
        return entry
    try:
        return BUILTIN_RECIPES[entry]
    except KeyError:
        raise ProfileError(f"unknown recipe {entry!r} (built-in: {', '.join(BUILTIN_RECIPES)})") from None


def recipe_passes(
    profile: HardwareProfile, recipe: RecipeSpec, pruned: bool, model_batch: int | None = None
) -> list[Pass[Any]]:
    """The passes of one attempt: optional magnitude pruning, the recipe's quantization step, finalize, op check.

    ``model_batch`` is the model's own fixed batch (calibration feeds must match it).
    """
    passes: list[Pass[Any]] = []
    if pruned:
        up = profile.pruning.unstructured
        passes.append(MagnitudePrune(MagnitudePruneConfig(sparsity=up.sparsity, min_params=up.min_params)))
    q = recipe.quantization
    fixed = profile.shapes.fixed_batch or (1 if profile.shapes.static_only else None) or model_batch
    if q.mode == "static":
        passes.append(
            StaticQuantize(
                StaticQuantizeConfig(
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
                    exclude_top_k=q.exclude_top_k,
                    keep_float=q.keep_float or None,
                )
            )
        )
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
