"""The built-in recipe catalogue. A profile's ladder names these, or defines its own rungs.

Every recipe is a :class:`~packager.profiles.RecipeSpec`: a precision, one quantization step
and whether the profile's pruning settings apply. Names are stable: they appear in manifests.
"""

from __future__ import annotations

from packager.errors import ProfileError
from packager.profiles import QuantizationSpec, RecipeSpec

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
