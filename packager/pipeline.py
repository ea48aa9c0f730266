"""The passes of one ladder attempt: a profile's constraints applied to one recipe.

Above both the passes (which know only their own configs) and the profile schema, so neither
depends on the other.
"""

from __future__ import annotations

from typing import Any

from packager.passes.base import Pass
from packager.passes.check import OpSupportCheck, OpSupportConfig
from packager.passes.graph import Finalize, FinalizeConfig
from packager.passes.prune import MagnitudePrune, MagnitudePruneConfig
from packager.passes.quantize import DynamicQuantize, DynamicQuantizeConfig, StaticQuantize, StaticQuantizeConfig
from packager.passes.weights import ConvertFp16, Fp16Config, Int4WeightOnly, Int4WeightOnlyConfig
from packager.profiles import HardwareProfile
from packager.recipes import RecipeSpec


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
