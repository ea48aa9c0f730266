"""Recipes: the schema of one ladder rung and the built-in catalogue a profile's ladder names.

Every recipe is a :class:`RecipeSpec`: a precision, one quantization step and whether the
profile's pruning settings apply. Built-in names are stable: they appear in manifests. Which
passes a recipe runs for a given profile is decided in :mod:`packager.pipeline`.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from packager.errors import ProfileError
from packager.passes.quantize import WEIGHT_OPS

Precision = Literal["fp32", "fp16", "int8", "uint8", "int16", "uint16", "int4"]
Calibration = Literal["minmax", "entropy", "percentile"]
QuantMode = Literal["none", "static", "dynamic", "fp16", "int4_weight_only"]
QuantFormat = Literal["qdq", "qoperator"]
QuantType = Literal["int8", "uint8", "int16", "uint16"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class QuantizationSpec(_Strict):
    """A quantization step of a recipe. ``mode: none`` keeps fp32 weights."""

    mode: QuantMode = "none"
    format: QuantFormat = "qdq"
    per_channel: bool = True
    activation_type: QuantType = "uint8"
    weight_type: QuantType = "int8"
    calibration: Calibration = "minmax"
    calibration_samples: int = Field(default=256, ge=1, le=100_000, description="cap on samples streamed")
    percentile: float = Field(default=99.999, gt=50, le=100)
    reduce_range: bool = False
    exclude_top_k: int = Field(
        default=0, ge=0, le=64, description="keep in float the k nodes with the worst activation SQNR"
    )
    op_types: list[str] | None = Field(default=None, description="op types to quantize (default: all supported)")
    keep_float: list[Literal["first", "last"]] = Field(
        default_factory=list,
        description="keep the first / last weight-bearing node (Conv, MatMul, Gemm, LSTM...) in float (static only)",
    )
    mixed_precision: bool = Field(
        default=False,
        description="static QDQ only: search the fewest nodes to keep in float for the quality gates to pass "
        "(the profile's mixed_precision settings; packager.passes.mixed)",
    )
    int4_block_size: int = Field(default=32, ge=16, le=256)
    keep_io_types: bool = True


class RecipeSpec(_Strict):
    """One rung of the ladder. ``name`` of a built-in recipe, or a full definition."""

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9_.+-]{0,63}$")
    precision: Precision
    quantization: QuantizationSpec = QuantizationSpec()
    prune: bool = Field(default=True, description="apply the profile's pruning settings in this recipe")
    description: str = ""


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
            name="int8-qdq-mixed",
            precision="int8",
            quantization=_Q(mode="static", format="qdq", per_channel=True, calibration="minmax", mixed_precision=True),
            description="as int8-qdq, keeping in float the fewest nodes (ranked by sensitivity, searched within the "
            "profile's mixed_precision budget) that make the quality gates pass",
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
    """A ladder entry as a full recipe: a definition as it is, a name from :data:`BUILTIN_RECIPES`.

    Raises:
        ProfileError: an unknown recipe name (the message lists the built-in ones).
    """
    if isinstance(entry, RecipeSpec):
        return entry
    try:
        return BUILTIN_RECIPES[entry]
    except KeyError:
        raise ProfileError(f"unknown recipe {entry!r} (built-in: {', '.join(BUILTIN_RECIPES)})") from None
